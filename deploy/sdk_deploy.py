"""The same deployment through the SageMaker Python SDK v3's resource layer, for users who prefer it.

SDK v3 splits into packages; its resource layer, `sagemaker-core` (imported as
`sagemaker.core.resources`: Model.create, EndpointConfig.create, Endpoint.create / update /
wait_for_status / invoke), does exactly what deploy/endpoints.py does with boto3, production options
included (the boto3-shaped fields are turned into the SDK's shapes by its own `transform`). It is
part of requirements-deploy.txt; the `sagemaker` meta-package (ModelBuilder) has its own environment,
see requirements-sdk3.txt. Resources are tagged and recorded like the boto3 path, so `python -m
deploy delete` removes them too.
"""

from __future__ import annotations

from typing import Any

from deploy.endpoints import (
    EndpointSpec,
    describe_endpoint,
    retire_superseded,
    settled_endpoint,
    versioned_name,
)
from deploy.errors import DeployError
from deploy.progress import log
from deploy.rollout import check_not_rolled_back, deployment_config
from deploy.session import Aws, step
from deploy.state import DeploymentState, tags_for


def _shape(name: str, fields: dict[str, Any]) -> Any:
    """The SDK shape `name` built from a boto3-shaped (PascalCase) dict, by the SDK's own converter."""
    from sagemaker.core import shapes
    from sagemaker.core.utils.code_injection.codec import transform

    return getattr(shapes, name)(**transform(fields, name))


def _tags(spec: EndpointSpec, state: DeploymentState) -> list[Any]:
    return [_shape("Tag", tag) for tag in tags_for(state.name, spec.tags)]


def _container(spec: EndpointSpec) -> Any:
    from sagemaker.core.shapes import ContainerDefinition, ModelDataSource, S3ModelDataSource

    fields: dict[str, Any] = {"image": spec.image_uri, "environment": dict(spec.environment)}
    if spec.model_data is not None and spec.model_data.compressed:
        fields["model_data_url"] = spec.model_data.s3_uri
    elif spec.model_data is not None:
        fields["model_data_source"] = ModelDataSource(s3_data_source=S3ModelDataSource(
            s3_uri=spec.model_data.s3_uri, s3_data_type="S3Prefix", compression_type="None"))
    return ContainerDefinition(**fields)


def _variant(spec: EndpointSpec, model_name: str) -> Any:
    from sagemaker.core.shapes import ProductionVariant

    return ProductionVariant(
        variant_name=spec.variant, model_name=model_name, initial_instance_count=spec.instance_count,
        instance_type=spec.instance_type, initial_variant_weight=1.0,
        container_startup_health_check_timeout_in_seconds=spec.startup_timeout,
        model_data_download_timeout_in_seconds=spec.download_timeout,
    )


def _create_model_and_config(aws: Aws, spec: EndpointSpec, state: DeploymentState) -> str:
    from sagemaker.core.resources import EndpointConfig, Model

    network = spec.network.model_fields()
    model_extra = {"vpc_config": _shape("VpcConfig", network["VpcConfig"])} if "VpcConfig" in network else {}
    if network.get("EnableNetworkIsolation"):
        model_extra["enable_network_isolation"] = True
    fields = spec.config_fields()
    config_extra: dict[str, Any] = {"kms_key_id": fields["KmsKeyId"]} if "KmsKeyId" in fields else {}
    if "DataCaptureConfig" in fields:
        config_extra["data_capture_config"] = _shape("DataCaptureConfig", fields["DataCaptureConfig"])
    model_name, config_name = versioned_name(spec.name), versioned_name(spec.name)
    with step(f"create model {model_name} (SDK)"):
        Model.create(model_name=model_name, primary_container=_container(spec), execution_role_arn=spec.role_arn,
                     tags=_tags(spec, state), session=aws.session, region=aws.region, **model_extra)
    state.add("model", model_name)
    with step(f"create endpoint config {config_name} (SDK)"):
        EndpointConfig.create(endpoint_config_name=config_name, production_variants=[_variant(spec, model_name)],
                              tags=_tags(spec, state), session=aws.session, region=aws.region, **config_extra)
    state.add("endpoint-config", config_name, model=model_name)
    log(f"created model {model_name} and endpoint config {config_name} with the SageMaker SDK")
    return config_name


def deploy_with_sdk(aws: Aws, spec: EndpointSpec, state: DeploymentState, wait_timeout: float = 3600,
                    poll: float = 15.0) -> dict[str, Any]:
    """Create or update the endpoint with sagemaker-core resources; returns DescribeEndpoint's answer."""
    from sagemaker.core.resources import Endpoint
    from sagemaker.core.utils.exceptions import FailedStatusError, TimeoutExceededError

    existing = settled_endpoint(aws, spec.name, state, wait_timeout, poll)
    blue_green = deployment_config(spec.rollout, spec.rollback_alarms)
    config_name = _create_model_and_config(aws, spec, state)
    with step(f"{'update' if existing else 'create'} endpoint {spec.name} (SDK)"):
        if existing is None:
            endpoint = Endpoint.create(endpoint_name=spec.name, endpoint_config_name=config_name,
                                       tags=_tags(spec, state), session=aws.session, region=aws.region)
            state.add("endpoint", spec.name)
        else:
            endpoint = Endpoint.get(endpoint_name=spec.name, session=aws.session, region=aws.region)
            endpoint.endpoint_config_name = config_name
            if blue_green:
                endpoint.update(deployment_config=_shape("DeploymentConfig", blue_green))
            else:
                endpoint.update()
        try:
            endpoint.wait_for_status("InService", poll=max(1, int(poll)), timeout=int(wait_timeout))
        except (FailedStatusError, TimeoutExceededError) as exc:
            raise DeployError(f"endpoint {spec.name} did not reach InService: {exc}") from exc
    desc = describe_endpoint(aws, spec.name)
    assert desc is not None  # it was InService a moment ago
    retire_superseded(aws, state, keep_config=desc["EndpointConfigName"])
    check_not_rolled_back(desc, config_name)  # an alarm fired: SageMaker shifted the traffic back
    return desc
