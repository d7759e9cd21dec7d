"""The endpoint lifecycle against moto over HTTP: exact fields from moto's describe calls."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import boto3
import pytest

from deploy import autoscaling, endpoints, model_artifacts, teardown
from deploy.errors import DeployError
from deploy.session import Aws
from deploy.state import TAG_KEY, DeploymentState, state_dir
from tests.deploy.conftest import REGION
from tests.deploy.moto_stack import ACCOUNT_ID, queue_invocation_result

IMAGE = f"{ACCOUNT_ID}.dkr.ecr.{REGION}.amazonaws.com/sagemaker-llm-serve:0.1.0-abc123def456"
OURS = {"Key": TAG_KEY, "Value": "smollm2"}


def _state() -> DeploymentState:
    return DeploymentState.load("smollm2", REGION, state_dir())


def _spec(role_arn: str, model: model_artifacts.ModelData | None, **overrides) -> endpoints.EndpointSpec:
    env = endpoints.build_environment("true", None, 1, {"MAX_INPUT_TOKENS": 3000, "MAX_TOTAL_TOKENS": 4096},
                                      ["DTYPE=bfloat16"])
    fields = dict(name="smollm2", image_uri=IMAGE, role_arn=role_arn, instance_type="ml.g4dn.xlarge",
                  model_data=model, environment=env, startup_timeout=900, download_timeout=1800)
    return endpoints.EndpointSpec(**{**fields, **overrides})


def test_upload_model_as_tarball_puts_files_at_the_archive_root(aws: Aws, model_dir: Path) -> None:
    state = _state()
    data = model_artifacts.upload_model(aws, state, model_dir, "models-bucket", "models/smollm2")
    assert data.s3_uri == "s3://models-bucket/models/smollm2/model.tar.gz" and data.compressed
    s3 = boto3.client("s3", region_name=REGION)
    body = s3.get_object(Bucket="models-bucket", Key="models/smollm2/model.tar.gz")["Body"].read()
    with tarfile.open(fileobj=io.BytesIO(body), mode="r:gz") as tar:
        members = {m.name: tar.extractfile(m).read() for m in tar.getmembers() if m.isfile()}
    assert members == {p.relative_to(model_dir).as_posix(): p.read_bytes()
                       for p in model_dir.rglob("*") if p.is_file()}
    assert s3.get_bucket_tagging(Bucket="models-bucket")["TagSet"] == [OURS]
    assert [(r.kind, r.name) for r in state.resources] == [
        ("s3-bucket", "models-bucket"), ("s3-object", "s3://models-bucket/models/smollm2/model.tar.gz")]


def test_upload_model_uncompressed_keeps_the_layout_under_the_prefix(aws: Aws, model_dir: Path) -> None:
    data = model_artifacts.upload_model(aws, _state(), model_dir, "models-bucket", "/models/smollm2/", True)
    assert data.s3_uri == "s3://models-bucket/models/smollm2/" and not data.compressed
    listed = boto3.client("s3", region_name=REGION).list_objects_v2(Bucket="models-bucket")["Contents"]
    assert sorted(o["Key"] for o in listed) == [
        "models/smollm2/config.json", "models/smollm2/sub/weights.bin", "models/smollm2/tokenizer.json"]
    assert {o["Key"]: o["Size"] for o in listed}["models/smollm2/sub/weights.bin"] == 256 * 64


def test_create_endpoint_with_exact_fields_then_smoke_test(aws: Aws, role_arn: str, moto_url: str) -> None:
    state = _state()
    prefix = model_artifacts.ModelData("s3://models-bucket/models/smollm2/")
    desc = endpoints.deploy(aws, _spec(role_arn, prefix), state, wait_timeout=30, poll=0.2)
    sm = boto3.client("sagemaker", region_name=REGION)
    model_name = state.find("model")[0].name
    model = sm.describe_model(ModelName=model_name)
    assert model["ExecutionRoleArn"] == role_arn
    assert model["PrimaryContainer"] == {
        "Image": IMAGE,
        "ModelDataSource": {"S3DataSource": {"S3Uri": "s3://models-bucket/models/smollm2/",
                                             "S3DataType": "S3Prefix", "CompressionType": "None"}},
        "Environment": {"OAI_ENABLED": "true", "SM_NUM_GPUS": "1", "MAX_INPUT_TOKENS": "3000",
                        "MAX_TOTAL_TOKENS": "4096", "DTYPE": "bfloat16"},
    }
    config = sm.describe_endpoint_config(EndpointConfigName=desc["EndpointConfigName"])
    assert config["ProductionVariants"] == [{
        "VariantName": "AllTraffic", "ModelName": model_name, "InitialInstanceCount": 1,
        "InstanceType": "ml.g4dn.xlarge", "InitialVariantWeight": 1.0,
        "ModelDataDownloadTimeoutInSeconds": 1800, "ContainerStartupHealthCheckTimeoutInSeconds": 900}]
    endpoint = sm.describe_endpoint(EndpointName="smollm2")
    assert endpoint["EndpointStatus"] == "InService"
    assert endpoint["EndpointConfigName"] == desc["EndpointConfigName"]
    for arn in (model["ModelArn"], config["EndpointConfigArn"], endpoint["EndpointArn"]):
        assert sm.list_tags(ResourceArn=arn)["Tags"] == [OURS]
    answer = {"id": "chatcmpl-1", "object": "chat.completion",
              "choices": [{"index": 0, "message": {"role": "assistant", "content": "Hello there, nice day!"},
                           "finish_reason": "stop"}]}
    queue_invocation_result(moto_url, json.dumps(answer))
    assert endpoints.smoke_test(aws, "smollm2", endpoints.smoke_payload(True)) == "Hello there, nice day!"


def test_update_in_place_keeps_autoscaling_and_retires_the_old_pair(aws: Aws, role_arn: str, capsys) -> None:
    state = _state()
    tarball = model_artifacts.ModelData("s3://models-bucket/models/smollm2/model.tar.gz")
    first = endpoints.deploy(aws, _spec(role_arn, tarball), state, wait_timeout=30, poll=0.2)
    autoscaling.enable(aws, state, "smollm2", "AllTraffic", 1, 4, 30.0)
    second = endpoints.deploy(aws, _spec(role_arn, tarball, instance_type="ml.g4dn.2xlarge", instance_count=2),
                              state, wait_timeout=30, poll=0.2)
    assert second["EndpointConfigName"] != first["EndpointConfigName"]
    assert "smollm2: Updating" in capsys.readouterr().err  # the progress line while waiting
    sm = boto3.client("sagemaker", region_name=REGION)
    assert [c["EndpointConfigName"] for c in sm.list_endpoint_configs()["EndpointConfigs"]] == [
        second["EndpointConfigName"]]
    assert len(sm.list_models()["Models"]) == 1
    variant = sm.describe_endpoint(EndpointName="smollm2")["ProductionVariants"][0]
    assert (variant["CurrentInstanceCount"], variant["DesiredInstanceCount"]) == (2, 2)
    model = sm.describe_model(ModelName=state.find("model")[0].name)
    assert model["PrimaryContainer"]["ModelDataUrl"] == tarball.s3_uri
    aas = boto3.client("application-autoscaling", region_name=REGION)
    targets = aas.describe_scalable_targets(ServiceNamespace="sagemaker")["ScalableTargets"]
    assert [(t["ResourceId"], t["MinCapacity"], t["MaxCapacity"]) for t in targets] == [
        ("endpoint/smollm2/variant/AllTraffic", 1, 4)]
    [policy] = aas.describe_scaling_policies(ServiceNamespace="sagemaker")["ScalingPolicies"]
    assert policy["TargetTrackingScalingPolicyConfiguration"]["TargetValue"] == 30.0  # put back after the update


def test_autoscaling_registers_the_variant_with_target_tracking(aws: Aws, role_arn: str) -> None:
    state = _state()
    endpoints.deploy(aws, _spec(role_arn, None), state, wait_timeout=30, poll=0.2)
    autoscaling.enable(aws, state, "smollm2", "AllTraffic", 1, 3, 25.0, scale_in_cooldown=600, scale_out_cooldown=30)
    aas = boto3.client("application-autoscaling", region_name=REGION)
    target = aas.describe_scalable_targets(ServiceNamespace="sagemaker")["ScalableTargets"][0]
    assert {k: target[k] for k in ("ResourceId", "ScalableDimension", "MinCapacity", "MaxCapacity")} == {
        "ResourceId": "endpoint/smollm2/variant/AllTraffic",
        "ScalableDimension": "sagemaker:variant:DesiredInstanceCount", "MinCapacity": 1, "MaxCapacity": 3}
    policy = aas.describe_scaling_policies(ServiceNamespace="sagemaker")["ScalingPolicies"][0]
    assert policy["PolicyName"] == "smollm2-AllTraffic-invocations"
    assert policy["PolicyType"] == "TargetTrackingScaling"
    assert policy["TargetTrackingScalingPolicyConfiguration"] == {
        "TargetValue": 25.0,
        "PredefinedMetricSpecification": {"PredefinedMetricType": "SageMakerVariantInvocationsPerInstance"},
        "ScaleInCooldown": 600, "ScaleOutCooldown": 30}
    autoscaling.disable(aws, state, "smollm2", "AllTraffic")
    assert aas.describe_scalable_targets(ServiceNamespace="sagemaker")["ScalableTargets"] == []
    assert aas.describe_scaling_policies(ServiceNamespace="sagemaker")["ScalingPolicies"] == []
    assert state.find("scalable-target") == [] and state.find("scaling-policy") == []


def test_teardown_deletes_what_it_created_and_nothing_else(aws: Aws, role_arn: str, model_dir: Path) -> None:
    s3, sm = boto3.client("s3", region_name=REGION), boto3.client("sagemaker", region_name=REGION)
    s3.create_bucket(Bucket="shared-bucket")
    s3.put_object(Bucket="shared-bucket", Key="someone-else/data.txt", Body=b"keep me")
    sm.create_model(ModelName="someone-elses-model", ExecutionRoleArn=role_arn, PrimaryContainer={"Image": IMAGE})
    state = _state()
    shared = model_artifacts.upload_model(aws, state, model_dir, "shared-bucket", "models/smollm2", True)
    own = model_artifacts.upload_model(aws, state, model_dir, "own-bucket", "models/smollm2")
    endpoints.deploy(aws, _spec(role_arn, shared), state, wait_timeout=30, poll=0.2)
    endpoints.deploy(aws, _spec(role_arn, own, instance_count=2), state, wait_timeout=30, poll=0.2)
    autoscaling.enable(aws, state, "smollm2", "AllTraffic", 1, 2, 20.0)

    teardown.delete_all(aws, state, wait_timeout=30, poll=0.2)

    assert sm.list_endpoints()["Endpoints"] == []
    assert sm.list_endpoint_configs()["EndpointConfigs"] == []
    assert [m["ModelName"] for m in sm.list_models()["Models"]] == ["someone-elses-model"]
    aas = boto3.client("application-autoscaling", region_name=REGION)
    assert aas.describe_scalable_targets(ServiceNamespace="sagemaker")["ScalableTargets"] == []
    assert aas.describe_scaling_policies(ServiceNamespace="sagemaker")["ScalingPolicies"] == []
    assert [b["Name"] for b in s3.list_buckets()["Buckets"]] == ["shared-bucket"]
    assert [o["Key"] for o in s3.list_objects_v2(Bucket="shared-bucket")["Contents"]] == ["someone-else/data.txt"]
    assert not state.path.exists()


def test_an_endpoint_not_made_by_this_deployment_is_never_updated(aws: Aws, role_arn: str) -> None:
    sm = boto3.client("sagemaker", region_name=REGION)
    sm.create_model(ModelName="theirs", ExecutionRoleArn=role_arn, PrimaryContainer={"Image": IMAGE})
    sm.create_endpoint_config(EndpointConfigName="theirs", ProductionVariants=[
        {"VariantName": "AllTraffic", "ModelName": "theirs", "InitialInstanceCount": 1,
         "InstanceType": "ml.g4dn.xlarge"}])
    sm.create_endpoint(EndpointName="smollm2", EndpointConfigName="theirs")
    with pytest.raises(DeployError, match="exists but was not created by this deployment"):
        endpoints.deploy(aws, _spec(role_arn, None), _state(), wait_timeout=30, poll=0.2)
    assert sm.describe_endpoint(EndpointName="smollm2")["EndpointConfigName"] == "theirs"
    assert [m["ModelName"] for m in sm.list_models()["Models"]] == ["theirs"]


def _fail_endpoint(name: str, reason: str) -> None:
    """Put the endpoint into SageMaker's Failed state (no API does that; moto runs in this process)."""
    from moto.sagemaker.models import sagemaker_backends

    endpoint = sagemaker_backends[ACCOUNT_ID][REGION].endpoints[name]
    endpoint.endpoint_status, endpoint.failure_reason = "Failed", reason


def test_a_failed_endpoint_is_reported_then_recreated_by_the_next_deploy(aws: Aws, role_arn: str) -> None:
    state = _state()
    endpoints.deploy(aws, _spec(role_arn, None), state, wait_timeout=30, poll=0.2)
    reason = "The primary container for production variant AllTraffic did not pass the ping health check."
    _fail_endpoint("smollm2", reason)
    with pytest.raises(DeployError, match="endpoint smollm2 is Failed: The primary container .* ping health check"):
        endpoints.wait_for_endpoint(aws, "smollm2", timeout=5, poll=0.2)
    desc = endpoints.deploy(aws, _spec(role_arn, None, startup_timeout=1800), state, wait_timeout=30, poll=0.2)
    assert desc["EndpointStatus"] == "InService"
    sm = boto3.client("sagemaker", region_name=REGION)
    config = sm.describe_endpoint_config(EndpointConfigName=desc["EndpointConfigName"])
    assert config["ProductionVariants"][0]["ContainerStartupHealthCheckTimeoutInSeconds"] == 1800
    assert len(sm.list_endpoint_configs()["EndpointConfigs"]) == 1 and len(sm.list_models()["Models"]) == 1


def test_model_data_kinds() -> None:
    assert model_artifacts.ModelData("s3://b/m/model.tar.gz").container_fields() == {
        "ModelDataUrl": "s3://b/m/model.tar.gz"}
    # A prefix always ends with "/", or s3://b/m would also pick up s3://b/m-old/...
    assert model_artifacts.ModelData("s3://b/m").container_fields() == {"ModelDataSource": {"S3DataSource": {
        "S3Uri": "s3://b/m/", "S3DataType": "S3Prefix", "CompressionType": "None"}}}
    with pytest.raises(DeployError, match="not an S3 URI"):
        model_artifacts.ModelData("/local/model")


def test_a_symlinked_file_goes_into_the_tarball_as_its_bytes(tmp_path: Path) -> None:
    (tmp_path / "weights.bin").write_bytes(b"\x00\x01weights")
    model = tmp_path / "model"
    model.mkdir()
    (model / "weights.bin").symlink_to(tmp_path / "weights.bin")  # as notebook 02 links the GGUF
    with tarfile.open(model_artifacts.package_model_dir(model, tmp_path / "m.tar.gz")) as tar:
        [member] = tar.getmembers()
        assert member.isfile() and tar.extractfile(member).read() == b"\x00\x01weights"
