"""ModelService.shutdown's sequence with a stand-in engine (the real server's SIGTERM path is
tests/integration/test_shutdown.py): drain first, cut short only at the deadline, stop the loop."""

from __future__ import annotations

import time

from serve.config import Settings
from serve.engine.request import EngineShutdown
from serve.service import CUT_SHORT_SECONDS, ModelService, Status


class StandInEngine:
    def __init__(self, svc: ModelService, finishes_after: float | None):
        self.svc, self.finishes_after = svc, finishes_after
        self.calls: list[str] = []
        self.stopped = False
        self.started = time.monotonic()

    def drain(self) -> None:
        self.calls.append("drain")

    def abort(self, reason: str, error: type) -> None:
        self.calls.append(f"abort:{error.__name__}")
        assert "shutting down" in reason
        self.svc.inflight = 0  # the clients' greenlets write their errors and leave

    def shutdown(self, timeout: float = 10.0) -> None:
        assert timeout == 0  # never blocks the hub
        self.calls.append("shutdown")
        self.stopped = True

    def tick(self) -> None:
        if self.finishes_after is not None and time.monotonic() - self.started > self.finishes_after:
            self.svc.inflight = 0


def service_with(inflight: int, finishes_after: float | None) -> tuple[ModelService, StandInEngine]:
    svc = ModelService(Settings.from_env({}))
    engine = StandInEngine(svc, finishes_after)
    svc.engine, svc.status, svc.inflight = engine, Status.READY, inflight  # type: ignore[assignment]
    return svc, engine


def sleeper(engine: StandInEngine):
    def sleep(seconds: float) -> None:
        time.sleep(seconds)
        engine.tick()
    return sleep


def test_requests_that_finish_in_time_are_not_cut():
    svc, engine = service_with(inflight=3, finishes_after=0.3)
    cut = svc.shutdown(time.monotonic() + CUT_SHORT_SECONDS + 2, sleeper(engine))
    assert cut == 0 and svc.status is Status.DRAINING
    assert engine.calls == ["drain", "shutdown"]


def test_requests_still_running_at_the_deadline_end_with_engine_shutdown():
    svc, engine = service_with(inflight=2, finishes_after=None)
    t0 = time.monotonic()
    deadline = t0 + CUT_SHORT_SECONDS + 0.5
    cut = svc.shutdown(deadline, sleeper(engine))
    assert cut == 2 and engine.calls == ["drain", f"abort:{EngineShutdown.__name__}", "shutdown"]
    assert time.monotonic() <= deadline + 0.2
    assert time.monotonic() - t0 >= 0.4  # the drain waited until the cut-off first
