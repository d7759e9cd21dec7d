"""Shared fixtures of the client suites: the local SageMaker runtime in front of the real servers.

The servers are the session-scoped ones of tests/conftest.py (`openai_server`: OAI_ENABLED=true,
`generate_server`: OAI_ENABLED=false); each gets one LocalRuntime (a thread, no model load) whose
endpoint names choose how the stream is cut:

    NAME            parts of the event stream
    NAME            one PayloadPart per container write (what SageMaker usually does)
    NAME-7          every write cut into parts of at most 7 bytes
    NAME-regroup    re-cut into 61-byte parts across event boundaries
    NAME-slow       a 2 s limit for a whole stream (ModelInvocationTimeExceeded)
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import boto3
import pytest
from botocore.config import Config

from deploy.local_endpoint import EndpointConfig, LocalRuntime, RuntimeConfig
from tests.server import NO_EOS, Server

REGION = "us-east-1"
PART_MODES = ("", "-7", "-regroup")
# A chat that always runs to max_tokens=400 (EOS banned): 4 s or more on any CPU, so the NAME-slow
# endpoints' 2 s limit always cuts it. A counting prompt stopped on EOS after 122 tokens, within 2 s on a
# fast CI machine, and its stream completed before the limit.
OVERLONG = {"messages": [{"role": "user", "content": "Write a long essay about the history of the ocean."}],
            "max_tokens": 400, "temperature": 0, "logit_bias": NO_EOS}
# Fake credentials: the local runtime does not check signatures, but every client signs with SigV4.
CREDENTIALS = {"aws_access_key_id": "AKIDLOCALRUNTIME", "aws_secret_access_key": "local-runtime-secret"}


def runtime_config(name: str, server: Server) -> RuntimeConfig:
    """Endpoints NAME, NAME-7, NAME-regroup and NAME-slow, all forwarding to `server`."""
    base = EndpointConfig(target=server.url)
    return RuntimeConfig(region=REGION, endpoints={
        name: base,
        f"{name}-7": EndpointConfig(target=server.url, part_size=7),
        f"{name}-regroup": EndpointConfig(target=server.url, regroup=61),
        f"{name}-slow": EndpointConfig(target=server.url, stream_timeout=2.0),
    })


@pytest.fixture(scope="session")
def oai_runtime(openai_server: Server) -> Iterator[LocalRuntime]:
    """Runtime with endpoints `oai*` in front of the OAI_ENABLED=true server."""
    with LocalRuntime(runtime_config("oai", openai_server)) as rt:
        yield rt


@pytest.fixture(scope="session")
def gen_runtime(generate_server: Server) -> Iterator[LocalRuntime]:
    """Runtime with endpoints `gen*` in front of the OAI_ENABLED=false server."""
    with LocalRuntime(runtime_config("gen", generate_server)) as rt:
        yield rt


def runtime_client(url: str):
    """A boto3 sagemaker-runtime client aimed at a local runtime, with bounded waits and no retries."""
    return boto3.client("sagemaker-runtime", endpoint_url=url, region_name=REGION,
                        config=Config(connect_timeout=5, read_timeout=70, retries={"max_attempts": 1}),
                        **CREDENTIALS)


@pytest.fixture
def aws_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """Fake credentials and region in the environment, for clients that build their own boto3 session."""
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", CREDENTIALS["aws_access_key_id"])
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", CREDENTIALS["aws_secret_access_key"])
    monkeypatch.setenv("AWS_DEFAULT_REGION", REGION)
    for var in ("AWS_PROFILE", "AWS_SESSION_TOKEN"):
        monkeypatch.delenv(var, raising=False)
    os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")  # never fetch the price list
