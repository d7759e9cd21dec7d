"""moto in server mode on loopback, with two fidelity fixes to moto 5.2's SageMaker.

Everything the deploy code does goes over real HTTP to this server (boto3's AWS_ENDPOINT_URL), so
the request serialisation, the error shapes and the response parsing are botocore's own. Fixes:
- moto 5.2 answers UpdateEndpoint with "not implemented"; `install_update_endpoint` adds it with
  SageMaker's observable behaviour: Updating, then InService on the new config a moment later;
- moto describes absent optional structures as `{}` / `[]` (e.g. "VpcConfig": {}), where SageMaker
  omits them; the SDK's strict pydantic shapes reject `VpcConfig: {}` (it requires Subnets), so
  empty ones are dropped from the describe answers, as SageMaker does.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Iterator

import requests
from moto.core.responses import ActionResult
from moto.core.utils import utcnow
from moto.sagemaker.exceptions import ValidationError
from moto.sagemaker.models import FakeEndpoint, SageMakerModelBackend
from moto.sagemaker.responses import SageMakerResponse
from moto.server import ThreadedMotoServer

UPDATE_SECONDS = 0.8  # how long a fake update stays "Updating" (long enough for two status polls)
ACCOUNT_ID = "123456789012"  # moto's default account


def _backend_update_endpoint(self: SageMakerModelBackend, endpoint_name: str, endpoint_config_name: str) -> str:
    endpoint = self.endpoints.get(endpoint_name)
    if endpoint is None:
        arn = FakeEndpoint.arn_formatter(endpoint_name, self.account_id, self.region_name)
        raise ValidationError(message=f"Could not find endpoint '{arn}'.")
    if endpoint.endpoint_status != "InService":
        raise ValidationError(message=f"Cannot update in-progress endpoint '{endpoint.arn}'.")
    config = self.describe_endpoint_config(endpoint_config_name)  # raises for an unknown config
    endpoint.endpoint_status = "Updating"

    def finish() -> None:
        endpoint.endpoint_config_name = endpoint_config_name
        endpoint.production_variants = endpoint._process_production_variants(config["ProductionVariants"])
        endpoint.last_modified_time = utcnow()
        endpoint.endpoint_status = "InService"

    timer = threading.Timer(UPDATE_SECONDS, finish)
    timer.daemon = True
    timer.start()
    return endpoint.arn


def _response_update_endpoint(self: SageMakerResponse) -> ActionResult:
    arn = self.sagemaker_backend.update_endpoint(
        endpoint_name=self._get_param("EndpointName"), endpoint_config_name=self._get_param("EndpointConfigName"))
    return ActionResult({"EndpointArn": arn})


def _omit_empty(answer: dict) -> dict:
    return {key: value for key, value in answer.items() if value not in ({}, [])}


def _describe_model(self: SageMakerResponse) -> ActionResult:
    model = self.sagemaker_backend.describe_model(self._get_param("ModelName"))
    return ActionResult(_omit_empty(model.response_object))


def _describe_endpoint_config(self: SageMakerResponse) -> ActionResult:
    return ActionResult(_omit_empty(self.sagemaker_backend.describe_endpoint_config(
        self._get_param("EndpointConfigName"))))


def _describe_endpoint(self: SageMakerResponse) -> ActionResult:
    return ActionResult(_omit_empty(self.sagemaker_backend.describe_endpoint(self._get_param("EndpointName"))))


def install_fixes() -> None:
    """Teach moto's SageMaker UpdateEndpoint and SageMaker's omission of empty fields (idempotent)."""
    if not hasattr(SageMakerResponse, "update_endpoint"):
        SageMakerModelBackend.update_endpoint = _backend_update_endpoint
        SageMakerResponse.update_endpoint = _response_update_endpoint
    # Only the HTTP answers change: moto's own code reads the empty fields of its objects.
    SageMakerResponse.describe_model = _describe_model
    SageMakerResponse.describe_endpoint_config = _describe_endpoint_config
    SageMakerResponse.describe_endpoint = _describe_endpoint


@contextlib.contextmanager
def moto_server() -> Iterator[str]:
    """A moto server on a free loopback port; yields its URL."""
    install_fixes()
    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one line per request otherwise
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    try:
        yield f"http://{host}:{port}"
    finally:
        server.stop()


def reset(url: str) -> None:
    """Forget every resource (between tests)."""
    requests.post(f"{url}/moto-api/reset", timeout=10).raise_for_status()


def queue_invocation_result(url: str, body: str, content_type: str = "application/json") -> None:
    """The answer moto's InvokeEndpoint gives to the next new request body."""
    payload = {"results": [{"Body": body, "ContentType": content_type, "InvokedProductionVariant": "AllTraffic"}]}
    requests.post(f"{url}/moto-api/static/sagemaker/endpoint-results", json=payload, timeout=10).raise_for_status()
