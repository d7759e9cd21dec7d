"""A Docker engine to build and run the image with: the one that runs, or a dockerd started here.

Standard library only (the system python3 runs it before any venv exists). The deploy tests use it
too, to push the built image to a local registry.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator

# Debian's client matches Debian's engine (20.10) and drives its built-in BuildKit without the
# buildx plugin, which newer clients require for `docker build` with BuildKit.
DOCKER = os.environ.get("DOCKER") or ("/usr/bin/docker" if os.path.exists("/usr/bin/docker") else "docker")
LOCK_DIR = tempfile.gettempdir()
APT_PACKAGES = {"dockerd": "docker.io", "debootstrap": "debootstrap"}


def docker(*args: str, timeout: float = 120, check: bool = True, **kwargs) -> subprocess.CompletedProcess:
    """Run the docker CLI with captured text output; raise with its stderr when `check` and it fails."""
    proc = subprocess.run([DOCKER, *args], capture_output=True, text=True, timeout=timeout, **kwargs)
    if check and proc.returncode != 0:
        raise RuntimeError(f"docker {' '.join(args)} failed ({proc.returncode}): {proc.stderr.strip()}")
    return proc


def engine_running() -> bool:
    """True when a Docker engine answers on the default socket."""
    try:
        return docker("info", "--format", "{{.ServerVersion}}", timeout=20, check=False).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


def image_exists(ref: str) -> bool:
    """True when the engine holds the image `ref` (no registry is asked)."""
    return docker("image", "inspect", ref, check=False).returncode == 0


@contextlib.contextmanager
def host_lock(name: str) -> Iterator[None]:
    """A host-wide lock, so concurrent test sessions neither start two engines nor debootstrap twice."""
    with open(os.path.join(LOCK_DIR, f"sagemaker-llm-serve-{name}.lock"), "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def ensure_packages() -> None:
    """apt-get install what the build needs (docker.io, debootstrap) when its command is missing."""
    missing = [pkg for cmd, pkg in APT_PACKAGES.items() if shutil.which(cmd) is None]
    if not missing:
        return
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    with host_lock("apt"):
        subprocess.run(["apt-get", "update", "-q"], check=True, env=env, timeout=600, stdout=subprocess.DEVNULL)
        subprocess.run(
            ["apt-get", "install", "-y", "-q", "--no-install-recommends", *missing],
            check=True, env=env, timeout=900, stdout=subprocess.DEVNULL,
        )


class DockerEngine:
    """A running Docker engine: the one already there, or a `dockerd` started (and later stopped) here."""

    def __init__(self, start_timeout: float = 90) -> None:
        self.start_timeout = start_timeout
        self.process: subprocess.Popen | None = None
        self.workdir: str | None = None

    @property
    def started_here(self) -> bool:
        """True when this object launched the engine (and so will stop it)."""
        return self.process is not None

    def start(self) -> DockerEngine:
        """Make sure an engine answers; launch dockerd in the background when none does."""
        if engine_running():
            return self
        ensure_packages()
        with host_lock("engine"):
            if engine_running():  # another session started one while we waited for the lock
                return self
            self.workdir = tempfile.mkdtemp(prefix="dockerd-")
            log = open(os.path.join(self.workdir, "dockerd.log"), "wb")
            self.process = subprocess.Popen(
                ["dockerd", "--pidfile", os.path.join(self.workdir, "dockerd.pid")],
                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True,
            )
            log.close()
            self._wait_ready()
        return self

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + self.start_timeout
        while not engine_running():
            if self.process.poll() is not None or time.monotonic() > deadline:
                tail = self.log_tail()
                self.stop()
                raise RuntimeError(f"dockerd did not come up within {self.start_timeout:.0f} s:\n{tail}")
            time.sleep(0.5)

    def log_tail(self, lines: int = 30) -> str:
        """The end of the log of the dockerd started here ('' when none was started)."""
        if not self.workdir:
            return ""
        path = os.path.join(self.workdir, "dockerd.log")
        with contextlib.suppress(OSError), open(path, errors="replace") as handle:
            return "".join(handle.readlines()[-lines:])
        return ""

    def stop(self, timeout: float = 60) -> None:
        """Stop the dockerd started here (it stops its own containerd) and remove its temp dir."""
        if self.process is not None:
            if self.process.poll() is None:
                self.process.send_signal(signal.SIGTERM)
                try:
                    self.process.wait(timeout=timeout)
                except subprocess.TimeoutExpired:
                    self.process.kill()
                    self.process.wait(timeout=10)
            self.process = None
        if self.workdir:
            shutil.rmtree(self.workdir, ignore_errors=True)
            self.workdir = None

    def __enter__(self) -> DockerEngine:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
