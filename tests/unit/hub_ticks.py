"""For the gevent probes (import after monkey-patching): count a greenlet's ticks while a block runs."""

from __future__ import annotations

import gevent


class Ticks:
    """`with Ticks() as t: ...` counts 10 ms ticks of a greenlet meanwhile; `t.count` 0 means the hub froze."""

    def __init__(self) -> None:
        self.count = 0
        self._done = False
        self._greenlet: gevent.Greenlet | None = None

    def __enter__(self) -> Ticks:
        self._greenlet = gevent.spawn(self._tick)
        gevent.sleep(0)  # the ticker runs first
        return self

    def __exit__(self, *exc: object) -> None:
        self._done = True
        if self._greenlet is not None:
            self._greenlet.join(5)

    def _tick(self) -> None:
        while not self._done:
            self.count += 1
            gevent.sleep(0.01)
