"""Fixtures for the deploy tests: one moto server per session, a clean account per test."""

from __future__ import annotations

import json
import os
from pathlib import Path

import boto3
import pytest

from deploy.session import Aws, connect
from tests.deploy.moto_stack import moto_server, reset

REGION = "us-east-1"
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
