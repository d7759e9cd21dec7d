"""What a production account asks of an endpoint: private networking, no egress, its own KMS key,
captured traffic, and its own tags on everything.

- VPC (`--subnets`, `--security-groups`): the model's VpcConfig; SageMaker puts the instances'
  network interfaces in those subnets, so model data and the image come through VPC endpoints.
- Network isolation (`--network-isolation`): EnableNetworkIsolation on the model; the container
  gets no network at all. It then serves its embedded model or the model data SageMaker copies
  from S3 before start, never a hub download: HF_HUB_OFFLINE=1 makes every Hugging Face library
  stay offline and the server refuse a hub id in HF_MODEL_ID at start-up.
- KMS (`--kms-key`): the endpoint config's KmsKeyId (the instances' ML storage volume; instance
  types with local NVMe storage encrypt that with a hardware key instead), the data capture's
  objects, and, on `upload-model`, the model data.
- Data capture (`--data-capture S3_URI`, `--data-capture-percent`): requests and answers sampled
  into S3, in a bucket of this account only.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import botocore.exceptions as bce

from deploy.errors import DeployError
from deploy.session import Aws, step
from deploy.state import TAG_KEY

HUB_OFFLINE = {"HF_HUB_OFFLINE": "1"}
# A tag as SageMaker, S3, ECR and IAM all accept it (the strictest of their rules).
_TAG_KEY = re.compile(r"^[\w.:/=+\-@ ]{1,128}$")
_TAG_VALUE = re.compile(r"^[\w.:/=+\-@ ]{0,256}$")


@dataclass(frozen=True)
class Network:
    """Where the endpoint's instances sit and whether the container may reach any network."""

    subnets: tuple[str, ...] = ()
    security_groups: tuple[str, ...] = ()
    isolated: bool = False

    def __post_init__(self) -> None:
        if bool(self.subnets) != bool(self.security_groups):
            raise DeployError("--subnets and --security-groups go together (SageMaker's VpcConfig needs both)")

    @property
    def in_vpc(self) -> bool:
        """True when the endpoint runs in the account's own VPC."""
        return bool(self.subnets)

    def model_fields(self) -> dict[str, Any]:
        """The CreateModel fields: VpcConfig and EnableNetworkIsolation, when asked for."""
        fields: dict[str, Any] = {}
        if self.in_vpc:
            fields["VpcConfig"] = {"Subnets": list(self.subnets), "SecurityGroupIds": list(self.security_groups)}
        if self.isolated:
            fields["EnableNetworkIsolation"] = True
        return fields


@dataclass(frozen=True)
class DataCapture:
    """Sampled requests and answers, written by SageMaker to an S3 prefix."""

    destination: str
    sampling_percent: int = 100

    def __post_init__(self) -> None:
        if not self.destination.startswith("s3://") or len(self.destination) <= len("s3://"):
            raise DeployError(f"--data-capture wants an S3 URI (s3://bucket/prefix), got {self.destination!r}")
        if not 0 < self.sampling_percent <= 100:
            raise DeployError(f"--data-capture-percent must be 1..100, got {self.sampling_percent}")

    @property
    def bucket(self) -> str:
        """The bucket the captured data goes to."""
        return self.destination[5:].split("/", 1)[0]

    def config(self, kms_key_arn: str | None) -> dict[str, Any]:
        """The endpoint config's DataCaptureConfig (JSON bodies captured as JSON, not base64)."""
        config: dict[str, Any] = {
            "EnableCapture": True, "InitialSamplingPercentage": self.sampling_percent,
            "DestinationS3Uri": self.destination,
            "CaptureOptions": [{"CaptureMode": "Input"}, {"CaptureMode": "Output"}],
            "CaptureContentTypeHeader": {"JsonContentTypes": ["application/json"]},
        }
        if kms_key_arn:
            config["KmsKeyId"] = kms_key_arn
        return config


def split_list(value: str | None) -> tuple[str, ...]:
    """'a,b, c' -> ('a', 'b', 'c'); None -> ()."""
    return tuple(part.strip() for part in (value or "").split(",") if part.strip())


def parse_tags(values: list[str] | None) -> dict[str, str]:
    """--tags KEY=VALUE[,KEY=VALUE...] (repeatable) as a dict; our own deployment tag is reserved."""
    tags: dict[str, str] = {}
    for pair in (item for value in values or [] for item in split_list(value)):
        key, sep, tag_value = pair.partition("=")
        if not sep or not _TAG_KEY.match(key) or not _TAG_VALUE.match(tag_value):
            raise DeployError(f"--tags expects KEY=VALUE pairs of letters, digits, spaces and _.:/=+-@, got {pair!r}")
        if key == TAG_KEY or key.lower().startswith("aws:"):
            raise DeployError(f"tag key {key!r} is reserved ({TAG_KEY} is set by this tool, aws: by AWS)")
        tags[key] = tag_value
    return tags


def resolve_kms_key(aws: Aws, key: str | None) -> str | None:
    """The ARN of an enabled KMS key of this account from a key id, ARN, alias or alias ARN."""
    if not key:
        return None
    with step(f"describe KMS key {key}"):
        try:
            meta = aws.client("kms").describe_key(KeyId=key)["KeyMetadata"]
        except bce.ClientError as exc:
            if exc.response.get("Error", {}).get("Code") == "NotFoundException":
                raise DeployError(f"KMS key {key!r} does not exist in {aws.region}") from exc
            raise
    if meta.get("KeyState") != "Enabled":
        raise DeployError(f"KMS key {meta['Arn']} is {meta.get('KeyState')}, not Enabled")
    return meta["Arn"]


def check_isolated_model(environment: dict[str, str], has_model_data: bool) -> None:
    """Refuse what an isolated container cannot do: download HF_MODEL_ID from the Hugging Face Hub."""
    hub_id = environment.get("HF_MODEL_ID")
    if hub_id and not hub_id.startswith("/") and not has_model_data:
        raise DeployError(f"--network-isolation: the container cannot download HF_MODEL_ID={hub_id} from the "
                          "Hugging Face Hub; upload the model (`upload-model`) and pass --model-data, or serve "
                          "the embedded model")
