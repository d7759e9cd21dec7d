"""`deploy` with what a production account requires: VPC, network isolation, KMS, data capture, tags.
Asserted on the resources moto recorded, as SageMaker describes them."""

from __future__ import annotations

import boto3
import pytest

from deploy import cli, governance
from deploy.errors import DeployError
from deploy.state import TAG_KEY
from tests.deploy.conftest import REGION

IMAGE = "123456789012.dkr.ecr.us-east-1.amazonaws.com/sagemaker-llm-serve:0.1.0-abc123def456"
BASE = ["deploy", "--name", "smollm2", "--image-uri", IMAGE, "--instance-type", "ml.g4dn.xlarge", "--no-smoke-test",
        "--poll", "0.2"]


def deploy(capsys, *extra: str) -> tuple[int, str]:
    code = cli.main([*BASE, *extra])
    return code, capsys.readouterr().err


def described() -> tuple[dict, dict, dict]:
    sm = boto3.client("sagemaker", region_name=REGION)
    endpoint = sm.describe_endpoint(EndpointName="smollm2")
    config = sm.describe_endpoint_config(EndpointConfigName=endpoint["EndpointConfigName"])
    model = sm.describe_model(ModelName=config["ProductionVariants"][0]["ModelName"])
    return model, config, endpoint


def test_private_isolated_encrypted_captured_and_tagged(aws_env: dict[str, str], role_arn: str, capsys) -> None:
    key = boto3.client("kms", region_name=REGION).create_key()["KeyMetadata"]["Arn"]
    code, err = deploy(capsys, "--role", role_arn, "--model-data", "s3://models-bucket/models/smollm2/",
                       "--subnets", "subnet-0aaa,subnet-0bbb", "--security-groups", "sg-0ccc", "--network-isolation",
                       "--kms-key", key, "--data-capture", "s3://capture-bucket/smollm2", "--data-capture-percent", "20",
                       "--tags", "team=ml", "--tags", "cost-center=42", "--oai-enabled", "true")
    assert code == 0, err
    model, config, endpoint = described()
    assert model["VpcConfig"] == {"Subnets": ["subnet-0aaa", "subnet-0bbb"], "SecurityGroupIds": ["sg-0ccc"]}
    assert model["EnableNetworkIsolation"] is True
    assert model["PrimaryContainer"]["Environment"] == {"OAI_ENABLED": "true", "HF_HUB_OFFLINE": "1"}
    assert config["KmsKeyId"] == key
    assert config["DataCaptureConfig"] == {
        "EnableCapture": True, "InitialSamplingPercentage": 20, "DestinationS3Uri": "s3://capture-bucket/smollm2",
        "KmsKeyId": key, "CaptureOptions": [{"CaptureMode": "Input"}, {"CaptureMode": "Output"}],
        "CaptureContentTypeHeader": {"JsonContentTypes": ["application/json"]}}
    sm = boto3.client("sagemaker", region_name=REGION)
    expected_tags = [{"Key": TAG_KEY, "Value": "smollm2"}, {"Key": "team", "Value": "ml"},
                     {"Key": "cost-center", "Value": "42"}]
    for arn in (model["ModelArn"], config["EndpointConfigArn"], endpoint["EndpointArn"]):
        assert sm.list_tags(ResourceArn=arn)["Tags"] == expected_tags
    s3 = boto3.client("s3", region_name=REGION)  # the capture bucket did not exist: made private and encrypted
    assert s3.get_public_access_block(Bucket="capture-bucket")["PublicAccessBlockConfiguration"]["BlockPublicAcls"]
    [rule] = s3.get_bucket_encryption(Bucket="capture-bucket")["ServerSideEncryptionConfiguration"]["Rules"]
    assert rule["ApplyServerSideEncryptionByDefault"] == {"SSEAlgorithm": "aws:kms", "KMSMasterKeyID": key}


def test_defaults_add_nothing(aws_env: dict[str, str], role_arn: str, capsys) -> None:
    code, err = deploy(capsys, "--role", role_arn)
    assert code == 0, err
    model, config, _ = described()
    assert "VpcConfig" not in model and model.get("EnableNetworkIsolation") is not True
    assert model["PrimaryContainer"]["Environment"] == {}
    assert "KmsKeyId" not in config and "DataCaptureConfig" not in config


@pytest.mark.parametrize(("extra", "message"), [
    (["--network-isolation", "--hf-model-id", "HuggingFaceTB/SmolLM2-135M-Instruct"],
     "the container cannot download HF_MODEL_ID=HuggingFaceTB/SmolLM2-135M-Instruct from the Hugging Face Hub"),
    (["--subnets", "subnet-0aaa"], "--subnets and --security-groups go together"),
    (["--kms-key", "alias/nope"], "KMS key 'alias/nope' does not exist in us-east-1"),
    (["--data-capture", "capture-bucket/x"], "--data-capture wants an S3 URI"),
    (["--data-capture", "s3://capture-bucket/x", "--data-capture-percent", "0"], "--data-capture-percent must be"),
    (["--data-capture-percent", "10"], "--data-capture-percent needs --data-capture"),
    (["--tags", "team"], "--tags expects KEY=VALUE"),
    (["--tags", f"{TAG_KEY}=other"], "is reserved"),
])
def test_mistakes_are_refused_before_anything_is_made(aws_env: dict[str, str], role_arn: str, capsys,
                                                      extra: list[str], message: str) -> None:
    code, err = deploy(capsys, "--role", role_arn, *extra)
    assert code == 2 and message in err, err
    sm = boto3.client("sagemaker", region_name=REGION)
    assert sm.list_models()["Models"] == [] and sm.list_endpoint_configs()["EndpointConfigs"] == []


def test_isolation_keeps_model_data_and_local_model_ids() -> None:
    governance.check_isolated_model({"HF_MODEL_ID": "org/model"}, has_model_data=True)  # S3 data wins
    governance.check_isolated_model({"HF_MODEL_ID": "/opt/ml/model/sub"}, has_model_data=False)
    with pytest.raises(DeployError):
        governance.check_isolated_model({"HF_MODEL_ID": "org/model"}, has_model_data=False)
