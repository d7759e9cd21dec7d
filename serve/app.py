"""The SageMaker HTTP contract: `/ping`, `/invocations`, dispatch, error mapping, SSE (SPEC 1, 5, 6).

gunicorn loads `serve.app:create_app()` inside its worker, after fork, so the model (and CUDA)
is only ever initialised there; the load runs on a background OS thread while `/ping` says 503.
"""

from __future__ import annotations

import json
import logging
import sys
from collections.abc import Callable
from typing import Any

from flask import Flask, Response, request
from werkzeug.exceptions import HTTPException

from serve.config import Settings
from serve.handlers import chat, common, completions, generate
from serve.handlers.runtime import Runtime
from serve.protocol import errors
from serve.protocol.errors import GENERATE, OPENAI, ApiError

log = logging.getLogger("serve")
JSON_TYPES = ("application/json", "text/json")
JSONLINES_TYPES = ("application/jsonlines", "application/jsonl", "application/x-jsonlines", "application/json-lines")
Handler = Callable[[Runtime, Any], common.Reply]
SHAPES = "`inputs` (TGI generate), `messages` (chat completions) or `prompt` (completions)"


def dispatch(mode: str, body: Any) -> tuple[str, Handler]:
    """SPEC section 1's table: (protocol, handler) for this body, or a 422 ApiError."""
    keys = set(body) if isinstance(body, dict) else set()
    if mode == "openai":
        if "messages" in keys:
            return OPENAI, chat.handle
        if "prompt" in keys:
            return OPENAI, completions.handle
        if "inputs" in keys:
            raise errors.validation(
                "The server is in OpenAI mode (OAI_ENABLED=true): send `messages` (chat completions) or "
                "`prompt` (completions) instead of `inputs`, or unset OAI_ENABLED", "inputs")
    elif mode == "generate":
        if "inputs" in keys:
            return GENERATE, generate.handle
        if keys & {"messages", "prompt"}:
            raise errors.validation(
                "The OpenAI API is disabled (OAI_ENABLED=false): set OAI_ENABLED=true (or unset it) to send "
                "`messages` or `prompt`, or send TGI's `{\"inputs\": ...}`")
    else:
        if "inputs" in keys:
            return GENERATE, generate.handle
        if "messages" in keys:
            return OPENAI, chat.handle
        if "prompt" in keys:
            return OPENAI, completions.handle
    raise errors.validation(f"Unrecognised request body: send a JSON object with {SHAPES}")


def _media_type() -> str:
    return (request.mimetype or "").lower()


def _decode_body(settings: Settings) -> str:
    """The body as text: 413 over PAYLOAD_LIMIT, 400 when it is not UTF-8."""
    if (request.content_length or 0) > settings.payload_limit:
        raise ApiError(413, "payload_too_large", f"Payload is larger than PAYLOAD_LIMIT ({settings.payload_limit} bytes)")
    raw = request.get_data(cache=False)
    if len(raw) > settings.payload_limit:
        raise ApiError(413, "payload_too_large", f"Payload is larger than PAYLOAD_LIMIT ({settings.payload_limit} bytes)")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise errors.bad_request(f"The body is not valid UTF-8: {exc}") from None


def _loads(text: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise errors.bad_request(f"The body is not valid JSON: {exc}") from None


def _json(body: Any, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    data = json.dumps(body, ensure_ascii=False)
    return Response(data, status=status, mimetype="application/json", headers=headers or {})


def _answer_one(rt: Runtime, body: Any, allow_stream: bool = True) -> tuple[str, common.Reply | ApiError]:
    """Dispatch and run one request; errors come back as values so JSON lines can keep going."""
    protocol = OPENAI if rt.settings.mode == "openai" else GENERATE
    try:
        protocol, handler = dispatch(rt.settings.mode, body)
        if not allow_stream and isinstance(body, dict):
            body = {**body, "stream": False}
        if not rt.ready:
            raise errors.unhealthy()
        return protocol, handler(rt, body)
    except ApiError as err:
        return protocol, err


def _jsonlines(rt: Runtime, text: str) -> Response:
    """Batch transform: one answer line per input line, in order; a bad line fails alone."""
    lines = [line for line in text.splitlines() if line.strip()]

    def one(line: str) -> str:
        try:
            body = _loads(line)
        except ApiError as err:
            return json.dumps(err.body(OPENAI if rt.settings.mode == "openai" else GENERATE))
        protocol, reply = _answer_one(rt, body, allow_stream=False)
        if isinstance(reply, ApiError):
            return json.dumps(reply.body(protocol), ensure_ascii=False)
        return json.dumps(reply.body, ensure_ascii=False)

    if "gevent" in sys.modules:
        from gevent import monkey
        from gevent.pool import Pool

        if monkey.is_module_patched("threading"):  # run the lines concurrently so they batch
            return Response("".join(r + "\n" for r in Pool(rt.settings.max_concurrent_requests).imap(one, lines)),
                            mimetype="application/jsonlines")
    return Response("".join(one(line) + "\n" for line in lines), mimetype="application/jsonlines")


def _invocations(rt: Runtime) -> Response:
    mtype = _media_type()
    default = OPENAI if rt.settings.mode == "openai" else GENERATE
    if mtype and mtype not in JSON_TYPES + JSONLINES_TYPES and not mtype.endswith("+json"):
        err = ApiError(415, "unsupported_media_type",
                       f"Unsupported Content-Type {mtype!r}: send application/json or application/jsonlines")
        return _json(err.body(default), err.status)
    try:
        text = _decode_body(rt.settings)
        if mtype in JSONLINES_TYPES:
            return _jsonlines(rt, text)
        body = _loads(text)
    except ApiError as err:
        return _json(err.body(default), err.status)
    protocol, reply = _answer_one(rt, body)
    if isinstance(reply, ApiError):
        if reply.status >= 500 or reply.status == 424:
            log.warning("request failed: %s %s", reply.status, reply.message)
        return _json(reply.body(protocol), reply.status)
    if reply.stream is not None:
        headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no", **reply.headers}
        response = Response(reply.stream, mimetype="text/event-stream", headers=headers)
        if reply.on_close is not None:
            response.call_on_close(reply.on_close)
        return response
    return _json(reply.body, reply.status, reply.headers)


def _register_routes(app: Flask, rt: Runtime) -> None:
    @app.route("/ping", methods=["GET", "POST"])
    def ping() -> Response:
        if rt.ready:
            return Response(b"", status=200)
        return _json({"error": "unhealthy", "error_type": "healthcheck"}, 503)

    @app.route("/invocations", methods=["POST"])
    def invocations() -> Response:
        rt.inflight += 1
        try:
            response = _invocations(rt)
        except BaseException:
            rt.inflight -= 1
            raise

        def done() -> None:
            rt.inflight -= 1

        response.call_on_close(done)  # streams count until their last byte is written
        custom = request.headers.get("X-Amzn-SageMaker-Custom-Attributes")
        if custom is not None:
            response.headers["X-Amzn-SageMaker-Custom-Attributes"] = custom
        return response


def _register_error_handlers(app: Flask, default: str) -> None:
    """404/405/413 from routing, and any bug, as JSON in the server's default protocol shape."""

    @app.errorhandler(HTTPException)
    def http_error(exc: HTTPException) -> Response:
        kinds = {404: "not_found", 405: "method_not_allowed", 413: "payload_too_large"}
        kind = kinds.get(exc.code or 500, "validation")
        what = f"{request.method} {request.path}"
        message = {404: f"Not found: {what}; the routes are GET /ping and POST /invocations",
                   405: f"Method not allowed: {what}"}.get(exc.code or 500, exc.description or exc.name)
        return _json(ApiError(exc.code or 500, kind, message).body(default), exc.code or 500)

    @app.errorhandler(Exception)
    def unexpected(exc: Exception) -> Response:
        log.exception("unhandled error")
        err = ApiError(500, "internal", f"Internal server error: {type(exc).__name__}: {exc}")
        return _json(err.body(default), 500)


def configure_logging(level: str) -> None:
    """One readable line per record on stderr (gunicorn's own loggers keep their handlers)."""
    logger = logging.getLogger("serve")
    if not logger.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        logger.addHandler(handler)
        logger.propagate = False
    logger.setLevel(level.upper())


def create_app(settings: Settings | None = None, runtime: Runtime | None = None, load: bool = True) -> Flask:
    """The WSGI app. Without `runtime`, starts loading the model in the background (`load=True`)."""
    settings = settings or (runtime.settings if runtime else Settings.from_env())
    configure_logging(settings.log_level)
    if runtime is None:
        runtime = Runtime(settings)
        if load:
            runtime.start_loading()
    app = Flask("serve")
    app.extensions["serve.runtime"] = runtime
    _register_routes(app, runtime)
    _register_error_handlers(app, OPENAI if settings.mode == "openai" else GENERATE)
    return app


def runtime_of(app: Flask) -> Runtime:
    """The Runtime behind an app (gunicorn hooks use it to drain on SIGTERM)."""
    return app.extensions["serve.runtime"]
