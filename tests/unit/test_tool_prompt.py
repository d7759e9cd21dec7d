"""Prompts with tools: SmolLM2's template (no tool support) and a template that declares `tools`."""

from __future__ import annotations

import json

import pytest

from serve.protocol.structured import StructuredFields
from serve.structured.tool_prompt import template_declares_tools, tool_messages
from serve.structured.tools import plan_tools

WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "Current weather of a city",
                                            "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                                                           "required": ["city"]}}}
SEARCH = {"type": "function", "function": {"name": "search", "parameters": {"type": "object"}}}
HISTORY = [
    {"role": "user", "content": "Weather in Paris and in Rome?"},
    {"role": "assistant", "content": None, "tool_calls": [
        {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}},
        {"id": "call_2", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Rome"}'}},
    ]},
    {"role": "tool", "tool_call_id": "call_1", "content": "22C, sunny"},
    {"role": "tool", "tool_call_id": "call_2", "content": "25C"},
]
# A template in the style of tool-aware ones (Llama 3.1, Mistral): reads `tools`, renders
# `tool_calls` with their arguments as objects, and has a `tool` role.
TOOL_TEMPLATE = (
    "{%- if tools %}[TOOLS]{% for t in tools %} {{ t.function.name }}{% endfor %}[/TOOLS]{% endif %}"
    "{%- for m in messages %}"
    "{%- if m.role == 'assistant' and m.tool_calls %}[CALLS]{% for c in m.tool_calls %}"
    "{{ c.function.name }}{{ c.function.arguments | tojson }};{% endfor %}[/CALLS]"
    "{%- elif m.role == 'tool' %}[RESULT {{ m.tool_call_id }}]{{ m.content }}[/RESULT]"
    "{%- else %}[{{ m.role }}]{{ m.content }}{% endif %}"
    "{%- endfor %}{%- if add_generation_prompt %}[assistant]{% endif %}"
)


def plan_for(body):
    f = StructuredFields.model_validate(body)
    return plan_tools(f.tools, f.tool_choice, f.parallel_tool_calls)


def render(tokenizer, messages, tools, template=None):
    return tokenizer.apply_chat_template(messages, tools=tools, chat_template=template, add_generation_prompt=True,
                                         tokenize=False)


def test_template_detection(tokenizer):
    assert not template_declares_tools(tokenizer.chat_template)  # SmolLM2's
    assert template_declares_tools(TOOL_TEMPLATE)
    assert template_declares_tools("{% generation %}{{ tools }}{% endgeneration %}")  # transformers' own tag
    assert not template_declares_tools(None)


def test_smollm2_gets_a_system_message_and_text_history(tokenizer):
    plan = plan_for({"tools": [WEATHER, SEARCH], "tool_prompt": "Use the tools wisely."})
    messages, tools = tool_messages(HISTORY, plan, tokenizer.chat_template, "Use the tools wisely.")
    assert tools is None
    prompt = render(tokenizer, messages, tools)
    system = prompt.split("<|im_end|>")[0]
    assert system.startswith("<|im_start|>system\nUse the tools wisely.")
    assert json.dumps(WEATHER) in system  # the full definition
    assert '<tool_call>{"name":"function_name","arguments":{"argument":"value"}}</tool_call>' in system
    assert "otherwise answer the user in plain text" in system
    assert "SmolLM" not in prompt  # our system message replaced the template's default one
    calls = ('<tool_call>{"name":"get_weather","arguments":{"city":"Paris"}}</tool_call>\n'
             '<tool_call>{"name":"get_weather","arguments":{"city":"Rome"}}</tool_call>')
    assert f"<|im_start|>assistant\n{calls}<|im_end|>" in prompt
    results = ('<tool_response>{"name": "get_weather", "content": "22C, sunny"}</tool_response>\n'
               '<tool_response>{"name": "get_weather", "content": "25C"}</tool_response>')
    assert f"<|im_start|>user\n{results}<|im_end|>" in prompt  # both results in one user turn
    assert prompt.endswith("<|im_start|>assistant\n")


def test_an_existing_system_message_is_kept_first(tokenizer):
    plan = plan_for({"tools": [WEATHER], "tool_choice": "get_weather"})
    messages, _ = tool_messages([{"role": "system", "content": "Be brief."}, *HISTORY[:1]], plan,
                                tokenizer.chat_template)
    assert [m["role"] for m in messages] == ["system", "user"]
    assert messages[0]["content"].startswith("Be brief.\n\n")
    assert "You must call the function `get_weather`, once." in messages[0]["content"]


@pytest.mark.parametrize("body, line", [
    ({"tool_choice": "required"}, "You must call a function. For several calls, write one block per line."),
    ({"tool_choice": "required", "parallel_tool_calls": False}, "You must call a function. Call one function at most."),
])
def test_mode_lines(tokenizer, body, line):
    messages, _ = tool_messages(HISTORY[:1], plan_for({"tools": [WEATHER], **body}), tokenizer.chat_template)
    assert messages[0]["content"].endswith(line)


def test_history_without_tools_in_play_still_renders_as_text(tokenizer):
    messages, tools = tool_messages(HISTORY, None, tokenizer.chat_template)
    assert tools is None and [m["role"] for m in messages] == ["user", "assistant", "user"]
    assert "<tool_call>" not in messages[0]["content"]
    render(tokenizer, messages, tools)


def test_a_template_that_declares_tools_gets_them(tokenizer):
    plan = plan_for({"tools": [WEATHER, SEARCH]})
    messages, tools = tool_messages(HISTORY, plan, TOOL_TEMPLATE)
    assert [t["function"]["name"] for t in tools] == ["get_weather", "search"]
    prompt = render(tokenizer, messages, tools, TOOL_TEMPLATE)
    assert "[TOOLS] get_weather search[/TOOLS]" in prompt
    assert '[CALLS]get_weather{"city": "Paris"};get_weather{"city": "Rome"};[/CALLS]' in prompt  # objects, not strings
    assert "[RESULT call_1]22C, sunny[/RESULT][RESULT call_2]25C[/RESULT]" in prompt
    # Its own call format differs from ours, so the output format is said once; the tools are not listed again.
    assert "<tool_call>{" in prompt and "<tools>" not in prompt


def test_a_template_that_speaks_our_format_gets_no_extra_text():
    template = TOOL_TEMPLATE.replace("[CALLS]", "<tool_call>")
    messages, tools = tool_messages(HISTORY[:1], plan_for({"tools": [WEATHER]}), template)
    assert messages == HISTORY[:1] and tools is not None
