"""The SageMaker SDK v3 resource path (`deploy --sdk`) makes the same resources as the boto3 path,
production options and blue/green updates included."""

from __future__ import annotations

import boto3

from deploy import endpoints, sdk_deploy, teardown
from deploy.governance import DataCapture, Network
from deploy.model_artifacts import ModelData
from deploy.rollout import parse_rollout
from deploy.session import Aws
from deploy.state import TAG_KEY, DeploymentState, state_dir
from tests.deploy.conftest import REGION
from tests.deploy.test_lifecycle import IMAGE


def _described(name: str, state: DeploymentState) -> tuple[dict, dict, dict]:
    sm = boto3.client("sagemaker", region_name=REGION)
    model = sm.describe_model(ModelName=state.find("model")[0].name)
    endpoint = sm.describe_endpoint(EndpointName=name)
    config = sm.describe_endpoint_config(EndpointConfigName=endpoint["EndpointConfigName"])
    variants = [{k: v for k, v in variant.items() if k != "ModelName"} for variant in config["ProductionVariants"]]
    keep = ("PrimaryContainer", "ExecutionRoleArn", "VpcConfig", "EnableNetworkIsolation")
    return ({k: model[k] for k in keep if k in model}, {"Variants": variants, "KmsKeyId": config.get("KmsKeyId"),
            "DataCaptureConfig": config.get("DataCaptureConfig")}, endpoint.get("LastDeploymentConfig", {}))


def test_sdk_deploy_matches_boto3_deploy_and_updates_in_place(aws: Aws, role_arn: str) -> None:
    env = endpoints.build_environment("false", "HuggingFaceTB/SmolLM2-135M-Instruct", 1)
    key = boto3.client("kms", region_name=REGION).create_key()["KeyMetadata"]["Arn"]
    production = dict(network=Network(("subnet-0aaa",), ("sg-0bbb",), isolated=True), kms_key_arn=key,
                      data_capture=DataCapture("s3://captures/smollm2", 25), tags={"team": "ml"})
    specs = {name: endpoints.EndpointSpec(name=name, image_uri=IMAGE, role_arn=role_arn,
                                          instance_type="ml.g4dn.xlarge", environment=env,
                                          model_data=ModelData("s3://models-bucket/m/"), **production)
             for name in ("via-boto3", "via-sdk")}
    states = {name: DeploymentState.load(name, REGION, state_dir()) for name in specs}
    endpoints.deploy(aws, specs["via-boto3"], states["via-boto3"], wait_timeout=30, poll=0.2)
    desc = sdk_deploy.deploy_with_sdk(aws, specs["via-sdk"], states["via-sdk"], wait_timeout=30, poll=1)
    assert desc["EndpointStatus"] == "InService"
    assert _described("via-sdk", states["via-sdk"]) == _described("via-boto3", states["via-boto3"])
    model, config, _ = _described("via-sdk", states["via-sdk"])
    assert model["EnableNetworkIsolation"] is True and model["VpcConfig"]["Subnets"] == ["subnet-0aaa"]
    assert config["KmsKeyId"] == key and config["DataCaptureConfig"]["InitialSamplingPercentage"] == 25
    sm = boto3.client("sagemaker", region_name=REGION)
    assert sm.list_tags(ResourceArn=desc["EndpointArn"])["Tags"] == [
        {"Key": TAG_KEY, "Value": "via-sdk"}, {"Key": "team", "Value": "ml"}]

    for name in specs:  # the same blue/green update both ways
        specs[name].instance_count, specs[name].rollout = 2, parse_rollout("linear:50%:1m")
    endpoints.deploy(aws, specs["via-boto3"], states["via-boto3"], wait_timeout=30, poll=0.2)
    updated = sdk_deploy.deploy_with_sdk(aws, specs["via-sdk"], states["via-sdk"], wait_timeout=30, poll=1)
    assert _described("via-sdk", states["via-sdk"])[2] == _described("via-boto3", states["via-boto3"])[2] == {
        "BlueGreenUpdatePolicy": {"TrafficRoutingConfiguration": {
            "Type": "LINEAR", "WaitIntervalInSeconds": 60, "LinearStepSize": {"Type": "CAPACITY_PERCENT", "Value": 50}}}}
    assert updated["EndpointConfigName"] != desc["EndpointConfigName"]
    assert updated["ProductionVariants"][0]["CurrentInstanceCount"] == 2
    assert len(states["via-sdk"].find("endpoint-config")) == 1  # the superseded pair was retired

    for state in states.values():
        teardown.delete_all(aws, state, wait_timeout=30, poll=0.2)
    assert sm.list_endpoints()["Endpoints"] == [] and sm.list_models()["Models"] == []
    assert sm.list_endpoint_configs()["EndpointConfigs"] == []


def test_cli_sdk_flag_deploys_and_delete_cleans_up(aws_env: dict[str, str], role_arn: str) -> None:
    from tests.deploy.test_errors import run_cli

    created = run_cli("deploy", "--sdk", "--name", "cli-sdk", "--image-uri", IMAGE, "--role", "SageMakerExecution",
                      "--instance-type", "ml.g4dn.xlarge", "--no-smoke-test", "--poll", "1", env=aws_env)
    assert created.returncode == 0, created.stderr
    assert created.stdout == "cli-sdk\n" and "with the SageMaker SDK" in created.stderr
    sm = boto3.client("sagemaker", region_name=REGION)
    assert sm.describe_endpoint(EndpointName="cli-sdk")["EndpointStatus"] == "InService"
    deleted = run_cli("delete", "--name", "cli-sdk", env=aws_env)
    assert deleted.returncode == 0, deleted.stderr
    assert sm.list_endpoints()["Endpoints"] == [] and sm.list_models()["Models"] == []
