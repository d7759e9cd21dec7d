"""Structured output and tool calling through the client libraries people use, against the real server.

openai (`parse`, tools round trip, streamed tool calls), LangChain (`bind_tools`, `with_structured_output`),
LlamaIndex (`OpenAILike.chat_with_tools`), huggingface_hub (`InferenceClient.chat_completion`),
text-generation (`Client.generate` with `grammar`), LiteLLM (`sagemaker_chat/`) and boto3 (`invoke_endpoint`).

SmolLM2-135M chooses tools badly, so the tests assert what the server guarantees, never the model's
judgement: the JSON parses and validates against the schema, the functions called are among those
offered, their arguments validate against the tool's `parameters`, the finish reason is right. Greedy
decoding keeps every answer reproducible; schemas are small and bounded (enums, `maxLength`, integer
ranges) so that no field can run on until `max_tokens`. The machine is slow and shared: every call
gets minutes, and the calls that go through the local SageMaker runtime (60 s per invocation, as the
service) are kept short.
"""

from __future__ import annotations

import json
import re
from typing import Any, Literal

import jsonschema
import openai
import pytest
from pydantic import BaseModel, Field

from deploy.openai_bridge import BASE_URL, async_container_http_client, container_http_client
from deploy.streaming import iter_sse_json
from tests.clients.conftest import CREDENTIALS, REGION, runtime_client

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900, func_only=True)]
TIMEOUT = 600  # seconds one call may take on a busy 2-core machine

WEATHER_PARAMS = {
    "type": "object",
    "properties": {
        "city": {"type": "string", "maxLength": 20, "description": "the city"},
        "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
    },
    "required": ["city", "unit"],
    "additionalProperties": False,
}
TIME_PARAMS = {
    "type": "object",
    "properties": {"city": {"type": "string", "maxLength": 20}},
    "required": ["city"],
    "additionalProperties": False,
}
TOOLS = [
    {"type": "function", "function": {"name": "get_weather", "description": "Current weather of a city",
                                      "parameters": WEATHER_PARAMS}},
    {"type": "function", "function": {"name": "get_time", "description": "Local time in a city",
                                      "parameters": TIME_PARAMS}},
]
PARAMS = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}
WEATHER_QUESTION = "What is the weather in Paris?"
CITY_SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 20},
        "country": {"type": "string", "enum": ["France", "Germany", "Italy", "Spain"]},
        "century": {"type": "integer", "minimum": 1, "maximum": 21},
    },
    "required": ["name", "country", "century"],
    "additionalProperties": False,
}


class City(BaseModel):
    """A city, its country and the century it was founded in."""

    name: str = Field(max_length=20)
    country: Literal["France", "Germany", "Italy", "Spain"]
    century: int = Field(ge=1, le=21)


class GetWeather(BaseModel):
    """Current weather of a city."""

    city: str = Field(max_length=20, description="the city")
    unit: Literal["celsius", "fahrenheit"]


def arguments_of(name: str, arguments: str | dict, params: dict[str, dict] = PARAMS) -> dict[str, Any]:
    """A call's arguments, checked: the function was offered and the arguments follow its schema."""
    assert name in params, f"called {name!r}, offered {sorted(params)}"
    args = json.loads(arguments) if isinstance(arguments, str) else arguments
    jsonschema.validate(args, params[name])
    return args


def check_final_answer(content: str | None, tool_calls: list | None, finish_reason: str) -> None:
    """The answer after a tool result (tool_choice auto): either text, or calls that follow their schemas."""
    if tool_calls:
        assert content is None and finish_reason == "tool_calls"
        for call in tool_calls:
            arguments_of(call.function.name, call.function.arguments)
    else:
        assert isinstance(content, str) and content.strip() and finish_reason in ("stop", "length")


def tool_result(args: dict[str, Any]) -> str:
    return json.dumps({"city": args.get("city"), "temperature": 18, "sky": "sunny"})


# -- openai ---------------------------------------------------------------------------------------------
@pytest.fixture
def oai_client(openai_server) -> openai.OpenAI:
    return openai.OpenAI(base_url=BASE_URL, api_key="unused", max_retries=0, timeout=TIMEOUT,
                         http_client=container_http_client(openai_server.url, timeout=TIMEOUT))


def test_openai_parse_pydantic_response_format(oai_client):
    out = oai_client.chat.completions.parse(model="smollm2", response_format=City, max_tokens=200, temperature=0,
                                            messages=[{"role": "user", "content": "Describe Paris as JSON."}])
    choice = out.choices[0]
    assert choice.finish_reason == "stop" and choice.message.refusal is None
    assert isinstance(choice.message.parsed, City)
    jsonschema.validate(json.loads(choice.message.content), City.model_json_schema())
    assert choice.message.parsed == City.model_validate_json(choice.message.content)


def test_openai_tools_round_trip(oai_client):
    messages: list[Any] = [{"role": "user", "content": WEATHER_QUESTION}]
    first = oai_client.chat.completions.create(model="smollm2", messages=messages, tools=TOOLS,
                                               tool_choice="required", parallel_tool_calls=False,
                                               max_tokens=200, temperature=0)
    choice = first.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    [call] = choice.message.tool_calls  # parallel_tool_calls=False: exactly one
    assert call.type == "function" and call.id.startswith("call_")
    args = arguments_of(call.function.name, call.function.arguments)
    # OpenAI's own recipe: the assistant message object goes back as it came, then one tool message per call.
    messages += [choice.message, {"role": "tool", "tool_call_id": call.id, "content": tool_result(args)}]
    final = oai_client.chat.completions.create(model="smollm2", messages=messages, tools=TOOLS, max_tokens=24,
                                               temperature=0)
    answer = final.choices[0]
    check_final_answer(answer.message.content, answer.message.tool_calls, answer.finish_reason)
    assert final.usage.prompt_tokens > first.usage.prompt_tokens  # the call and its result are in the prompt


def accumulate(stream) -> tuple[str, dict[int, dict[str, str]], str | None]:
    """(content, calls by index, finish_reason) from chat chunks, the way openai users fold deltas."""
    content, calls, finish = "", {}, None
    for chunk in stream:
        if not chunk.choices:
            continue
        choice = chunk.choices[0]
        content += choice.delta.content or ""
        for delta in choice.delta.tool_calls or []:
            call = calls.setdefault(delta.index, {"id": "", "name": "", "arguments": ""})
            if delta.id:  # the first delta of a call: id, type, name, empty arguments
                assert not call["id"] and delta.type == "function" and delta.function.arguments == ""
                call["id"] = delta.id
            if delta.function and delta.function.name:
                call["name"] += delta.function.name
            if delta.function and delta.function.arguments:
                call["arguments"] += delta.function.arguments
        finish = choice.finish_reason or finish
    return content, calls, finish


def test_openai_streamed_tool_calls_round_trip(oai_client):
    messages: list[dict[str, Any]] = [{"role": "user", "content": WEATHER_QUESTION}]
    stream = oai_client.chat.completions.create(model="smollm2", messages=messages, tools=TOOLS,
                                                tool_choice="required", parallel_tool_calls=False,
                                                max_tokens=200, temperature=0, stream=True)
    content, calls, finish = accumulate(stream)
    assert finish == "tool_calls" and content == "" and list(calls) == [0]
    call = calls[0]
    assert call["id"].startswith("call_")
    args = arguments_of(call["name"], call["arguments"])
    messages += [
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": call["id"], "type": "function", "function": {"name": call["name"], "arguments": call["arguments"]}}]},
        {"role": "tool", "tool_call_id": call["id"], "content": tool_result(args)},
    ]
    stream = oai_client.chat.completions.create(model="smollm2", messages=messages, tools=TOOLS, max_tokens=24,
                                                temperature=0, stream=True)
    content, calls, finish = accumulate(stream)
    if calls:
        assert finish == "tool_calls" and content == ""
        for c in calls.values():
            arguments_of(c["name"], c["arguments"])
    else:
        assert content.strip() and finish in ("stop", "length")


# -- LangChain ------------------------------------------------------------------------------------------
@pytest.fixture
def chat_openai(openai_server):
    from langchain_openai import ChatOpenAI

    return ChatOpenAI(model="smollm2", base_url=BASE_URL, api_key="unused", temperature=0, max_tokens=200,
                      max_retries=0, timeout=TIMEOUT,
                      http_client=container_http_client(openai_server.url, timeout=TIMEOUT),
                      http_async_client=async_container_http_client(openai_server.url, timeout=TIMEOUT))


def test_langchain_bind_tools_round_trip(chat_openai):
    from langchain_core.messages import AIMessage, HumanMessage, ToolMessage
    from langchain_core.utils.function_calling import convert_to_openai_tool

    params = {"GetWeather": convert_to_openai_tool(GetWeather, strict=True)["function"]["parameters"]}
    bound = chat_openai.bind_tools([GetWeather], tool_choice="required", parallel_tool_calls=False, strict=True)
    messages: list[Any] = [HumanMessage(WEATHER_QUESTION)]
    ai = bound.invoke(messages)
    assert isinstance(ai, AIMessage) and ai.response_metadata["finish_reason"] == "tool_calls"
    assert ai.invalid_tool_calls == [] and len(ai.tool_calls) == 1
    call = ai.tool_calls[0]
    GetWeather.model_validate(arguments_of(call["name"], call["args"], params))
    assert call["id"].startswith("call_")
    messages += [ai, ToolMessage(tool_result(call["args"]), tool_call_id=call["id"])]
    final = chat_openai.bind_tools([GetWeather], strict=True).invoke(messages, max_tokens=24)
    assert final.invalid_tool_calls == []
    if final.tool_calls:
        assert final.response_metadata["finish_reason"] == "tool_calls"
        for c in final.tool_calls:
            arguments_of(c["name"], c["args"], params)
    else:
        assert isinstance(final.content, str) and final.content.strip()
        assert final.response_metadata["finish_reason"] in ("stop", "length")
    assert final.usage_metadata["input_tokens"] > ai.usage_metadata["input_tokens"]


@pytest.mark.parametrize("method", ["json_schema", "function_calling"])
def test_langchain_with_structured_output(chat_openai, method):
    structured = chat_openai.with_structured_output(City, method=method, include_raw=True)
    out = structured.invoke("Describe Paris.")
    assert out["parsing_error"] is None and isinstance(out["parsed"], City)
    raw = out["raw"]
    if method == "function_calling":  # a named tool: one call of it, finish_reason stop (as OpenAI)
        assert raw.response_metadata["finish_reason"] == "stop"
        [call] = raw.tool_calls
        assert call["name"] == "City" and City.model_validate(call["args"]) == out["parsed"]
    else:
        assert raw.response_metadata["finish_reason"] == "stop" and raw.tool_calls == []
        jsonschema.validate(json.loads(raw.content), City.model_json_schema())
        assert City.model_validate_json(raw.content) == out["parsed"]


# -- LlamaIndex -----------------------------------------------------------------------------------------
def test_llama_index_openai_like_chat_with_tools(openai_server):
    from llama_index.core.tools import FunctionTool
    from llama_index.llms.openai_like import OpenAILike

    seen: list[dict[str, Any]] = []

    def get_weather(city: str, unit: str) -> str:
        """Current weather of a city."""
        seen.append({"city": city, "unit": unit})
        return tool_result({"city": city})

    tool = FunctionTool.from_defaults(fn=get_weather, fn_schema=GetWeather)
    params = {"get_weather": tool.metadata.to_openai_tool()["function"]["parameters"]}
    llm = OpenAILike(model="smollm2", api_base=BASE_URL, api_key="unused", is_chat_model=True,
                     is_function_calling_model=True, context_window=8192, max_tokens=200, temperature=0,
                     max_retries=0, timeout=TIMEOUT,
                     http_client=container_http_client(openai_server.url, timeout=TIMEOUT),
                     async_http_client=async_container_http_client(openai_server.url, timeout=TIMEOUT))
    response = llm.chat_with_tools([tool], user_msg=WEATHER_QUESTION, tool_required=True)
    [selection] = llm.get_tool_calls_from_response(response)  # allow_parallel_tool_calls defaults to False
    assert selection.tool_id.startswith("call_")
    args = arguments_of(selection.tool_name, selection.tool_kwargs, params)
    output = tool.call(**args)
    assert not output.is_error and seen == [GetWeather.model_validate(args).model_dump()]
    # The streamed answer folds into the same call (greedy decoding).
    *_, last = llm.stream_chat_with_tools([tool], user_msg=WEATHER_QUESTION, tool_required=True)
    [streamed] = llm.get_tool_calls_from_response(last)
    assert (streamed.tool_name, streamed.tool_kwargs) == (selection.tool_name, selection.tool_kwargs)


# -- huggingface_hub ------------------------------------------------------------------------------------
@pytest.fixture
def inference_client(openai_server):
    """InferenceClient aimed at the container. It posts chat to `{url}/v1/chat/completions` (the TGI
    route); the container's only route is `/invocations`, so the httpx2 session rewrites the path, as
    deploy/openai_bridge.py does for httpx clients."""
    import httpx2
    from huggingface_hub import InferenceClient, set_client_factory
    from huggingface_hub.utils._http import default_client_factory, hf_request_event_hook

    class InvocationsTransport(httpx2.HTTPTransport):
        def handle_request(self, request: httpx2.Request) -> httpx2.Response:
            if request.method == "POST" and request.url.path.endswith("/chat/completions"):
                request.url = request.url.copy_with(path="/invocations")
            return super().handle_request(request)

    set_client_factory(lambda: httpx2.Client(transport=InvocationsTransport(), timeout=None,
                                             event_hooks={"request": [hf_request_event_hook]}))
    try:
        yield InferenceClient(model=openai_server.url, timeout=TIMEOUT)
    finally:
        set_client_factory(default_client_factory)


def test_inference_client_chat_completion_tools(inference_client):
    out = inference_client.chat_completion([{"role": "user", "content": WEATHER_QUESTION}], tools=TOOLS,
                                            tool_choice="required", max_tokens=200, temperature=0,
                                            extra_body={"parallel_tool_calls": False})
    choice = out.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    [call] = choice.message.tool_calls
    assert call.id.startswith("call_") and call.type == "function"
    arguments_of(call.function.name, call.function.arguments)


def test_inference_client_chat_completion_response_format(inference_client):
    out = inference_client.chat_completion([{"role": "user", "content": "Describe Paris as JSON."}],
                                            response_format={"type": "json", "value": CITY_SCHEMA},  # TGI's form
                                            max_tokens=200, temperature=0)
    assert out.choices[0].finish_reason == "stop"
    jsonschema.validate(json.loads(out.choices[0].message.content), CITY_SCHEMA)


# -- text-generation ------------------------------------------------------------------------------------
def test_text_generation_client_generate_with_grammar(generate_server):
    from text_generation import Client
    from text_generation.types import Grammar, GrammarType

    client = Client(generate_server.invocations, timeout=TIMEOUT)
    schema = {"type": "object", "properties": {"capital": {"type": "string", "maxLength": 12},
                                               "sure": {"type": "boolean"}},
              "required": ["capital", "sure"], "additionalProperties": False}
    out = client.generate("The capital of France, as JSON:", max_new_tokens=40,
                          grammar=Grammar(type=GrammarType.Json, value=schema))
    assert out.details.finish_reason == "eos_token"
    jsonschema.validate(json.loads(out.generated_text), schema)
    pattern = r"(yes|no), [0-9]{1,2}"
    out = client.generate("Is Paris in France? Answer and give a number:", max_new_tokens=20,
                          grammar=Grammar(type=GrammarType.Regex, value=pattern))
    assert re.fullmatch(pattern, out.generated_text) and out.details.finish_reason == "eos_token"


# -- through the local SageMaker runtime ----------------------------------------------------------------
def test_litellm_sagemaker_chat_tools(oai_runtime, aws_env):
    import litellm

    tools = [{"type": "function", "function": {"name": "get_weather", "description": "Current weather of a city",
                                               "parameters": {"type": "object", "properties": {
                                                   "city": {"type": "string", "enum": ["Paris", "London"]}},
                                                   "required": ["city"], "additionalProperties": False}}}]
    params = {"get_weather": tools[0]["function"]["parameters"]}
    out = litellm.completion(model="sagemaker_chat/oai", messages=[{"role": "user", "content": WEATHER_QUESTION}],
                             tools=tools, tool_choice="required", parallel_tool_calls=False, max_tokens=100,
                             temperature=0, aws_region_name=REGION, timeout=TIMEOUT, num_retries=0,
                             sagemaker_base_url=f"{oai_runtime.url}/endpoints/oai/invocations", **CREDENTIALS)
    choice = out.choices[0]
    assert choice.finish_reason == "tool_calls" and not choice.message.content
    [call] = choice.message.tool_calls
    assert call.id.startswith("call_") and call.type == "function"
    arguments_of(call.function.name, call.function.arguments, params)


def test_boto3_invoke_endpoint_response_format(oai_runtime):
    client = runtime_client(oai_runtime.url)
    body = {"messages": [{"role": "user", "content": "Describe Paris as JSON."}], "max_tokens": 100,
            "temperature": 0,
            "response_format": {"type": "json_schema", "json_schema": {"name": "city", "strict": True,
                                                                       "schema": CITY_SCHEMA}}}
    out = client.invoke_endpoint(EndpointName="oai", Body=json.dumps(body), ContentType="application/json",
                                 Accept="application/json")
    choice = json.loads(out["Body"].read())["choices"][0]
    assert choice["finish_reason"] == "stop"
    jsonschema.validate(json.loads(choice["message"]["content"]), CITY_SCHEMA)
    stream = client.invoke_endpoint_with_response_stream(EndpointName="oai-7",
                                                         Body=json.dumps({**body, "stream": True}))
    chunks = [c for c in iter_sse_json(stream["Body"]) if c["choices"]]
    assert "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks) == choice["message"]["content"]
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop"
