"""Model artifacts on S3: a local model directory as model.tar.gz, or as an uncompressed S3 prefix.

SageMaker unpacks model.tar.gz into /opt/ml/model, so the archive holds the directory's files at its
root. The uncompressed prefix (ModelDataSource, CompressionType None) skips the archive entirely:
faster to upload, and SageMaker copies the files straight into /opt/ml/model.
"""

from __future__ import annotations

import tarfile
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import botocore.exceptions as bce

from deploy.errors import DeployError
from deploy.progress import Progress, log
from deploy.session import Aws, step
from deploy.state import TAG_KEY, DeploymentState, tags_for


@dataclass(frozen=True)
class ModelData:
    """Where the model lives on S3 and whether it is a tarball or a prefix of plain files."""

    s3_uri: str

    def __post_init__(self) -> None:
        split_s3_uri(self.s3_uri)  # a clear error for anything but s3://bucket/key
        if not self.compressed and not self.s3_uri.endswith("/"):
            # SageMaker copies every object under the prefix: without the slash, s3://b/model
            # would also match s3://b/model-old/...
            object.__setattr__(self, "s3_uri", self.s3_uri + "/")

    @property
    def compressed(self) -> bool:
        """True for a .tar.gz archive, False for an uncompressed prefix of plain files."""
        return self.s3_uri.endswith(".tar.gz")

    def container_fields(self) -> dict[str, Any]:
        """The ContainerDefinition fields that point SageMaker at this model."""
        if self.compressed:
            return {"ModelDataUrl": self.s3_uri}
        return {"ModelDataSource": {"S3DataSource": {
            "S3Uri": self.s3_uri, "S3DataType": "S3Prefix", "CompressionType": "None"}}}


def split_s3_uri(uri: str) -> tuple[str, str]:
    """('bucket', 'key') from s3://bucket/key."""
    if not uri.startswith("s3://"):
        raise DeployError(f"not an S3 URI: {uri!r} (expected s3://bucket/key)")
    bucket, _, key = uri[5:].partition("/")
    return bucket, key


def package_model_dir(model_dir: Path, out_path: Path) -> Path:
    """Write model_dir's files into a gzip tarball with the files at the archive root."""
    if not model_dir.is_dir():
        raise DeployError(f"model directory {model_dir} does not exist")
    with tarfile.open(out_path, "w:gz") as tar:
        for path in sorted(model_dir.rglob("*")):
            if path.is_file():
                tar.add(path, arcname=str(path.relative_to(model_dir)), recursive=False)
    return out_path


def ensure_bucket(aws: Aws, bucket: str, state: DeploymentState) -> None:
    """Create the bucket (tagged) when it does not exist; an existing bucket is used as it is."""
    s3 = aws.client("s3")
    try:
        s3.head_bucket(Bucket=bucket)
        return
    except bce.ClientError as exc:
        code = exc.response.get("Error", {}).get("Code")
        if code in {"403", "AccessDenied"}:
            raise DeployError(f"S3 bucket {bucket} exists but this account may not use it (bucket names are "
                              "global); choose another --bucket") from exc
        if code not in {"404", "NoSuchBucket", "NotFound"}:
            raise
    with step(f"create S3 bucket {bucket}"):
        kwargs: dict[str, Any] = {"Bucket": bucket}
        if aws.region != "us-east-1":  # us-east-1 rejects an explicit LocationConstraint
            kwargs["CreateBucketConfiguration"] = {"LocationConstraint": aws.region}
        s3.create_bucket(**kwargs)
        s3.put_bucket_tagging(Bucket=bucket, Tagging={"TagSet": tags_for(state.name)})
    state.add("s3-bucket", bucket)
    log(f"created S3 bucket {bucket}")


def _upload_files(aws: Aws, files: list[tuple[Path, str]], bucket: str, state: DeploymentState) -> None:
    total = sum(path.stat().st_size for path, _ in files)
    progress = Progress(f"upload s3://{bucket}")
    sent = 0

    def advance(nbytes: int) -> None:
        nonlocal sent
        sent += nbytes
        progress.update(f"{sent / 1e6:.1f}/{total / 1e6:.1f} MB")

    s3 = aws.client("s3")
    for path, key in files:
        with step(f"upload s3://{bucket}/{key}"):
            s3.upload_file(str(path), bucket, key, Callback=advance,
                           ExtraArgs={"Tagging": f"{TAG_KEY}={state.name}"})
        state.add("s3-object", f"s3://{bucket}/{key}", bucket=bucket, key=key)
    progress.done(f"{len(files)} file(s), {total / 1e6:.1f} MB")


def upload_model(aws: Aws, state: DeploymentState, model_dir: Path, bucket: str, prefix: str,
                 uncompressed: bool = False) -> ModelData:
    """Upload model_dir as s3://bucket/prefix/model.tar.gz, or file by file under s3://bucket/prefix/."""
    prefix = prefix.strip("/")
    ensure_bucket(aws, bucket, state)
    if uncompressed:
        if not model_dir.is_dir():
            raise DeployError(f"model directory {model_dir} does not exist")
        files = [(p, f"{prefix}/{p.relative_to(model_dir)}") for p in sorted(model_dir.rglob("*")) if p.is_file()]
        _upload_files(aws, files, bucket, state)
        return ModelData(f"s3://{bucket}/{prefix}/")
    with tempfile.TemporaryDirectory(prefix="model-tar-") as tmp:
        tarball = package_model_dir(model_dir, Path(tmp) / "model.tar.gz")
        _upload_files(aws, [(tarball, f"{prefix}/model.tar.gz")], bucket, state)
    return ModelData(f"s3://{bucket}/{prefix}/model.tar.gz")


def delete_bucket_if_ours(aws: Aws, bucket: str, deployment: str) -> bool:
    """Delete the bucket if it carries our tag and is empty (never emptied by force)."""
    s3 = aws.client("s3")
    with step(f"delete S3 bucket {bucket}"):
        try:
            tag_set = s3.get_bucket_tagging(Bucket=bucket).get("TagSet", [])
        except bce.ClientError as exc:
            code = exc.response.get("Error", {}).get("Code")
            if code in {"NoSuchBucket", "404"}:
                return True
            if code != "NoSuchTagSet":
                raise
            tag_set = []
        if {"Key": TAG_KEY, "Value": deployment} not in tag_set:
            log(f"kept S3 bucket {bucket}: not tagged {TAG_KEY}={deployment}")
            return False
        if s3.list_objects_v2(Bucket=bucket, MaxKeys=1).get("KeyCount", 0):
            log(f"kept S3 bucket {bucket}: it still holds objects this deployment did not upload")
            return False
        s3.delete_bucket(Bucket=bucket)
    return True
