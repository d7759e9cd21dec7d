"""The options a production account asks for, and the `role` command: parsers and what they mean.

Kept apart from cli.py's basic life cycle: VPC, network isolation, KMS, data capture and tags on
`deploy`, blue/green rollouts with alarm rollback, tags everywhere, and the least-privilege role.
"""

from __future__ import annotations

import argparse
import json
from typing import Any

from deploy import governance, iam, model_artifacts, rollout
from deploy.errors import DeployError
from deploy.session import Aws
from deploy.state import DeploymentState


def add_tags(common: argparse.ArgumentParser) -> None:
    """--tags on every command (applied to whatever the command creates)."""
    common.add_argument("--tags", action="append", metavar="KEY=VALUE[,KEY=VALUE]",
                        help="your tags on everything this command creates (repeatable), beside "
                        "sagemaker-llm-serve:deployment=NAME")


def add_kms_key(parser: argparse.ArgumentParser, what: str) -> None:
    """--kms-key: a key id, key ARN, alias or alias ARN of this account."""
    parser.add_argument("--kms-key", metavar="KEY", help=f"KMS key (id, ARN or alias/NAME) for {what}")


def add_deploy_options(p: argparse.ArgumentParser) -> None:
    """The production options of `deploy`: networking, isolation, KMS, data capture, rollout."""
    p.add_argument("--subnets", metavar="ID,ID", help="run the instances in these VPC subnets (with --security-groups)")
    p.add_argument("--security-groups", metavar="ID,ID", help="security groups of the instances' network interfaces")
    p.add_argument("--network-isolation", action="store_true",
                   help="EnableNetworkIsolation: the container gets no network; it serves --model-data or the "
                   "embedded model, never a hub download (HF_HUB_OFFLINE=1)")
    add_kms_key(p, "the instances' storage volume and the captured data")
    p.add_argument("--data-capture", metavar="S3_URI", help="capture sampled requests and answers under this S3 "
                   "prefix (a bucket of this account; created private and encrypted if missing)")
    p.add_argument("--data-capture-percent", type=int, default=100, metavar="N",
                   help="percentage of requests captured (default %(default)s)")
    p.add_argument("--rollout", metavar="PLAN", help="update blue/green with traffic shifting: canary:10%%:5m, "
                   "canary:1:5m, linear:25%%:2m or all-at-once:10m (default: the in-place update)")
    p.add_argument("--rollback-alarms", metavar="ALARM,ALARM",
                   help="CloudWatch alarms that roll the --rollout back when they fire (up to 10)")


def add_role(sub, common: argparse.ArgumentParser) -> None:
    """The `role` command."""
    p = sub.add_parser("role", parents=[common], help="create the endpoint's least-privilege execution role",
                       description="Create (or update) IAM role sagemaker-llm-serve-NAME, which SageMaker assumes "
                       "for this endpoint: pull this repository's image, read this model data, write this "
                       "endpoint's logs and metrics (and use the KMS key, write the captured data, manage VPC "
                       "network interfaces when asked). Prints the role ARN; `deploy --name NAME` uses it when "
                       "no --role is given. --print shows the trust and permission policies instead.")
    p.add_argument("--repository", default="sagemaker-llm-serve", help="ECR repository the image is pulled from")
    p.add_argument("--model-data", help="the S3 URI `upload-model` printed (omit when serving the embedded model)")
    add_kms_key(p, "the model data, the volume and the captured data")
    p.add_argument("--data-capture", metavar="S3_URI", help="allow writing captured data under this prefix")
    p.add_argument("--vpc", action="store_true", help="allow the network interface actions of an endpoint in a VPC")
    p.add_argument("--print", action="store_true", dest="print_only", help="print the policies, create nothing")


def run_role(aws: Aws, state: DeploymentState, args: argparse.Namespace) -> str:
    """`role`: the role ARN, or with --print the two policy documents as JSON."""
    scope = iam.RoleScope(
        account=aws.account_id, region=aws.region, endpoint=args.name, repository=args.repository,
        model_data=model_artifacts.ModelData(args.model_data) if args.model_data else None,
        kms_key_arn=governance.resolve_kms_key(aws, args.kms_key), data_capture=args.data_capture, vpc=args.vpc)
    if args.print_only:
        return json.dumps({"RoleName": iam.role_name(args.name), "AssumeRolePolicyDocument": iam.trust_policy(
            scope.account), "Policies": {iam.POLICY_NAME: iam.execution_policy(scope)}}, indent=2)
    return iam.ensure_role(aws, state, scope, governance.parse_tags(args.tags))


def spec_fields(aws: Aws, state: DeploymentState, args: argparse.Namespace, environment: dict[str, str],
                has_model_data: bool) -> dict[str, Any]:
    """The EndpointSpec fields `deploy`'s production options ask for, checked before anything is made."""
    network = governance.Network(governance.split_list(args.subnets), governance.split_list(args.security_groups),
                                 args.network_isolation)
    if network.isolated:
        governance.check_isolated_model(environment, has_model_data)
        environment.update(governance.HUB_OFFLINE)
    plan = rollout.parse_rollout(args.rollout)
    alarms = governance.split_list(args.rollback_alarms)
    rollout.deployment_config(plan, alarms)  # the combination is checked up front
    rollout.check_alarms(aws, alarms)
    kms_key_arn = governance.resolve_kms_key(aws, args.kms_key)
    tags = governance.parse_tags(args.tags)
    capture = None
    if args.data_capture:
        capture = governance.DataCapture(args.data_capture, args.data_capture_percent)
        model_artifacts.ensure_bucket(aws, capture.bucket, state, kms_key_arn, tags)
    elif args.data_capture_percent != 100:
        raise DeployError("--data-capture-percent needs --data-capture")
    return {"network": network, "kms_key_arn": kms_key_arn, "data_capture": capture, "tags": tags,
            "rollout": plan, "rollback_alarms": alarms}
