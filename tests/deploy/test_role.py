"""`python -m deploy role`: the execution role with exactly what the endpoint needs, asserted as written
and as IAM evaluates it (moto taught SimulatePrincipalPolicy), created, used, and deleted with the rest."""

from __future__ import annotations

import json

import boto3

from deploy import cli
from tests.deploy.conftest import REGION
from tests.deploy.moto_stack import ACCOUNT_ID

ARN = f"arn:aws:iam::{ACCOUNT_ID}:role/sagemaker-llm-serve-smollm2"
MODEL_DATA = "s3://models-bucket/models/smollm2/"
LOG_GROUP = f"arn:aws:logs:{REGION}:{ACCOUNT_ID}:log-group:/aws/sagemaker/Endpoints/smollm2"
OURS = {"StringEquals": {"aws:ResourceAccount": ACCOUNT_ID}}
BASE = [
    {"Sid": "PullImageLogin", "Effect": "Allow", "Action": "ecr:GetAuthorizationToken", "Resource": "*"},
    {"Sid": "PullImage", "Effect": "Allow",
     "Action": ["ecr:BatchCheckLayerAvailability", "ecr:BatchGetImage", "ecr:GetDownloadUrlForLayer"],
     "Resource": f"arn:aws:ecr:{REGION}:{ACCOUNT_ID}:repository/sagemaker-llm-serve"},
    {"Sid": "ReadModelData", "Effect": "Allow", "Action": "s3:GetObject",
     "Resource": "arn:aws:s3:::models-bucket/models/smollm2/*", "Condition": OURS},
    {"Sid": "ListModelData", "Effect": "Allow", "Action": "s3:ListBucket", "Resource": "arn:aws:s3:::models-bucket",
     "Condition": {**OURS, "StringLike": {"s3:prefix": "models/smollm2/*"}}},
    {"Sid": "WriteLogs", "Effect": "Allow",
     "Action": ["logs:CreateLogGroup", "logs:CreateLogStream", "logs:DescribeLogStreams", "logs:PutLogEvents"],
     "Resource": [LOG_GROUP, f"{LOG_GROUP}:log-stream:*"]},
    {"Sid": "WriteMetrics", "Effect": "Allow", "Action": "cloudwatch:PutMetricData", "Resource": "*",
     "Condition": {"StringEquals": {"cloudwatch:namespace": ["/aws/sagemaker/Endpoints", "AWS/SageMaker"]}}},
]
TRUST = {"Version": "2012-10-17", "Statement": [{
    "Effect": "Allow", "Principal": {"Service": "sagemaker.amazonaws.com"}, "Action": "sts:AssumeRole",
    "Condition": {"StringEquals": {"aws:SourceAccount": ACCOUNT_ID}}}]}


def run(capsys, *argv: str) -> str:
    """`python -m deploy ARGV` in this process; its stdout (asserting exit status 0)."""
    code = cli.main(list(argv))
    out, err = capsys.readouterr()
    assert code == 0, err
    return out.strip()


def simulate(action: str, resource: str = "*", **context: str) -> str:
    entries = [{"ContextKeyName": k.replace("__", ":"), "ContextKeyValues": [v], "ContextKeyType": "string"}
               for k, v in context.items()]
    [result] = boto3.client("iam", region_name=REGION).simulate_principal_policy(
        PolicySourceArn=ARN, ActionNames=[action], ResourceArns=[resource], ContextEntries=entries)[
        "EvaluationResults"]
    return result["EvalDecision"]


def test_the_role_grants_exactly_what_the_endpoint_needs(aws_env: dict[str, str], capsys) -> None:
    assert run(capsys, "role", "--name", "smollm2", "--model-data", MODEL_DATA) == ARN
    iam = boto3.client("iam", region_name=REGION)
    role = iam.get_role(RoleName="sagemaker-llm-serve-smollm2")["Role"]
    assert role["AssumeRolePolicyDocument"] == TRUST
    assert iam.list_role_policies(RoleName="sagemaker-llm-serve-smollm2")["PolicyNames"] == [
        "sagemaker-llm-serve-endpoint"]
    assert iam.list_attached_role_policies(RoleName="sagemaker-llm-serve-smollm2")["AttachedPolicies"] == []
    policy = iam.get_role_policy(RoleName="sagemaker-llm-serve-smollm2", PolicyName="sagemaker-llm-serve-endpoint")
    assert policy["PolicyDocument"] == {"Version": "2012-10-17", "Statement": BASE}
    # The same document, read as IAM would: what the endpoint does is allowed, the neighbours are not.
    ours = {"aws__ResourceAccount": ACCOUNT_ID}
    assert simulate("s3:GetObject", "arn:aws:s3:::models-bucket/models/smollm2/model.safetensors", **ours) == "allowed"
    assert simulate("s3:GetObject", "arn:aws:s3:::models-bucket/models/other/model.safetensors", **ours) != "allowed"
    assert simulate("s3:GetObject", "arn:aws:s3:::models-bucket/models/smollm2/x",
                    aws__ResourceAccount="444455556666") != "allowed"  # the same name in another account
    assert simulate("s3:PutObject", "arn:aws:s3:::models-bucket/models/smollm2/x", **ours) != "allowed"
    assert simulate("ecr:BatchGetImage", f"arn:aws:ecr:{REGION}:{ACCOUNT_ID}:repository/sagemaker-llm-serve") == (
        "allowed")
    assert simulate("ecr:BatchGetImage", f"arn:aws:ecr:{REGION}:{ACCOUNT_ID}:repository/other") != "allowed"
    assert simulate("logs:PutLogEvents", f"{LOG_GROUP}:log-stream:AllTraffic/i-0abc") == "allowed"
    assert simulate("logs:PutLogEvents", f"{LOG_GROUP}-other:log-stream:x") != "allowed"
    assert simulate("cloudwatch:PutMetricData", cloudwatch__namespace="/aws/sagemaker/Endpoints") == "allowed"
    assert simulate("cloudwatch:PutMetricData", cloudwatch__namespace="Custom/Anything") != "allowed"
    assert simulate("sagemaker:CreateEndpoint") != "allowed" and simulate("iam:PassRole") != "allowed"


def test_kms_capture_and_vpc_add_their_statements_only(aws_env: dict[str, str], capsys) -> None:
    key = boto3.client("kms", region_name=REGION).create_key()["KeyMetadata"]["Arn"]
    printed = json.loads(run(capsys, "role", "--name", "smollm2", "--model-data", "s3://models-bucket/m/model.tar.gz",
                             "--kms-key", key, "--data-capture", "s3://captures/smollm2", "--vpc", "--print"))
    assert printed["RoleName"] == "sagemaker-llm-serve-smollm2" and printed["AssumeRolePolicyDocument"] == TRUST
    statements = {s["Sid"]: s for s in printed["Policies"]["sagemaker-llm-serve-endpoint"]["Statement"]}
    assert list(statements) == ["PullImageLogin", "PullImage", "ReadModelData", "WriteLogs", "WriteMetrics",
                                "WriteDataCapture", "UseKmsKey", "GrantKmsKeyToVolumes", "VpcNetworkInterfaces"]
    assert statements["ReadModelData"]["Resource"] == "arn:aws:s3:::models-bucket/m/model.tar.gz"  # a tarball: no List
    assert statements["WriteDataCapture"] == {"Sid": "WriteDataCapture", "Effect": "Allow", "Action": "s3:PutObject",
                                              "Resource": "arn:aws:s3:::captures/smollm2/*",
                                              "Condition": {"StringEquals": {"aws:ResourceAccount": ACCOUNT_ID}}}
    assert statements["UseKmsKey"]["Resource"] == statements["GrantKmsKeyToVolumes"]["Resource"] == key
    assert statements["UseKmsKey"]["Action"] == ["kms:Decrypt", "kms:DescribeKey", "kms:Encrypt", "kms:GenerateDataKey"]
    assert statements["GrantKmsKeyToVolumes"]["Condition"] == {"Bool": {"kms:GrantIsForAWSResource": "true"}}
    assert statements["VpcNetworkInterfaces"]["Action"][0] == "ec2:CreateNetworkInterface"
    assert boto3.client("iam", region_name=REGION).list_roles()["Roles"] == []  # --print creates nothing


def test_deploy_uses_the_recorded_role_and_delete_removes_it(aws_env: dict[str, str], capsys) -> None:
    role_arn = run(capsys, "role", "--name", "smollm2", "--tags", "team=ml")
    assert run(capsys, "deploy", "--name", "smollm2", "--image-uri", "img:1", "--instance-type", "ml.g4dn.xlarge",
               "--no-smoke-test", "--poll", "0.2") == "smollm2"
    sm = boto3.client("sagemaker", region_name=REGION)
    [model] = sm.list_models()["Models"]
    assert sm.describe_model(ModelName=model["ModelName"])["ExecutionRoleArn"] == role_arn
    iam = boto3.client("iam", region_name=REGION)
    assert {"Key": "team", "Value": "ml"} in iam.list_role_tags(RoleName="sagemaker-llm-serve-smollm2")["Tags"]
    run(capsys, "delete", "--name", "smollm2", "--poll", "0.2")
    assert iam.list_roles()["Roles"] == [] and sm.list_endpoints()["Endpoints"] == []


def test_a_role_of_that_name_not_made_here_is_left_alone(aws_env: dict[str, str], capsys) -> None:
    iam = boto3.client("iam", region_name=REGION)
    iam.create_role(RoleName="sagemaker-llm-serve-smollm2", AssumeRolePolicyDocument=json.dumps(TRUST))
    assert cli.main(["role", "--name", "smollm2"]) == 2
    assert "exists but was not made by this deployment" in capsys.readouterr().err
    assert iam.list_role_policies(RoleName="sagemaker-llm-serve-smollm2")["PolicyNames"] == []


def test_the_sagemaker_sdk_accepts_the_role(aws_env: dict[str, str], capsys) -> None:
    """The SDK v3 checks an execution role before it deploys (iam:SimulatePrincipalPolicy): ours passes."""
    from sagemaker.core.helper.iam_role_resolver import resolve_and_validate_role
    from sagemaker.core.helper.session_helper import Session

    run(capsys, "role", "--name", "smollm2", "--model-data", MODEL_DATA)
    session = Session(boto_session=boto3.Session(region_name=REGION))
    assert resolve_and_validate_role(ARN, role_type="serving", sagemaker_session=session) == ARN
