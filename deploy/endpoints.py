"""The endpoint lifecycle with boto3: model -> endpoint config -> endpoint, update in place, wait, smoke test.

Models and endpoint configs are immutable in SageMaker, so every deploy makes a new pair with a
timestamp suffix; an existing endpoint is switched to the new config with UpdateEndpoint (no
downtime: SageMaker brings the new fleet up before draining the old), and the superseded pair is
deleted once the endpoint is InService again.
"""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

import botocore.exceptions as bce

from deploy import autoscaling
from deploy.errors import DeployError
from deploy.governance import DataCapture, Network
from deploy.model_artifacts import ModelData
from deploy.progress import Progress, log
from deploy.rollout import Rollout, check_not_rolled_back, deployment_config
from deploy.session import Aws, step
from deploy.state import DeploymentState, tags_for

DEFAULT_INSTANCE_TYPE = "ml.g5.xlarge"
TERMINAL_FAILURES = {"Failed", "OutOfService", "UpdateRollbackFailed"}
IN_FLIGHT = {"Creating", "Updating", "SystemUpdating", "RollingBack", "Deleting"}


@dataclass
class EndpointSpec:
    """Everything one deployment of the container needs."""

    name: str
    image_uri: str
    role_arn: str
    instance_type: str = DEFAULT_INSTANCE_TYPE
    instance_count: int = 1
    variant: str = "AllTraffic"
    model_data: ModelData | None = None
    environment: dict[str, str] = field(default_factory=dict)
    # An LLM takes minutes to download and load; SageMaker's defaults assume small models.
    startup_timeout: int = 600
    download_timeout: int = 1200
    network: Network = field(default_factory=Network)
    kms_key_arn: str | None = None  # the instances' storage volume and the captured data
    data_capture: DataCapture | None = None
    tags: dict[str, str] = field(default_factory=dict)  # the user's, beside ours
    rollout: Rollout | None = None  # None: the in-place update
    rollback_alarms: tuple[str, ...] = ()

    def config_fields(self) -> dict[str, Any]:
        """The CreateEndpointConfig fields besides the variants: KmsKeyId, DataCaptureConfig."""
        fields: dict[str, Any] = {}
        if self.kms_key_arn:
            fields["KmsKeyId"] = self.kms_key_arn
        if self.data_capture is not None:
            fields["DataCaptureConfig"] = self.data_capture.config(self.kms_key_arn)
        return fields


def build_environment(oai_enabled: str | None = None, hf_model_id: str | None = None,
                      num_gpus: int | None = None, limits: dict[str, int | None] | None = None,
                      extra: list[str] | None = None) -> dict[str, str]:
    """The container environment: the named settings, then KEY=VALUE pairs (which win)."""
    env: dict[str, str] = {}
    if oai_enabled is not None:
        env["OAI_ENABLED"] = oai_enabled
    if hf_model_id:
        env["HF_MODEL_ID"] = hf_model_id
    if num_gpus is not None:
        env["SM_NUM_GPUS"] = str(num_gpus)
    env.update({key: str(value) for key, value in (limits or {}).items() if value is not None})
    for pair in extra or []:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise DeployError(f"--env expects KEY=VALUE, got {pair!r}")
        env[key] = value
    return env


def container_definition(spec: EndpointSpec) -> dict[str, Any]:
    """The PrimaryContainer of the SageMaker model."""
    container: dict[str, Any] = {"Image": spec.image_uri, "Environment": dict(spec.environment)}
    if spec.model_data is not None:
        container.update(spec.model_data.container_fields())
    return container


def production_variant(spec: EndpointSpec, model_name: str) -> dict[str, Any]:
    """The one production variant of the endpoint config."""
    return {
        "VariantName": spec.variant, "ModelName": model_name, "InitialInstanceCount": spec.instance_count,
        "InstanceType": spec.instance_type, "InitialVariantWeight": 1.0,
        "ContainerStartupHealthCheckTimeoutInSeconds": spec.startup_timeout,
        "ModelDataDownloadTimeoutInSeconds": spec.download_timeout,
    }


def versioned_name(base: str) -> str:
    """base-YYYYmmdd-HHMMSS-mmm, within SageMaker's 63 characters."""
    now = datetime.now(timezone.utc)
    return f"{base[:40]}-{now:%Y%m%d-%H%M%S}-{now.microsecond // 1000:03d}"


def describe_endpoint(aws: Aws, name: str) -> dict[str, Any] | None:
    """The endpoint's description, or None when it does not exist."""
    try:
        return aws.client("sagemaker").describe_endpoint(EndpointName=name)
    except bce.ClientError as exc:
        if "Could not find endpoint" in exc.response.get("Error", {}).get("Message", ""):
            return None
        raise


def _descriptions(aws: Aws, name: str, timeout: float, poll: float) -> Iterator[dict[str, Any] | None]:
    """The endpoint's description (None once it is gone), now and then at growing intervals, until
    `timeout`: quick first looks, then every `poll` seconds (a model load takes minutes)."""
    deadline = time.monotonic() + timeout
    delay = 1.0
    while True:
        with step(f"describe endpoint {name}"):
            desc = describe_endpoint(aws, name)
        yield desc
        if time.monotonic() > deadline:
            status = desc["EndpointStatus"] if desc else "gone"
            raise DeployError(f"endpoint {name} still {status} after {timeout:.0f} s")
        time.sleep(min(delay, poll))
        delay *= 2


def wait_for_endpoint(aws: Aws, name: str, timeout: float = 3600, poll: float = 15.0) -> dict[str, Any]:
    """Poll until the endpoint is InService, showing a progress line; DeployError if it fails."""
    progress = Progress(f"endpoint {name}")
    descriptions = _descriptions(aws, name, timeout, poll)
    while True:
        desc = next(descriptions)
        if desc is None:
            raise DeployError(f"endpoint {name} disappeared while waiting for it")
        status = desc["EndpointStatus"]
        if status == "InService":
            progress.done("InService")
            return desc
        if status in TERMINAL_FAILURES:
            progress.done(status)
            raise DeployError(f"endpoint {name} is {status}: {desc.get('FailureReason', 'no reason given')} "
                              f"(CloudWatch log group /aws/sagemaker/Endpoints/{name} has the container's log)")
        progress.update(status)


def wait_deleted(aws: Aws, name: str, timeout: float, poll: float) -> None:
    """Wait until the endpoint is gone (its config cannot be deleted before)."""
    progress = Progress(f"endpoint {name}")
    for desc in _descriptions(aws, name, timeout, poll):
        if desc is None:
            progress.done("deleted")
            return
        progress.update(desc["EndpointStatus"])


def create_model_and_config(aws: Aws, spec: EndpointSpec, state: DeploymentState) -> tuple[str, str]:
    """Create a new model and endpoint config for `spec`, both tagged and recorded."""
    sm = aws.client("sagemaker")
    model_name, config_name = versioned_name(spec.name), versioned_name(spec.name)
    tags = tags_for(state.name, spec.tags)
    with step(f"create model {model_name}"):
        sm.create_model(ModelName=model_name, ExecutionRoleArn=spec.role_arn, Tags=tags,
                        PrimaryContainer=container_definition(spec), **spec.network.model_fields())
    state.add("model", model_name)
    with step(f"create endpoint config {config_name}"):
        sm.create_endpoint_config(EndpointConfigName=config_name, Tags=tags,
                                  ProductionVariants=[production_variant(spec, model_name)], **spec.config_fields())
    state.add("endpoint-config", config_name, model=model_name)
    log(f"created model {model_name} and endpoint config {config_name}")
    return model_name, config_name


def _update(aws: Aws, spec: EndpointSpec, existing: dict[str, Any], config_name: str,
            wait_timeout: float, poll: float) -> dict[str, Any]:
    old_config = aws.client("sagemaker").describe_endpoint_config(EndpointConfigName=existing["EndpointConfigName"])
    old_types = {v["VariantName"]: v.get("InstanceType") for v in old_config["ProductionVariants"]}
    # Application Auto Scaling refuses an update that changes a scaled variant's instance type.
    must_suspend = old_types.get(spec.variant) not in (None, spec.instance_type)
    blue_green = deployment_config(spec.rollout, spec.rollback_alarms)
    with autoscaling.suspended(aws, spec.name, spec.variant, active=must_suspend):
        with step(f"update endpoint {spec.name}"):
            aws.client("sagemaker").update_endpoint(EndpointName=spec.name, EndpointConfigName=config_name,
                                                    **({"DeploymentConfig": blue_green} if blue_green else {}))
        how = f"blue/green, {spec.rollout.kind.lower().replace('_', ' ')}" if spec.rollout else "in place"
        log(f"updating endpoint {spec.name} to {config_name} ({how})")
        return wait_for_endpoint(aws, spec.name, wait_timeout, poll)


def settled_endpoint(aws: Aws, name: str, state: DeploymentState, wait_timeout: float,
                     poll: float) -> dict[str, Any] | None:
    """The endpoint this deployment may update, once no change is in flight; None to create it anew.

    SageMaker refuses to update an endpoint that is still changing or has failed, so a rerun after
    an interrupted deploy waits for the change to finish, and one after a failed deploy deletes the
    failed endpoint (ours) and creates it again.
    """
    with step(f"describe endpoint {name}"):
        existing = describe_endpoint(aws, name)
    if existing is None:
        return None
    if not state.find("endpoint", name):
        raise DeployError(f"endpoint {name} exists but was not created by this deployment "
                          f"(no record in {state.path}); pick another --name")
    if existing["EndpointStatus"] in IN_FLIGHT:
        log(f"endpoint {name} is {existing['EndpointStatus']}; waiting for that change to finish first")
        with contextlib.suppress(DeployError):  # a change that ends in failure is handled below
            wait_for_endpoint(aws, name, wait_timeout, poll)
        existing = describe_endpoint(aws, name)
        if existing is None:  # it was being deleted
            return None
    if existing["EndpointStatus"] in TERMINAL_FAILURES:
        log(f"endpoint {name} is {existing['EndpointStatus']} ({existing.get('FailureReason', '')}); "
            "deleting it to create it anew")
        with step(f"delete failed endpoint {name}"):
            aws.client("sagemaker").delete_endpoint(EndpointName=name)
            wait_deleted(aws, name, wait_timeout, poll)
        return None
    return existing


def deploy(aws: Aws, spec: EndpointSpec, state: DeploymentState, wait_timeout: float = 3600,
           poll: float = 15.0) -> dict[str, Any]:
    """Create the endpoint, or update it in place when this deployment already made it."""
    existing = settled_endpoint(aws, spec.name, state, wait_timeout, poll)
    _, config_name = create_model_and_config(aws, spec, state)
    if existing is None:
        with step(f"create endpoint {spec.name}"):
            aws.client("sagemaker").create_endpoint(EndpointName=spec.name, EndpointConfigName=config_name,
                                                    Tags=tags_for(state.name, spec.tags))
        state.add("endpoint", spec.name)
        log(f"creating endpoint {spec.name}" + (" (a first deploy has no old fleet to shift traffic from)"
                                                if spec.rollout else ""))
        desc = wait_for_endpoint(aws, spec.name, wait_timeout, poll)
    else:
        desc = _update(aws, spec, existing, config_name, wait_timeout, poll)
    retire_superseded(aws, state, keep_config=desc["EndpointConfigName"])
    check_not_rolled_back(desc, config_name)  # an alarm fired: SageMaker shifted the traffic back
    return desc


def retire_superseded(aws: Aws, state: DeploymentState, keep_config: str) -> None:
    """Delete the endpoint configs and models of this deployment that the endpoint no longer uses."""
    sm = aws.client("sagemaker")
    keep_model = next((r.details.get("model") for r in state.find("endpoint-config", keep_config)), None)
    for config in state.find("endpoint-config"):
        if config.name != keep_config:
            with step(f"delete endpoint config {config.name}"):
                sm.delete_endpoint_config(EndpointConfigName=config.name)
            state.remove("endpoint-config", config.name)
    for model in state.find("model"):
        if model.name != keep_model:
            with step(f"delete model {model.name}"):
                sm.delete_model(ModelName=model.name)
            state.remove("model", model.name)


def smoke_payload(oai_enabled: bool) -> dict[str, Any]:
    """One small request in the protocol the endpoint speaks."""
    if oai_enabled:
        return {"messages": [{"role": "user", "content": "Say hello in five words."}], "max_tokens": 16}
    return {"inputs": "Say hello in five words.", "parameters": {"max_new_tokens": 16}}


def generated_text(answer: Any) -> str:
    """The text of a TGI generate answer or an OpenAI chat/completions answer."""
    if isinstance(answer, list) and answer and "generated_text" in answer[0]:
        return answer[0]["generated_text"]
    if isinstance(answer, dict) and answer.get("choices"):
        choice = answer["choices"][0]
        return choice.get("message", {}).get("content") or choice.get("text", "")
    raise DeployError(f"unexpected answer shape: {json.dumps(answer)[:300]}")


def smoke_test(aws: Aws, name: str, payload: dict[str, Any]) -> str:
    """Invoke the endpoint once and return the generated text."""
    runtime = aws.client("sagemaker-runtime")
    try:
        response = runtime.invoke_endpoint(EndpointName=name, ContentType="application/json",
                                           Accept="application/json", Body=json.dumps(payload).encode())
    except bce.ClientError as exc:
        err = exc.response.get("Error", {})
        detail = exc.response.get("OriginalMessage") or err.get("Message", "")
        raise DeployError(f"smoke test of {name} failed ({err.get('Code')}): {detail}") from exc
    body = response["Body"].read().decode("utf-8", errors="replace")
    try:
        return generated_text(json.loads(body))
    except json.JSONDecodeError as exc:
        raise DeployError(f"smoke test of {name}: the answer is not JSON: {body[:300]!r}") from exc
