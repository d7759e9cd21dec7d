"""Which failures stay with one request and which end the worker: the one place that decides.

| where it was raised                                          | ordinary error         | out of memory          | device error |
|--------------------------------------------------------------|------------------------|------------------------|--------------|
| one request's rows: detokenizer, stop criteria, a logits     | that request fails     | that request fails     | restart      |
|   processor, sampling that row, `SequenceState.advance`      |                        |                        |              |
| a forward pass: prefill of the newcomers / decode of the     | the requests of that   | the same, then cached  | restart      |
|   batch                                                      |   forward fail         |   memory is released   |              |
| updating the running batch (merging newcomers, dropping rows)| restart                | restart                | restart      |
| anything else that escapes a step (the loop itself)          | restart                | restart                | restart      |

plus two rules over time: `STICKY_FAILED_STEPS` steps in a row in which every prefill (or every
decode) failed mean a device stuck in an error state (restart), and no finished step for ENGINE_STALL_TIMEOUT seconds while
work waits means a hung step (the service's watchdog restarts the worker).

Why: a failure inside one request's rows cannot have touched anyone else's state, so failing that
request is exact. A failed forward leaves its own batch in an unknown state (some layers may hold the
new column, others not), so that batch is dropped and its requests fail, as TGI's router does with
`clear_cache` (for a decode, the whole running batch; for a prefill, only the newcomers, the newest
rows); the rest of the engine is intact, so the loop goes on. After an exception in the middle of
updating the running batch, or a CUDA error (the CUDA context of the process is corrupt and every
later kernel may fail or compute garbage), no state can be trusted: every in-flight request fails
with a clear error and the worker process exits so that gunicorn starts a fresh one.
On CPU, torch reports a failed allocation as a RuntimeError ("DefaultCPUAllocator: can't allocate
memory"), which is treated exactly like CUDA's OutOfMemoryError.
"""

from __future__ import annotations

import enum

STICKY_FAILED_STEPS = 3  # steps in a row where every forward failed: the device is stuck, restart

_OOM_MARKERS = ("out of memory", "can't allocate memory", "cannot allocate memory")
_DEVICE_MARKERS = (
    "cuda error", "cublas_status", "cudnn_status", "cudnn error", "device-side assert", "illegal memory access",
    "nccl error", "hip error", "unspecified launch failure", "misaligned address", "an illegal instruction",
)


class Scope(enum.Enum):
    """Where a failure was raised (the rows of the table above)."""

    REQUEST = "one request's rows"
    FORWARD = "a forward pass"
    BATCH_UPDATE = "updating the running batch"


class Action(enum.Enum):
    """What the engine does about a failure."""

    FAIL_REQUEST = "fail that request"
    FAIL_FORWARD = "fail the requests of that forward"
    RESTART = "fail every request and restart the worker"


class EngineFault(BaseException):
    """The engine's state can no longer be trusted: the loop ends and the worker restarts.

    A BaseException on purpose: the per-request `except Exception` guards inside a step must never
    swallow it on its way up to the loop.
    """


def is_out_of_memory(exc: BaseException) -> bool:
    """A failed allocation, on any device (CUDA's OutOfMemoryError, CPU's RuntimeError, MemoryError)."""
    if isinstance(exc, MemoryError):
        return True
    name = type(exc).__name__
    return name == "OutOfMemoryError" or (isinstance(exc, RuntimeError) and _has(exc, _OOM_MARKERS))


def is_device_error(exc: BaseException) -> bool:
    """An error from the accelerator itself (CUDA/HIP/NCCL), after which the device cannot be trusted."""
    if is_out_of_memory(exc):
        return False
    return type(exc).__name__ == "AcceleratorError" or (isinstance(exc, RuntimeError) and _has(exc, _DEVICE_MARKERS))


def decide(exc: BaseException, scope: Scope) -> Action:
    """The table above, as a function."""
    if not isinstance(exc, Exception) or is_device_error(exc) or scope is Scope.BATCH_UPDATE:
        return Action.RESTART
    return Action.FAIL_REQUEST if scope is Scope.REQUEST else Action.FAIL_FORWARD


def describe(exc: BaseException) -> str:
    """A one-line reason for a client or a log: the message, or the exception type when it has none."""
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


class StepHealth:
    """The rules over time for one engine: failed steps in a row, and whether this step ran out of memory.

    Prefills and decodes are counted apart: a step that prefills newcomers fine while its decode
    fails (a corrupt cache, a sticky kernel error) is still a failed decode step.
    """

    def __init__(self) -> None:
        self.failed_steps = {"prefill": 0, "decode": 0}
        self.out_of_memory = False
        self.last_error = ""
        self._outcomes: dict[str, list[int]] = {}  # kind -> [succeeded, failed] in this step

    def begin(self) -> None:
        """A step starts."""
        self._outcomes = {kind: [0, 0] for kind in self.failed_steps}
        self.out_of_memory = False

    def forward_succeeded(self, kind: str) -> None:
        self._outcomes[kind][0] += 1

    def forward_failed(self, kind: str, exc: Exception) -> None:
        """Count a failed forward of `kind` ("prefill" or "decode"); raise EngineFault for a device error."""
        self._outcomes[kind][1] += 1
        self.last_error = describe(exc)
        self.out_of_memory |= is_out_of_memory(exc)
        if decide(exc, Scope.FORWARD) is Action.RESTART:
            raise EngineFault(f"engine failure: device error in a {kind} forward: {describe(exc)}") from exc

    def end(self) -> None:
        """A step ended: raise EngineFault once STICKY_FAILED_STEPS steps in a row failed every forward of a kind."""
        for kind, (succeeded, failed) in self._outcomes.items():
            if succeeded:
                self.failed_steps[kind] = 0
            elif failed:
                self.failed_steps[kind] += 1
                if self.failed_steps[kind] >= STICKY_FAILED_STEPS:
                    raise EngineFault(f"engine failure: {self.failed_steps[kind]} {kind} steps in a row failed, the "
                                      f"device looks stuck (last error: {self.last_error})")


def _has(exc: BaseException, markers: tuple[str, ...]) -> bool:
    message = str(exc).lower()
    return any(m in message for m in markers)
