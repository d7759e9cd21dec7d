"""Wire models of structured output and tool calling, shared by chat, completions and generate.

Requests: `response_format` (OpenAI's and TGI's dialects), generate's `parameters.grammar`, `tools`,
`tool_choice`, `parallel_tool_calls` and TGI's `tool_prompt` (`StructuredFields` gathers them for a
request model to inherit). Answers: OpenAI's `tool_calls` and their streamed deltas.

The models only parse shapes, leniently (unknown keys ignored, as OpenAI's server does). What the
values mean, and the 422s for meanings that cannot be served, are in serve/structured/.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import AliasChoices, BaseModel, ConfigDict, Field


class _Lenient(BaseModel):
    model_config = ConfigDict(extra="ignore", populate_by_name=True)


class JsonSchemaFormat(_Lenient):
    """OpenAI's `response_format.json_schema`."""

    name: str | None = None
    description: str | None = None
    schema_: Any = Field(default=None, alias="schema")
    strict: bool | None = None


class ResponseFormat(_Lenient):
    """OpenAI: `type` text | json_object | json_schema (+ `json_schema`); TGI: json | json_object |
    json_schema | regex with `value` (a schema, a JSON string holding one, or a pattern)."""

    type: str
    json_schema: JsonSchemaFormat | None = None
    value: Any = None


class GrammarParam(_Lenient):
    """Generate's `parameters.grammar` (TGI): `{"type": "json" | "regex", "value": ...}`."""

    type: str
    value: Any = None


class FunctionDefinition(_Lenient):
    """A callable function; TGI also spells `parameters` as `arguments`."""

    name: str
    description: str | None = None
    parameters: dict[str, Any] | None = Field(default=None, validation_alias=AliasChoices("parameters", "arguments"))
    strict: bool | None = None


class Tool(_Lenient):
    """One entry of `tools`."""

    type: str = "function"
    function: FunctionDefinition


class FunctionName(_Lenient):
    name: str


class NamedToolChoice(_Lenient):
    """`{"type": "function", "function": {"name": ...}}`."""

    type: str = "function"
    function: FunctionName


# "none" | "auto" | "required" | TGI's bare function name | a named choice.
ToolChoice = str | NamedToolChoice


class StructuredFields(_Lenient):
    """The request fields of this module, for chat and completions request models to inherit."""

    response_format: ResponseFormat | None = None
    tools: list[Tool] | None = None
    tool_choice: ToolChoice | None = None
    parallel_tool_calls: bool = True
    tool_prompt: str | None = None


class FunctionCall(BaseModel):
    """`tool_calls[].function` of an answer: `arguments` is a JSON string, as OpenAI sends it."""

    name: str
    arguments: str


class ToolCall(BaseModel):
    """One element of `message.tool_calls`."""

    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class FunctionCallDelta(BaseModel):
    name: str | None = None
    arguments: str | None = None


class ToolCallDelta(BaseModel):
    """One element of a streamed `delta.tool_calls`: the first for a call carries `id`, `type` and
    the name with `"arguments": ""`, the next ones argument fragments only."""

    index: int
    id: str | None = None
    type: Literal["function"] | None = None
    function: FunctionCallDelta

    def wire(self) -> dict[str, Any]:
        """The JSON form: absent fields left out (OpenAI's chunks omit them)."""
        return self.model_dump(exclude_none=True)
