"""The bridge's SageMaker transport without a network: what it sends (URL, SigV4, headers) and how it
unwraps what the runtime answers (event stream -> SSE, ModelError -> original status)."""

from __future__ import annotations

import asyncio
import json

import boto3
import httpx
import openai
import pytest

from deploy import eventstream
from deploy.openai_bridge import BASE_URL, AsyncSageMakerTransport, SageMakerTransport
from tests.clients.conftest import CREDENTIALS

pytestmark = pytest.mark.timeout(60, func_only=True)
SESSION = boto3.Session(region_name="eu-west-1", **CREDENTIALS)
CHUNK = {"id": "c1", "object": "chat.completion.chunk", "created": 1, "model": "m",
         "choices": [{"index": 0, "delta": {"content": "Paris"}, "finish_reason": None}]}


def sse_frames(parts: int = 7, done: bool = True) -> bytes:
    sse = (f"data: {json.dumps(CHUNK)}\n\n" + ("data: [DONE]\n\n" if done else "")).encode()
    return b"".join(eventstream.payload_part(p) for p in eventstream.split_parts([sse], parts))


def fake_runtime(seen: list[httpx.Request], stream_body: bytes) -> httpx.MockTransport:
    def answer(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        if request.url.path.endswith("-response-stream"):
            return httpx.Response(200, headers={"content-type": eventstream.CONTENT_TYPE,
                                                "x-amzn-sagemaker-content-type": "text/event-stream"},
                                  content=stream_body)
        error = {"message": "Received client error (422) ...", "OriginalStatusCode": 422,
                 "OriginalMessage": json.dumps({"error": {"message": "bad top_logprobs", "type": "validation"}})}
        return httpx.Response(424, headers={"x-amzn-ErrorType": "ModelError"}, json=error)

    return httpx.MockTransport(answer)


def test_requests_are_signed_for_the_real_runtime_api():
    seen: list[httpx.Request] = []
    transport = SageMakerTransport("my-llm", session=SESSION, inference_component="ic-1",
                                   inner=fake_runtime(seen, sse_frames()))
    client = openai.OpenAI(base_url=BASE_URL, api_key="unused", http_client=httpx.Client(transport=transport),
                           max_retries=0)
    chunks = list(client.chat.completions.create(model="m", messages=[{"role": "user", "content": "Hi"}],
                                                 stream=True))
    assert [c.choices[0].delta.content for c in chunks] == ["Paris"]
    (sent,) = seen
    assert str(sent.url) == "https://runtime.sagemaker.eu-west-1.amazonaws.com/endpoints/my-llm/invocations-response-stream"
    auth = sent.headers["authorization"]
    assert auth.startswith(f"AWS4-HMAC-SHA256 Credential={CREDENTIALS['aws_access_key_id']}/")
    assert "/eu-west-1/sagemaker/aws4_request" in auth and "x-amz-date" in auth.split("SignedHeaders=")[1]
    assert sent.headers["x-amzn-sagemaker-accept"] == "text/event-stream"
    assert sent.headers["x-amzn-sagemaker-inference-component"] == "ic-1"
    assert json.loads(sent.content)["stream"] is True


def test_model_error_and_stream_error_reach_openai_as_themselves():
    seen: list[httpx.Request] = []
    broken = sse_frames(done=False) + eventstream.model_stream_error("primary did not complete", "ModelInvocationTimeExceeded")
    transport = SageMakerTransport("my-llm", session=SESSION, inner=fake_runtime(seen, broken))
    client = openai.OpenAI(base_url=BASE_URL, api_key="unused", http_client=httpx.Client(transport=transport),
                           max_retries=0)
    with pytest.raises(openai.UnprocessableEntityError, match="bad top_logprobs"):
        client.chat.completions.create(model="m", messages=[{"role": "user", "content": "Hi"}])
    assert seen[-1].url.path == "/endpoints/my-llm/invocations"
    with pytest.raises(openai.APIError, match="primary did not complete"):
        for _ in client.chat.completions.create(model="m", messages=[{"role": "user", "content": "Hi"}], stream=True):
            pass


def test_async_transport_decodes_the_event_stream():
    seen: list[httpx.Request] = []

    async def main() -> bytes:
        def answer(request: httpx.Request) -> httpx.Response:
            seen.append(request)
            return httpx.Response(200, headers={"content-type": eventstream.CONTENT_TYPE}, content=sse_frames(3))

        transport = AsyncSageMakerTransport("e", session=SESSION, endpoint_url="http://runtime.test",
                                            inner=httpx.MockTransport(answer))
        async with httpx.AsyncClient(transport=transport) as http:
            response = await http.post(f"{BASE_URL}/chat/completions", json={"messages": [], "stream": True})
            return await response.aread()

    body = asyncio.run(main())
    assert body == f"data: {json.dumps(CHUNK)}\n\ndata: [DONE]\n\n".encode()
    assert str(seen[0].url) == "http://runtime.test/endpoints/e/invocations-response-stream"
