"""A Docker engine to build and run the image with: the one that runs, or a dockerd started here.

The docker client is chosen on first use (`docker_cli`): the first one that can build with
BuildKit, after installing Debian's docker.io when none can. Standard library only (the system
python3 runs it before any venv exists). The deploy tests use it too, to push the built image to a
local registry.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator
from typing import IO

LOCK_DIR = tempfile.gettempdir()
APT_PACKAGES = {"dockerd": "docker.io", "debootstrap": "debootstrap"}
# Clients from Docker 23 on build with BuildKit only through the buildx plugin; older ones (Debian
# bookworm's docker.io is 20.10) drive the engine's built-in BuildKit themselves.
BUILTIN_BUILDKIT_BEFORE = 23
_cli: str | None = None  # the client picked by docker_cli(), once one that can build was found


def _client_major(cli: str) -> int | None:
    """The major version of a docker client (`docker --version` needs no engine), None if it does not run."""
    try:
        out = subprocess.run([cli, "--version"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    match = re.search(r"version (\d+)\.", out)
    return int(match.group(1)) if match else None


def can_build(cli: str) -> bool:
    """True when `cli build` works with BuildKit: a pre-23 client, or a newer one with buildx."""
    major = _client_major(cli)
    if major is None:
        return False
    if major < BUILTIN_BUILDKIT_BEFORE:
        return True
    return subprocess.run([cli, "buildx", "version"], capture_output=True, timeout=30).returncode == 0


def _candidates() -> list[str]:
    """Every `docker` on PATH, in PATH order, then Debian's client (apt puts it in /usr/bin)."""
    found: list[str] = []
    for folder in [*os.environ.get("PATH", "").split(os.pathsep), "/usr/bin"]:
        path = os.path.realpath(os.path.join(folder or ".", "docker"))
        if os.path.isfile(path) and os.access(path, os.X_OK) and path not in found:
            found.append(path)
    return found


def docker_cli() -> str:
    """The docker client every command here runs: $DOCKER, else the first one that can build.

    Picked on first use, not at import: a machine whose first `docker` on PATH is a client without
    buildx gets Debian's docker.io installed and its client used, in this same run.
    """
    global _cli
    if os.environ.get("DOCKER"):
        return os.environ["DOCKER"]
    if _cli is None:
        usable = [cli for cli in _candidates() if can_build(cli)]
        if not usable:
            with contextlib.suppress(subprocess.CalledProcessError):  # apt's own error is on stderr
                ensure_packages(force=["docker.io"])
            usable = [cli for cli in _candidates() if can_build(cli)]
        if not usable:
            found = ", ".join(_candidates()) or "none"
            raise RuntimeError(f"no docker client here can build with BuildKit (found: {found}); install the "
                               "buildx plugin for it, or Debian's docker.io, or set DOCKER=/path/to/docker")
        _cli = usable[0]
    return _cli


def docker(*args: str, timeout: float = 120, check: bool = True, **kwargs) -> subprocess.CompletedProcess:
    """Run the docker CLI with captured text output; raise with its stderr when `check` and it fails."""
    proc = subprocess.run([docker_cli(), *args], capture_output=True, text=True, timeout=timeout, **kwargs)
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


def ensure_packages(force: list[str] | None = None) -> None:
    """apt-get install what the build needs (docker.io, debootstrap) when its command is missing.

    `force`: packages to install even though their command exists (e.g. docker.io when the only
    docker clients on the machine cannot build).
    """
    missing = [pkg for cmd, pkg in APT_PACKAGES.items() if shutil.which(cmd) is None]
    missing += [pkg for pkg in force or [] if pkg not in missing]
    if not missing:
        return
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    with host_lock("apt"):
        subprocess.run(["apt-get", "update", "-q"], check=True, env=env, timeout=600, stdout=subprocess.DEVNULL)
        subprocess.run(
            ["apt-get", "install", "-y", "-q", "--no-install-recommends", *missing],
            check=True, env=env, timeout=900, stdout=subprocess.DEVNULL,
        )


USERS_LOCK = os.path.join(LOCK_DIR, "sagemaker-llm-serve-engine-users.lock")
HANDOVER = os.path.join(LOCK_DIR, "sagemaker-llm-serve-dockerd.json")


def _alive(pid: int) -> bool:
    """True while `pid` runs (a zombie, exited but not yet reaped by its parent, counts as gone)."""
    try:
        with open(f"/proc/{pid}/stat") as handle:
            return handle.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


class DockerEngine:
    """A running Docker engine: the one already there, or a `dockerd` started (and later stopped) here.

    Test sessions on one machine share the engine: each holds a shared lock on USERS_LOCK while it uses
    it. The session that started dockerd stops it only when no other session holds that lock; otherwise
    it hands the engine over (HANDOVER names the process) and the last session to leave stops it.
    """

    def __init__(self, start_timeout: float = 90) -> None:
        self.start_timeout = start_timeout
        self.process: subprocess.Popen | None = None
        self.workdir: str | None = None
        self._users: IO[str] | None = None

    @property
    def started_here(self) -> bool:
        """True when this object launched the engine (and so will stop it, or hand it over)."""
        return self.process is not None

    def start(self) -> DockerEngine:
        """Make sure an engine answers; launch dockerd in the background when none does."""
        if self._users is None:
            self._users = open(USERS_LOCK, "w")
            fcntl.flock(self._users, fcntl.LOCK_SH)  # this session uses the engine until stop()
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
        """Leave the engine: stop the dockerd started here (it stops its own containerd), or hand it over
        while other sessions use it; the last session to leave stops a handed-over one."""
        if self._users is None:
            return
        fcntl.flock(self._users, fcntl.LOCK_UN)
        try:  # held until the end, so no session starts using an engine that is being stopped
            fcntl.flock(self._users, fcntl.LOCK_EX | fcntl.LOCK_NB)
            last = True
        except BlockingIOError:
            last = False
        try:
            if self.process is not None and not last:
                with open(HANDOVER, "w") as handle:
                    json.dump({"pid": self.process.pid, "workdir": self.workdir}, handle)
            elif self.process is not None:
                self._terminate(self.process.pid, timeout)
                self.process.wait(timeout=10)
                shutil.rmtree(self.workdir or "", ignore_errors=True)
            elif last and os.path.exists(HANDOVER):
                with open(HANDOVER) as handle:
                    handed = json.load(handle)
                self._terminate(handed["pid"], timeout)
                shutil.rmtree(handed["workdir"] or "", ignore_errors=True)
            if last:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(HANDOVER)
        finally:
            self.process, self.workdir = None, None
            self._users.close()
            self._users = None

    @staticmethod
    def _terminate(pid: int, timeout: float) -> None:
        """SIGTERM, then SIGKILL after `timeout` seconds."""
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
            deadline = time.monotonic() + timeout
            while _alive(pid) and time.monotonic() < deadline:
                time.sleep(0.2)
            if _alive(pid):
                os.kill(pid, signal.SIGKILL)

    def __enter__(self) -> DockerEngine:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
