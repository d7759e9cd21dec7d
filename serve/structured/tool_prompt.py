"""The messages a chat template renders when tools are offered or were used in the conversation.

A template that declares `tools` (Qwen, Hermes, Llama 3.1, Mistral...) gets them passed in, and the
history as transformers' templates expect it (assistant `tool_calls` with `arguments` as an object,
`role: "tool"` messages). A template that does not (SmolLM2's) gets plain text it can render:

- a system message listing the tools and saying the exact output format (`tool_prompt`, TGI's
  field, leads it when given);
- assistant tool calls written as the `<tool_call>` blocks the grammar produces, so the model sees
  its own format in the history;
- tool results as a user message of `<tool_response>` blocks (consecutive results merged into one,
  so templates that insist on alternating roles still render).

Messages are the wire's dicts (`role`, `content` as text or None, `tool_calls`, `tool_call_id`, `name`).
"""

from __future__ import annotations

import functools
import json
import re
from typing import Any

import jinja2
from jinja2 import meta

from serve.protocol.structured import Tool
from serve.structured.tools import CLOSE_TAG, OPEN_TAG, ToolMode, ToolPlan, parameters_of

Message = dict[str, Any]


@functools.lru_cache(maxsize=8)
def template_declares_tools(template: str | None) -> bool:
    """True when the chat template reads a `tools` variable (then it renders tools itself).

    Cached: every chat request asks, and a server has one template (parsing it costs ~1 ms of hub time)."""
    if not template:
        return False
    try:
        env = jinja2.Environment(extensions=["jinja2.ext.loopcontrols", "jinja2.ext.do"])
        return "tools" in meta.find_undeclared_variables(env.parse(template))
    except jinja2.TemplateSyntaxError:  # transformers' own tags (e.g. {% generation %}): look at the text
        return re.search(r"\btools\b", template) is not None


def tool_messages(messages: list[Message], plan: ToolPlan | None, template: str | None,
                  tool_prompt: str | None = None) -> tuple[list[Message], list[dict[str, Any]] | None]:
    """(messages, tools) to pass to `apply_chat_template`; tools is None unless the template takes them."""
    native = template_declares_tools(template)
    rendered = [_native(m) for m in messages] if native else _as_text(messages)
    if plan is None:
        return rendered, None
    tools = [_definition(t) for t in plan.tools] if native else None
    # A native template that already speaks our <tool_call> format needs no format instructions.
    if not native or tool_prompt or OPEN_TAG not in (template or ""):
        rendered = _with_system(rendered, instructions(plan, tool_prompt, list_tools=not native))
    return rendered, tools


def instructions(plan: ToolPlan, tool_prompt: str | None, list_tools: bool = True) -> str:
    """The system text: tools, exact format, what the tool choice asks."""
    parts = [tool_prompt] if tool_prompt else []
    if list_tools:
        listing = "\n".join(json.dumps(_definition(t), ensure_ascii=False) for t in plan.tools)
        parts.append(f"You can call these functions (their arguments follow the JSON Schema in `parameters`):\n"
                     f"<tools>\n{listing}\n</tools>")
    parts.append(f"To call a function, write {OPEN_TAG}{CLOSE_TAG} tags around a JSON object with the function's "
                 f'name and arguments, exactly like this:\n{OPEN_TAG}{{"name":"function_name","arguments":'
                 f'{{"argument":"value"}}}}{CLOSE_TAG}')
    parts.append(_mode_line(plan))
    return "\n\n".join(parts)


def _mode_line(plan: ToolPlan) -> str:
    if plan.mode is ToolMode.NAMED:
        return f"You must call the function `{plan.tools[0].function.name}`, once."
    several = "For several calls, write one block per line." if plan.parallel else "Call one function at most."
    if plan.mode is ToolMode.REQUIRED:
        return f"You must call a function. {several}"
    return ("Call a function only when it helps to answer; otherwise answer the user in plain text, "
            f"without any {OPEN_TAG} tag. {several}")


def _definition(tool: Tool) -> dict[str, Any]:
    fn: dict[str, Any] = {"name": tool.function.name}
    if tool.function.description:
        fn["description"] = tool.function.description
    fn["parameters"] = parameters_of(tool)
    return {"type": "function", "function": fn}


def call_text(name: str, arguments: Any) -> str:
    """One call as the grammar writes it; `arguments` is the wire's JSON string (or an object)."""
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments)
        except json.JSONDecodeError:
            pass  # kept as the string the client sent
    body = json.dumps({"name": name, "arguments": arguments}, separators=(",", ":"), ensure_ascii=False)
    return f"{OPEN_TAG}{body}{CLOSE_TAG}"


def _native(message: Message) -> Message:
    """The message as transformers' tool-aware templates expect it (arguments as objects)."""
    out = {k: v for k, v in message.items() if v is not None}
    out["content"] = message.get("content") or ""
    if message.get("tool_calls"):
        calls = []
        for call in message["tool_calls"]:
            fn = dict(call["function"])
            if isinstance(fn.get("arguments"), str):
                try:
                    fn["arguments"] = json.loads(fn["arguments"])
                except json.JSONDecodeError:
                    pass
            calls.append({**call, "function": fn})
        out["tool_calls"] = calls
    return out


def _as_text(messages: list[Message]) -> list[Message]:
    """Tool calls and results as plain text, for templates that know only role and content."""
    out: list[Message] = []
    names: dict[str, str] = {}  # tool_call_id -> function name
    merge_results = False  # True while the last message is a user message made of tool results
    for m in messages:
        role, content = m["role"], m.get("content") or ""
        if role == "assistant" and m.get("tool_calls"):
            blocks = []
            for call in m["tool_calls"]:
                names[call.get("id", "")] = call["function"]["name"]
                blocks.append(call_text(call["function"]["name"], call["function"].get("arguments", "{}")))
            out.append({"role": "assistant", "content": "\n".join(([content] if content else []) + blocks)})
        elif role == "tool":
            result = {"name": m.get("name") or names.get(m.get("tool_call_id") or "", ""), "content": content}
            block = f"<tool_response>{json.dumps(result, ensure_ascii=False)}</tool_response>"
            if merge_results:
                out[-1]["content"] += "\n" + block
            else:
                out.append({"role": "user", "content": block})
            merge_results = True
            continue
        else:
            out.append({"role": role, "content": content})
        merge_results = False
    return out


def _with_system(messages: list[Message], text: str) -> list[Message]:
    """`text` appended to the leading system message, or a new one in front."""
    if messages and messages[0]["role"] in ("system", "developer"):
        first = messages[0]
        joined = f"{first['content']}\n\n{text}" if first.get("content") else text
        return [{**first, "content": joined}, *messages[1:]]
    return [{"role": "system", "content": text}, *messages]
