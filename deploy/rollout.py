"""How an update reaches the traffic: in place (SageMaker's default) or blue/green with traffic shifting.

    --rollout canary:10%:5m    10% of the capacity first, the rest after 5 minutes without an alarm
    --rollout canary:1:5m      one instance first (INSTANCE_COUNT)
    --rollout linear:25%:2m    25% more every 2 minutes
    --rollout all-at-once:10m  everything at once, then 10 minutes of baking before the old fleet goes

`--rollback-alarms A,B` names CloudWatch alarms (up to 10, they must exist): if any goes into ALARM
during the rollout, SageMaker shifts the traffic back to the old fleet (AutoRollbackConfiguration).
Both are SageMaker's DeploymentConfig on UpdateEndpoint; a first deploy has nothing to shift from.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from deploy.errors import DeployError
from deploy.session import Aws, step

_DURATION = re.compile(r"^(\d+)([smh]?)$")
_STEP = re.compile(r"^(\d+)(%?)$")
_SECONDS = {"": 1, "s": 1, "m": 60, "h": 3600}
FORMS = "canary:SIZE:WAIT, linear:SIZE:WAIT or all-at-once:WAIT (SIZE like 10% or 1, WAIT like 5m)"


@dataclass(frozen=True)
class Rollout:
    """A blue/green traffic shift: its type, its step size and the wait between steps."""

    kind: str  # CANARY | LINEAR | ALL_AT_ONCE
    wait_seconds: int
    size: dict[str, Any] | None = None  # {"Type": "CAPACITY_PERCENT" | "INSTANCE_COUNT", "Value": n}

    def policy(self) -> dict[str, Any]:
        """SageMaker's BlueGreenUpdatePolicy."""
        routing: dict[str, Any] = {"Type": self.kind, "WaitIntervalInSeconds": self.wait_seconds}
        if self.kind == "CANARY":
            routing["CanarySize"] = self.size
        elif self.kind == "LINEAR":
            routing["LinearStepSize"] = self.size
        return {"TrafficRoutingConfiguration": routing}


def _seconds(text: str) -> int:
    match = _DURATION.match(text)
    if not match:
        raise DeployError(f"--rollout: {text!r} is not a wait like 30s, 5m or 1h")
    seconds = int(match.group(1)) * _SECONDS[match.group(2)]
    if seconds > 3600:
        raise DeployError(f"--rollout: SageMaker waits at most 3600 s between steps, not {seconds}")
    return seconds


def _size(text: str, kind: str) -> dict[str, Any]:
    match = _STEP.match(text)
    if not match or int(match.group(1)) < 1:
        raise DeployError(f"--rollout: {text!r} is not a step size like 10% or 1")
    value, percent = int(match.group(1)), bool(match.group(2))
    low = 10 if kind == "LINEAR" else 1
    if percent and not low <= value <= 50:
        raise DeployError(f"--rollout: a {kind.lower()} step must be {low}-50% of the fleet, not {value}%")
    return {"Type": "CAPACITY_PERCENT" if percent else "INSTANCE_COUNT", "Value": value}


def parse_rollout(text: str | None) -> Rollout | None:
    """The Rollout `--rollout` describes; None for the default in-place update."""
    if not text:
        return None
    parts = text.lower().split(":")
    if parts[0] in ("canary", "linear") and len(parts) == 3:
        kind = parts[0].upper()
        return Rollout(kind, _seconds(parts[2]), _size(parts[1], kind))
    if parts[0] == "all-at-once" and len(parts) in (1, 2):
        return Rollout("ALL_AT_ONCE", _seconds(parts[1]) if len(parts) == 2 else 0)
    raise DeployError(f"--rollout {text!r}: use {FORMS}")


def deployment_config(rollout: Rollout | None, alarms: tuple[str, ...]) -> dict[str, Any] | None:
    """UpdateEndpoint's DeploymentConfig, or None for the in-place update."""
    if rollout is None:
        if alarms:
            raise DeployError("--rollback-alarms needs --rollout: SageMaker rolls back blue/green updates")
        return None
    config: dict[str, Any] = {"BlueGreenUpdatePolicy": rollout.policy()}
    if alarms:
        config["AutoRollbackConfiguration"] = {"Alarms": [{"AlarmName": name} for name in alarms]}
    return config


def check_alarms(aws: Aws, alarms: tuple[str, ...]) -> None:
    """DeployError unless every alarm exists (SageMaker would fail the update later, less clearly)."""
    if not alarms:
        return
    if len(alarms) > 10:
        raise DeployError(f"--rollback-alarms: SageMaker watches at most 10 alarms, not {len(alarms)}")
    with step("describe CloudWatch alarms"):
        found = {a["AlarmName"] for a in aws.client("cloudwatch").describe_alarms(
            AlarmNames=list(alarms))["MetricAlarms"]}
    missing = [name for name in alarms if name not in found]
    if missing:
        raise DeployError(f"--rollback-alarms: no CloudWatch alarm named {', '.join(missing)} in {aws.region}")


def check_not_rolled_back(desc: dict[str, Any], config_name: str) -> None:
    """DeployError when the endpoint settled on another config than the one just deployed (an alarm fired)."""
    if desc["EndpointConfigName"] != config_name:
        raise DeployError(f"endpoint {desc['EndpointName']} rolled back to {desc['EndpointConfigName']}: "
                          f"{desc.get('FailureReason') or 'a rollback alarm went into ALARM'}; the new model "
                          "and config were deleted")
