"""Fixtures for the deploy tests: one moto server per session, a clean account per test."""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import boto3
import pytest

from deploy.local_endpoint import LocalRuntime, RuntimeConfig
from deploy.session import Aws, connect
from tests.deploy.hosting import MotoHosting
from tests.deploy.moto_stack import moto_server, reset

REGION = "us-east-1"
ROOT = Path(__file__).resolve().parents[2]
TRUST_SAGEMAKER = {"Version": "2012-10-17", "Statement": [
    {"Effect": "Allow", "Principal": {"Service": "sagemaker.amazonaws.com"}, "Action": "sts:AssumeRole"}]}


def aws_environment(moto_url: str, state_dir: Path) -> dict[str, str]:
    """Environment that points boto3 (in this process or a child) at moto and nowhere else."""
    return {
        "AWS_ENDPOINT_URL": moto_url, "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_REGION": REGION, "AWS_EC2_METADATA_DISABLED": "true",
        "AWS_CONFIG_FILE": os.devnull, "AWS_SHARED_CREDENTIALS_FILE": os.devnull,
        "DEPLOY_STATE_DIR": str(state_dir),
    }


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Every test that talks to the moto server is `slow` (it starts a server), as the house rule says."""
    for item in items:
        if "moto_url" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.slow)


@pytest.fixture(scope="session")
def moto_url() -> str:
    with moto_server() as url:
        yield url


@pytest.fixture
def aws_env(moto_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    """A fresh moto account, and this process's environment pointing at it."""
    reset(moto_url)
    env = aws_environment(moto_url, tmp_path / "state")
    for key in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_DEFAULT_REGION", "DEPLOY_REGISTRY_OVERRIDE"):
        monkeypatch.delenv(key, raising=False)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    return env


@pytest.fixture
def aws(aws_env: dict[str, str]) -> Aws:
    return connect(REGION)


@pytest.fixture
def role_arn(aws: Aws) -> str:
    iam = boto3.client("iam", region_name=REGION)
    return iam.create_role(RoleName="SageMakerExecution", AssumeRolePolicyDocument=json.dumps(TRUST_SAGEMAKER))[
        "Role"]["Arn"]


@pytest.fixture
def model_dir(tmp_path: Path) -> Path:
    """A small model directory in HF layout (the upload does not look inside the files)."""
    root = tmp_path / "model"
    (root / "sub").mkdir(parents=True)
    (root / "config.json").write_text(json.dumps({"model_type": "llama", "vocab_size": 64}))
    (root / "tokenizer.json").write_text(json.dumps({"version": "1.0", "model": {"type": "BPE"}}))
    (root / "sub" / "weights.bin").write_bytes(bytes(range(256)) * 64)
    return root


# The SDK tests: the SDKs run in their own environments (.venv-sdk3, .venv-sdk2; `make setup`), as
# child processes pointed at moto and at the local runtime, whose endpoints the real server answers.
SDK_VENVS = {"v3": ROOT / ".venv-sdk3", "v2": ROOT / ".venv-sdk2"}
CHAT_ENV = {"OAI_ENABLED": "true", "MAX_TOTAL_TOKENS": "2048"}  # what the SDK scripts deploy with


@pytest.fixture(scope="session")
def smollm2_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A model directory holding the embedded SmolLM2 GGUF (a link to the wheel's file)."""
    from serve.model_loading import EMBEDDED_GGUF, embedded_model_dir

    folder = tmp_path_factory.mktemp("smollm2")
    (folder / EMBEDDED_GGUF).symlink_to(Path(embedded_model_dir()) / EMBEDDED_GGUF)
    return folder


@pytest.fixture(scope="session")
def hosting(moto_url: str, smollm2_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[MotoHosting]:
    """SageMaker's hosting for moto's endpoints, with the SmolLM2 server of the SDK scripts started early."""
    hosts = MotoHosting(tmp_path_factory.mktemp("hosting"), REGION, moto_url)
    try:
        hosts.server({**CHAT_ENV, "SM_MODEL_DIR": str(hosts.adopt(smollm2_dir))})
        yield hosts
    finally:
        hosts.close()


@pytest.fixture(scope="session")
def runtime_url(hosting: MotoHosting) -> Iterator[str]:
    """The local SageMaker runtime in front of the hosted endpoints."""
    with LocalRuntime(RuntimeConfig(endpoints=hosting, region=REGION)) as runtime:
        yield runtime.url


def run_sdk(version: str, script: str, env: dict[str, str], timeout: float = 600) -> dict:
    """Run tests/deploy/sdk_scripts/SCRIPT with the SDK's environment; the JSON it printed after `RESULT`."""
    python = SDK_VENVS[version] / "bin" / "python"
    assert python.exists(), f"{SDK_VENVS[version]} is missing: run `make setup`"
    # The SDKs make default-session clients, which find their region in AWS_DEFAULT_REGION (or ~/.aws/config).
    full_env = {"PATH": os.environ["PATH"], "HOME": env["DEPLOY_STATE_DIR"], "AWS_DEFAULT_REGION": REGION, **env}
    proc = subprocess.run([str(python), str(Path(__file__).parent / "sdk_scripts" / script)], cwd=ROOT,
                          env=full_env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"stdout:\n{proc.stdout[-3000:]}\nstderr:\n{proc.stderr[-6000:]}"
    return json.loads(proc.stdout.rsplit("RESULT ", 1)[1])  # the SDK draws progress panels before it
