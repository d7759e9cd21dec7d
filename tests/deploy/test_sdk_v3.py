"""SDK v3 (`pip install sagemaker`): ModelBuilder with our image, environment and model data, against moto
and the local runtime, answered by the real server. The SDK runs in .venv-sdk3 (its mlflow caps gunicorn
below the server's pin), the script reads as a user writes it: tests/deploy/sdk_scripts/v3_modelbuilder.py.
"""

from __future__ import annotations

import json
from pathlib import Path

import boto3
import pytest

from deploy import cli, model_artifacts
from deploy.session import Aws
from deploy.state import DeploymentState, state_dir
from tests.deploy.conftest import CHAT_ENV, REGION, run_sdk
from tests.deploy.moto_stack import ACCOUNT_ID

IMAGE = f"{ACCOUNT_ID}.dkr.ecr.{REGION}.amazonaws.com/sagemaker-llm-serve:0.1.0-abc123def456"
pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]


def sse_json(text: str) -> list:
    """The JSON events of an SSE body, up to OpenAI's [DONE] (which must end it)."""
    data = [line[5:].strip() for line in text.splitlines() if line.startswith("data:")]
    assert data[-1] == "[DONE]"
    return [json.loads(d) for d in data[:-1]]


def test_model_builder_deploys_invokes_streams_and_deletes(aws: Aws, aws_env: dict[str, str], runtime_url: str,
                                                           smollm2_dir: Path, capsys) -> None:
    state = DeploymentState.load("smollm2-v3", REGION, state_dir())
    data = model_artifacts.upload_model(aws, state, smollm2_dir, "models-bucket", "models/smollm2", uncompressed=True)
    assert cli.main(["role", "--name", "smollm2-v3", "--model-data", data.s3_uri]) == 0  # least privilege
    role = capsys.readouterr().out.strip()
    result = run_sdk("v3", "v3_modelbuilder.py", {
        **aws_env, "AWS_ENDPOINT_URL_SAGEMAKER_RUNTIME": runtime_url, "IMAGE_URI": IMAGE,
        "MODEL_DATA": data.s3_uri, "SAGEMAKER_ROLE": role, "ENDPOINT_NAME": "smollm2-v3"})
    assert result["container"] == {"Image": IMAGE, "Environment": CHAT_ENV, "ModelDataSource": {
        "S3DataSource": {"S3Uri": data.s3_uri, "S3DataType": "S3Prefix", "CompressionType": "None"}}}
    assert result["execution_role_arn"] == role
    reply = result["reply"]
    assert reply["object"] == "chat.completion" and "Paris" in reply["choices"][0]["message"]["content"]
    assert result["variant"] == "AllTraffic"
    chunks = sse_json(result["stream"])
    streamed = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"])
    assert "Paris" in streamed and {c["object"] for c in chunks} == {"chat.completion.chunk"}
    # The SDK's own streaming call is broken in the pinned release (see the script); when an upgrade
    # fixes it, this fails: then stream with it, here, in notebook 02 and in the README.
    assert result["sdk_stream_error"] == "AttributeError: 'EventStream' object has no attribute 'get'"
    sm = boto3.client("sagemaker", region_name=REGION)
    assert sm.list_endpoints()["Endpoints"] == [] and sm.list_models()["Models"] == []
