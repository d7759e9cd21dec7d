"""`python -m deploy`: from a checkout to an InService SageMaker endpoint and back.

Each subcommand prints its one result on stdout (an image URI, an S3 URI, an endpoint name, a
generated text) and its progress on stderr, so a script can chain them with $(...).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path

import botocore.exceptions as bce

from deploy import autoscaling, ecr, endpoints, flags, governance, iam, model_artifacts, sdk_deploy, teardown
from deploy.errors import DeployError
from deploy.progress import log
from deploy.session import Aws, check_instance_type, connect, resolve_role
from deploy.state import DeploymentState, state_dir

LIMITS = ("MAX_INPUT_TOKENS", "MAX_TOTAL_TOKENS", "MAX_BATCH_PREFILL_TOKENS", "MAX_BATCH_TOTAL_TOKENS",
          "MAX_CONCURRENT_REQUESTS")


def _common() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--name", required=True, help="deployment name: the endpoint's name, and the tag "
                        "on everything created for it (so `delete --name` finds it all)")
    common.add_argument("--region", help="AWS region (default: AWS_REGION / the profile's region)")
    common.add_argument("--profile", help="AWS profile (default: AWS_PROFILE / default credentials)")
    common.add_argument("--state-dir", help="where the record of created resources is kept "
                        "(default: $DEPLOY_STATE_DIR or ~/.sagemaker-llm-serve/deployments)")
    flags.add_tags(common)
    return common


def _add_push(sub, common) -> None:
    p = sub.add_parser("push", parents=[common], help="build, create the ECR repository if missing, tag, push",
                       description="Push a local image (built first with --build) to ECR, tagged with the "
                       "project version and version-gitsha. Prints the image URI (the version-gitsha tag) to use "
                       "with `deploy`. Needs a running Docker engine.")
    p.add_argument("--image", required=True, help="local image to push, e.g. sagemaker-llm-serve:gpu")
    p.add_argument("--build", choices=("gpu", "cpu"), help="build --image first with container/imagebuild.py: "
                   "gpu (CUDA torch, for SageMaker GPU instances) or cpu")
    p.add_argument("--repository", default="sagemaker-llm-serve", help="ECR repository name")
    p.add_argument("--registry-override", help="push to this loopback host:port instead of the ECR registry "
                   "(tests: a local registry); default $DEPLOY_REGISTRY_OVERRIDE")
    p.add_argument("--send-ecr-credentials", action="store_true", help="log in to the override registry with the "
                   "account's ECR credentials (default $DEPLOY_REGISTRY_OVERRIDE_CREDENTIALS=1; loopback only)")


def _add_upload(sub, common) -> None:
    p = sub.add_parser("upload-model", parents=[common], help="upload a local model directory to S3",
                       description="Upload a model directory (HF layout or a .gguf) as model.tar.gz, or file by "
                       "file with --uncompressed. Prints the S3 URI to pass to `deploy --model-data`.")
    p.add_argument("--model-dir", required=True, type=Path, help="local directory with the model files")
    p.add_argument("--bucket", help="S3 bucket, created if missing (default sagemaker-llm-serve-ACCOUNT-REGION)")
    p.add_argument("--prefix", help="key prefix (default models/NAME)")
    p.add_argument("--uncompressed", action="store_true",
                   help="upload the files under a prefix (ModelDataSource, no tarball: faster for big models)")
    flags.add_kms_key(p, "the uploaded objects and the default encryption of a bucket created here (else SSE-S3)")


def _add_deploy(sub, common) -> None:
    p = sub.add_parser("deploy", parents=[common], help="create or update the endpoint, wait, smoke-test",
                       description="Create model, endpoint config and endpoint (or update the endpoint in place "
                       "with a new config), wait for InService with a progress line, then invoke it once.")
    p.add_argument("--image-uri", required=True, help="image URI printed by `push`")
    p.add_argument("--role", help="SageMaker execution role name or ARN (default $SAGEMAKER_ROLE, else the role "
                   "`role --name NAME` made)")
    p.add_argument("--model-data", help="s3://.../model.tar.gz or an s3://.../prefix/ from upload-model "
                   "(omit to serve HF_MODEL_ID or the embedded default model)")
    p.add_argument("--instance-type", default=endpoints.DEFAULT_INSTANCE_TYPE, help="default %(default)s")
    p.add_argument("--instance-count", type=int, default=1)
    p.add_argument("--variant", default="AllTraffic", help="production variant name")
    p.add_argument("--oai-enabled", choices=("true", "false"), help="OAI_ENABLED: OpenAI chat or TGI generate")
    p.add_argument("--hf-model-id", help="HF_MODEL_ID inside the container")
    p.add_argument("--num-gpus", type=int, help="SM_NUM_GPUS")
    for limit in LIMITS:
        p.add_argument("--" + limit.lower().replace("_", "-"), type=int, help=limit)
    p.add_argument("--env", action="append", default=[], metavar="KEY=VALUE", help="more container environment")
    p.add_argument("--startup-timeout", type=int, default=600,
                   help="ContainerStartupHealthCheckTimeoutInSeconds (default %(default)s)")
    p.add_argument("--download-timeout", type=int, default=1200,
                   help="ModelDataDownloadTimeoutInSeconds (default %(default)s)")
    p.add_argument("--wait-timeout", type=float, default=3600, help="give up waiting after this many seconds")
    p.add_argument("--poll", type=float, default=15.0, help="seconds between status checks")
    p.add_argument("--no-smoke-test", action="store_true", help="skip the one test invocation")
    p.add_argument("--sdk", action="store_true", help="use the SageMaker Python SDK (sagemaker-core) instead of boto3")
    flags.add_deploy_options(p)


def _add_invoke(sub, common) -> None:
    p = sub.add_parser("invoke", parents=[common], help="send one request, print the generated text")
    p.add_argument("--body", help="JSON request body (default: a short generate, or chat with --oai)")
    p.add_argument("--oai", action="store_true", help="default body in OpenAI chat format")


def _add_autoscale(sub, common) -> None:
    p = sub.add_parser("autoscale", parents=[common], help="target-tracking autoscaling on invocations",
                       description="Register the variant with Application Auto Scaling and track "
                       "SageMakerVariantInvocationsPerInstance (requests per instance per minute).")
    p.add_argument("--variant", default="AllTraffic")
    p.add_argument("--min", type=int, default=1, dest="min_capacity")
    p.add_argument("--max", type=int, default=2, dest="max_capacity")
    p.add_argument("--target-invocations", type=float, default=20.0, help="default %(default)s per minute")
    p.add_argument("--scale-in-cooldown", type=int, default=300)
    p.add_argument("--scale-out-cooldown", type=int, default=60)
    p.add_argument("--disable", action="store_true", help="remove the policy and deregister instead")


def _add_delete_and_status(sub, common) -> None:
    p = sub.add_parser("delete", parents=[common], help="delete everything this deployment created, nothing else")
    p.add_argument("--wait-timeout", type=float, default=1800)
    p.add_argument("--poll", type=float, default=10.0)
    sub.add_parser("status", parents=[common], help="print the recorded resources as JSON")


def build_parser() -> argparse.ArgumentParser:
    """The argument parser with every subcommand."""
    parser = argparse.ArgumentParser(
        prog="python -m deploy",
        description="Deploy the sagemaker-llm-serve container to SageMaker: from a checkout to an InService "
        "endpoint and back. Each command prints its result on stdout and its progress on stderr.",
        epilog="Typical sequence: push -> upload-model -> role -> deploy -> autoscale -> invoke -> delete. "
        "Errors about credentials, region, role or instance type exit with status 2.")
    common = _common()
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_push(sub, common)
    _add_upload(sub, common)
    flags.add_role(sub, common)
    _add_deploy(sub, common)
    _add_invoke(sub, common)
    _add_autoscale(sub, common)
    _add_delete_and_status(sub, common)
    return parser


def _spec(aws: Aws, state: DeploymentState, args: argparse.Namespace) -> endpoints.EndpointSpec:
    limits = {name: getattr(args, name.lower()) for name in LIMITS}
    environment = endpoints.build_environment(args.oai_enabled, args.hf_model_id, args.num_gpus, limits, args.env)
    role = args.role or os.environ.get("SAGEMAKER_ROLE") or iam.recorded_role(state)
    return endpoints.EndpointSpec(
        name=args.name, image_uri=args.image_uri, role_arn=resolve_role(aws, role),
        instance_type=check_instance_type(args.instance_type), instance_count=args.instance_count,
        variant=args.variant, environment=environment,
        model_data=model_artifacts.ModelData(args.model_data) if args.model_data else None,
        startup_timeout=args.startup_timeout, download_timeout=args.download_timeout,
        **flags.spec_fields(aws, state, args, environment, bool(args.model_data)),
    )


def _run_deploy(aws: Aws, state: DeploymentState, args: argparse.Namespace) -> str:
    spec = _spec(aws, state, args)
    run = sdk_deploy.deploy_with_sdk if args.sdk else endpoints.deploy
    desc = run(aws, spec, state, wait_timeout=args.wait_timeout, poll=args.poll)
    log(f"endpoint {desc['EndpointName']} InService with config {desc['EndpointConfigName']}")
    if not args.no_smoke_test:
        payload = endpoints.smoke_payload(spec.environment.get("OAI_ENABLED") == "true")
        log(f"smoke test answer: {endpoints.smoke_test(aws, spec.name, payload)!r}")
    return desc["EndpointName"]


def _dispatch(args: argparse.Namespace) -> str | None:
    aws = connect(args.region, args.profile)
    state = DeploymentState.load(args.name, aws.region, state_dir(args.state_dir))
    tags = governance.parse_tags(args.tags)
    if args.command == "push":
        return ecr.build_and_push(aws, state, args.image, args.repository, args.registry_override, args.build,
                                  args.send_ecr_credentials, tags).image_uri
    if args.command == "upload-model":
        bucket = args.bucket or f"sagemaker-llm-serve-{aws.account_id}-{aws.region}"
        prefix = args.prefix or f"models/{args.name}"
        return model_artifacts.upload_model(aws, state, args.model_dir, bucket, prefix, args.uncompressed,
                                            governance.resolve_kms_key(aws, args.kms_key), tags).s3_uri
    if args.command == "role":
        return flags.run_role(aws, state, args)
    if args.command == "deploy":
        return _run_deploy(aws, state, args)
    if args.command == "invoke":
        try:
            body = json.loads(args.body) if args.body else endpoints.smoke_payload(args.oai)
        except json.JSONDecodeError as exc:
            raise DeployError(f"--body is not JSON: {exc}") from exc
        return endpoints.smoke_test(aws, args.name, body)
    if args.command == "autoscale":
        if args.disable:
            autoscaling.disable(aws, state, args.name, args.variant)
            return None
        autoscaling.enable(aws, state, args.name, args.variant, args.min_capacity, args.max_capacity,
                           args.target_invocations, args.scale_in_cooldown, args.scale_out_cooldown)
        return autoscaling.resource_id(args.name, args.variant)
    if args.command == "delete":
        teardown.delete_all(aws, state, args.wait_timeout, args.poll)
        return None
    return json.dumps({"name": state.name, "region": state.region, "state_file": str(state.path),
                       "resources": [r.__dict__ for r in state.resources]}, indent=2)


def main(argv: Sequence[str] | None = None) -> int:
    """Run one subcommand; 2 with a one-line explanation for errors the user can fix."""
    args = build_parser().parse_args(argv)
    try:
        result = _dispatch(args)
    except DeployError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except (bce.ClientError, bce.BotoCoreError) as exc:  # not one we can explain: say which call failed
        print(f"error: AWS call failed: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted; `python -m deploy status` shows what exists so far", file=sys.stderr)
        return 130
    if result is not None:
        print(result)
    return 0
