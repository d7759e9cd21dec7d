"""Session fixtures for the container tests: a Docker engine, the CPU image, two running containers.

Everything is session-scoped and shared: the image is built once (a cached rebuild after the
first run) and each container loads SmolLM2 once. Every wait is bounded.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass

import httpx
import pytest

from container.dockerengine import DockerEngine, docker
from container.imagebuild import DEFAULT_TAG, BuildReport, build_image

READY_TIMEOUT = 300.0  # two containers load SmolLM2 side by side on 2 cores: ~40-90 s each


@dataclass
class Container:
    """One `docker run IMAGE serve`, published on 127.0.0.1 only."""

    name: str
    container_port: int
    base_url: str = ""

    @classmethod
    def run(cls, image: str, name: str, env: dict[str, str], port: int = 8080, volumes: tuple[str, ...] = ()):
        """Start the container detached, exactly as SageMaker does: the command is `serve`."""
        docker("rm", "--force", name, check=False)
        args = ["run", "--detach", "--name", name, "--publish", f"127.0.0.1::{port}"]
        for key, value in env.items():
            args += ["--env", f"{key}={value}"]
        for volume in volumes:
            args += ["--volume", volume]
        docker(*args, image, "serve")
        host_port = docker("port", name, str(port)).stdout.split()[0].rsplit(":", 1)[1]
        return cls(name=name, container_port=port, base_url=f"http://127.0.0.1:{host_port}")

    def state(self) -> dict:
        """`docker inspect`'s State of the container."""
        return json.loads(docker("inspect", "--format", "{{json .State}}", self.name).stdout)

    def logs(self, tail: int = 40) -> str:
        """The last lines of the container's output (stdout and stderr)."""
        proc = docker("logs", "--tail", str(tail), self.name, check=False)
        return proc.stdout + proc.stderr

    def wait_ready(self, timeout: float = READY_TIMEOUT) -> float:
        """Poll /ping until 200; returns the seconds it took; fails with the logs otherwise."""
        started = time.monotonic()
        with httpx.Client(timeout=5) as client:
            while time.monotonic() - started < timeout:
                if not self.state()["Running"]:
                    pytest.fail(f"container {self.name} exited while starting:\n{self.logs()}")
                try:
                    if client.get(f"{self.base_url}/ping").status_code == 200:
                        return time.monotonic() - started
                except httpx.TransportError:
                    pass  # the port is published before gunicorn listens
                time.sleep(1)
        pytest.fail(f"/ping of {self.name} not 200 within {timeout:.0f} s:\n{self.logs()}")

    def stop(self, timeout: int = 30) -> float:
        """`docker stop` with SageMaker's 30 s grace; returns how long it took."""
        started = time.monotonic()
        docker("stop", "--time", str(timeout), self.name, timeout=timeout + 30)
        return time.monotonic() - started

    def remove(self) -> None:
        """Remove the container whatever its state."""
        docker("rm", "--force", self.name, check=False)


@pytest.fixture(scope="session")
def docker_engine() -> Iterator[DockerEngine]:
    """A running engine; one started here is stopped at the end of the session."""
    engine = DockerEngine().start()
    yield engine
    engine.stop()


@pytest.fixture(scope="session")
def cpu_image(docker_engine: DockerEngine, tmp_path_factory: pytest.TempPathFactory) -> BuildReport:
    """The CPU image, built by the same helper a developer runs (a cached rebuild after the first)."""
    log_path = tmp_path_factory.mktemp("image") / "docker-build.log"
    try:
        report = build_image(DEFAULT_TAG, variant="cpu", log_path=str(log_path))
    except RuntimeError as exc:
        tail = "".join(log_path.read_text(errors="replace").splitlines(keepends=True)[-40:])
        pytest.fail(f"{exc}\n{tail}")
    print(f"\nimage {report.tag}: {report.size_bytes / 1e6:.0f} MB, timings {report.timings}")
    return report


@pytest.fixture(scope="session")
def servers(cpu_image: BuildReport, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Container]]:
    """Two containers of the image, one per OAI_ENABLED mode, started together to share the wait.

    The generate one binds where SAGEMAKER_BIND_TO_PORT says (9090) and gets an empty folder
    mounted at /opt/ml/model, as SageMaker does for an endpoint without model data: both must
    still fall through to the embedded model.
    """
    empty_model_dir = tmp_path_factory.mktemp("opt-ml-model")
    suffix = os.getpid()
    started = {
        "generate": Container.run(
            cpu_image.tag, f"sls-test-generate-{suffix}", {"OAI_ENABLED": "false", "SAGEMAKER_BIND_TO_PORT": "9090"},
            port=9090, volumes=(f"{empty_model_dir}:/opt/ml/model:ro",),
        ),
        "openai": Container.run(cpu_image.tag, f"sls-test-openai-{suffix}", {"OAI_ENABLED": "true"}),
    }
    try:
        for mode, container in started.items():
            print(f"\n{mode} container ready in {container.wait_ready():.1f} s")
        yield started
    finally:
        for container in started.values():
            container.remove()
