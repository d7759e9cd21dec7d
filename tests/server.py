"""Start the real server (`container/serve`: gunicorn + one gevent worker) on a free loopback port.

Reusable by every test suite that needs a live container contract:

    from tests.server import running_server

    with running_server({"OAI_ENABLED": "true"}) as srv:
        requests.post(srv.url + "/invocations", json={...}, timeout=60)

The server binds 127.0.0.1 only, its output goes to a log file (`srv.logs()`), every wait is bounded,
and leaving the block sends SIGTERM (then SIGKILL if it does not exit in time).
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Mapping
from pathlib import Path

import requests

ROOT = Path(__file__).resolve().parent.parent
SERVE = ROOT / "container" / "serve"
# logit_bias that bans SmolLM2's <|endoftext|> and <|im_end|>: a test that needs a stream to last (to hold
# a slot, to be cut by a time limit) cannot count on the model rambling, which a fast machine finishes early.
NO_EOS = {"0": -100, "2": -100}
DEFAULT_READY_TIMEOUT = 240.0  # SmolLM2 loads in 10-60 s depending on how busy the machine is


def default_cpu_dtype() -> str:
    """The dtype a server on this machine's CPU picks when DTYPE is unset (bfloat16 where the CPU has native
    bf16, float32 elsewhere): what its start-up line says, on either kind of CI machine."""
    from serve.model_loading import pick_dtype

    return str(pick_dtype(None, on_gpu=False)[0]).removeprefix("torch.")


def free_port() -> int:
    """A TCP port nobody listens on right now (127.0.0.1)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """A running `container/serve` process."""

    def __init__(self, proc: subprocess.Popen, port: int, log_path: Path):
        self.proc, self.port, self.log_path = proc, port, log_path

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def invocations(self) -> str:
        return f"{self.url}/invocations"

    def logs(self) -> str:
        """Everything the server printed so far (stdout and stderr)."""
        return self.log_path.read_text(encoding="utf-8", errors="replace")

    def ping(self, timeout: float = 2.0) -> int:
        """The /ping status code, or 0 when the connection fails."""
        try:
            return requests.get(f"{self.url}/ping", timeout=timeout).status_code
        except requests.RequestException:
            return 0

    def wait_listening(self, timeout: float = 60.0) -> None:
        """Block until /ping answers at all (200 or 503): gunicorn is up, the model may still load."""
        self._wait_for(lambda code: code != 0, timeout, "listening")

    def wait_ready(self, timeout: float = DEFAULT_READY_TIMEOUT) -> None:
        """Block until /ping says 200; raise with the server's log if it dies or times out."""
        self._wait_for(lambda code: code == 200, timeout, "ready")

    def _wait_for(self, ok, timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.logs()[-5000:]}")
            if ok(self.ping()):
                return
            time.sleep(0.25)
        raise TimeoutError(f"server not {what} after {timeout:.0f}s:\n{self.logs()[-5000:]}")

    def terminate(self, timeout: float = 40.0) -> int:
        """SIGTERM, wait up to `timeout` (SageMaker waits 30 s), then SIGKILL. Returns the exit code."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        return self.proc.returncode


def server_env(overrides: Mapping[str, str] | None, port: int) -> dict[str, str]:
    """The environment of the server: ours minus the settings the test did not ask for."""
    env = {k: v for k, v in os.environ.items() if k not in ("OAI_ENABLED", "MESSAGES_API_ENABLED")}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env.update({
        "SAGEMAKER_BIND_TO_PORT": str(port),
        "SAGEMAKER_BIND_HOST": "127.0.0.1",  # tests never listen beyond loopback
        "SM_MODEL_DIR": env.get("SM_MODEL_DIR", str(ROOT / ".no-model-dir")),  # never pick up a stray /opt/ml/model
        "PYTHONUNBUFFERED": "1",
        "TQDM_DISABLE": "1",
    })
    env.update(overrides or {})
    return env


@contextlib.contextmanager
def running_server(
    env: Mapping[str, str] | None = None, wait: bool = True, timeout: float = DEFAULT_READY_TIMEOUT
) -> Iterator[Server]:
    """Start `container/serve` with `env` overrides; yield a `Server`; SIGTERM it on exit."""
    port = free_port()
    log_file = tempfile.NamedTemporaryFile(prefix=f"serve-{port}-", suffix=".log", delete=False)
    proc = subprocess.Popen(
        [str(SERVE)], env=server_env(env, port), stdout=log_file, stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL, cwd=str(ROOT),
    )
    server = Server(proc, port, Path(log_file.name))
    try:
        if wait:
            server.wait_ready(timeout)
        yield server
    finally:
        server.terminate()
        log_file.close()
        with contextlib.suppress(OSError):
            os.unlink(log_file.name)


def sse_events(response: requests.Response) -> list[str]:
    """The `data:` payloads of an SSE response, in order (works for `data:x` and `data: x`)."""
    events = []
    for line in response.iter_lines(decode_unicode=True):
        if line and line.startswith("data:"):
            events.append(line[5:].lstrip(" "))
    return events
