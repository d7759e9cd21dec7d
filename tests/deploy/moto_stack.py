"""moto in server mode on loopback, taught what moto 5.2 lacks and the deploy code relies on.

Everything the deploy code does goes over real HTTP to this server (boto3's AWS_ENDPOINT_URL), so
the request serialisation, the error shapes and the response parsing are botocore's own. What moto
is taught lives beside this file: SageMaker's UpdateEndpoint (with blue/green deployment configs
and alarm rollbacks), EnableNetworkIsolation and empty-field omission (moto_sagemaker.py), S3's
ExpectedBucketOwner (moto_s3.py), IAM's SimulatePrincipalPolicy (moto_iam.py).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator

import requests
from moto.server import ThreadedMotoServer

from tests.deploy import moto_iam, moto_s3, moto_sagemaker

ACCOUNT_ID = "123456789012"  # moto's default account


def install_fixes() -> None:
    """Patch moto's SageMaker, S3 and IAM as described above (idempotent)."""
    moto_sagemaker.install()
    moto_s3.install()
    moto_iam.install()


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
