"""moto 5.2's IAM taught SimulatePrincipalPolicy (moto answers 500), for a role's own policies.

The SageMaker SDK v3 checks an execution role with it before deploying (`resolve_and_validate_role`),
and the tests ask it whether the role `python -m deploy role` makes allows what an endpoint does and
nothing beyond. Evaluated as IAM does for one principal: an explicit Deny wins, then any Allow; a
statement applies when its Action/NotAction and Resource/NotResource patterns match and each of its
conditions holds for the given ContextEntries (a key that is not given fails the condition, as it
would in a request that lacks it). Operators: String(Not)Equals, StringLike, Bool, ArnLike.
"""

from __future__ import annotations

import fnmatch
import json
from typing import Any
from urllib.parse import unquote

from moto.core.responses import ActionResult
from moto.iam.responses import IamResponse


def _listed(value: Any) -> list[str]:
    return [value] if isinstance(value, str) else list(value or [])


def _like(pattern: str, value: str, case: bool = True) -> bool:
    return fnmatch.fnmatchcase(value, pattern) if case else fnmatch.fnmatchcase(value.lower(), pattern.lower())


def _condition_holds(condition: dict[str, dict[str, Any]], context: dict[str, list[str]]) -> bool:
    for operator, tests in condition.items():
        for key, wanted in tests.items():
            given = context.get(key.lower())
            if given is None:
                return False
            wanted = _listed(wanted)
            if operator in ("StringEquals", "Bool"):
                ok = any(g.lower() == w.lower() if operator == "Bool" else g == w for g in given for w in wanted)
            elif operator == "StringNotEquals":
                ok = all(g != w for g in given for w in wanted)
            elif operator in ("StringLike", "ArnLike"):
                ok = any(_like(w, g) for g in given for w in wanted)
            else:
                raise NotImplementedError(f"condition operator {operator} is not simulated here")
            if not ok:
                return False
    return True


def _applies(statement: dict[str, Any], action: str, resource: str, context: dict[str, list[str]]) -> bool:
    if "Action" in statement and not any(_like(p, action, case=False) for p in _listed(statement["Action"])):
        return False
    if "NotAction" in statement and any(_like(p, action, case=False) for p in _listed(statement["NotAction"])):
        return False
    if "Resource" in statement and not any(_like(p, resource) for p in _listed(statement["Resource"])):
        return False
    if "NotResource" in statement and any(_like(p, resource) for p in _listed(statement["NotResource"])):
        return False
    return _condition_holds(statement.get("Condition", {}), context)


def decide(documents: list[dict[str, Any]], action: str, resource: str, context: dict[str, list[str]]) -> str:
    """`allowed`, `explicitDeny` or `implicitDeny` for one action on one resource."""
    statements = [s for doc in documents for s in _listed_statements(doc)]
    matching = [s for s in statements if _applies(s, action, resource, context)]
    if any(s.get("Effect") == "Deny" for s in matching):
        return "explicitDeny"
    return "allowed" if any(s.get("Effect") == "Allow" for s in matching) else "implicitDeny"


def _listed_statements(doc: dict[str, Any]) -> list[dict[str, Any]]:
    statement = doc.get("Statement", [])
    return [statement] if isinstance(statement, dict) else statement


def _documents(response: IamResponse, role_arn: str) -> list[dict[str, Any]]:
    role = response.backend.get_role_by_arn(role_arn)
    docs = [json.loads(unquote(text)) for text in role.policies.values()]
    for policy in role.managed_policies.values():
        version = next(v for v in policy.versions if v.is_default_version)
        docs.append(json.loads(unquote(version.document)))
    return docs


def _simulate_principal_policy(self: IamResponse) -> ActionResult:
    params = self._get_params()
    documents = _documents(self, params["PolicySourceArn"])
    context = {e["ContextKeyName"].lower(): _listed(e.get("ContextKeyValues")) for e in params.get("ContextEntries", [])}
    results = []
    for action in params.get("ActionNames", []):
        for resource in params.get("ResourceArns") or ["*"]:
            results.append({"EvalActionName": action, "EvalResourceName": resource,
                            "EvalDecision": decide(documents, action, resource, context)})
    return ActionResult({"EvaluationResults": results, "IsTruncated": False})


def install() -> None:
    """Add SimulatePrincipalPolicy to moto's IAM responses (idempotent)."""
    IamResponse.simulate_principal_policy = _simulate_principal_policy
