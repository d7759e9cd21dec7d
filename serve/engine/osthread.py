"""Real OS threads and locks, even inside a gevent-monkey-patched process.

gunicorn's gevent worker patches `threading` and `_thread`: a `threading.Thread` started there is a
greenlet, and a lock from the patched module is a gevent lock. The engine's loop and the model
loader must be real OS threads (a greenlet running the model would freeze `/ping`), and what they
share with greenlets must be guarded by raw OS locks. These helpers hand out the originals.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any


def original(module: str, name: str) -> Any:
    """The unpatched stdlib object, even inside a gevent-monkey-patched process."""
    if "gevent" in sys.modules:
        from gevent import monkey

        return monkey.get_original(module, name)
    return getattr(__import__(module), name)


def allocate_lock() -> Any:
    """A raw OS lock (never a gevent one)."""
    return original("_thread", "allocate_lock")()


def start_os_thread(target: Callable[..., Any], *args: Any) -> int:
    """Run `target(*args)` on a real OS thread; returns the thread's identifier."""
    return original("_thread", "start_new_thread")(target, args)
