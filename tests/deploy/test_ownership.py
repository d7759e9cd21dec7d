"""Data ownership: ExpectedBucketOwner on every bucket call, private encrypted buckets, no foreign
bucket, and ECR credentials that never leave for a host that is not ECR unless asked for on loopback."""

from __future__ import annotations

from pathlib import Path

import boto3
import pytest

from deploy import cli, ecr, model_artifacts, teardown
from deploy.errors import DeployError
from deploy.session import Aws
from deploy.state import TAG_KEY, DeploymentState, state_dir
from tests.deploy.conftest import REGION
from tests.deploy.moto_stack import ACCOUNT_ID

DEFAULT_BUCKET = f"sagemaker-llm-serve-{ACCOUNT_ID}-{REGION}"
OTHER_ACCOUNT = "444455556666"


def record_s3_calls(aws: Aws) -> list[tuple[str, dict]]:
    """Every S3 operation the deploy code sends from now on, with its parameters (botocore's own event)."""
    calls: list[tuple[str, dict]] = []
    aws.session.events.register("before-parameter-build.s3",
                                lambda params, model, **_: calls.append((model.name, dict(params))))
    return calls


def test_every_call_on_the_bucket_names_its_expected_owner(aws: Aws, model_dir: Path) -> None:
    calls = record_s3_calls(aws)
    state = DeploymentState.load("smollm2", REGION, state_dir())
    model_artifacts.upload_model(aws, state, model_dir, DEFAULT_BUCKET, "models/smollm2", uncompressed=True)
    teardown.delete_all(aws, state, wait_timeout=30, poll=0.2)
    operations = [name for name, _ in calls]
    assert operations[:5] == ["HeadBucket", "CreateBucket", "PutBucketTagging", "PutPublicAccessBlock",
                              "PutBucketEncryption"]
    assert operations.count("PutObject") == 3 and operations.count("DeleteObject") == 3
    assert operations[-3:] == ["GetBucketTagging", "ListObjectsV2", "DeleteBucket"]
    # CreateBucket has no such parameter: it fails by itself when the name is taken.
    assert [(name, params.get("ExpectedBucketOwner")) for name, params in calls if name != "CreateBucket"] == [
        (name, ACCOUNT_ID) for name, _ in calls if name != "CreateBucket"]


def test_a_created_bucket_is_private_and_encrypted(aws: Aws, model_dir: Path) -> None:
    state = DeploymentState.load("smollm2", REGION, state_dir())
    model_artifacts.upload_model(aws, state, model_dir, DEFAULT_BUCKET, "models/smollm2")
    s3 = boto3.client("s3", region_name=REGION)
    assert s3.get_public_access_block(Bucket=DEFAULT_BUCKET)["PublicAccessBlockConfiguration"] == {
        "BlockPublicAcls": True, "IgnorePublicAcls": True, "BlockPublicPolicy": True, "RestrictPublicBuckets": True}
    [rule] = s3.get_bucket_encryption(Bucket=DEFAULT_BUCKET)["ServerSideEncryptionConfiguration"]["Rules"]
    assert rule["ApplyServerSideEncryptionByDefault"] == {"SSEAlgorithm": "AES256"}
    assert s3.get_bucket_tagging(Bucket=DEFAULT_BUCKET)["TagSet"] == [{"Key": TAG_KEY, "Value": "smollm2"}]


def test_kms_key_encrypts_the_bucket_and_every_object(aws_env: dict[str, str], model_dir: Path, capsys) -> None:
    kms = boto3.client("kms", region_name=REGION)
    key = kms.create_key(Description="model data")["KeyMetadata"]
    kms.create_alias(AliasName="alias/models", TargetKeyId=key["KeyId"])
    code = cli.main(["upload-model", "--name", "smollm2", "--model-dir", str(model_dir), "--kms-key", "alias/models",
                     "--tags", "team=ml,cost-center=42"])
    assert code == 0, capsys.readouterr().err
    s3 = boto3.client("s3", region_name=REGION)
    [rule] = s3.get_bucket_encryption(Bucket=DEFAULT_BUCKET)["ServerSideEncryptionConfiguration"]["Rules"]
    assert rule == {"ApplyServerSideEncryptionByDefault": {"SSEAlgorithm": "aws:kms", "KMSMasterKeyID": key["Arn"]},
                    "BucketKeyEnabled": True}
    head = s3.head_object(Bucket=DEFAULT_BUCKET, Key="models/smollm2/model.tar.gz")
    assert (head["ServerSideEncryption"], head["SSEKMSKeyId"]) == ("aws:kms", key["Arn"])
    assert s3.get_bucket_tagging(Bucket=DEFAULT_BUCKET)["TagSet"] == [
        {"Key": TAG_KEY, "Value": "smollm2"}, {"Key": "team", "Value": "ml"}, {"Key": "cost-center", "Value": "42"}]


def other_account_s3() -> object:
    """An S3 client acting as another account (moto's STS issues keys that belong to the assumed role's account)."""
    creds = boto3.client("sts", region_name=REGION).assume_role(
        RoleArn=f"arn:aws:iam::{OTHER_ACCOUNT}:role/squatter", RoleSessionName="squat")["Credentials"]
    return boto3.client("s3", region_name=REGION, aws_access_key_id=creds["AccessKeyId"],
                        aws_secret_access_key=creds["SecretAccessKey"], aws_session_token=creds["SessionToken"])


def test_the_predictable_bucket_owned_by_someone_else_is_refused(aws_env: dict[str, str], model_dir: Path,
                                                                 capsys) -> None:
    squatter = other_account_s3()
    squatter.create_bucket(Bucket=DEFAULT_BUCKET)
    code = cli.main(["upload-model", "--name", "smollm2", "--model-dir", str(model_dir)])
    err = capsys.readouterr().err
    assert code == 2, err
    assert f"S3 bucket {DEFAULT_BUCKET} exists but is not owned by account {ACCOUNT_ID}" in err
    assert "Choose another --bucket" in err
    assert squatter.list_objects_v2(Bucket=DEFAULT_BUCKET).get("KeyCount") == 0  # nothing was sent to it


def test_data_capture_into_a_foreign_bucket_is_refused(aws_env: dict[str, str], role_arn: str, capsys) -> None:
    other_account_s3().create_bucket(Bucket="captures")
    code = cli.main(["deploy", "--name", "smollm2", "--image-uri", "img", "--role", role_arn, "--instance-type",
                     "ml.g4dn.xlarge", "--data-capture", "s3://captures/smollm2", "--no-smoke-test"])
    assert code == 2 and "S3 bucket captures exists but is not owned by account" in capsys.readouterr().err
    assert boto3.client("sagemaker", region_name=REGION).list_models()["Models"] == []


AUTH = ecr.RegistryAuth(username="AWS", password="secret", registry=f"{ACCOUNT_ID}.dkr.ecr.{REGION}.amazonaws.com")


def test_ecr_credentials_go_to_ecr_and_to_a_loopback_override_only_when_asked() -> None:
    assert ecr.push_credentials(AUTH, None, send_to_override=False) is AUTH
    assert ecr.push_credentials(AUTH, "127.0.0.1:5000", send_to_override=False) is None
    assert ecr.push_credentials(AUTH, "127.0.0.1:5000", send_to_override=True) is AUTH
    assert ecr.push_credentials(AUTH, "[::1]:5000", send_to_override=True) is AUTH
    assert ecr.push_credentials(AUTH, "localhost:5000", send_to_override=True) is AUTH
    for host in ("registry.example.com:5000", "10.0.0.5:5000", "127.0.0.1.example.com:443", AUTH.registry):
        with pytest.raises(DeployError, match="is not on loopback"):
            ecr.push_credentials(AUTH, host, send_to_override=True)


def test_push_to_a_remote_override_is_refused_before_anything_happens(aws_env: dict[str, str], capsys) -> None:
    code = cli.main(["push", "--name", "smollm2", "--image", "nope:latest", "--registry-override",
                     "registry.example.com:5000", "--send-ecr-credentials"])
    assert code == 2 and "registry override registry.example.com:5000 is not on loopback" in capsys.readouterr().err
    assert boto3.client("ecr", region_name=REGION).describe_repositories()["repositories"] == []
