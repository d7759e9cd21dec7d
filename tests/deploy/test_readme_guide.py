"""The README's deploy guide, run as written: push to a local registry, the rest against moto.

The two bash blocks between the deploy-guide and deploy-teardown markers are extracted from
README.md and run with bash; only the environment differs from a user's: AWS_ENDPOINT_URL points at
moto, DEPLOY_REGISTRY_OVERRIDE at a loopback `docker-registry` that accepts only the credentials
moto's GetAuthorizationToken hands out (which the push sends only because
DEPLOY_REGISTRY_OVERRIDE_CREDENTIALS=1 asks for it), MODEL_DIR at a small model directory, and
VARIANT=cpu (the GPU image is a multi-GB build: `make gpu-image-check`).
"""

from __future__ import annotations

import base64
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import boto3
import pytest

from deploy.ecr import project_version
from tests.deploy.conftest import REGION
from tests.deploy.moto_stack import ACCOUNT_ID, queue_invocation_result
from tests.deploy.registry import running_registry

REPO_ROOT = Path(__file__).resolve().parents[2]
MANIFEST_TYPES = "application/vnd.docker.distribution.manifest.v2+json, application/vnd.oci.image.manifest.v1+json"


def readme_block(marker: str) -> str:
    """The bash code between <!-- MARKER:start --> and <!-- MARKER:end --> in README.md."""
    text = (REPO_ROOT / "README.md").read_text()
    match = re.search(rf"<!-- {marker}:start -->\s*```bash\n(.*?)```\s*<!-- {marker}:end -->", text, re.DOTALL)
    assert match, f"README.md has no {marker} block"
    return match.group(1)


@pytest.fixture(scope="session")
def local_image() -> str:
    """The project image, built by the container's own helper if this engine does not have it yet."""
    # The container's image helper (container/imagebuild.py) owns the engine and the build.
    dockerengine = pytest.importorskip("container.dockerengine", reason="the image helper is not in this checkout")
    imagebuild = pytest.importorskip("container.imagebuild", reason="the image helper is not in this checkout")
    DockerEngine, image_exists = dockerengine.DockerEngine, dockerengine.image_exists
    DEFAULT_TAG, build_image = imagebuild.DEFAULT_TAG, imagebuild.build_image

    engine = DockerEngine().start()  # the engine that runs, or one started (and stopped) here
    try:
        if not image_exists(DEFAULT_TAG):
            build_image(DEFAULT_TAG, "cpu")
        yield DEFAULT_TAG
    finally:
        engine.stop()


def run_bash(script: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    """Run a README block with bash -euo pipefail, `python` being this interpreter."""
    path = f"{Path(sys.executable).parent}:{os.environ['PATH']}"
    result = subprocess.run(["bash", "-euo", "pipefail", "-c", script], cwd=REPO_ROOT, capture_output=True,
                            text=True, timeout=900, env={**env, "PATH": path, "HOME": env["DEPLOY_STATE_DIR"]})
    assert result.returncode == 0, f"stdout:\n{result.stdout}\nstderr:\n{result.stderr}"
    return result


def ecr_password() -> str:
    token = boto3.client("ecr", region_name=REGION).get_authorization_token()["authorizationData"][0]
    return base64.b64decode(token["authorizationToken"]).decode().split(":", 1)[1]


ROLE = f"arn:aws:iam::{ACCOUNT_ID}:role/sagemaker-llm-serve-smollm2"


def assert_deployed(image_uri: str, model_data: str) -> None:
    """The state after the guide: the updated endpoint with its exact fields, scaling, repository, role."""
    sm = boto3.client("sagemaker", region_name=REGION)
    endpoint = sm.describe_endpoint(EndpointName="smollm2")
    assert endpoint["EndpointStatus"] == "InService"
    assert endpoint["LastDeploymentConfig"] == {"BlueGreenUpdatePolicy": {"TrafficRoutingConfiguration": {
        "Type": "CANARY", "WaitIntervalInSeconds": 300, "CanarySize": {"Type": "CAPACITY_PERCENT", "Value": 50}}}}
    config = sm.describe_endpoint_config(EndpointConfigName=endpoint["EndpointConfigName"])
    [variant] = config["ProductionVariants"]
    assert {k: v for k, v in variant.items() if k != "ModelName"} == {
        "VariantName": "AllTraffic", "InitialInstanceCount": 2, "InstanceType": "ml.g4dn.xlarge",
        "InitialVariantWeight": 1.0, "ModelDataDownloadTimeoutInSeconds": 1200,
        "ContainerStartupHealthCheckTimeoutInSeconds": 600}
    model = sm.describe_model(ModelName=variant["ModelName"])
    assert model["ExecutionRoleArn"] == ROLE  # step 3's role, not a broad one
    assert model["PrimaryContainer"] == {
        "Image": image_uri,
        "ModelDataSource": {"S3DataSource": {"S3Uri": model_data, "S3DataType": "S3Prefix", "CompressionType": "None"}},
        "Environment": {"OAI_ENABLED": "true", "SM_NUM_GPUS": "1", "MAX_TOTAL_TOKENS": "8192", "DTYPE": "float16"}}
    assert len(sm.list_models()["Models"]) == 1  # step 4's model was retired by step 6
    aas = boto3.client("application-autoscaling", region_name=REGION)
    [target] = aas.describe_scalable_targets(ServiceNamespace="sagemaker")["ScalableTargets"]
    assert (target["ResourceId"], target["MinCapacity"], target["MaxCapacity"]) == (
        "endpoint/smollm2/variant/AllTraffic", 1, 4)
    assert boto3.client("ecr", region_name=REGION).describe_repositories()["repositories"][0]["repositoryName"] == (
        "sagemaker-llm-serve")


def assert_nothing_left(state_dir: Path) -> None:
    """The state after the teardown block: no resource of any kind, no state file."""
    sm = boto3.client("sagemaker", region_name=REGION)
    aas = boto3.client("application-autoscaling", region_name=REGION)
    assert sm.list_endpoints()["Endpoints"] == [] and sm.list_endpoint_configs()["EndpointConfigs"] == []
    assert sm.list_models()["Models"] == []
    assert aas.describe_scalable_targets(ServiceNamespace="sagemaker")["ScalableTargets"] == []
    assert aas.describe_scaling_policies(ServiceNamespace="sagemaker")["ScalingPolicies"] == []
    assert boto3.client("s3", region_name=REGION).list_buckets()["Buckets"] == []
    assert boto3.client("ecr", region_name=REGION).describe_repositories()["repositories"] == []
    assert boto3.client("iam", region_name=REGION).list_roles()["Roles"] == []
    assert list(state_dir.glob("*.json")) == []


@pytest.mark.slow
def test_readme_deploy_guide(aws_env: dict[str, str], model_dir: Path, moto_url: str, local_image: str) -> None:
    answer = {"choices": [{"index": 0, "message": {"role": "assistant", "content": "Hi! Nice to meet you."},
                           "finish_reason": "stop"}], "object": "chat.completion"}
    queue_invocation_result(moto_url, json.dumps(answer))
    with running_registry("AWS", ecr_password()) as registry:
        env = {**aws_env, "MODEL_DIR": str(model_dir), "DEPLOY_REGISTRY_OVERRIDE": registry.host,
               "DEPLOY_REGISTRY_OVERRIDE_CREDENTIALS": "1", "VARIANT": "cpu"}
        assert local_image == "sagemaker-llm-serve:cpu"  # what the guide builds and pushes with VARIANT=cpu
        guide = run_bash(readme_block("deploy-guide") + '\necho "IMAGE_URI=$IMAGE_URI MODEL_DATA=$MODEL_DATA"\n', env)
        # The sha is read from the printed URI: another commit may land while the guide runs.
        image_uri = re.search(r"^IMAGE_URI=(\S+)", guide.stdout, re.MULTILINE).group(1)
        tags = [project_version(), image_uri.rsplit(":", 1)[1]]
        pushed = registry.get("/v2/sagemaker-llm-serve/tags/list").json()
        digest = registry.get(f"/v2/sagemaker-llm-serve/manifests/{tags[1]}", Accept=MANIFEST_TYPES).headers[
            "Docker-Content-Digest"]
    assert re.fullmatch(rf"{re.escape(project_version())}-[0-9a-f]{{12}}(-dirty)?", tags[1])
    assert image_uri == f"{ACCOUNT_ID}.dkr.ecr.{REGION}.amazonaws.com/sagemaker-llm-serve:{tags[1]}"
    model_data = f"s3://sagemaker-llm-serve-{ACCOUNT_ID}-{REGION}/models/smollm2/"
    lines = guide.stdout.strip().splitlines()
    assert lines[-1] == f"IMAGE_URI={image_uri} MODEL_DATA={model_data}"
    assert lines[-2] == "Hi! Nice to meet you."  # step 7, the invoke
    assert sorted(pushed["tags"]) == sorted(tags)
    state = json.loads((Path(aws_env["DEPLOY_STATE_DIR"]) / f"smollm2.{REGION}.json").read_text())
    assert [r["details"]["digest"] for r in state["resources"] if r["kind"] == "ecr-image"] == [digest]
    assert "endpoint smollm2: Updating" in guide.stderr and "smoke test answer" in guide.stderr

    assert_deployed(image_uri, model_data)

    run_bash(readme_block("deploy-teardown"), aws_env)
    assert_nothing_left(Path(aws_env["DEPLOY_STATE_DIR"]))
