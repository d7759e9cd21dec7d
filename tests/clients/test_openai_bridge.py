"""`openai` (sync, async, streaming) through the httpx bridge: straight to the container, and
SigV4-signed through the local SageMaker runtime (event stream unwrapped back into SSE)."""

from __future__ import annotations

import asyncio

import openai
import pytest

from deploy.openai_bridge import (
    BASE_URL,
    async_sagemaker_http_client,
    container_http_client,
    sagemaker_http_client,
)
from tests.clients.conftest import CREDENTIALS, OVERLONG, REGION

pytestmark = [pytest.mark.slow, pytest.mark.timeout(150, func_only=True)]
MESSAGES = [{"role": "user", "content": "What is the capital of France?"}]


def sagemaker_openai(runtime, endpoint: str = "oai") -> openai.OpenAI:
    import boto3

    session = boto3.Session(region_name=REGION, **CREDENTIALS)
    http = sagemaker_http_client(endpoint, session=session, endpoint_url=runtime.url)
    return openai.OpenAI(base_url=BASE_URL, api_key="unused", http_client=http, max_retries=0, timeout=60)


def test_openai_to_container_logprobs_and_n(openai_server):
    client = openai.OpenAI(base_url=BASE_URL, api_key="unused", http_client=container_http_client(openai_server.url),
                           max_retries=0, timeout=60)
    out = client.chat.completions.create(model="smollm2", messages=MESSAGES, max_tokens=8, n=2, temperature=0.8,
                                         seed=7, logprobs=True, top_logprobs=2)
    assert [c.index for c in out.choices] == [0, 1]
    for choice in out.choices:
        tokens = choice.logprobs.content
        assert tokens and all(t.logprob <= 0 and len(t.top_logprobs) == 2 for t in tokens)
        assert "".join(t.token for t in tokens) == choice.message.content
    assert out.usage.completion_tokens == sum(len(c.logprobs.content) for c in out.choices)


def test_openai_through_sagemaker_runtime(oai_runtime):
    client = sagemaker_openai(oai_runtime)
    out = client.chat.completions.create(model="smollm2", messages=MESSAGES, max_tokens=16, temperature=0)
    assert "Paris" in out.choices[0].message.content and out.object == "chat.completion"
    legacy = client.completions.create(model="smollm2", prompt="The capital of France is", max_tokens=6,
                                       temperature=0)
    assert "Paris" in legacy.choices[0].text


@pytest.mark.parametrize("endpoint", ["oai", "oai-7", "oai-regroup"])
def test_openai_stream_through_sagemaker_runtime(oai_runtime, endpoint):
    client = sagemaker_openai(oai_runtime, endpoint)
    whole = client.chat.completions.create(model="m", messages=MESSAGES, max_tokens=16, temperature=0)
    chunks = list(client.chat.completions.create(model="m", messages=MESSAGES, max_tokens=16, temperature=0,
                                                 stream=True, stream_options={"include_usage": True}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    assert chunks[-1].choices == [] and chunks[-1].usage.total_tokens == whole.usage.total_tokens
    assert len({c.id for c in chunks}) == 1


def test_openai_stream_with_logprobs_and_n(oai_runtime):
    client = sagemaker_openai(oai_runtime, "oai-7")
    chunks = list(client.chat.completions.create(model="m", messages=MESSAGES, max_tokens=6, n=2, temperature=0.7,
                                                 seed=3, logprobs=True, stream=True,
                                                 stream_options={"include_usage": True}))
    by_index = {0: [], 1: []}
    for chunk in chunks:
        for choice in chunk.choices:
            if choice.logprobs and choice.logprobs.content:
                by_index[choice.index] += choice.logprobs.content
    assert all(by_index[i] for i in (0, 1))
    assert chunks[-1].usage.completion_tokens == len(by_index[0]) + len(by_index[1])


def test_openai_errors_keep_their_status(oai_runtime):
    client = sagemaker_openai(oai_runtime)
    with pytest.raises(openai.UnprocessableEntityError, match="top_logprobs"):  # ModelError(422) unwrapped
        client.chat.completions.create(model="m", messages=MESSAGES, max_tokens=4, logprobs=True, top_logprobs=50)
    with pytest.raises(openai.APIError, match="allotted time"):  # ModelStreamError mid-stream
        stream = sagemaker_openai(oai_runtime, "oai-slow").chat.completions.create(
            model="m", **OVERLONG, stream=True)
        for _ in stream:
            pass
    with pytest.raises(openai.BadRequestError, match="not found"):  # ValidationError: unknown endpoint
        sagemaker_openai(oai_runtime, "missing").chat.completions.create(model="m", messages=MESSAGES)


def test_async_openai_through_sagemaker_runtime(oai_runtime):
    import boto3

    async def main() -> tuple[str, str]:
        http = async_sagemaker_http_client("oai-regroup", endpoint_url=oai_runtime.url,
                                           session=boto3.Session(region_name=REGION, **CREDENTIALS))
        async with openai.AsyncOpenAI(base_url=BASE_URL, api_key="unused", http_client=http, max_retries=0,
                                      timeout=60) as client:
            whole = await client.chat.completions.create(model="m", messages=MESSAGES, max_tokens=12,
                                                         temperature=0)
            stream = await client.chat.completions.create(model="m", messages=MESSAGES, max_tokens=12,
                                                          temperature=0, stream=True)
            parts = [c.choices[0].delta.content or "" async for c in stream if c.choices]
            return whole.choices[0].message.content, "".join(parts)

    whole, streamed = asyncio.run(asyncio.wait_for(main(), 120))
    assert "Paris" in whole and streamed == whole
