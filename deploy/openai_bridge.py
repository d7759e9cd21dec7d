"""httpx transports that let OpenAI-speaking clients reach a container or a SageMaker endpoint.

The container answers OpenAI's chat and completions bodies on `POST /invocations` (docs/api.md,
"Dispatch"). Clients such as `openai.OpenAI`, LangChain's `ChatOpenAI` and LlamaIndex's `OpenAILike` post to
`{base_url}/chat/completions` instead; these transports take those requests and

- `ContainerTransport`: send them to a local container's `/invocations`, unchanged;
- `SageMakerTransport`: send them through the SageMaker runtime API (`InvokeEndpoint`, or
  `InvokeEndpointWithResponseStream` when the body says `"stream": true`), SigV4-signed with the
  caller's boto3 credentials, unwrapping the event stream back into the container's SSE bytes and a
  `ModelError` back into the container's own status and body (so a 422 stays a 422 for the client).

    client = openai.OpenAI(base_url=BASE_URL, api_key="unused",
                           http_client=sagemaker_http_client("my-endpoint", region_name="us-east-1"))

Every class has an async twin (`Async...`) for `AsyncOpenAI` and the async paths of the frameworks.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Iterator
from typing import Any

import httpx
from botocore.auth import SigV4Auth
from botocore.awsrequest import AWSRequest
from botocore.eventstream import EventStreamBuffer

BASE_URL = "http://sagemaker.local/v1"  # any base URL works: the transports decide where requests go
OPENAI_PATHS = ("/chat/completions", "/completions")


def _is_openai_post(request: httpx.Request) -> bool:
    return request.method == "POST" and request.url.path.endswith(OPENAI_PATHS)


def _container_request(request: httpx.Request, base: str) -> httpx.Request:
    """The same request, aimed at the container's /invocations (other paths keep theirs)."""
    path = "/invocations" if _is_openai_post(request) else request.url.path
    headers = {k: v for k, v in request.headers.items() if k.lower() not in ("host", "content-length")}
    return httpx.Request(request.method, base.rstrip("/") + path, headers=headers, content=request.content,
                         extensions=request.extensions)


class ContainerTransport(httpx.BaseTransport):
    """OpenAI requests to a local container's `/invocations` (no SageMaker in between)."""

    def __init__(self, container_url: str, inner: httpx.BaseTransport | None = None):
        self.container_url = container_url
        self.inner = inner or httpx.HTTPTransport()

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        """Forward with the path rewritten."""
        request.read()
        return self.inner.handle_request(_container_request(request, self.container_url))

    def close(self) -> None:
        """Close the inner transport."""
        self.inner.close()


class AsyncContainerTransport(httpx.AsyncBaseTransport):
    """The async twin of `ContainerTransport`."""

    def __init__(self, container_url: str, inner: httpx.AsyncBaseTransport | None = None):
        self.container_url = container_url
        self.inner = inner or httpx.AsyncHTTPTransport()

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        """Forward with the path rewritten."""
        await request.aread()
        return await self.inner.handle_async_request(_container_request(request, self.container_url))

    async def aclose(self) -> None:
        """Close the inner transport."""
        await self.inner.aclose()


class _Signer:
    """Builds the runtime API request for one OpenAI request and signs it (SigV4, service `sagemaker`)."""

    def __init__(self, endpoint_name: str, region_name: str | None, session: Any, endpoint_url: str | None,
                 inference_component: str | None, custom_attributes: str | None):
        if session is None:
            import boto3

            session = boto3.Session(region_name=region_name)
        self.session = session
        self.region = region_name or session.region_name
        if not self.region:
            raise ValueError("no AWS region: pass region_name= or configure one for boto3")
        self.endpoint_name = endpoint_name
        self.base = (endpoint_url or f"https://runtime.sagemaker.{self.region}.amazonaws.com").rstrip("/")
        self.extra = {"X-Amzn-SageMaker-Inference-Component": inference_component,
                      "X-Amzn-SageMaker-Custom-Attributes": custom_attributes}

    def build(self, request: httpx.Request) -> tuple[httpx.Request, bool]:
        """(signed runtime request, is it a stream)."""
        body = request.content
        try:
            stream = _is_openai_post(request) and json.loads(body or b"{}").get("stream") is True
        except (ValueError, AttributeError):
            stream = False
        suffix = "invocations-response-stream" if stream else "invocations"
        url = f"{self.base}/endpoints/{self.endpoint_name}/{suffix}"
        accept = "X-Amzn-SageMaker-Accept" if stream else "Accept"
        headers = {"Content-Type": "application/json", accept: "text/event-stream" if stream else "application/json"}
        headers.update({k: v for k, v in self.extra.items() if v})
        aws_request = AWSRequest(method="POST", url=url, data=body, headers=headers)
        credentials = self.session.get_credentials()
        if credentials is None:
            raise RuntimeError("no AWS credentials found by boto3 to sign the SageMaker runtime request")
        SigV4Auth(credentials.get_frozen_credentials(), "sagemaker", self.region).add_auth(aws_request)
        signed = httpx.Request("POST", url, headers=dict(aws_request.headers.items()), content=body,
                               extensions=request.extensions)
        return signed, stream


def _unwrap_model_error(response: httpx.Response, content: bytes) -> httpx.Response:
    """A `ModelError` (424) becomes the container's own status and body; anything else stays."""
    headers = {k: v for k, v in response.headers.items() if k.lower() not in ("content-length", "content-encoding",
                                                                               "transfer-encoding")}
    if response.status_code == 424 and response.headers.get("x-amzn-errortype", "").startswith("ModelError"):
        try:
            error = json.loads(content)
            status = int(error.get("OriginalStatusCode") or 502)
            original = error.get("OriginalMessage") or error.get("message") or ""
            return httpx.Response(status, headers={"content-type": "application/json"}, content=original.encode())
        except (ValueError, TypeError):
            pass
    return httpx.Response(response.status_code, headers=headers, content=content)


def _error_event(headers: dict[str, Any], payload: bytes) -> bytes:
    """An exception frame as one SSE error event in OpenAI's shape, which the clients raise."""
    try:
        body = json.loads(payload)
    except ValueError:
        body = {"Message": payload.decode("utf-8", "replace")}
    kind = headers.get(":exception-type") or headers.get(":error-code") or "InternalStreamFailure"
    error = {"message": body.get("Message") or body.get("message") or kind, "type": kind,
             "code": body.get("ErrorCode"), "param": None}
    return b"\n\ndata: " + json.dumps({"error": error}).encode() + b"\n\n"


class EventStreamDecoder:
    """Feed raw `application/vnd.amazon.eventstream` bytes, get back the payload bytes (SSE)."""

    def __init__(self) -> None:
        self.buffer = EventStreamBuffer()  # checks both CRCs of every frame

    def feed(self, data: bytes) -> Iterator[bytes]:
        """Payloads of every complete frame so far; exception frames turn into SSE error events."""
        self.buffer.add_data(data)
        for message in self.buffer:
            kind = message.headers.get(":message-type")
            if kind == "event" and message.headers.get(":event-type") == "PayloadPart":
                yield message.payload
            elif kind in ("exception", "error"):
                yield _error_event(message.headers, message.payload)


class _SSEStream(httpx.SyncByteStream):
    def __init__(self, response: httpx.Response):
        self.response, self.decoder = response, EventStreamDecoder()

    def __iter__(self) -> Iterator[bytes]:
        for chunk in self.response.iter_bytes():
            yield from self.decoder.feed(chunk)

    def close(self) -> None:
        self.response.close()


class _AsyncSSEStream(httpx.AsyncByteStream):
    def __init__(self, response: httpx.Response):
        self.response, self.decoder = response, EventStreamDecoder()

    async def __aiter__(self) -> AsyncIterator[bytes]:
        async for chunk in self.response.aiter_bytes():
            for payload in self.decoder.feed(chunk):
                yield payload

    async def aclose(self) -> None:
        await self.response.aclose()


def _sse_response(response: httpx.Response, stream: httpx.SyncByteStream | httpx.AsyncByteStream) -> httpx.Response:
    content_type = response.headers.get("x-amzn-sagemaker-content-type", "text/event-stream")
    return httpx.Response(200, headers={"content-type": content_type}, stream=stream)


class SageMakerTransport(httpx.BaseTransport):
    """OpenAI requests through the SageMaker runtime API to endpoint `endpoint_name`, SigV4-signed."""

    def __init__(self, endpoint_name: str, region_name: str | None = None, session: Any = None,
                 endpoint_url: str | None = None, inference_component: str | None = None,
                 custom_attributes: str | None = None, inner: httpx.BaseTransport | None = None):
        self.signer = _Signer(endpoint_name, region_name, session, endpoint_url, inference_component,
                              custom_attributes)
        self.inner = inner or httpx.HTTPTransport()

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        """Sign, send, and turn the runtime's answer back into what the container said."""
        request.read()
        signed, stream = self.signer.build(request)
        response = self.inner.handle_request(signed)
        if stream and response.status_code == 200:
            return _sse_response(response, _SSEStream(response))
        try:
            return _unwrap_model_error(response, response.read())
        finally:
            response.close()

    def close(self) -> None:
        """Close the inner transport."""
        self.inner.close()


class AsyncSageMakerTransport(httpx.AsyncBaseTransport):
    """The async twin of `SageMakerTransport`."""

    def __init__(self, endpoint_name: str, region_name: str | None = None, session: Any = None,
                 endpoint_url: str | None = None, inference_component: str | None = None,
                 custom_attributes: str | None = None, inner: httpx.AsyncBaseTransport | None = None):
        self.signer = _Signer(endpoint_name, region_name, session, endpoint_url, inference_component,
                              custom_attributes)
        self.inner = inner or httpx.AsyncHTTPTransport()

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        """Sign, send, and turn the runtime's answer back into what the container said."""
        await request.aread()
        signed, stream = self.signer.build(request)
        response = await self.inner.handle_async_request(signed)
        if stream and response.status_code == 200:
            return _sse_response(response, _AsyncSSEStream(response))
        try:
            return _unwrap_model_error(response, await response.aread())
        finally:
            await response.aclose()

    async def aclose(self) -> None:
        """Close the inner transport."""
        await self.inner.aclose()


def container_http_client(container_url: str, timeout: float = 120.0) -> httpx.Client:
    """An `httpx.Client` for OpenAI-style clients, talking to a local container."""
    return httpx.Client(transport=ContainerTransport(container_url), timeout=timeout)


def async_container_http_client(container_url: str, timeout: float = 120.0) -> httpx.AsyncClient:
    """An `httpx.AsyncClient` for OpenAI-style clients, talking to a local container."""
    return httpx.AsyncClient(transport=AsyncContainerTransport(container_url), timeout=timeout)


def sagemaker_http_client(endpoint_name: str, timeout: float = 120.0, **kwargs: Any) -> httpx.Client:
    """An `httpx.Client` for OpenAI-style clients, talking to a SageMaker endpoint (kwargs: see transport)."""
    return httpx.Client(transport=SageMakerTransport(endpoint_name, **kwargs), timeout=timeout)


def async_sagemaker_http_client(endpoint_name: str, timeout: float = 120.0, **kwargs: Any) -> httpx.AsyncClient:
    """An `httpx.AsyncClient` for OpenAI-style clients, talking to a SageMaker endpoint."""
    return httpx.AsyncClient(transport=AsyncSageMakerTransport(endpoint_name, **kwargs), timeout=timeout)
