"""`tools` + `tool_choice` -> a ToolPlan: which tools, which grammar, which finish reason.

The output format of a call is one block per call, JSON compact, name first (so a stream can name
the function before its arguments are generated):

    <tool_call>{"name":"get_weather","arguments":{"city":"Paris"}}</tool_call>

(an optional newline is allowed inside the tags, as Hermes/Qwen-style models write them, and calls
are separated by a newline). The grammar per `tool_choice`:

- `required`: one or more calls (one only when `parallel_tool_calls` is false);
- a named function (OpenAI's object or TGI's bare name): exactly one call of that function;
- `auto` (the default with tools): ONE generation in which the grammar allows either free text
  that does not open with `<tool_call>`, or calls as under `required`; the model picks;
- `none`: no tools at all (neither in the prompt nor in the grammar).

Each call's `arguments` are constrained by that tool's `parameters` schema, compiled as its own
document so its `$ref`s resolve as the client wrote them.
"""

from __future__ import annotations

import enum
import json
import re
from dataclasses import dataclass
from typing import Any

from serve.engine.grammar import COMPACT_JSON, Constraint
from serve.protocol.structured import NamedToolChoice, ResponseFormat, Tool, ToolChoice
from serve.structured import StructuredRequestError

OPEN_TAG, CLOSE_TAG = "<tool_call>", "</tool_call>"
MAX_PARALLEL_CALLS = 8  # bounds the calls of one answer, so a model cannot loop on calls forever
NAME_PATTERN = re.compile(r"^[a-zA-Z0-9_-]{1,64}$")  # OpenAI's rule for function names
NO_PARAMETERS: dict[str, Any] = {"type": "object", "properties": {}, "additionalProperties": False}


class ToolMode(str, enum.Enum):
    AUTO = "auto"
    REQUIRED = "required"
    NAMED = "named"


@dataclass(frozen=True)
class ToolPlan:
    """How one request uses its tools."""

    mode: ToolMode
    tools: list[Tool]  # the tools offered to the model (the named one only, for NAMED)
    parallel: bool
    constraint: Constraint

    @property
    def finish_reason(self) -> str:
        """OpenAI's reason when the answer holds calls: `stop` for a named function."""
        return "stop" if self.mode is ToolMode.NAMED else "tool_calls"


def plan_tools(tools: list[Tool] | None, tool_choice: ToolChoice | None, parallel_tool_calls: bool = True,
               response_format: ResponseFormat | None = None) -> ToolPlan | None:
    """The plan for a request's tool fields; None when no tool is in play. 422s as StructuredRequestError."""
    choice = _choice(tool_choice)
    if not tools:
        if choice not in (None, "none", "auto"):
            raise StructuredRequestError("`tool_choice` needs `tools`", "tool_choice")
        return None
    if choice == "none":
        return None
    _check_tools(tools)
    if response_format is not None and response_format.type != "text":
        raise StructuredRequestError(
            "`tools` and `response_format` cannot be used together; send one of them", "response_format"
        )
    if choice in (None, "auto"):
        mode, offered = ToolMode.AUTO, tools
    elif choice == "required":
        mode, offered = ToolMode.REQUIRED, tools
    else:
        mode, offered = ToolMode.NAMED, [_find(tools, choice)]
    parallel = parallel_tool_calls and mode is not ToolMode.NAMED
    return ToolPlan(mode, offered, parallel, Constraint.lark(tool_grammar(offered, mode, parallel)))


def _choice(tool_choice: ToolChoice | None) -> str | None:
    """"none" | "auto" | "required" | a function name | None."""
    if isinstance(tool_choice, NamedToolChoice):
        if tool_choice.type != "function":
            raise StructuredRequestError(
                f"`tool_choice.type` must be `function`; got `{tool_choice.type}`", "tool_choice.type"
            )
        return tool_choice.function.name
    return tool_choice


def _check_tools(tools: list[Tool]) -> None:
    seen: set[str] = set()
    for i, tool in enumerate(tools):
        if tool.type != "function":
            raise StructuredRequestError(f"`tools[{i}].type` must be `function`; got `{tool.type}`", f"tools[{i}].type")
        name = tool.function.name
        if not NAME_PATTERN.match(name):
            raise StructuredRequestError(
                f"`tools[{i}].function.name` must be 1-64 letters, digits, `_` or `-`; got {name!r}",
                f"tools[{i}].function.name",
            )
        if name in seen:
            raise StructuredRequestError(f"two tools are named `{name}`", f"tools[{i}].function.name")
        seen.add(name)


def _find(tools: list[Tool], name: str) -> Tool:
    for tool in tools:
        if tool.function.name == name:
            return tool
    known = ", ".join(t.function.name for t in tools)
    raise StructuredRequestError(f"`tool_choice` names `{name}`, which is not in `tools` ({known})", "tool_choice")


def parameters_of(tool: Tool) -> dict[str, Any]:
    """The JSON Schema of a tool's arguments (no parameters: an empty object)."""
    return tool.function.parameters if tool.function.parameters is not None else NO_PARAMETERS


def tool_grammar(tools: list[Tool], mode: ToolMode, parallel: bool) -> str:
    """The Lark grammar (llguidance dialect) of an answer under `mode`."""
    calls = f'call ("\\n" call){{0,{MAX_PARALLEL_CALLS - 1}}}' if parallel else "call"
    lines = [
        "start: TEXT | calls" if mode is ToolMode.AUTO else "start: calls",
        # Free text: anything that does not open (after blanks) with the call tag.
        f"TEXT: /(?s:.*)/ & ~/(?s:[ \\t\\r\\n]*{re.escape(OPEN_TAG)}.*)/",
        f"calls: {calls}",
        f'call: {_lark(OPEN_TAG)} "\\n"? body "\\n"? {_lark(CLOSE_TAG)}',
        "body: " + " | ".join(f"fn{i}" for i in range(len(tools))),
    ]
    for i, tool in enumerate(tools):
        head = '{"name":' + json.dumps(tool.function.name) + ',"arguments":'
        lines.append(f'fn{i}: {_lark(head)} args{i} "}}"')
        lines.append(f"args{i}: %json {json.dumps({**parameters_of(tool), 'x-guidance': COMPACT_JSON})}")
    if mode is not ToolMode.AUTO:
        lines.pop(1)  # no free text
    return "\n".join(lines) + "\n"


def _lark(text: str) -> str:
    """A Lark string literal (JSON's escaping is Lark's for these ASCII texts)."""
    return json.dumps(text)
