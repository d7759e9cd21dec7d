"""The endpoint's execution role with only what it needs, instead of AmazonSageMakerFullAccess.

SageMaker assumes this role to pull the image, copy the model data into /opt/ml/model, write the
container's log and the instance metrics, and (with those options) use the KMS key, write captured
traffic and manage the network interfaces in your VPC. `python -m deploy role` makes it:

- trust: sagemaker.amazonaws.com, and only on behalf of this account (aws:SourceAccount);
- ECR: GetAuthorizationToken (it has no resource-level permissions) and the three pull actions on
  this repository only;
- S3: GetObject on the model data (the one tarball, or the objects under the prefix, and ListBucket
  for that prefix only), in a bucket of this account (aws:ResourceAccount);
- CloudWatch Logs: this endpoint's log group /aws/sagemaker/Endpoints/NAME and its streams;
  CloudWatch metrics: PutMetricData into SageMaker's namespaces only;
- KMS (--kms-key): that key only; grants only for AWS resources (the endpoint's volumes);
- data capture (--data-capture): PutObject under that prefix; VPC (--vpc): the network interface
  actions SageMaker documents for endpoints in a VPC.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import botocore.exceptions as bce

from deploy.errors import DeployError
from deploy.model_artifacts import ModelData, split_s3_uri
from deploy.progress import log
from deploy.session import SAGEMAKER_PRINCIPAL, Aws, step
from deploy.state import TAG_KEY, DeploymentState, tags_for

POLICY_NAME = "sagemaker-llm-serve-endpoint"
METRIC_NAMESPACES = ["/aws/sagemaker/Endpoints", "AWS/SageMaker"]
VPC_ACTIONS = ["ec2:CreateNetworkInterface", "ec2:CreateNetworkInterfacePermission", "ec2:DeleteNetworkInterface",
               "ec2:DeleteNetworkInterfacePermission", "ec2:DescribeDhcpOptions", "ec2:DescribeNetworkInterfaces",
               "ec2:DescribeSecurityGroups", "ec2:DescribeSubnets", "ec2:DescribeVpcs"]


@dataclass(frozen=True)
class RoleScope:
    """Everything the role's policy is scoped to."""

    account: str
    region: str
    endpoint: str
    repository: str
    model_data: ModelData | None = None
    kms_key_arn: str | None = None
    data_capture: str | None = None  # s3://bucket/prefix
    vpc: bool = False
    partition: str = "aws"


def role_name(deployment: str) -> str:
    """The role's name: sagemaker-llm-serve-NAME, within IAM's 64 characters."""
    return f"sagemaker-llm-serve-{deployment}"[:64]


def trust_policy(account: str) -> dict[str, Any]:
    """SageMaker may assume the role, and only for this account (confused-deputy protection)."""
    return {"Version": "2012-10-17", "Statement": [{
        "Effect": "Allow", "Principal": {"Service": SAGEMAKER_PRINCIPAL}, "Action": "sts:AssumeRole",
        "Condition": {"StringEquals": {"aws:SourceAccount": account}}}]}


def _model_data_statements(scope: RoleScope) -> list[dict[str, Any]]:
    if scope.model_data is None:
        return []
    bucket, key = split_s3_uri(scope.model_data.s3_uri)
    ours = {"aws:ResourceAccount": scope.account}
    bucket_arn = f"arn:{scope.partition}:s3:::{bucket}"
    if scope.model_data.compressed:
        return [{"Sid": "ReadModelData", "Effect": "Allow", "Action": "s3:GetObject",
                 "Resource": f"{bucket_arn}/{key}", "Condition": {"StringEquals": ours}}]
    return [{"Sid": "ReadModelData", "Effect": "Allow", "Action": "s3:GetObject",
             "Resource": f"{bucket_arn}/{key}*", "Condition": {"StringEquals": ours}},
            {"Sid": "ListModelData", "Effect": "Allow", "Action": "s3:ListBucket", "Resource": bucket_arn,
             "Condition": {"StringEquals": ours, "StringLike": {"s3:prefix": f"{key}*"}}}]


def _optional_statements(scope: RoleScope) -> list[dict[str, Any]]:
    statements: list[dict[str, Any]] = []
    if scope.data_capture:
        bucket, key = split_s3_uri(scope.data_capture)
        prefix = f"{key.rstrip('/')}/" if key else ""
        statements.append({"Sid": "WriteDataCapture", "Effect": "Allow", "Action": "s3:PutObject",
                           "Resource": f"arn:{scope.partition}:s3:::{bucket}/{prefix}*",
                           "Condition": {"StringEquals": {"aws:ResourceAccount": scope.account}}})
    if scope.kms_key_arn:
        statements += [{"Sid": "UseKmsKey", "Effect": "Allow", "Resource": scope.kms_key_arn,
                        "Action": ["kms:Decrypt", "kms:DescribeKey", "kms:Encrypt", "kms:GenerateDataKey"]},
                       {"Sid": "GrantKmsKeyToVolumes", "Effect": "Allow", "Action": "kms:CreateGrant",
                        "Resource": scope.kms_key_arn,
                        "Condition": {"Bool": {"kms:GrantIsForAWSResource": "true"}}}]
    if scope.vpc:
        statements.append({"Sid": "VpcNetworkInterfaces", "Effect": "Allow", "Action": VPC_ACTIONS, "Resource": "*"})
    return statements


def execution_policy(scope: RoleScope) -> dict[str, Any]:
    """The role's one inline policy: exactly what the endpoint does."""
    prefix = f"arn:{scope.partition}"
    log_group = f"{prefix}:logs:{scope.region}:{scope.account}:log-group:/aws/sagemaker/Endpoints/{scope.endpoint}"
    statements = [
        {"Sid": "PullImageLogin", "Effect": "Allow", "Action": "ecr:GetAuthorizationToken", "Resource": "*"},
        {"Sid": "PullImage", "Effect": "Allow",
         "Action": ["ecr:BatchCheckLayerAvailability", "ecr:BatchGetImage", "ecr:GetDownloadUrlForLayer"],
         "Resource": f"{prefix}:ecr:{scope.region}:{scope.account}:repository/{scope.repository}"},
        *_model_data_statements(scope),
        {"Sid": "WriteLogs", "Effect": "Allow",
         "Action": ["logs:CreateLogGroup", "logs:CreateLogStream", "logs:DescribeLogStreams", "logs:PutLogEvents"],
         "Resource": [log_group, f"{log_group}:log-stream:*"]},
        {"Sid": "WriteMetrics", "Effect": "Allow", "Action": "cloudwatch:PutMetricData", "Resource": "*",
         "Condition": {"StringEquals": {"cloudwatch:namespace": METRIC_NAMESPACES}}},
        *_optional_statements(scope),
    ]
    return {"Version": "2012-10-17", "Statement": statements}


def _existing(aws: Aws, name: str) -> dict[str, Any] | None:
    try:
        return aws.client("iam").get_role(RoleName=name)["Role"]
    except bce.ClientError as exc:
        if exc.response.get("Error", {}).get("Code") == "NoSuchEntity":
            return None
        raise


def _is_ours(aws: Aws, name: str, deployment: str) -> bool:
    tags = aws.client("iam").list_role_tags(RoleName=name).get("Tags", [])
    return {"Key": TAG_KEY, "Value": deployment} in tags


def ensure_role(aws: Aws, state: DeploymentState, scope: RoleScope, tags: dict[str, str] | None = None) -> str:
    """Create the role (or bring ours up to date with this scope) and return its ARN."""
    iam, name = aws.client("iam"), role_name(state.name)
    trust, policy = json.dumps(trust_policy(scope.account)), json.dumps(execution_policy(scope))
    found = _existing(aws, name)
    if found is not None and not _is_ours(aws, name, state.name):
        raise DeployError(f"IAM role {name} exists but was not made by this deployment (no tag "
                          f"{TAG_KEY}={state.name}); pick another --name or pass --role")
    with step(f"{'update' if found else 'create'} IAM role {name}"):
        if found is None:
            found = iam.create_role(RoleName=name, AssumeRolePolicyDocument=trust, Tags=tags_for(state.name, tags),
                                    Description=f"SageMaker execution role of endpoint {scope.endpoint} "
                                    "(python -m deploy role)")["Role"]
            state.add("iam-role", name, arn=found["Arn"])
        else:
            iam.update_assume_role_policy(RoleName=name, PolicyDocument=trust)
        iam.put_role_policy(RoleName=name, PolicyName=POLICY_NAME, PolicyDocument=policy)
    log(f"IAM role {name}: {len(execution_policy(scope)['Statement'])} statements scoped to endpoint "
        f"{scope.endpoint}, repository {scope.repository}"
        + (f", model data {scope.model_data.s3_uri}" if scope.model_data else ""))
    return found["Arn"]


def recorded_role(state: DeploymentState) -> str | None:
    """The ARN of the role `deploy role` made for this deployment, if it did."""
    roles = state.find("iam-role")
    return roles[-1].details.get("arn") if roles else None


def delete_role_if_ours(aws: Aws, name: str, deployment: str) -> bool:
    """Delete the role and its inline policy if it carries our tag."""
    iam = aws.client("iam")
    with step(f"delete IAM role {name}"):
        if _existing(aws, name) is None:
            return True
        if not _is_ours(aws, name, deployment):
            log(f"kept IAM role {name}: not tagged {TAG_KEY}={deployment}")
            return False
        for policy in iam.list_role_policies(RoleName=name).get("PolicyNames", []):
            iam.delete_role_policy(RoleName=name, PolicyName=policy)
        iam.delete_role(RoleName=name)
    return True
