"""Autoscaling of an endpoint variant with Application Auto Scaling, target tracking on invocations.

SageMakerVariantInvocationsPerInstance counts requests per instance per minute; for an LLM whose
requests take seconds, a target in the tens (not SageMaker's example of 70+) keeps latency sane.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

from deploy.progress import log
from deploy.session import Aws, step
from deploy.state import DeploymentState

NAMESPACE = "sagemaker"
DIMENSION = "sagemaker:variant:DesiredInstanceCount"
METRIC = "SageMakerVariantInvocationsPerInstance"


def resource_id(endpoint: str, variant: str) -> str:
    """Application Auto Scaling's id for an endpoint variant."""
    return f"endpoint/{endpoint}/variant/{variant}"


def policy_name(endpoint: str, variant: str) -> str:
    """The name of the target-tracking policy this tool puts on a variant."""
    return f"{endpoint}-{variant}-invocations"


def enable(aws: Aws, state: DeploymentState, endpoint: str, variant: str, min_capacity: int, max_capacity: int,
           target_invocations: float, scale_in_cooldown: int = 300, scale_out_cooldown: int = 60) -> dict[str, Any]:
    """Register the variant as a scalable target and put a target-tracking policy on it."""
    aas = aws.client("application-autoscaling")
    rid = resource_id(endpoint, variant)
    with step(f"register scalable target {rid}"):
        aas.register_scalable_target(ServiceNamespace=NAMESPACE, ResourceId=rid, ScalableDimension=DIMENSION,
                                     MinCapacity=min_capacity, MaxCapacity=max_capacity)
    state.add("scalable-target", rid, min=min_capacity, max=max_capacity)
    config = {
        "TargetValue": float(target_invocations),
        "PredefinedMetricSpecification": {"PredefinedMetricType": METRIC},
        "ScaleInCooldown": scale_in_cooldown, "ScaleOutCooldown": scale_out_cooldown,
    }
    name = policy_name(endpoint, variant)
    with step(f"put scaling policy {name}"):
        response = aas.put_scaling_policy(PolicyName=name, ServiceNamespace=NAMESPACE, ResourceId=rid,
                                          ScalableDimension=DIMENSION, PolicyType="TargetTrackingScaling",
                                          TargetTrackingScalingPolicyConfiguration=config)
    state.add("scaling-policy", name, resource_id=rid, config=config)
    log(f"autoscaling {rid}: {min_capacity}..{max_capacity} instances, target {target_invocations} "
        "invocations per instance per minute")
    return response


def disable(aws: Aws, state: DeploymentState, endpoint: str, variant: str) -> None:
    """Delete this deployment's policy and deregister the variant (both only if recorded as ours)."""
    aas = aws.client("application-autoscaling")
    rid = resource_id(endpoint, variant)
    for policy in state.find("scaling-policy"):
        if policy.details.get("resource_id") == rid:
            with step(f"delete scaling policy {policy.name}"):
                _ignore_missing(lambda p=policy: aas.delete_scaling_policy(
                    PolicyName=p.name, ServiceNamespace=NAMESPACE, ResourceId=rid, ScalableDimension=DIMENSION))
            state.remove("scaling-policy", policy.name)
    if state.find("scalable-target", rid):
        with step(f"deregister scalable target {rid}"):
            _ignore_missing(lambda: aas.deregister_scalable_target(
                ServiceNamespace=NAMESPACE, ResourceId=rid, ScalableDimension=DIMENSION))
        state.remove("scalable-target", rid)


def _ignore_missing(call) -> None:
    try:
        call()
    except Exception as exc:  # botocore's ObjectNotFoundException is client-specific: match by code
        if getattr(exc, "response", {}).get("Error", {}).get("Code") != "ObjectNotFoundException":
            raise


@contextlib.contextmanager
def suspended(aws: Aws, endpoint: str, variant: str, active: bool = True) -> Iterator[None]:
    """Deregister the variant's scaling for the duration of the block, then put it back as it was."""
    if not active:
        yield
        return
    aas = aws.client("application-autoscaling")
    rid = resource_id(endpoint, variant)
    targets = aas.describe_scalable_targets(ServiceNamespace=NAMESPACE, ResourceIds=[rid])["ScalableTargets"]
    if not targets:
        yield
        return
    policies = aas.describe_scaling_policies(ServiceNamespace=NAMESPACE, ResourceId=rid)["ScalingPolicies"]
    aas.deregister_scalable_target(ServiceNamespace=NAMESPACE, ResourceId=rid, ScalableDimension=DIMENSION)
    log(f"autoscaling of {rid} suspended for the update")
    yield
    target = targets[0]
    aas.register_scalable_target(ServiceNamespace=NAMESPACE, ResourceId=rid, ScalableDimension=DIMENSION,
                                 MinCapacity=target["MinCapacity"], MaxCapacity=target["MaxCapacity"])
    for policy in policies:
        aas.put_scaling_policy(PolicyName=policy["PolicyName"], ServiceNamespace=NAMESPACE, ResourceId=rid,
                               ScalableDimension=DIMENSION, PolicyType=policy["PolicyType"],
                               TargetTrackingScalingPolicyConfiguration=policy[
                                   "TargetTrackingScalingPolicyConfiguration"])
    log(f"autoscaling of {rid} restored")
