"""Model artifacts on S3: a local model directory as model.tar.gz, or as an uncompressed S3 prefix.

SageMaker unpacks model.tar.gz into /opt/ml/model, so the archive holds the directory's files at its
root. The uncompressed prefix (ModelDataSource, CompressionType None) skips the archive entirely:
faster to upload, and SageMaker copies the files straight into /opt/ml/model.

Bucket names are global and the default one is predictable (sagemaker-llm-serve-ACCOUNT-REGION), so
someone else could create it first and wait for our model: every call on a bucket passes
ExpectedBucketOwner (S3 answers 403 when another account owns it), a bucket owned elsewhere is
refused, and a bucket created here gets Block Public Access and default encryption.
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
    # dereference: a symlinked weights file goes in as its bytes (SageMaker would unpack a dangling link)
    with tarfile.open(out_path, "w:gz", dereference=True) as tar:
        for path in sorted(model_dir.rglob("*")):
            if path.is_file():
                tar.add(path, arcname=str(path.relative_to(model_dir)), recursive=False)
    return out_path


def owner(aws: Aws) -> dict[str, str]:
    """The ExpectedBucketOwner argument: S3 refuses the call when another account owns the bucket."""
    return {"ExpectedBucketOwner": aws.account_id}


def bucket_is_ours(aws: Aws, bucket: str) -> bool:
    """True when the bucket exists in this account, False when it does not exist at all.

    DeployError when it exists but another account owns it (or this account may not read it).
    """
    try:
        aws.client("s3").head_bucket(Bucket=bucket, **owner(aws))
        return True
    except bce.ClientError as exc:
        code = exc.response.get("Error", {}).get("Code")
        if code in {"403", "AccessDenied"}:
            raise DeployError(f"S3 bucket {bucket} exists but is not owned by account {aws.account_id} (bucket "
                              "names are global: anyone can create a predictable one first and wait for your "
                              "data); refusing to use it. Choose another --bucket") from exc
        if code not in {"404", "NoSuchBucket", "NotFound"}:
            raise
    return False


def encryption_rule(kms_key_arn: str | None) -> dict[str, Any]:
    """Default encryption: SSE-KMS with the key (and an S3 Bucket Key, fewer KMS calls), else SSE-S3."""
    if kms_key_arn:
        return {"ApplyServerSideEncryptionByDefault": {"SSEAlgorithm": "aws:kms", "KMSMasterKeyID": kms_key_arn},
                "BucketKeyEnabled": True}
    return {"ApplyServerSideEncryptionByDefault": {"SSEAlgorithm": "AES256"}}


BLOCK_PUBLIC_ACCESS = {"BlockPublicAcls": True, "IgnorePublicAcls": True, "BlockPublicPolicy": True,
                       "RestrictPublicBuckets": True}


def ensure_bucket(aws: Aws, bucket: str, state: DeploymentState, kms_key_arn: str | None = None,
                  tags: dict[str, str] | None = None) -> None:
    """Create the bucket (tagged, private, encrypted) when it does not exist; one of ours is used as it is."""
    if bucket_is_ours(aws, bucket):
        return
    s3 = aws.client("s3")
    with step(f"create S3 bucket {bucket}"):
        kwargs: dict[str, Any] = {"Bucket": bucket, "ObjectOwnership": "BucketOwnerEnforced"}
        if aws.region != "us-east-1":  # us-east-1 rejects an explicit LocationConstraint
            kwargs["CreateBucketConfiguration"] = {"LocationConstraint": aws.region}
        s3.create_bucket(**kwargs)
    state.add("s3-bucket", bucket)
    with step(f"secure S3 bucket {bucket}"):
        s3.put_bucket_tagging(Bucket=bucket, Tagging={"TagSet": tags_for(state.name, tags)}, **owner(aws))
        s3.put_public_access_block(Bucket=bucket, PublicAccessBlockConfiguration=BLOCK_PUBLIC_ACCESS, **owner(aws))
        s3.put_bucket_encryption(Bucket=bucket, ServerSideEncryptionConfiguration={
            "Rules": [encryption_rule(kms_key_arn)]}, **owner(aws))
    kind = f"SSE-KMS with {kms_key_arn}" if kms_key_arn else "SSE-S3"
    log(f"created S3 bucket {bucket} (Block Public Access on, default encryption {kind})")


def _upload_files(aws: Aws, files: list[tuple[Path, str]], bucket: str, state: DeploymentState,
                  kms_key_arn: str | None) -> None:
    total = sum(path.stat().st_size for path, _ in files)
    progress = Progress(f"upload s3://{bucket}")
    sent = 0

    def advance(nbytes: int) -> None:
        nonlocal sent
        sent += nbytes
        progress.update(f"{sent / 1e6:.1f}/{total / 1e6:.1f} MB")

    extra: dict[str, str] = {"Tagging": f"{TAG_KEY}={state.name}", **owner(aws)}
    if kms_key_arn:  # per object too: a bucket of ours that existed before may encrypt otherwise
        extra.update(ServerSideEncryption="aws:kms", SSEKMSKeyId=kms_key_arn)
    s3 = aws.client("s3")
    for path, key in files:
        with step(f"upload s3://{bucket}/{key}"):
            s3.upload_file(str(path), bucket, key, Callback=advance, ExtraArgs=extra)
        state.add("s3-object", f"s3://{bucket}/{key}", bucket=bucket, key=key)
    progress.done(f"{len(files)} file(s), {total / 1e6:.1f} MB")


def upload_model(aws: Aws, state: DeploymentState, model_dir: Path, bucket: str, prefix: str,
                 uncompressed: bool = False, kms_key_arn: str | None = None,
                 tags: dict[str, str] | None = None) -> ModelData:
    """Upload model_dir as s3://bucket/prefix/model.tar.gz, or file by file under s3://bucket/prefix/."""
    prefix = prefix.strip("/")
    ensure_bucket(aws, bucket, state, kms_key_arn, tags)
    if uncompressed:
        if not model_dir.is_dir():
            raise DeployError(f"model directory {model_dir} does not exist")
        files = [(p, f"{prefix}/{p.relative_to(model_dir)}") for p in sorted(model_dir.rglob("*")) if p.is_file()]
        _upload_files(aws, files, bucket, state, kms_key_arn)
        return ModelData(f"s3://{bucket}/{prefix}/")
    with tempfile.TemporaryDirectory(prefix="model-tar-") as tmp:
        tarball = package_model_dir(model_dir, Path(tmp) / "model.tar.gz")
        _upload_files(aws, [(tarball, f"{prefix}/model.tar.gz")], bucket, state, kms_key_arn)
    return ModelData(f"s3://{bucket}/{prefix}/model.tar.gz")


def delete_object(aws: Aws, bucket: str, key: str) -> None:
    """Delete one object we uploaded (only if the bucket is still this account's)."""
    aws.client("s3").delete_object(Bucket=bucket, Key=key, **owner(aws))


def delete_bucket_if_ours(aws: Aws, bucket: str, deployment: str) -> bool:
    """Delete the bucket if it carries our tag and is empty (never emptied by force)."""
    s3 = aws.client("s3")
    with step(f"delete S3 bucket {bucket}"):
        try:
            tag_set = s3.get_bucket_tagging(Bucket=bucket, **owner(aws)).get("TagSet", [])
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
        if s3.list_objects_v2(Bucket=bucket, MaxKeys=1, **owner(aws)).get("KeyCount", 0):
            log(f"kept S3 bucket {bucket}: it still holds objects this deployment did not upload")
            return False
        s3.delete_bucket(Bucket=bucket, **owner(aws))
    return True
