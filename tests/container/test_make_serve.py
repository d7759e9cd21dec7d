"""`make serve`'s port: SAGEMAKER_BIND_TO_PORT wins when set (the container's own variable), else PORT.

Only gunicorn's listening socket is checked (it opens before the model loads), then the process
group is stopped; the server binds 127.0.0.1 only.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests

from tests.server import free_port

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[2]
VENV = Path(sys.prefix)


def listening_port(make_args: list[str], env: dict[str, str], candidates: list[int], timeout: float = 90) -> int:
    """Run `make serve` with `env` (and no SAGEMAKER_BIND_TO_PORT unless given) until one of `candidates`
    answers /ping (200 or 503); which one it was."""
    full_env = {k: v for k, v in os.environ.items() if k != "SAGEMAKER_BIND_TO_PORT"}
    full_env.update(SAGEMAKER_BIND_HOST="127.0.0.1", **env)
    # -o: the venv is set up already; make must not reinstall it because a requirements file is newer.
    proc = subprocess.Popen(["make", "--no-print-directory", "-o", f"{VENV}/.setup-done", f"VENV={VENV}", "serve",
                             *make_args], cwd=ROOT, env=full_env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert proc.poll() is None, "make serve exited"
            for port in candidates:
                try:
                    requests.get(f"http://127.0.0.1:{port}/ping", timeout=1)
                    return port
                except requests.RequestException:
                    pass
            time.sleep(0.5)
        raise AssertionError(f"make serve listened on none of {candidates}")
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=40)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)


def test_sagemaker_bind_to_port_wins_over_port() -> None:
    bind, port = free_port(), free_port()
    assert listening_port([f"PORT={port}"], {"SAGEMAKER_BIND_TO_PORT": str(bind)}, [bind, port]) == bind


def test_port_when_sagemaker_bind_to_port_is_unset() -> None:
    port = free_port()
    assert listening_port([f"PORT={port}"], {}, [port]) == port
