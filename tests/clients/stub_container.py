"""A tiny stand-in container for the runtime's own tests: it misbehaves on request, fast.

Body `{"mode": ...}` picks the behaviour: `echo` (default) answers with what it received, `sse`
streams N events, `drip` streams them slowly, `break` streams two events then drops the connection, `sleep` answers late,
`status` answers with the given status and body.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator

from flask import Flask, Response, request

from deploy.local_endpoint import BackgroundServer


def _sse(n: int) -> Iterator[bytes]:
    for i in range(n):
        yield f"data: {json.dumps({'index': i, 'text': 'é' * (i % 3) + str(i)})}\n\n".encode()


def _broken() -> Iterator[bytes]:
    yield from _sse(2)
    raise ConnectionAbortedError("container died mid-stream")  # werkzeug drops the connection


def _drip(n: int, delay: float) -> Iterator[bytes]:
    for chunk in _sse(n):
        time.sleep(delay)
        yield chunk


def create_stub() -> Flask:
    """The stub app."""
    app = Flask("stub")

    @app.post("/invocations")
    def invocations() -> Response:
        raw = request.get_data()
        try:
            body = json.loads(raw)
        except ValueError:
            body = {}
        mode = body.get("mode", "echo") if isinstance(body, dict) else "echo"
        extra = {"X-Amzn-SageMaker-Custom-Attributes": "from-container", "X-Internal-Secret": "strip-me"}
        if mode == "sse":
            return Response(_sse(int(body.get("n", 5))), mimetype="text/event-stream", headers=extra)
        if mode == "drip":
            return Response(_drip(int(body.get("n", 10)), float(body.get("delay", 0.2))), mimetype="text/event-stream")
        if mode == "break":
            return Response(_broken(), mimetype="text/event-stream")
        if mode == "sleep":
            time.sleep(float(body.get("seconds", 3)))
        if mode == "status":
            return Response(body.get("body", "{}"), status=int(body["status"]), mimetype="application/json")
        seen = {"headers": dict(request.headers), "length": len(raw)}
        return Response(json.dumps(seen), mimetype="application/json", headers=extra)

    return app


class StubContainer(BackgroundServer):
    """`with StubContainer() as stub: stub.url`."""

    def __init__(self) -> None:
        super().__init__(create_stub(), name="stub-container")
