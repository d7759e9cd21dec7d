"""Which docker client the build helper runs, on machines whose first `docker` cannot build.

Fake clients (shell scripts answering `--version` and `buildx version` as the real ones do) on a
PATH made for the test; no engine is needed.
"""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import pytest

from container import dockerengine

STATIC_28 = "Docker version 28.2.2, build e6534b4"  # the static client of this machine, no buildx
DEBIAN = "Docker version 20.10.24+dfsg1, build 297e128"  # Debian bookworm's docker.io


def fake_client(folder: Path, version: str, buildx: bool) -> Path:
    """A `docker` script in `folder` that prints `version` and has (or lacks) the buildx plugin."""
    folder.mkdir(parents=True, exist_ok=True)
    script = folder / "docker"
    missing = "echo \"docker: 'buildx' is not a docker command.\" >&2; exit 1"
    script.write_text("#!/bin/sh\n"
                      f'if [ "$1" = "--version" ]; then echo "{version}"; exit 0; fi\n'
                      f'if [ "$1" = "buildx" ]; then {"echo buildx v0.24.0; exit 0" if buildx else missing}; fi\n'
                      "exit 0\n")
    script.chmod(script.stat().st_mode | stat.S_IXUSR)
    return script


@pytest.fixture
def machine(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict:
    """A PATH with only the test's folders, no $DOCKER, no client picked yet, apt recorded not run."""
    installs: list[list[str] | None] = []
    monkeypatch.delenv("DOCKER", raising=False)
    monkeypatch.setattr(dockerengine, "_cli", None)
    monkeypatch.setattr(dockerengine, "_candidates", lambda: [
        str(p) for d in ("local-bin", "usr-bin") if (p := tmp_path / d / "docker").exists()])
    monkeypatch.setattr(dockerengine, "ensure_packages", lambda force=None: installs.append(force))
    return {"root": tmp_path, "installs": installs}


def test_a_client_without_buildx_is_passed_over_for_one_that_can_build(machine: dict) -> None:
    fake_client(machine["root"] / "local-bin", STATIC_28, buildx=False)
    debian = fake_client(machine["root"] / "usr-bin", DEBIAN, buildx=False)
    assert dockerengine.docker_cli() == str(debian)
    assert machine["installs"] == []


def test_a_new_client_with_buildx_is_used_first(machine: dict) -> None:
    with_buildx = fake_client(machine["root"] / "local-bin", STATIC_28, buildx=True)
    fake_client(machine["root"] / "usr-bin", DEBIAN, buildx=False)
    assert dockerengine.docker_cli() == str(with_buildx)


def test_the_first_run_installs_docker_io_and_uses_its_client(machine: dict, monkeypatch) -> None:
    """The fresh-machine case: only the static client; docker.io is installed, then its client picked."""
    fake_client(machine["root"] / "local-bin", STATIC_28, buildx=False)

    def apt_install(force=None) -> None:
        machine["installs"].append(force)
        fake_client(machine["root"] / "usr-bin", DEBIAN, buildx=False)  # what `apt-get install docker.io` adds

    monkeypatch.setattr(dockerengine, "ensure_packages", apt_install)
    assert dockerengine.docker_cli() == str(machine["root"] / "usr-bin" / "docker")
    assert machine["installs"] == [["docker.io"]]
    assert dockerengine.docker_cli() == str(machine["root"] / "usr-bin" / "docker")  # picked once
    assert machine["installs"] == [["docker.io"]]


def test_no_client_that_can_build_is_a_clear_error(machine: dict) -> None:
    fake_client(machine["root"] / "local-bin", STATIC_28, buildx=False)
    with pytest.raises(RuntimeError, match="no docker client here can build with BuildKit .*local-bin/docker"):
        dockerengine.docker_cli()


def test_docker_env_wins(machine: dict, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DOCKER", "/opt/docker/bin/docker")
    assert dockerengine.docker_cli() == "/opt/docker/bin/docker"


def test_the_real_candidates_follow_path_order(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    first = fake_client(tmp_path / "a", STATIC_28, buildx=False)
    second = fake_client(tmp_path / "b", DEBIAN, buildx=False)
    monkeypatch.setenv("PATH", f"{tmp_path / 'a'}:{tmp_path / 'b'}")
    assert dockerengine._candidates()[:2] == [str(first), str(second)]
    assert [dockerengine.can_build(str(c)) for c in (first, second)] == [False, True]


@pytest.fixture
def fake_engine(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A `dockerd` that writes its pid file and sleeps; the engine 'answers' while it runs."""
    bin_dir, work = tmp_path / "bin", tmp_path / "work"
    bin_dir.mkdir()
    work.mkdir()
    script = bin_dir / "dockerd"
    script.write_text('#!/bin/sh\necho $$ > "$2"\nexec sleep 300\n')
    script.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
    monkeypatch.setattr(dockerengine, "USERS_LOCK", str(tmp_path / "users.lock"))
    monkeypatch.setattr(dockerengine, "HANDOVER", str(tmp_path / "handover.json"))
    monkeypatch.setattr(dockerengine, "ensure_packages", lambda force=None: None)
    monkeypatch.setattr(dockerengine.tempfile, "mkdtemp", lambda prefix="": str(work))
    monkeypatch.setattr(dockerengine, "engine_running", lambda: dockerd_pid(work) is not None)
    return work


def dockerd_pid(work: Path) -> int | None:
    """The fake dockerd's pid while it runs."""
    try:
        pid = int((work / "dockerd.pid").read_text())
    except (OSError, ValueError):
        return None
    return pid if dockerengine._alive(pid) else None


def test_the_session_that_started_the_engine_stops_it(fake_engine: Path) -> None:
    engine = dockerengine.DockerEngine(start_timeout=10).start()
    pid = dockerd_pid(fake_engine)
    assert engine.started_here and pid is not None
    engine.stop()
    assert not dockerengine._alive(pid) and not fake_engine.exists()


def test_an_engine_another_session_uses_is_handed_over_and_stopped_by_the_last(fake_engine: Path) -> None:
    """Two sessions (two lock handles, as two test processes would hold): the starter leaves first."""
    starter = dockerengine.DockerEngine(start_timeout=10).start()
    pid = dockerd_pid(fake_engine)
    other = dockerengine.DockerEngine().start()
    assert not other.started_here  # it found the engine running
    starter.stop()
    assert dockerengine._alive(pid)  # still in use: handed over, not stopped
    assert json.loads(Path(dockerengine.HANDOVER).read_text())["pid"] == pid
    other.stop()
    assert not dockerengine._alive(pid) and not Path(dockerengine.HANDOVER).exists()
    assert not fake_engine.exists()
