"""A local SageMaker runtime: the InvokeEndpoint APIs on loopback, in front of a running container.

    python -m deploy.local_endpoint --endpoint my-llm=http://127.0.0.1:8080 --port 8081
    boto3.client("sagemaker-runtime", endpoint_url="http://127.0.0.1:8081").invoke_endpoint(...)

It behaves as the service does (botocore's sagemaker-runtime model, the developer guide): only the
API's headers pass, 6 MB bodies, 60 s for the container, container errors wrapped as `ModelError`
(424 + OriginalStatusCode/OriginalMessage/LogStreamArn), streams as `PayloadPart` event-stream
frames (one per container write, `--part-size` N-byte parts, or `--regroup`ed across event
boundaries) ending with a `ModelStreamError` frame when the stream breaks or runs too long.
The README's `clients` section has the details.
"""

from __future__ import annotations

import argparse
import json
import logging
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from typing import Any

import requests
from flask import Flask, Response, request
from werkzeug.serving import BaseWSGIServer, WSGIRequestHandler, make_server

from deploy import eventstream

log = logging.getLogger("deploy.local_endpoint")
MAX_PAYLOAD = 6 * 1024 * 1024  # 6291456: `Body` max in the service model, and the documented cap
# Request headers the runtime API defines and forwards to the container (routing headers such as
# Target-Variant, Target-Container-Hostname and Inference-Component are consumed by the service).
FORWARDED = ("Content-Type", "Accept", "X-Amzn-SageMaker-Custom-Attributes", "X-Amzn-SageMaker-Target-Model",
             "X-Amzn-SageMaker-Inference-Id", "X-Amzn-SageMaker-Session-Id")
CUSTOM = "X-Amzn-SageMaker-Custom-Attributes"
VARIANT = "x-Amzn-Invoked-Production-Variant"


@dataclass(frozen=True)
class EndpointConfig:
    """One endpoint name served by the runtime and how it behaves."""

    target: str  # base URL of the container, e.g. http://127.0.0.1:8080
    variant: str = "AllTraffic"
    invocation_timeout: float = 60.0  # the service's limit for the container to answer
    stream_timeout: float = 60.0  # total time a stream may take before ModelInvocationTimeExceeded
    part_size: int | None = None  # cut each container write into parts of at most N bytes
    regroup: int | None = None  # re-cut the whole stream into N-byte parts, across event boundaries


@dataclass(frozen=True)
class RuntimeConfig:
    """Every endpoint plus the account facts that appear in error messages."""

    endpoints: dict[str, EndpointConfig] = field(default_factory=dict)
    region: str = "us-east-1"
    account: str = "123456789012"
    payload_limit: int = MAX_PAYLOAD


def _error(status: int, code: str, message: str, **fields: object) -> Response:
    """An error the way rest-json services send it: botocore reads the code from x-amzn-ErrorType."""
    body = {"message": message, **fields}
    return Response(json.dumps(body), status=status, mimetype="application/json",
                    headers={"x-amzn-ErrorType": code, "x-amzn-RequestId": str(uuid.uuid4())})


def _log_group(cfg: RuntimeConfig, name: str) -> str:
    return f"/aws/sagemaker/Endpoints/{name}"


def model_error(cfg: RuntimeConfig, name: str, ep: EndpointConfig, status: int, original: str) -> Response:
    """The service's ModelError (424) wrapping the container's own status and body."""
    kind = "client" if 400 <= status < 500 else "server"
    console = (f"https://{cfg.region}.console.aws.amazon.com/cloudwatch/home?region={cfg.region}"
               f"#logEventViewer:group={_log_group(cfg, name)}")
    message = (f'Received {kind} error ({status}) from primary with message "{original}". '
               f"See {console} in account {cfg.account} for more information.")
    arn = f"arn:aws:logs:{cfg.region}:{cfg.account}:log-group:{_log_group(cfg, name)}"
    return _error(424, "ModelError", message, OriginalStatusCode=status, OriginalMessage=original, LogStreamArn=arn)


def _forward_headers(stream: bool) -> dict[str, str]:
    headers = {h: request.headers[h] for h in FORWARDED if h in request.headers}
    if stream:
        # InvokeEndpointWithResponseStream names its Accept header X-Amzn-SageMaker-Accept.
        headers.pop("Accept", None)
        if "X-Amzn-SageMaker-Accept" in request.headers:
            headers["Accept"] = request.headers["X-Amzn-SageMaker-Accept"]
        if "Content-Type" not in headers and "X-Amzn-SageMaker-Content-Type" in request.headers:
            headers["Content-Type"] = request.headers["X-Amzn-SageMaker-Content-Type"]
    return headers  # no Content-Type from the caller: none is invented for the container


class _Deadline:
    """Closes the upstream response when time is up, which unblocks a read stuck in the socket."""

    def __init__(self, seconds: float):
        self._fired = False
        self._end = time.monotonic() + seconds  # the clock runs from the request, not from the headers
        self._resp: requests.Response | None = None
        self._timer: threading.Timer | None = None

    def watch(self, resp: requests.Response) -> None:
        """Start the clock on `resp`."""
        self._resp = resp
        self._timer = threading.Timer(max(0.0, self._end - time.monotonic()), self._fire)
        self._timer.daemon = True
        self._timer.start()

    @property
    def fired(self) -> bool:
        """The timer closed the response."""
        return self._fired

    @property
    def expired(self) -> bool:
        """Time is up (also when a socket time-out beat the timer thread to it)."""
        return self._fired or time.monotonic() >= self._end

    def _fire(self) -> None:
        self._fired = True
        if self._resp is not None:
            self._resp.close()

    def cancel(self) -> None:
        """Stop the clock (the answer is complete)."""
        if self._timer is not None:
            self._timer.cancel()


def _post(ep: EndpointConfig, body: bytes, stream: bool, timeout: float) -> requests.Response:
    """Send the body to the container's /invocations; connection errors propagate."""
    return requests.post(f"{ep.target.rstrip('/')}/invocations", data=body, headers=_forward_headers(stream),
                         stream=True, timeout=(min(5.0, timeout), timeout))


TIMEOUT_MESSAGE = ("Your invocation timed out while waiting for a response from container primary. Review the "
                   "latency metrics for each container in Amazon CloudWatch, resolve the issue, and try again.")


def invoke(cfg: RuntimeConfig, name: str, ep: EndpointConfig, body: bytes) -> Response:
    """InvokeEndpoint: the container's whole answer within the time limit, or a ModelError."""
    deadline = _Deadline(ep.invocation_timeout)
    try:
        upstream = _post(ep, body, stream=False, timeout=ep.invocation_timeout)
    except requests.Timeout:
        return model_error(cfg, name, ep, 0, TIMEOUT_MESSAGE)
    except requests.RequestException as exc:
        return model_error(cfg, name, ep, 0, f"Could not connect to the container: {exc}")
    deadline.watch(upstream)
    try:
        content = b"".join(upstream.iter_content(chunk_size=None))
    except (requests.RequestException, AttributeError, ValueError) as exc:
        if not deadline.expired:
            return model_error(cfg, name, ep, 0, f"The container closed the connection: {exc}")
        return model_error(cfg, name, ep, 0, TIMEOUT_MESSAGE)
    finally:
        deadline.cancel()
        upstream.close()
    if deadline.fired:  # the timer closed the response, which may end the read without an error
        return model_error(cfg, name, ep, 0, TIMEOUT_MESSAGE)
    if upstream.status_code >= 400:
        return model_error(cfg, name, ep, upstream.status_code, content.decode("utf-8", "replace"))
    headers = {VARIANT: ep.variant, "x-amzn-RequestId": str(uuid.uuid4())}
    if CUSTOM in upstream.headers:
        headers[CUSTOM] = upstream.headers[CUSTOM]
    return Response(content, status=200, headers=headers,
                    content_type=upstream.headers.get("Content-Type", "application/octet-stream"))


def _parts(ep: EndpointConfig, chunks: Iterator[bytes]) -> Iterator[bytes]:
    if ep.regroup:
        return eventstream.regroup_parts(chunks, ep.regroup)
    if ep.part_size:
        return eventstream.split_parts(chunks, ep.part_size)
    return chunks


def _frames(ep: EndpointConfig, upstream: requests.Response, deadline: _Deadline) -> Iterator[bytes]:
    """PayloadPart frames for the container's bytes, then a ModelStreamError if it went wrong."""
    failure: tuple[str, str] | None = None
    try:
        chunks = (c for c in upstream.iter_content(chunk_size=None) if c)
        for part in _parts(ep, chunks):
            yield eventstream.payload_part(part)
    except Exception as exc:  # any upstream read failure ends the stream with an exception frame
        failure = ("StreamBroken", f"The model stream from primary broke: {type(exc).__name__}: {exc}")
    finally:
        deadline.cancel()
        upstream.close()
    # Closing the response from the timer may end the read quietly or with an error: both are a time-out.
    if deadline.fired or (failure is not None and deadline.expired):
        failure = ("ModelInvocationTimeExceeded",
                   "Your model primary did not complete sending the inference response in the allotted time.")
    if failure is not None:
        log.warning("stream failed: %s: %s", *failure)
        yield eventstream.model_stream_error(failure[1], failure[0])


def invoke_stream(cfg: RuntimeConfig, name: str, ep: EndpointConfig, body: bytes) -> Response:
    """InvokeEndpointWithResponseStream: a ModelError before the stream, exception frames within it."""
    deadline = _Deadline(ep.stream_timeout)
    try:
        upstream = _post(ep, body, stream=True, timeout=min(ep.invocation_timeout, ep.stream_timeout))
    except requests.Timeout:
        return model_error(cfg, name, ep, 0, TIMEOUT_MESSAGE)
    except requests.RequestException as exc:
        return model_error(cfg, name, ep, 0, f"Could not connect to the container: {exc}")
    if upstream.status_code >= 400:
        original = upstream.content.decode("utf-8", "replace")
        upstream.close()
        return model_error(cfg, name, ep, upstream.status_code, original)
    deadline.watch(upstream)
    headers = {VARIANT: ep.variant, "x-amzn-RequestId": str(uuid.uuid4()),
               "X-Amzn-SageMaker-Content-Type": upstream.headers.get("Content-Type", "application/octet-stream")}
    if CUSTOM in upstream.headers:
        headers[CUSTOM] = upstream.headers[CUSTOM]
    return Response(_frames(ep, upstream, deadline), status=200, headers=headers,
                    content_type=eventstream.CONTENT_TYPE, direct_passthrough=True)


def create_app(cfg: RuntimeConfig) -> Flask:
    """The WSGI app of the runtime API."""
    app = Flask("deploy.local_endpoint")

    def handle(name: str, stream: bool) -> Response:
        ep = cfg.endpoints.get(name)
        if ep is None:
            return _error(400, "ValidationError", f"Endpoint {name} of account {cfg.account} not found.")
        if (request.content_length or 0) > cfg.payload_limit:
            return _error(413, "ValidationError", f"Request payload of {request.content_length} bytes exceeds "
                          f"the {cfg.payload_limit}-byte limit of InvokeEndpoint.")
        body = request.get_data(cache=False)
        if len(body) > cfg.payload_limit:
            return _error(413, "ValidationError", f"Request payload of {len(body)} bytes exceeds "
                          f"the {cfg.payload_limit}-byte limit of InvokeEndpoint.")
        return (invoke_stream if stream else invoke)(cfg, name, ep, body)

    @app.post("/endpoints/<name>/invocations")
    def invocations(name: str) -> Response:
        return handle(name, stream=False)

    @app.post("/endpoints/<name>/invocations-response-stream")
    def invocations_stream(name: str) -> Response:
        return handle(name, stream=True)

    @app.errorhandler(404)
    @app.errorhandler(405)
    def unknown(exc: Exception) -> Response:
        return _error(404, "UnknownOperationException", f"Unknown operation {request.method} {request.path}")

    return app


class _QuietHandler(WSGIRequestHandler):
    def log_request(self, *args: object, **kwargs: object) -> None:  # no access log inside tests/notebooks
        pass


class BackgroundServer:
    """A WSGI app served from a daemon thread on loopback: `with BackgroundServer(app) as srv: srv.url`."""

    def __init__(self, app: Any, host: str = "127.0.0.1", port: int = 0, name: str = "wsgi-server"):
        self.server: BaseWSGIServer = make_server(host, port, app, threaded=True, request_handler=_QuietHandler)
        self.thread = threading.Thread(target=self.server.serve_forever, name=name, daemon=True)

    @property
    def url(self) -> str:
        """Base URL of the server (for the runtime: what boto3 gets as `endpoint_url`)."""
        return f"http://{self.server.host}:{self.server.port}"

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(10)


class LocalRuntime(BackgroundServer):
    """The runtime served from a background thread (tests, notebooks): `with LocalRuntime(cfg) as rt`."""

    def __init__(self, cfg: RuntimeConfig, host: str = "127.0.0.1", port: int = 0):
        super().__init__(create_app(cfg), host, port, name="local-runtime")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The CLI's arguments."""
    p = argparse.ArgumentParser(prog="python -m deploy.local_endpoint", description=__doc__.split("\n\n")[0])
    p.add_argument("--endpoint", action="append", required=True, metavar="NAME=URL",
                   help="serve endpoint NAME by forwarding to the container at URL (repeatable)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8081)
    p.add_argument("--variant", default="AllTraffic", help="x-Amzn-Invoked-Production-Variant")
    p.add_argument("--invocation-timeout", type=float, default=60.0, help="seconds the container has to answer")
    p.add_argument("--stream-timeout", type=float, default=60.0, help="seconds a whole stream may take")
    p.add_argument("--part-size", type=int, help="cut every container write into parts of at most N bytes")
    p.add_argument("--regroup", type=int, help="re-cut the stream into N-byte parts across event boundaries")
    p.add_argument("--region", default="us-east-1")
    p.add_argument("--account", default="123456789012")
    return p.parse_args(argv)


def config_from_args(args: argparse.Namespace) -> RuntimeConfig:
    """Build the RuntimeConfig the CLI describes."""
    base = EndpointConfig(target="", variant=args.variant, invocation_timeout=args.invocation_timeout,
                          stream_timeout=args.stream_timeout, part_size=args.part_size, regroup=args.regroup)
    endpoints = {}
    for spec in args.endpoint:
        name, sep, url = spec.partition("=")
        if not sep or not name or not url.startswith(("http://", "https://")):
            raise SystemExit(f"--endpoint wants NAME=http://HOST:PORT, got {spec!r}")
        endpoints[name] = replace(base, target=url)
    return RuntimeConfig(endpoints=endpoints, region=args.region, account=args.account)


def main(argv: list[str] | None = None) -> None:
    """Serve until interrupted."""
    args = parse_args(argv)
    cfg = config_from_args(args)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    server = make_server(args.host, args.port, create_app(cfg), threaded=True)
    for name, ep in cfg.endpoints.items():
        log.info("endpoint %s -> %s (runtime at http://%s:%s)", name, ep.target, server.host, server.port)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()


if __name__ == "__main__":
    main()
