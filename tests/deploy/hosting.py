"""SageMaker's hosting part, played on this machine for the endpoints moto records.

moto keeps the control plane (models, configs, endpoints) but runs nothing. `MotoHosting` is the
endpoint table of the local SageMaker runtime (deploy/local_endpoint.py): when a request names an
InService endpoint, it reads the endpoint's model as SageMaker would (the image's environment, the
model data), copies the model data from (moto's) S3 into a folder as SageMaker does into
/opt/ml/model, and starts the real server (`container/serve`) on it, once per distinct model. So
any client, the SDKs included, deploys through moto and then invokes the real container.

The server always runs from the server's environment ($SERVE_VENV, default .venv), also when this
code runs in another one (notebook 02's kernel runs in .venv-sdk3, where mlflow pins another gunicorn).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import sys
import tarfile
import tempfile
import threading
from collections.abc import Iterator, Mapping
from pathlib import Path

import boto3

from deploy.local_endpoint import EndpointConfig
from tests.server import Server, running_server

ROOT = Path(__file__).resolve().parents[2]


def server_bin() -> Path:
    """The bin folder of the environment the server runs from."""
    venv = Path(os.environ.get("SERVE_VENV") or ROOT / ".venv")
    return venv / "bin" if (venv / "bin" / "gunicorn").exists() else Path(sys.executable).parent


class MotoHosting(Mapping[str, EndpointConfig]):
    """Endpoint name -> the running server behind it; explicit routes first, then moto's endpoints."""

    def __init__(self, workdir: Path, region: str, moto_url: str | None = None, on_start=None) -> None:
        self.workdir, self.region, self.on_start = workdir, region, on_start
        self.moto_url = moto_url  # None: only the explicit routes (never a real AWS call)
        self.routes: dict[str, EndpointConfig] = {}  # endpoints served without moto (set by hand)
        self._servers: dict[str, Server] = {}
        self._stack = contextlib.ExitStack()
        self._lock = threading.Lock()

    def __getitem__(self, name: str) -> EndpointConfig:
        if name in self.routes:
            return self.routes[name]
        found = self.describe(name)
        if found is None:
            raise KeyError(name)
        env, variant = found
        return EndpointConfig(target=self.server(env).url, variant=variant)

    def __iter__(self) -> Iterator[str]:
        names = [e["EndpointName"] for e in self._client("sagemaker").list_endpoints()["Endpoints"]] if (
            self.moto_url) else []
        return iter(dict.fromkeys([*self.routes, *names]))

    def __len__(self) -> int:
        return len(list(iter(self)))

    def _client(self, service: str):
        return boto3.client(service, region_name=self.region, endpoint_url=self.moto_url)

    def describe(self, name: str) -> tuple[dict[str, str], str] | None:
        """(the server's environment, the variant) of an InService endpoint, as SageMaker would start it."""
        if self.moto_url is None:
            return None
        sm = self._client("sagemaker")
        try:
            endpoint = sm.describe_endpoint(EndpointName=name)
        except sm.exceptions.ClientError:
            return None
        if endpoint["EndpointStatus"] not in ("InService", "Updating", "RollingBack"):
            return None
        config = sm.describe_endpoint_config(EndpointConfigName=endpoint["EndpointConfigName"])
        variant = config["ProductionVariants"][0]
        container = sm.describe_model(ModelName=variant["ModelName"])["PrimaryContainer"]
        env = dict(container.get("Environment", {}))
        source = container.get("ModelDataSource", {}).get("S3DataSource", {})
        if source:
            env["SM_MODEL_DIR"] = str(self.fetch(source["S3Uri"], prefix=source.get("CompressionType") == "None"))
        elif container.get("ModelDataUrl"):
            env["SM_MODEL_DIR"] = str(self.fetch(container["ModelDataUrl"], prefix=False))
        return env, variant["VariantName"]

    def fetch(self, s3_uri: str, prefix: bool) -> Path:
        """What SageMaker puts in /opt/ml/model: the objects under a prefix, or an unpacked model.tar.gz."""
        s3 = self._client("s3")
        bucket, _, key = s3_uri.removeprefix("s3://").partition("/")
        download = Path(tempfile.mkdtemp(prefix="model-", dir=self.workdir))
        if prefix:
            for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=key):
                for obj in page.get("Contents", []):
                    path = download / obj["Key"][len(key):].lstrip("/")
                    path.parent.mkdir(parents=True, exist_ok=True)
                    s3.download_file(bucket, obj["Key"], str(path))
        else:
            archive = download.with_suffix(".tar.gz")
            s3.download_file(bucket, key, str(archive))
            with tarfile.open(archive) as tar:
                tar.extractall(download, filter="data")
            archive.unlink()
        return self._settle(download, move=True)

    def adopt(self, model_dir: Path) -> Path:
        """The folder `fetch` will make of this model's files once they are on S3 (to start its server early)."""
        return self._settle(model_dir, move=False)

    def _settle(self, folder: Path, move: bool) -> Path:
        """One folder per distinct model content (tarball or prefix alike), so one server per model."""
        digest = hashlib.sha256()
        files = sorted(p for p in folder.rglob("*") if p.is_file())
        for path in files:
            digest.update(f"{path.relative_to(folder)}\0".encode())
            with open(path, "rb") as handle:
                digest.update(hashlib.file_digest(handle, "sha256").digest())
        target = self.workdir / "model" / digest.hexdigest()[:16]
        with self._lock:
            if not target.exists():
                target.parent.mkdir(parents=True, exist_ok=True)
                if move:
                    folder.rename(target)
                    return target
                for path in files:
                    (target / path.relative_to(folder)).parent.mkdir(parents=True, exist_ok=True)
                    (target / path.relative_to(folder)).symlink_to(path.resolve())
        if move:
            shutil.rmtree(folder, ignore_errors=True)
        return target

    def server(self, env: Mapping[str, str]) -> Server:
        """The real server with this environment: started once, reused for every endpoint that has it."""
        key = json.dumps(dict(env), sort_keys=True)
        with self._lock:
            if key not in self._servers:
                path = f"{server_bin()}{os.pathsep}{os.environ.get('PATH', '')}"
                srv = self._stack.enter_context(running_server({**env, "PATH": path}, wait=False))
                if self.on_start is not None:
                    self.on_start(srv)
                self._servers[key] = srv
            srv = self._servers[key]
        srv.wait_ready()
        return srv

    def close(self) -> None:
        """Stop every server started here (SIGTERM all first: they drain in parallel)."""
        for srv in self._servers.values():
            if srv.proc.poll() is None:
                srv.proc.terminate()
        self._servers.clear()
        self._stack.close()
