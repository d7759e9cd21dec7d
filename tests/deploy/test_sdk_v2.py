"""SDK v2 (`sagemaker<3`): Model(image_uri, model_data, env, role).deploy(), Predictor with the JSON
serializer and deserializer, predict_stream, delete_endpoint; against moto and the local runtime,
answered by the real server. The SDK runs in .venv-sdk2 (it needs sagemaker-core<2, the v3 packages
2.x); the script reads as a user writes it: tests/deploy/sdk_scripts/v2_model.py."""

from __future__ import annotations

from pathlib import Path

import boto3
import pytest

from deploy import cli, model_artifacts
from deploy.session import Aws
from deploy.state import DeploymentState, state_dir
from tests.deploy.conftest import CHAT_ENV, REGION, run_sdk
from tests.deploy.test_sdk_v3 import IMAGE, sse_json

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]


def test_model_deploy_predictor_predict_stream_and_delete(aws: Aws, aws_env: dict[str, str], runtime_url: str,
                                                          smollm2_dir: Path, capsys) -> None:
    state = DeploymentState.load("smollm2-v2", REGION, state_dir())
    data = model_artifacts.upload_model(aws, state, smollm2_dir, "models-bucket", "models/smollm2")  # a tarball
    assert cli.main(["role", "--name", "smollm2-v2", "--model-data", data.s3_uri]) == 0
    role = capsys.readouterr().out.strip()
    result = run_sdk("v2", "v2_model.py", {
        **aws_env, "AWS_ENDPOINT_URL_SAGEMAKER_RUNTIME": runtime_url, "IMAGE_URI": IMAGE,
        "MODEL_DATA": data.s3_uri, "SAGEMAKER_ROLE": role, "ENDPOINT_NAME": "smollm2-v2"})
    assert result["container"] == {"Image": IMAGE, "Environment": CHAT_ENV, "ModelDataUrl": data.s3_uri}
    assert result["execution_role_arn"] == role
    reply = result["reply"]  # JSONDeserializer's dict
    assert reply["object"] == "chat.completion" and "Paris" in reply["choices"][0]["message"]["content"]
    chunks = sse_json(result["stream"])
    assert "Paris" in "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"])
    sm = boto3.client("sagemaker", region_name=REGION)
    assert sm.list_endpoints()["Endpoints"] == [] and sm.list_models()["Models"] == []
    assert sm.list_endpoint_configs()["EndpointConfigs"] == []  # delete_endpoint removed its config too
