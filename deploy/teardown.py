"""Delete what a deployment created, in dependency order, and nothing else.

The state file says what to delete; each SageMaker resource must also still carry this deployment's
tag, so a name reused by someone else since is left alone. Buckets and repositories are removed only
when they are ours and empty once our own objects and images are gone; the execution role last.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import botocore.exceptions as bce

from deploy import ecr, iam, model_artifacts
from deploy.autoscaling import DIMENSION, NAMESPACE
from deploy.endpoints import wait_deleted
from deploy.progress import log
from deploy.session import Aws, step
from deploy.state import TAG_KEY, DeploymentState

# kind -> (describe call, ARN field, delete call) for the SageMaker resources.
SAGEMAKER_KINDS: dict[str, tuple[str, str, str, str]] = {
    "endpoint": ("describe_endpoint", "EndpointName", "EndpointArn", "delete_endpoint"),
    "endpoint-config": ("describe_endpoint_config", "EndpointConfigName", "EndpointConfigArn",
                        "delete_endpoint_config"),
    "model": ("describe_model", "ModelName", "ModelArn", "delete_model"),
}


def _sagemaker_arn(aws: Aws, kind: str, name: str) -> str | None:
    describe, param, arn_field, _ = SAGEMAKER_KINDS[kind]
    try:
        return getattr(aws.client("sagemaker"), describe)(**{param: name})[arn_field]
    except bce.ClientError as exc:
        if "Could not find" in exc.response.get("Error", {}).get("Message", ""):
            return None
        raise


def _is_ours(aws: Aws, arn: str, deployment: str) -> bool:
    tags = aws.client("sagemaker").list_tags(ResourceArn=arn).get("Tags", [])
    return {"Key": TAG_KEY, "Value": deployment} in tags


def _delete_sagemaker(aws: Aws, state: DeploymentState, kind: str, timeout: float, poll: float) -> None:
    _, param, _, delete = SAGEMAKER_KINDS[kind]
    for resource in state.find(kind):
        with step(f"delete {kind} {resource.name}"):
            arn = _sagemaker_arn(aws, kind, resource.name)
            if arn is not None and _is_ours(aws, arn, state.name):
                getattr(aws.client("sagemaker"), delete)(**{param: resource.name})
                if kind == "endpoint":
                    wait_deleted(aws, resource.name, timeout, poll)
                log(f"deleted {kind} {resource.name}")
            elif arn is not None:
                log(f"kept {kind} {resource.name}: not tagged {TAG_KEY}={state.name}")
        state.remove(kind, resource.name)


def _delete_autoscaling(aws: Aws, state: DeploymentState) -> None:
    aas = aws.client("application-autoscaling")
    calls: list[tuple[str, str, Callable[[], Any]]] = []
    for p in state.find("scaling-policy"):
        calls.append(("scaling-policy", p.name, lambda p=p: aas.delete_scaling_policy(
            PolicyName=p.name, ServiceNamespace=NAMESPACE, ResourceId=p.details["resource_id"],
            ScalableDimension=DIMENSION)))
    for t in state.find("scalable-target"):
        calls.append(("scalable-target", t.name, lambda t=t: aas.deregister_scalable_target(
            ServiceNamespace=NAMESPACE, ResourceId=t.name, ScalableDimension=DIMENSION)))
    for kind, name, call in calls:
        with step(f"delete {kind} {name}"):
            try:
                call()
                log(f"deleted {kind} {name}")
            except bce.ClientError as exc:
                if exc.response.get("Error", {}).get("Code") != "ObjectNotFoundException":
                    raise
        state.remove(kind, name)


def _delete_storage(aws: Aws, state: DeploymentState) -> None:
    for obj in state.find("s3-object"):
        with step(f"delete {obj.name}"):
            model_artifacts.delete_object(aws, obj.details["bucket"], obj.details["key"])
        state.remove("s3-object", obj.name)
    for image in state.find("ecr-image"):
        ecr.delete_pushed_images(aws, image.details["repository"], image.details["tags"])
        log(f"deleted image tags {image.details['repository']}:{','.join(image.details['tags'])}")
        state.remove("ecr-image", image.name)
    for bucket in state.find("s3-bucket"):
        if model_artifacts.delete_bucket_if_ours(aws, bucket.name, state.name):
            log(f"deleted S3 bucket {bucket.name}")
        state.remove("s3-bucket", bucket.name)
    for repo in state.find("ecr-repository"):
        if ecr.delete_repository_if_ours(aws, repo.name, state.name):
            log(f"deleted ECR repository {repo.name}")
        state.remove("ecr-repository", repo.name)
    for role in state.find("iam-role"):  # last: nothing that uses the role is left
        if iam.delete_role_if_ours(aws, role.name, state.name):
            log(f"deleted IAM role {role.name}")
        state.remove("iam-role", role.name)


def delete_all(aws: Aws, state: DeploymentState, wait_timeout: float = 1800, poll: float = 10.0) -> None:
    """Delete everything the state lists: scaling, endpoint, configs, models, S3 objects, images, role."""
    if not state.resources:
        log(f"nothing recorded for deployment {state.name} in {state.path}")
        return
    _delete_autoscaling(aws, state)
    for kind in ("endpoint", "endpoint-config", "model"):
        _delete_sagemaker(aws, state, kind, wait_timeout, poll)
    _delete_storage(aws, state)
    state.forget_file()
