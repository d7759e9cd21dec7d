"""Progress lines on stderr while waiting: rewritten in place on a terminal, throttled lines otherwise.

stdout stays free for the one result a command prints (an image URI, an S3 URI), so shell scripts
can capture it with $(...).
"""

from __future__ import annotations

import sys
import time
from typing import TextIO


class Progress:
    """One status line for a long step (push, upload, endpoint wait)."""

    def __init__(self, label: str, stream: TextIO | None = None, every: float = 5.0) -> None:
        self.label = label
        self.stream = stream or sys.stderr
        self.every = every  # seconds between repeated lines (CI logs stay short)
        self.started = time.monotonic()
        self._last_text = ""
        self._last_emit = 0.0
        self._tty = bool(getattr(self.stream, "isatty", lambda: False)())

    @property
    def elapsed(self) -> float:
        """Seconds since this progress line started."""
        return time.monotonic() - self.started

    def update(self, text: str, force: bool = False) -> None:
        """Show `text` (with the elapsed time) if it changed or enough time passed."""
        now = time.monotonic()
        # A terminal redraws in place, so changes show at once; a log gets a line every `every` s.
        interval = 0.1 if self._tty and text != self._last_text else self.every
        if not force and now - self._last_emit < interval:
            return
        line = f"[{self.elapsed:6.1f}s] {self.label}: {text}"
        if self._tty:
            self.stream.write("\r\x1b[2K" + line)
        else:
            self.stream.write(line + "\n")
        self.stream.flush()
        self._last_text, self._last_emit = text, now

    def done(self, text: str) -> None:
        """Close the line with a final status."""
        self.update(text, force=True)
        if self._tty:
            self.stream.write("\n")
            self.stream.flush()


def log(message: str, stream: TextIO | None = None) -> None:
    """One informational line on stderr."""
    out = stream or sys.stderr
    out.write(message + "\n")
    out.flush()
