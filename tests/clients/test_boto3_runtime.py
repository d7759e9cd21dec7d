"""boto3 `sagemaker-runtime` against the local runtime in front of the real gunicorn server.

Both dispatch modes (OAI_ENABLED=true: chat; false: TGI generate), streams cut three ways
(one part per write, 7-byte parts, 61-byte parts regrouped across events).
"""

from __future__ import annotations

import json

import pytest
from botocore.exceptions import EventStreamError

from deploy.streaming import iter_sse_json
from tests.clients.conftest import OVERLONG, PART_MODES, runtime_client

pytestmark = [pytest.mark.slow, pytest.mark.timeout(120, func_only=True)]
CHAT = {"messages": [{"role": "user", "content": "What is the capital of France?"}], "max_tokens": 16,
        "temperature": 0}
GENERATE = {"inputs": "The capital of France is", "parameters": {"max_new_tokens": 8, "return_full_text": False}}


def test_invoke_endpoint_chat(oai_runtime):
    client = runtime_client(oai_runtime.url)
    out = client.invoke_endpoint(EndpointName="oai", Body=json.dumps(CHAT), ContentType="application/json",
                                 Accept="application/json", CustomAttributes="trace-id=42")
    answer = json.loads(out["Body"].read())
    assert "Paris" in answer["choices"][0]["message"]["content"]
    assert answer["usage"]["completion_tokens"] > 0
    assert out["ContentType"] == "application/json" and out["InvokedProductionVariant"] == "AllTraffic"
    assert out["CustomAttributes"] == "trace-id=42"  # the container echoes it (docs/api.md, "On SageMaker")
    assert "x-compute-time" not in out["ResponseMetadata"]["HTTPHeaders"]  # the service strips extras


@pytest.mark.parametrize("mode", PART_MODES)
def test_stream_chat(oai_runtime, mode):
    client = runtime_client(oai_runtime.url)
    whole = json.loads(client.invoke_endpoint(EndpointName="oai", Body=json.dumps(CHAT))["Body"].read())
    body = {**CHAT, "stream": True, "stream_options": {"include_usage": True}}
    out = client.invoke_endpoint_with_response_stream(EndpointName=f"oai{mode}", Body=json.dumps(body),
                                                      ContentType="application/json")
    assert out["ContentType"].startswith("text/event-stream")
    parts = [e["PayloadPart"]["Bytes"] for e in out["Body"]]
    if mode == "-7":
        assert max(map(len, parts)) <= 7
    if mode == "-regroup":
        assert all(len(p) == 61 for p in parts[:-1]) and any(b"\n\ndata: " in p for p in parts)  # merged, split
    raw = b"".join(parts)
    assert raw.endswith(b"data: [DONE]\n\n")
    chunks = list(iter_sse_json(parts))
    text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"])
    assert text == whole["choices"][0]["message"]["content"]
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"] == whole["usage"]


def test_invoke_endpoint_generate(gen_runtime):
    client = runtime_client(gen_runtime.url)
    out = client.invoke_endpoint(EndpointName="gen", Body=json.dumps(GENERATE), ContentType="application/json")
    answer = json.loads(out["Body"].read())
    assert isinstance(answer, list) and "Paris" in answer[0]["generated_text"]


@pytest.mark.parametrize("mode", PART_MODES)
def test_stream_generate(gen_runtime, mode):
    client = runtime_client(gen_runtime.url)
    whole = json.loads(client.invoke_endpoint(EndpointName="gen", Body=json.dumps(GENERATE))["Body"].read())
    out = client.invoke_endpoint_with_response_stream(EndpointName=f"gen{mode}",
                                                      Body=json.dumps({**GENERATE, "stream": True}))
    events = list(iter_sse_json(out["Body"]))
    assert len(events) == 8 and [e["index"] for e in events] == list(range(8))
    assert "".join(e["token"]["text"] for e in events if not e["token"]["special"]) == whole[0]["generated_text"]
    assert events[-1]["generated_text"] == whole[0]["generated_text"]


def test_container_422_is_model_error_with_original_message(oai_runtime, gen_runtime):
    client = runtime_client(oai_runtime.url)
    with pytest.raises(client.exceptions.ModelError) as err:
        client.invoke_endpoint(EndpointName="oai", Body=json.dumps({"inputs": "hi"}))
    r = err.value.response
    assert r["OriginalStatusCode"] == 422 and r["ResponseMetadata"]["HTTPStatusCode"] == 424
    assert "OpenAI mode" in json.loads(r["OriginalMessage"])["error"]["message"]
    assert "Received client error (422) from primary" in r["Error"]["Message"]
    gen = runtime_client(gen_runtime.url)
    with pytest.raises(gen.exceptions.ModelError) as err:  # the stream API wraps it the same way
        gen.invoke_endpoint_with_response_stream(EndpointName="gen", Body=json.dumps({**CHAT, "stream": True}))
    assert err.value.response["OriginalStatusCode"] == 422
    assert "OAI_ENABLED=true" in json.loads(err.value.response["OriginalMessage"])["error"]


def test_overlong_stream_raises_event_stream_error(oai_runtime):
    client = runtime_client(oai_runtime.url)
    body = {**OVERLONG, "stream": True}
    out = client.invoke_endpoint_with_response_stream(EndpointName="oai-slow", Body=json.dumps(body))
    received = []
    with pytest.raises(EventStreamError, match="ModelStreamError") as err:
        for event in out["Body"]:
            received.append(event["PayloadPart"]["Bytes"])
    assert "allotted time" in err.value.response["Error"]["Message"]
    assert b"".join(received).startswith(b"data: ") or not received  # whole parts only, never garbage
