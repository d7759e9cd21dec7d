"""The SageMaker HTTP contract: `/ping`, `/invocations`, dispatch, error shapes, SSE (docs/api.md).

gunicorn loads `serve.app:create_app()` inside its worker, after fork, so the model (and CUDA)
is only ever initialised there; the load runs on a background OS thread while `/ping` says 503.
"""

from __future__ import annotations

import json
import logging
import math
import re
import sys
from collections.abc import Callable, Sequence
from typing import IO, Any

from flask import Flask, Response, request
from werkzeug.exceptions import HTTPException

from serve import offhub
from serve.config import Settings
from serve.engine.osthread import original
from serve.handlers import chat, common, completions, departure, generate
from serve.protocol import errors
from serve.protocol.errors import Api, ApiError, HealthcheckError
from serve.protocol.fields import WireModel, dumps
from serve.service import ModelService

log = logging.getLogger("serve")
JSON_TYPES = ("application/json", "text/json")
JSONLINES_TYPES = ("application/jsonlines", "application/jsonl", "application/x-jsonlines", "application/json-lines")
Handler = Callable[[ModelService, Any], common.Reply]
SHAPES = "`inputs` (TGI generate), `messages` (chat completions) or `prompt` (completions)"


def dispatch(mode: str, body: Any) -> tuple[Api, Handler]:
    """The dispatch table (docs/api.md, "Routes and dispatch"): (API, handler), or a 422 ApiError."""
    keys = set(body) if isinstance(body, dict) else set()
    if mode == "openai":
        if "messages" in keys:
            return Api.OPENAI, chat.handle
        if "prompt" in keys:
            return Api.OPENAI, completions.handle
        if "inputs" in keys:
            raise errors.validation(
                "The server is in OpenAI mode (OAI_ENABLED=true): send `messages` (chat completions) or "
                "`prompt` (completions) instead of `inputs`, or unset OAI_ENABLED", "inputs")
    elif mode == "generate":
        if "inputs" in keys:
            return Api.GENERATE, generate.handle
        if keys & {"messages", "prompt"}:
            raise errors.validation(
                "The OpenAI API is disabled (OAI_ENABLED=false): set OAI_ENABLED=true (or unset it) to send "
                "`messages` or `prompt`, or send TGI's `{\"inputs\": ...}`")
    else:
        if "inputs" in keys:
            return Api.GENERATE, generate.handle
        if "messages" in keys:
            return Api.OPENAI, chat.handle
        if "prompt" in keys:
            return Api.OPENAI, completions.handle
    raise errors.validation(f"Unrecognised request body: send a JSON object with {SHAPES}")


def _decode_body(limit: int, timeout: float = 0) -> str:
    """The body as text: 413 over PAYLOAD_LIMIT (declared or streamed), 408 when it is not all in
    within `timeout` seconds (0: no deadline), 400 when it is not UTF-8."""
    declared = request.content_length or 0
    raw = b"" if declared > limit else _read_within(request.stream, limit + 1, timeout)
    if max(declared, len(raw)) > limit:
        raise errors.payload_too_large(limit)
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise errors.bad_request(f"The body is not valid UTF-8: {exc}") from None


class _BodyTimeout(Exception):
    """The body read's deadline passed (raised inside the read by gevent's timer)."""


def _read_within(stream: IO[bytes], size: int, timeout: float) -> bytes:
    """`_read_at_most` with a deadline on the whole read, in a greenlet of the gevent worker.

    A client that sends its headers and then trickles its body, or stalls in the middle of it,
    would hold its greenlet and connection for ever; past the deadline it gets a 408 and its
    connection is closed after the answer (`close_after_answer`: the rest of its body would be
    read as the next request otherwise). Outside gevent (tests' Flask client) there is no hub to
    guard and no deadline.
    """
    if timeout <= 0 or not offhub.in_greenlet():
        return _read_at_most(stream, size)
    import gevent

    try:
        with gevent.Timeout(timeout, _BodyTimeout):
            return _read_at_most(stream, size)
    except _BodyTimeout:
        close_after_answer(request.environ)
        raise errors.request_timeout(timeout) from None


_CLOSING: set[int] = set()  # ids of client sockets whose connection ends after the current answer


def close_after_answer(environ: dict[str, Any]) -> None:
    """Have the worker close this request's connection once its answer is written (keep-alive off)."""
    sock = environ.get("gunicorn.socket")
    if sock is not None:
        _CLOSING.add(id(sock))


def closing(sock: Any) -> bool:
    """The worker's question after each answer: must this connection close now? (Forgets it.)"""
    if id(sock) in _CLOSING:
        _CLOSING.discard(id(sock))
        return True
    return False


def _read_at_most(stream: IO[bytes], size: int) -> bytes:
    """Up to `size` bytes: a chunked body (no Content-Length) is never read far past the limit."""
    chunks, got = [], 0
    while got < size and (chunk := stream.read(size - got)):
        chunks.append(chunk)
        got += len(chunk)
    return b"".join(chunks)


MAX_JSON_DEPTH = 128  # serde_json's recursion limit: TGI refuses deeper bodies too
_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")  # `\ud800`..`\udfff`: the only way JSON text holds one


class _NotJson(ValueError):
    """A number or constant that parses in Python but is not JSON (RFC 8259): NaN, Infinity, 1e400."""


def _constant(name: str) -> float:
    raise _NotJson(f"{name} is not a JSON number")


def _finite(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise _NotJson(f"the number {text[:32]} is out of range")
    return value


def _loads(text: str) -> Any:
    """Decode one JSON body; 400 for what a strict JSON decoder (TGI's serde_json) refuses.

    Python's decoder accepts NaN, Infinity and numbers past the float range, and it hands back lone
    surrogates (`"\\ud800"`) that no tokenizer or UTF-8 encoder can take; it raises RecursionError on
    deep nesting and ValueError on integers past 4300 digits. All of these are the client's error.
    """
    try:
        body = json.loads(text, parse_constant=_constant, parse_float=_finite)
    except json.JSONDecodeError as exc:
        raise errors.bad_request(f"The body is not valid JSON: {exc}") from None
    except _NotJson as exc:
        raise errors.bad_request(f"The body is not valid JSON: {exc}") from None
    except RecursionError:
        raise errors.bad_request(f"The body is not valid JSON: nested deeper than {MAX_JSON_DEPTH} levels") from None
    except ValueError:  # int(): more digits than sys.get_int_max_str_digits()
        raise errors.bad_request("The body is not valid JSON: an integer has too many digits") from None
    surrogates = _SURROGATE_ESCAPE.search(text) is not None
    if surrogates or text.count("[") + text.count("{") >= MAX_JSON_DEPTH:  # else it cannot nest that deep
        _check_decoded(body, surrogates)
    return body


def _check_decoded(body: Any, surrogates: bool) -> None:
    """400 when `body` nests deeper than MAX_JSON_DEPTH, or (`surrogates`) holds a lone surrogate."""
    stack: list[tuple[Any, int]] = [(body, 0)]
    while stack:
        value, depth = stack.pop()
        if isinstance(value, dict | list):
            if depth >= MAX_JSON_DEPTH:
                raise errors.bad_request(f"The body is not valid JSON: nested deeper than {MAX_JSON_DEPTH} levels")
            items = [*value, *value.values()] if isinstance(value, dict) else value
            stack.extend((item, depth + 1) for item in items if surrogates or isinstance(item, dict | list))
        elif surrogates and isinstance(value, str) and not value.isascii():
            try:
                value.encode("utf-8")
            except UnicodeEncodeError:
                raise errors.bad_request(
                    "The body is not valid JSON text: a string holds a lone surrogate escape (\\ud800-\\udfff "
                    "not in a high-low pair), which is not Unicode text") from None


def _json(body: WireModel | Sequence[WireModel], status: int = 200, headers: dict[str, str] | None = None) -> Response:
    return Response(dumps(body), status=status, mimetype="application/json", headers=headers or {})


def _error(err: ApiError, api: Api) -> Response:
    return _json(err.model(api), err.status)


class Invocations:
    """POST /invocations for one worker: one JSON request, or a JSON-lines batch."""

    def __init__(self, svc: ModelService, default: Api):
        self.svc = svc
        self.default = default  # the shape of the errors no request chose (bad JSON, 413, 415)

    def __call__(self) -> Response:
        mtype = (request.mimetype or "").lower()
        if mtype and mtype not in JSON_TYPES + JSONLINES_TYPES and not mtype.endswith("+json"):
            return _error(ApiError(415, "unsupported_media_type",
                                   f"Unsupported Content-Type {mtype!r}: send application/json or application/jsonlines"),
                          self.default)
        try:
            text = _decode_body(self.svc.settings.payload_limit, self.svc.settings.body_read_timeout)
            if mtype in JSONLINES_TYPES:
                return self.jsonlines(text)
            body = _loads(text)
        except ApiError as err:
            return _error(err, self.default)
        api, reply = self.answer(body)
        if isinstance(reply, ApiError):
            if reply.status >= 500 or reply.status == 424:
                log.warning("request failed: %s %s", reply.status, reply.message)
            return _error(reply, api)
        if reply.stream is not None:
            headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no", **reply.headers}
            response = Response(reply.stream, mimetype="text/event-stream", headers=headers)
            if reply.on_close is not None:
                response.call_on_close(reply.on_close)
            return response
        return _json(reply.body, headers=reply.headers)

    def answer(self, body: Any, allow_stream: bool = True) -> tuple[Api, common.Reply | ApiError]:
        """Dispatch and run one request; errors come back as values so JSON lines can keep going."""
        api = self.default
        try:
            api, handler = dispatch(self.svc.settings.mode, body)
            if not allow_stream and isinstance(body, dict):
                body = {**body, "stream": False}
            if not self.svc.ready:
                raise errors.unhealthy()
            return api, handler(self.svc, body)
        except ApiError as err:
            return api, err

    def jsonlines(self, text: str) -> Response:
        """Batch transform: one answer line per input line, in order; a bad line fails alone.

        At most JSONLINES_CONCURRENCY lines run at once (the rest of MAX_CONCURRENT_REQUESTS stays
        for real-time traffic); when the client hangs up, lines not yet started are skipped and the
        running ones are cancelled (departure.py).
        """
        lines = [line for line in text.splitlines() if line.strip()]
        client = departure.current() or departure.Client()

        def one(line: str) -> str:
            if client.gone:
                return departure.client_gone().model(self.default).dumps()
            try:
                body = _loads(line)
            except ApiError as err:
                return err.model(self.default).dumps()
            with client.attached():  # a pool greenlet starts with an empty context
                api, reply = self.answer(body, allow_stream=False)
            return reply.model(api).dumps() if isinstance(reply, ApiError) else dumps(reply.body)

        if "gevent" in sys.modules:
            from gevent import monkey
            from gevent.pool import Pool

            if monkey.is_module_patched("threading"):  # run the lines concurrently so they batch
                pool = Pool(self.svc.settings.jsonlines_concurrency)
                return Response("".join(r + "\n" for r in pool.imap(one, lines)), mimetype="application/jsonlines")
        return Response("".join(one(line) + "\n" for line in lines), mimetype="application/jsonlines")


def _unhealthy_reason(svc: ModelService) -> str | None:
    """Why this worker will not get ready: its model failed to load, or its engine loop died."""
    return svc.error or getattr(svc.engine, "error", None)  # no engine yet: None


def _register_routes(app: Flask, svc: ModelService, default: Api) -> None:
    invocations_ = Invocations(svc, default)
    logged: str | None = None  # the last reason /ping logged: once per reason, not once per ping

    @app.route("/ping", methods=["GET", "POST"])
    def ping() -> Response:
        nonlocal logged
        if svc.ready:
            return Response(b"", status=200)
        reason = _unhealthy_reason(svc)
        if reason is not None and reason != logged:
            log.error("/ping answers 503: %s", reason)
            logged = reason
        return _json(HealthcheckError(reason=reason), 503)

    @app.route("/invocations", methods=["POST"])
    def invocations() -> Response:
        svc.inflight += 1
        client = departure.Client.of(request.environ)  # watched until the response is closed
        try:
            with client.attached():
                response = invocations_()
        except BaseException:
            client.close()
            svc.inflight -= 1
            raise

        def done() -> None:
            client.close()
            svc.inflight -= 1

        response.call_on_close(done)  # streams count until their last byte is written
        custom = request.headers.get("X-Amzn-SageMaker-Custom-Attributes")
        if custom is not None:
            response.headers["X-Amzn-SageMaker-Custom-Attributes"] = custom
        return response


def _register_error_handlers(app: Flask, default: Api) -> None:
    """404 and 405 from routing, and any bug, as JSON in the server's default API shape."""

    @app.errorhandler(HTTPException)
    def http_error(exc: HTTPException) -> Response:
        code = exc.code or 500
        kind = {404: "not_found", 405: "method_not_allowed"}.get(code, "validation")
        what = f"{request.method} {request.path}"
        message = {404: f"Not found: {what}; the routes are GET /ping and POST /invocations",
                   405: f"Method not allowed: {what}"}.get(code, exc.description or exc.name)
        return _error(ApiError(code, kind, message), default)

    @app.errorhandler(Exception)
    def unexpected(exc: Exception) -> Response:
        log.exception("unhandled error")
        return _error(ApiError(500, "internal", f"Internal server error: {type(exc).__name__}: {exc}"), default)


def configure_logging(level: str) -> None:
    """One readable line per record on stderr (gunicorn's own loggers keep their handlers)."""
    logger = logging.getLogger("serve")
    if not logger.handlers:
        handler = logging.StreamHandler()
        # Made after gevent's monkey-patching, the handler's lock would be a gevent RLock, which
        # deadlocks when the loader, engine and watchdog OS threads and the hub log at once
        # (tests/unit/logging_probe.py); a raw OS lock serves every thread.
        handler.lock = original("_thread", "RLock")()
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        logger.addHandler(handler)
        logger.propagate = False
    logger.setLevel(level.upper())
    # transformers imports torchao whenever it is installed (for its quantizer); on a CPU build torchao
    # warns once per CUDA kernel library it cannot load, and torch once per enum torchao registers: a
    # dozen misleading lines in every start-up log. Only their errors are kept.
    for name in ("torchao", "torch.utils._pytree"):
        logging.getLogger(name).setLevel(logging.ERROR)


def create_app(settings: Settings | None = None, service: ModelService | None = None, load: bool = True) -> Flask:
    """The WSGI app. Without `service`, starts loading the model in the background (`load=True`)."""
    settings = settings or (service.settings if service else Settings.from_env())
    configure_logging(settings.log_level)
    if service is None:
        service = ModelService(settings)
        if load:
            service.start_loading()
    app = Flask("serve")
    app.extensions["serve.service"] = service
    default = Api.default_for(settings.mode)
    _register_routes(app, service, default)
    _register_error_handlers(app, default)
    return app


def service_of(app: Flask) -> ModelService:
    """The ModelService behind an app (gunicorn hooks use it to drain on SIGTERM)."""
    return app.extensions["serve.service"]
