"""Clear errors for the mistakes people make: credentials, region, role, instance type."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import boto3
import botocore.exceptions as bce
import pytest

from deploy.errors import explain
from deploy.session import Aws, resolve_role
from tests.deploy.conftest import REGION
from tests.deploy.test_lifecycle import IMAGE

REPO_ROOT = Path(__file__).resolve().parents[2]


def run_cli(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    """`python -m deploy ARGS` in a child process with exactly `env` (plus PATH)."""
    full_env = {"PATH": os.environ["PATH"], "HOME": env.get("HOME", "/nonexistent"), **env}
    return subprocess.run([sys.executable, "-m", "deploy", *args], cwd=REPO_ROOT, env=full_env,
                          capture_output=True, text=True, timeout=120)


def test_help_lists_every_step() -> None:
    out = run_cli("--help", env={}).stdout
    for command in ("push", "upload-model", "deploy", "invoke", "autoscale", "delete", "status"):
        assert command in out
    deploy_help = run_cli("deploy", "--help", env={}).stdout
    assert "ContainerStartupHealthCheckTimeoutInSeconds" in deploy_help and "--oai-enabled" in deploy_help


def test_missing_credentials(aws_env: dict[str, str], tmp_path: Path) -> None:
    env = {k: v for k, v in aws_env.items() if not k.startswith("AWS_ACCESS") and not k.startswith("AWS_SECRET")}
    result = run_cli("status", "--name", "x", env={**env, "HOME": str(tmp_path)})
    assert result.returncode == 2, result.stderr
    assert "no AWS credentials found" in result.stderr and "AWS_PROFILE" in result.stderr
    assert "Traceback" not in result.stderr


def test_wrong_region_is_caught_before_any_call(aws_env: dict[str, str]) -> None:
    result = run_cli("status", "--name", "x", "--region", "us-east-7", env=aws_env)
    assert result.returncode == 2
    assert "region 'us-east-7' is not a SageMaker region; did you mean us-east-2, us-east-1" in result.stderr


def test_missing_role(aws_env: dict[str, str]) -> None:
    result = run_cli("deploy", "--name", "x", "--image-uri", IMAGE, "--role", "NoSuchRole",
                     "--instance-type", "ml.g4dn.xlarge", env=aws_env)
    assert result.returncode == 2
    assert "IAM role 'NoSuchRole' does not exist in account 123456789012" in result.stderr
    assert "sagemaker.amazonaws.com" in result.stderr
    no_role = run_cli("deploy", "--name", "x", "--image-uri", IMAGE, env=aws_env)
    assert no_role.returncode == 2 and "no execution role given" in no_role.stderr


def test_role_that_sagemaker_cannot_assume(aws: Aws) -> None:
    trust_ec2 = {"Version": "2012-10-17", "Statement": [
        {"Effect": "Allow", "Principal": {"Service": "ec2.amazonaws.com"}, "Action": "sts:AssumeRole"}]}
    boto3.client("iam", region_name=REGION).create_role(RoleName="Ec2Only", AssumeRolePolicyDocument=json.dumps(trust_ec2))
    with pytest.raises(Exception, match="does not let sagemaker.amazonaws.com assume it"):
        resolve_role(aws, "arn:aws:iam::123456789012:role/Ec2Only")


def test_instance_type_that_does_not_exist(aws_env: dict[str, str], role_arn: str) -> None:
    result = run_cli("deploy", "--name", "x", "--image-uri", IMAGE, "--role", role_arn,
                     "--instance-type", "ml.g5.xlarg", env=aws_env)
    assert result.returncode == 2
    assert "'ml.g5.xlarg' is not a SageMaker hosting instance type; did you mean ml.g5.xlarge" in result.stderr
    assert boto3.client("sagemaker", region_name=REGION).list_models()["Models"] == []  # nothing half-made


def _client_error(code: str, message: str, operation: str) -> bce.ClientError:
    return bce.ClientError({"Error": {"Code": code, "Message": message}}, operation)


def test_instance_type_the_account_cannot_use() -> None:
    # SageMaker's answer when the account's quota for an instance type is 0 (the usual case for GPUs).
    exc = _client_error("ResourceLimitExceeded", "The account-level service limit 'ml.g5.12xlarge for endpoint "
                        "usage' is 0 Instances, with current utilization of 0 Instances and a request delta of 1 "
                        "Instances. Please use AWS Service Quotas to request an increase for this quota.",
                        "CreateEndpoint")
    message = str(explain(exc, "create endpoint smollm2"))
    assert message.startswith("create endpoint smollm2: the account cannot run this instance type here")
    assert "Service Quotas" in message and "--instance-type" in message


def test_role_rejected_by_sagemaker_and_unreachable_region() -> None:
    exc = _client_error("ValidationException", "Could not assume role arn:aws:iam::1:role/x. Please ensure "
                        "that the role exists and allows principal 'sagemaker.amazonaws.com' to assume the role.",
                        "CreateModel")
    assert "SageMaker cannot use the execution role" in str(explain(exc, "create model m"))
    unreachable = bce.EndpointConnectionError(endpoint_url="https://api.sagemaker.mars-1.amazonaws.com/")
    assert "check --region" in str(explain(unreachable, "describe endpoint e"))
