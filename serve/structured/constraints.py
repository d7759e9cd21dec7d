"""`response_format` (chat, legacy completions) and `parameters.grammar` (generate) -> a Constraint.

OpenAI's dialect: `{"type": "text"}` (no constraint), `{"type": "json_object"}` (any JSON object),
`{"type": "json_schema", "json_schema": {"name", "schema", "strict", "description"}}`.
TGI's dialect: `{"type": "json" | "json_object" | "json_schema" | "regex", "value": ...}` where the
value is a schema, a JSON string holding one, `{"name", "schema"}` (TGI's json_schema), or a pattern.
The schema is always enforced (as OpenAI's `strict: true`), whatever `strict` says.
"""

from __future__ import annotations

import json
from typing import Any

from serve.engine.grammar import Constraint
from serve.protocol.structured import GrammarParam, ResponseFormat
from serve.structured import StructuredRequestError

RESPONSE_FORMAT_TYPES = ("text", "json_object", "json_schema", "json", "regex")
GRAMMAR_TYPES = ("json", "json_object", "json_schema", "regex")


def response_format_constraint(fmt: ResponseFormat | None, field: str = "response_format") -> Constraint | None:
    """The constraint a chat or completions `response_format` asks for; None for free text."""
    if fmt is None or fmt.type == "text":
        return None
    if fmt.type not in RESPONSE_FORMAT_TYPES:
        raise StructuredRequestError(
            f"`{field}.type` must be one of {', '.join(RESPONSE_FORMAT_TYPES)}; got `{fmt.type}`", f"{field}.type"
        )
    if fmt.type == "json_schema" and fmt.json_schema is not None:  # OpenAI's form
        schema = fmt.json_schema.schema_
        if schema is None:  # OpenAI lets `schema` be omitted: any JSON object then
            return Constraint.json_object()
        return Constraint.json_schema(_schema(schema, f"{field}.json_schema.schema"))
    if fmt.type == "json_schema" and fmt.value is None:
        raise StructuredRequestError(f"`{field}.json_schema` is required for type `json_schema`", f"{field}.json_schema")
    return _tgi_constraint(fmt.type, fmt.value, field)


def grammar_constraint(grammar: GrammarParam | None, field: str = "parameters.grammar") -> Constraint | None:
    """The constraint of generate's `parameters.grammar`; None when absent."""
    if grammar is None:
        return None
    if grammar.type not in GRAMMAR_TYPES:
        raise StructuredRequestError(
            f"`{field}.type` must be one of {', '.join(GRAMMAR_TYPES)}; got `{grammar.type}`", f"{field}.type"
        )
    return _tgi_constraint(grammar.type, grammar.value, field)


def _tgi_constraint(kind: str, value: Any, field: str) -> Constraint:
    where = f"{field}.value"
    if kind == "regex":
        if not isinstance(value, str) or not value:
            raise StructuredRequestError(f"`{where}` must be a non-empty regular expression string", where)
        return Constraint.regex(value)
    if value is None:
        if kind == "json_object":
            return Constraint.json_object()
        raise StructuredRequestError(f"`{where}` must hold a JSON Schema for type `{kind}`", where)
    schema = _schema(value, where)
    if kind == "json_schema" and isinstance(schema.get("schema"), (dict, str)):  # {"name", "schema"}
        schema = _schema(schema["schema"], f"{where}.schema")
    return Constraint.json_schema(schema)


def _schema(value: Any, field: str) -> dict[str, Any]:
    """A JSON Schema object, from a parsed value or from a JSON string holding one."""
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as exc:
            raise StructuredRequestError(f"`{field}` is a string but not valid JSON: {exc}", field) from exc
    if not isinstance(value, dict):
        raise StructuredRequestError(f"`{field}` must be a JSON Schema object; got {type(value).__name__}", field)
    return value
