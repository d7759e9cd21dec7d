"""Clients that hang up stop costing anything: their engine requests are cancelled at once.

A streamed answer notices its client leaving when a write fails (gunicorn closes the response and
`Reply.on_close` cancels). A plain answer writes nothing until the end, and a queued stream writes
nothing until its first token, so neither would notice: each HTTP request gets a `Client` whose
watcher greenlet waits for the client's socket to turn readable. The body has been read whole by
then, so readable means closed by the peer (poll's POLLRDHUP on Linux, even behind the bytes of a
pipelined request; elsewhere, a peek that reads no byte) or a pipelined request (looked at again
every PIPELINED_POLL s). The watcher then cancels every engine request submitted for that client
(`common.submit` tracks them through `track`), and the engine drops them at its next step, queued
or running.

Without gevent or without gunicorn's socket (Flask's test client, tools), nothing is watched; the
tracking still works, so `Client.leave()` can be called by hand.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import select
import socket
import sys
from collections.abc import Iterator
from contextvars import ContextVar
from typing import Any

from serve.protocol.errors import ApiError

log = logging.getLogger("serve")
# Seconds between two looks at a socket that holds bytes (a pipelined next request): readable but
# not closed, so waiting for readability again would spin.
PIPELINED_POLL = 0.5
# What poll reports once the peer closed or reset the connection (POLLRDHUP is Linux's).
HANGUP_EVENTS = getattr(select, "POLLRDHUP", 0) and (select.POLLRDHUP | select.POLLHUP | select.POLLERR)
_current: ContextVar[Client | None] = ContextVar("serve_client", default=None)


class Client:
    """The engine requests of one HTTP client, all cancelled when it leaves."""

    def __init__(self) -> None:
        self.gone = False
        self._handles: list[Any] = []
        self._watcher: Any = None  # a gevent Greenlet while watching

    @classmethod
    def of(cls, environ: dict[str, Any]) -> Client:
        """A client for a WSGI request; watched when it runs on gunicorn's gevent worker."""
        client = cls()
        sock = environ.get("gunicorn.socket")
        if sock is not None and _gevent_patched():
            import gevent

            client._watcher = gevent.spawn(_wait_for_hangup, sock, client)
        return client

    def track(self, handle: Any) -> None:
        """A request submitted for this client: cancelled when it leaves (at once if it has)."""
        if self.gone:
            handle.cancel()
        else:
            self._handles.append(handle)

    def leave(self) -> None:
        """The client has gone: cancel its engine requests (finished ones ignore it)."""
        if self.gone:
            return
        self.gone = True
        handles, self._handles = self._handles, []
        for h in handles:
            h.cancel()
        if handles:
            log.info("client went away: cancelled its %d engine request(s)", len(handles))

    def close(self) -> None:
        """The response is closed: stop watching (called by the WSGI layer, never by the watcher)."""
        watcher, self._watcher = self._watcher, None
        if watcher is not None:
            watcher.kill()  # blocks until it is dead: its read watcher must not outlive the socket
        self._handles = []

    @contextlib.contextmanager
    def attached(self) -> Iterator[Client]:
        """Within: what this greenlet (or thread) submits belongs to this client."""
        token = _current.set(self)
        try:
            yield self
        finally:
            _current.reset(token)


def current() -> Client | None:
    """The client the running code serves, if any."""
    return _current.get()


def track(handle: Any) -> None:
    """Tie an engine request to the current client (if any)."""
    client = _current.get()
    if client is not None:
        client.track(handle)


def gone() -> bool:
    """The current client has hung up."""
    client = _current.get()
    return client is not None and client.gone


def client_gone() -> ApiError:
    """The answer of a request whose client left; nobody reads it (nginx's 499, as proxies log it)."""
    return ApiError(499, "client_closed_request", "The client closed the connection; its request was cancelled")


def _gevent_patched() -> bool:
    if "gevent" not in sys.modules:
        return False
    from gevent import monkey

    return monkey.is_module_patched("socket")


def _wait_for_hangup(sock: Any, client: Client) -> None:
    """Watcher greenlet: call `client.leave()` once the peer has closed (or reset) `sock`."""
    import gevent
    from gevent.socket import wait_read

    try:
        fd = sock.fileno()
    except OSError:
        return
    closed = _closed_by_poll if HANGUP_EVENTS else _closed_by_peek
    while fd >= 0:
        wait_read(fd)
        verdict = closed(sock, fd)
        if verdict is None:
            return  # the socket is no longer ours to watch
        if verdict:
            client.leave()
            return
        gevent.sleep(PIPELINED_POLL)


def _closed_by_poll(sock: Any, fd: int) -> bool | None:
    """Linux: POLLRDHUP says the peer shut its side even when unread bytes (a pipelined request) wait."""
    from gevent import monkey

    poller = monkey.get_original("select", "poll")()  # the real poll, with a 0 timeout: never blocks the hub
    poller.register(fd, select.POLLIN | HANGUP_EVENTS)
    events = next((ev for f, ev in poller.poll(0) if f == fd), 0)
    if events & select.POLLNVAL:
        return None
    return bool(events & HANGUP_EVENTS)


def _closed_by_peek(sock: Any, fd: int) -> bool | None:
    """Elsewhere: a readable socket that peeks no byte has been closed by the peer (bytes hide a close)."""
    try:
        return not sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT)
    except BlockingIOError:
        return False  # a spurious wakeup: nothing to read after all
    except OSError as exc:
        return None if exc.errno in (errno.EBADF, errno.ENOTSOCK) else True  # closed here, or reset there
    except ValueError:  # a TLS socket takes no recv flags: it cannot be watched this way
        return None
