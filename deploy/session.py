"""One AWS session for every deploy step, checked up front: credentials, region, role, instance type.

The checks run before anything is created, so a mistake costs an error message, not a half-made
endpoint. boto3 honours AWS_ENDPOINT_URL, which is how the tests point every client at moto.
"""

from __future__ import annotations

import contextlib
import difflib
import functools
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import boto3
import botocore.exceptions as bce
from botocore.config import Config

from deploy.errors import ROLE_HELP, DeployError, explain

SAGEMAKER_PRINCIPAL = "sagemaker.amazonaws.com"
# Retries with backoff for throttling; the waits of the deploy steps are ours, not botocore's.
CLIENT_CONFIG = Config(retries={"max_attempts": 5, "mode": "standard"}, user_agent_extra="sagemaker-llm-serve")


@contextlib.contextmanager
def step(what: str) -> Iterator[None]:
    """Run one deploy step; an AWS failure we can explain becomes a DeployError naming the step."""
    try:
        yield
    except Exception as exc:
        explained = explain(exc, what)
        if explained is None or explained is exc:
            raise
        raise explained from exc


def known_regions(session: boto3.Session) -> list[str]:
    """Every region in which botocore's bundled endpoint data offers SageMaker (no network call)."""
    regions: set[str] = set()
    for partition in session.get_available_partitions():
        regions.update(session.get_available_regions("sagemaker", partition_name=partition))
    return sorted(regions)


def check_region(session: boto3.Session, region: str | None) -> str:
    """The region to use; DeployError when none is set or SageMaker is not offered there."""
    if not region:
        raise DeployError("no AWS region set; pass --region or set AWS_REGION (e.g. us-east-1)")
    regions = known_regions(session)
    if region not in regions:
        close = difflib.get_close_matches(region, regions, n=3)
        hint = f"; did you mean {', '.join(close)}?" if close else ""
        raise DeployError(f"region {region!r} is not a SageMaker region{hint}")
    return region


def check_instance_type(instance_type: str) -> str:
    """DeployError when SageMaker hosting has no such instance type (botocore's enum, offline)."""
    model = boto3.session.Session()._session.get_service_model("sagemaker")
    allowed = model.shape_for("ProductionVariantInstanceType").enum
    if instance_type not in allowed:
        close = difflib.get_close_matches(instance_type, allowed, n=3)
        hint = f"; did you mean {', '.join(close)}?" if close else ""
        raise DeployError(f"instance type {instance_type!r} is not a SageMaker hosting instance type{hint}")
    return instance_type


@dataclass
class Aws:
    """A checked boto3 session plus the account it acts in."""

    session: boto3.Session
    region: str
    _clients: dict[str, Any] = field(default_factory=dict, repr=False)

    def client(self, service: str) -> Any:
        """A cached boto3 client for `service` in this session's region."""
        if service not in self._clients:
            self._clients[service] = self.session.client(service, region_name=self.region, config=CLIENT_CONFIG)
        return self._clients[service]

    @functools.cached_property
    def account_id(self) -> str:
        """The caller's account id (also proves the credentials work)."""
        with step("check AWS credentials"):
            return self.client("sts").get_caller_identity()["Account"]


def connect(region: str | None = None, profile: str | None = None) -> Aws:
    """Open a session and check region and credentials before any resource is touched."""
    with step("open AWS session"):
        session = boto3.Session(profile_name=profile, region_name=region)
    # botocore reads AWS_DEFAULT_REGION; AWS_REGION is what the other AWS SDKs and the docs use.
    region = check_region(session, region or session.region_name or os.environ.get("AWS_REGION"))
    if session.get_credentials() is None:
        raise explain(bce.NoCredentialsError(), "open AWS session")
    aws = Aws(session=session, region=region)
    _ = aws.account_id
    return aws


def _trusts_sagemaker(policy: Any) -> bool:
    for statement in (policy or {}).get("Statement", []):
        principal = statement.get("Principal", {})
        services = principal.get("Service", []) if isinstance(principal, dict) else []
        services = [services] if isinstance(services, str) else services
        if statement.get("Effect") == "Allow" and SAGEMAKER_PRINCIPAL in services:
            return True
    return False


def resolve_role(aws: Aws, role: str | None) -> str:
    """The ARN of an existing role SageMaker may assume, from a role name or ARN."""
    if not role:
        raise DeployError(f"no execution role given; {ROLE_HELP}")
    name = role.rsplit("/", 1)[-1]
    try:
        found = aws.client("iam").get_role(RoleName=name)["Role"]
    except bce.ClientError as exc:
        code = exc.response.get("Error", {}).get("Code")
        if code == "NoSuchEntity":
            raise DeployError(f"IAM role {name!r} does not exist in account {aws.account_id}; {ROLE_HELP}") from exc
        if code in {"AccessDenied", "AccessDeniedException"} and role.startswith("arn:"):
            return role  # may not read IAM; SageMaker itself will judge the ARN
        raise (explain(exc, f"look up IAM role {name}") or exc) from exc
    if not _trusts_sagemaker(found.get("AssumeRolePolicyDocument")):
        raise DeployError(f"IAM role {name!r} does not let {SAGEMAKER_PRINCIPAL} assume it; {ROLE_HELP}")
    return found["Arn"]
