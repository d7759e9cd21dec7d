"""moto 5.2's SageMaker taught what the deploy code relies on and moto leaves out.

- UpdateEndpoint (moto answers "not implemented") with SageMaker's observable behaviour: Updating,
  then InService on the new config a moment later. With a DeploymentConfig it is kept and shown as
  DescribeEndpoint's LastDeploymentConfig, and when an alarm of its AutoRollbackConfiguration is in
  ALARM by the time the new fleet would take the traffic, the update rolls back: RollingBack, then
  InService on the old config.
- CreateModel keeps EnableNetworkIsolation (moto always answers false); DescribeEndpoint answers
  a DataCaptureConfigSummary (moto echoes the config's input shape, which the SDK's shapes reject).
- Absent optional structures are omitted from the describe answers, as SageMaker does (moto says
  `"VpcConfig": {}`, which the SDK's strict shapes reject).
"""

from __future__ import annotations

import threading
from typing import Any

from moto.cloudwatch.models import cloudwatch_backends
from moto.core.responses import ActionResult
from moto.core.utils import utcnow
from moto.sagemaker.exceptions import ValidationError
from moto.sagemaker.models import FakeEndpoint, SageMakerModelBackend
from moto.sagemaker.responses import SageMakerResponse

UPDATE_SECONDS = 0.8  # how long a fake update stays "Updating" (long enough for two status polls)


def _alarms_firing(backend: SageMakerModelBackend, deployment_config: dict[str, Any] | None) -> list[str]:
    names = [a["AlarmName"] for a in (deployment_config or {}).get("AutoRollbackConfiguration", {}).get("Alarms", [])]
    alarms = cloudwatch_backends[backend.account_id][backend.region_name].alarms
    return [name for name in names if name in alarms and alarms[name].state_value == "ALARM"]


def _later(seconds: float, action) -> None:
    timer = threading.Timer(seconds, action)
    timer.daemon = True
    timer.start()


def _backend_update_endpoint(self: SageMakerModelBackend, endpoint_name: str, endpoint_config_name: str,
                             deployment_config: dict[str, Any] | None = None) -> str:
    endpoint = self.endpoints.get(endpoint_name)
    if endpoint is None:
        arn = FakeEndpoint.arn_formatter(endpoint_name, self.account_id, self.region_name)
        raise ValidationError(message=f"Could not find endpoint '{arn}'.")
    if endpoint.endpoint_status != "InService":
        raise ValidationError(message=f"Cannot update in-progress endpoint '{endpoint.arn}'.")
    config = self.describe_endpoint_config(endpoint_config_name)  # raises for an unknown config
    endpoint.endpoint_status = "Updating"
    endpoint.last_deployment_config = deployment_config

    def settle() -> None:
        endpoint.last_modified_time = utcnow()
        endpoint.endpoint_status = "InService"

    def finish() -> None:
        firing = _alarms_firing(self, deployment_config)
        if firing:  # the old fleet keeps the traffic; the new one is torn down
            endpoint.endpoint_status = "RollingBack"
            endpoint.failure_reason = f"Rolled back: alarm {', '.join(firing)} went into ALARM during the update"
            _later(UPDATE_SECONDS / 2, settle)
            return
        endpoint.endpoint_config_name = endpoint_config_name
        endpoint.production_variants = endpoint._process_production_variants(config["ProductionVariants"])
        endpoint.failure_reason = None
        settle()

    _later(UPDATE_SECONDS, finish)
    return endpoint.arn


def _response_update_endpoint(self: SageMakerResponse) -> ActionResult:
    arn = self.sagemaker_backend.update_endpoint(
        endpoint_name=self._get_param("EndpointName"), endpoint_config_name=self._get_param("EndpointConfigName"),
        deployment_config=self._get_param("DeploymentConfig"))
    return ActionResult({"EndpointArn": arn})


def _create_model(self: SageMakerResponse) -> ActionResult:
    model = self.sagemaker_backend.create_model(
        model_name=self._get_param("ModelName"), execution_role_arn=self._get_param("ExecutionRoleArn"),
        primary_container=self._get_param("PrimaryContainer"), vpc_config=self._get_param("VpcConfig"),
        containers=self._get_param("Containers"), tags=self._get_param("Tags"))
    model.enable_network_isolation = bool(self._get_param("EnableNetworkIsolation", False))
    return ActionResult(model.response_create)


def _omit_empty(answer: dict) -> dict:
    return {key: value for key, value in answer.items() if value not in ({}, [])}


def _describe_model(self: SageMakerResponse) -> ActionResult:
    model = self.sagemaker_backend.describe_model(self._get_param("ModelName"))
    return ActionResult(_omit_empty(model.response_object))


def _describe_endpoint_config(self: SageMakerResponse) -> ActionResult:
    return ActionResult(_omit_empty(self.sagemaker_backend.describe_endpoint_config(
        self._get_param("EndpointConfigName"))))


def _capture_summary(config: dict[str, Any]) -> dict[str, Any]:
    """DescribeEndpoint's DataCaptureConfigSummary (moto echoes the endpoint config's input shape)."""
    summary = {"EnableCapture": config.get("EnableCapture", True),
               "CaptureStatus": "Started" if config.get("EnableCapture", True) else "Stopped",
               "CurrentSamplingPercentage": config["InitialSamplingPercentage"],
               "DestinationS3Uri": config["DestinationS3Uri"]}
    return {**summary, **({"KmsKeyId": config["KmsKeyId"]} if config.get("KmsKeyId") else {})}


def _describe_endpoint(self: SageMakerResponse) -> ActionResult:
    name = self._get_param("EndpointName")
    answer = _omit_empty(self.sagemaker_backend.describe_endpoint(name))
    if answer.get("DataCaptureConfig"):
        answer["DataCaptureConfig"] = _capture_summary(answer["DataCaptureConfig"])
    last = getattr(self.sagemaker_backend.endpoints[name], "last_deployment_config", None)
    answer.pop("LastDeploymentConfig", None)
    if last:
        answer["LastDeploymentConfig"] = last
    return ActionResult(answer)


def install() -> None:
    """Patch moto's SageMaker backend and responses (idempotent: plain attribute assignments)."""
    SageMakerModelBackend.update_endpoint = _backend_update_endpoint
    SageMakerResponse.update_endpoint = _response_update_endpoint
    SageMakerResponse.create_model = _create_model
    # Only the HTTP answers change: moto's own code reads the empty fields of its objects.
    SageMakerResponse.describe_model = _describe_model
    SageMakerResponse.describe_endpoint_config = _describe_endpoint_config
    SageMakerResponse.describe_endpoint = _describe_endpoint
