"""The worker's log is written from OS threads (loader, engine, watchdog) and the gevent hub at once."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_os_threads_and_greenlets_log_at_once_without_deadlock():
    """With the handler's lock a gevent RLock (made after monkey-patching), two of the three OS threads
    wrote 0 of 2000 records in 20 s: the engine's first idle line, logged in the same millisecond as the
    loader's "serving model" line, froze the engine loop until the stall watchdog restarted the worker."""
    out = subprocess.run([sys.executable, "-m", "tests.unit.logging_probe"], cwd=ROOT, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, (out.stdout, out.stderr[-2000:])
    assert json.loads(out.stdout) == {name: 2000 for name in
                                      ("thread0", "thread1", "thread2", "greenlet0", "greenlet1")}
