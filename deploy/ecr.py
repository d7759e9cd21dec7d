"""Build-and-push: the ECR repository, the registry login, version + git-sha tags, the docker push.

The registry host can be overridden (--registry-override / $DEPLOY_REGISTRY_OVERRIDE), a test aid:
an offline ECR stand-in (moto) hands out a registry address nothing listens on, so a local
`docker-registry` on loopback receives the push instead, under the ECR repository's name. The ECR
credentials are the account's: they go to the ECR registry, and to an override only when it is on
loopback and the caller asks for it (--send-ecr-credentials / $DEPLOY_REGISTRY_OVERRIDE_CREDENTIALS=1);
any other override host is refused.
"""

from __future__ import annotations

import base64
import ipaddress
import os
import re
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

import botocore.exceptions as bce

from deploy.errors import DeployError
from deploy.progress import Progress, log
from deploy.session import Aws, step
from deploy.state import TAG_KEY, DeploymentState, tags_for

REPO_ROOT = Path(__file__).resolve().parent.parent
REGISTRY_OVERRIDE_ENV = "DEPLOY_REGISTRY_OVERRIDE"
OVERRIDE_CREDENTIALS_ENV = "DEPLOY_REGISTRY_OVERRIDE_CREDENTIALS"


@dataclass
class RegistryAuth:
    """Docker credentials for one registry, from ecr:GetAuthorizationToken."""

    username: str
    password: str
    registry: str  # host[:port], no scheme


@dataclass
class PushResult:
    """What was pushed: the URI SageMaker should pull, every ref pushed and the manifest digest."""

    image_uri: str
    pushed: list[str] = field(default_factory=list)
    digest: str = ""


def project_version() -> str:
    """The project version from pyproject.toml."""
    text = (REPO_ROOT / "pyproject.toml").read_text()
    match = re.search(r'^version\s*=\s*"([^"]+)"', text, re.MULTILINE)
    if not match:
        raise DeployError("no version in pyproject.toml")
    return match.group(1)


def git_sha(repo_root: Path = REPO_ROOT) -> str:
    """The short commit sha of the checkout, with `-dirty` when files differ from it."""
    try:
        sha = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], cwd=repo_root, capture_output=True,
                             text=True, check=True, timeout=30).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=repo_root,
                               capture_output=True, text=True, check=True, timeout=30).stdout.strip()
    except (OSError, subprocess.SubprocessError) as exc:
        raise DeployError(f"cannot read the git commit of {repo_root}: {exc}") from exc
    return f"{sha}-dirty" if dirty else sha


def image_tags(version: str, sha: str) -> list[str]:
    """Tags for one push: the version, and version plus sha (immutable, the one endpoints use)."""
    return [version, f"{version}-{sha}"]


def ensure_repository(aws: Aws, name: str, state: DeploymentState, tags: dict[str, str] | None = None) -> str:
    """The repository URI, creating the repository (tagged, scan on push) when it is missing."""
    ecr = aws.client("ecr")
    try:
        with step(f"describe ECR repository {name}"):
            return ecr.describe_repositories(repositoryNames=[name])["repositories"][0]["repositoryUri"]
    except bce.ClientError as exc:
        if exc.response.get("Error", {}).get("Code") != "RepositoryNotFoundException":
            raise
    with step(f"create ECR repository {name}"):
        repo = ecr.create_repository(
            repositoryName=name, tags=tags_for(state.name, tags), imageScanningConfiguration={"scanOnPush": True},
        )["repository"]
    state.add("ecr-repository", name, arn=repo["repositoryArn"], uri=repo["repositoryUri"])
    log(f"created ECR repository {repo['repositoryUri']}")
    return repo["repositoryUri"]


def registry_auth(aws: Aws) -> RegistryAuth:
    """Log in to the account's registry: decode the `AWS:<password>` token ECR hands out."""
    with step("get ECR authorization token"):
        data = aws.client("ecr").get_authorization_token()["authorizationData"][0]
    username, password = base64.b64decode(data["authorizationToken"]).decode().split(":", 1)
    registry = re.sub(r"^https?://", "", data["proxyEndpoint"]).rstrip("/")
    return RegistryAuth(username=username, password=password, registry=registry)


def is_loopback(host: str) -> bool:
    """True for localhost, 127.0.0.0/8 and [::1], with or without a port."""
    name = host.rsplit(":", 1)[0] if host.count(":") == 1 or host.startswith("[") else host
    name = name.strip("[]")
    if name == "localhost":
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


def check_override(override: str | None) -> None:
    """DeployError for an override that is not on loopback (it would receive the account's image)."""
    if override and not is_loopback(override):
        raise DeployError(f"registry override {override} is not on loopback: the override is a test aid for a "
                          f"local registry; unset {REGISTRY_OVERRIDE_ENV} / --registry-override to push to ECR")


def push_credentials(auth: RegistryAuth, override: str | None, send_to_override: bool) -> RegistryAuth | None:
    """The credentials the push may present: ECR's for ECR; for an override only on request, on loopback."""
    if not override:
        return auth
    check_override(override)
    if not send_to_override:
        log(f"registry override {override}: pushing without the ECR credentials (--send-ecr-credentials "
            f"or {OVERRIDE_CREDENTIALS_ENV}=1 sends them to a loopback test registry)")
        return None
    return auth


def _push_tag(client, ref: str, tag: str, auth: RegistryAuth | None, progress: Progress) -> str:
    """Push one tag, streaming the engine's per-layer progress into one line; returns the digest."""
    sizes: dict[str, tuple[int, int]] = {}  # layer id -> (bytes sent, bytes to send)
    finished: set[str] = set()
    digest = ""
    auth_config = {"username": auth.username, "password": auth.password} if auth else None
    for event in client.api.push(ref, tag=tag, stream=True, decode=True, auth_config=auth_config):
        if "error" in event:
            raise DeployError(f"docker push {ref}:{tag} failed: {event['error']}")
        layer, detail = event.get("id"), event.get("progressDetail") or {}
        if layer and detail.get("total"):
            sizes[layer] = (min(detail.get("current", 0), detail["total"]), detail["total"])
        if layer and event.get("status") in {"Pushed", "Layer already exists", "Mounted from"}:
            finished.add(layer)
        if event.get("aux", {}).get("Digest"):
            digest = event["aux"]["Digest"]
        sent = sum(cur for cur, _ in sizes.values()) / 1e6
        total = sum(tot for _, tot in sizes.values()) / 1e6
        progress.update(f"{tag}: {len(finished)} layers done, {sent:.0f}/{total:.0f} MB sent")
    if not digest:
        raise DeployError(f"docker push {ref}:{tag} ended without a manifest digest")
    return digest


def push_image(local_image: str, repository_uri: str, tags: list[str], auth: RegistryAuth | None,
               registry_override: str | None = None) -> PushResult:
    """Tag `local_image` as repository:tag for every tag and push them (docker engine API)."""
    import docker  # imported here: only push needs a Docker engine

    repo_name = repository_uri.split("/", 1)[1]
    target = f"{registry_override}/{repo_name}" if registry_override else repository_uri
    try:
        client = docker.from_env(timeout=600)
        image = client.images.get(local_image)
    except docker.errors.ImageNotFound as exc:
        raise DeployError(f"no local image {local_image!r}; build it first (python3 -m container.imagebuild)") from exc
    except docker.errors.DockerException as exc:
        raise DeployError(f"cannot reach the Docker engine ({exc}); start dockerd") from exc
    result = PushResult(image_uri=f"{repository_uri}:{tags[-1]}")
    progress = Progress(f"push {target}")
    added = [f"{target}:{tag}" for tag in tags if f"{target}:{tag}" not in image.tags]
    try:
        for tag in tags:
            image.tag(target, tag=tag)
            result.digest = _push_tag(client, target, tag, auth, progress)
            result.pushed.append(f"{target}:{tag}")
    finally:
        for ref in added:  # the registry has them now; keep the local engine's tag list as it was
            client.images.remove(ref, noprune=True)
    progress.done(f"pushed {', '.join(tags)} ({result.digest})")
    return result


def build_local_image(tag: str, variant: str) -> None:
    """Build the Dockerfile as `tag` with the container's own build helper (cached rebuilds are quick)."""
    try:
        from container.imagebuild import build_image
    except ImportError as exc:
        raise DeployError(f"--build needs container/imagebuild.py from this checkout ({exc})") from exc
    log(f"building {tag} ({variant}) with container/imagebuild.py")
    try:
        report = build_image(tag=tag, variant=variant)
    except (RuntimeError, OSError, subprocess.SubprocessError) as exc:
        raise DeployError(f"image build failed: {exc}") from exc
    log(f"built {tag}: {report.size_bytes / 1e9:.2f} GB in {report.timings.get('total_s', 0):.0f} s")


def build_and_push(aws: Aws, state: DeploymentState, local_image: str, repository: str,
                   registry_override: str | None = None, build: str | None = None,
                   send_ecr_credentials: bool = False, resource_tags: dict[str, str] | None = None) -> PushResult:
    """The whole push step: [build,] repository, login, version and git-sha tags, push; recorded in state."""
    override = registry_override or os.environ.get(REGISTRY_OVERRIDE_ENV) or None
    send = send_ecr_credentials or os.environ.get(OVERRIDE_CREDENTIALS_ENV) == "1"
    check_override(override)  # before anything is built or created
    if build:
        build_local_image(local_image, build)
    repository_uri = ensure_repository(aws, repository, state, resource_tags)
    auth = registry_auth(aws)
    credentials = push_credentials(auth, override, send)
    if override:
        log(f"registry override: pushing to {override} instead of {auth.registry}")
    tags = image_tags(project_version(), git_sha())
    result = push_image(local_image, repository_uri, tags, credentials, override)
    state.add("ecr-image", f"{repository}:{tags[-1]}", repository=repository, tags=tags, digest=result.digest,
              pushed=result.pushed)
    return result


def delete_pushed_images(aws: Aws, repository: str, tags: list[str]) -> None:
    """Remove the tags this deployment pushed (an image already gone is fine)."""
    ecr = aws.client("ecr")
    with step(f"delete images {repository}:{','.join(tags)}"):
        try:
            ecr.batch_delete_image(repositoryName=repository, imageIds=[{"imageTag": t} for t in tags])
        except bce.ClientError as exc:
            if exc.response.get("Error", {}).get("Code") != "RepositoryNotFoundException":
                raise


def delete_repository_if_ours(aws: Aws, name: str, deployment: str) -> bool:
    """Delete the repository if it carries our tag and holds no images (never forced)."""
    ecr = aws.client("ecr")
    with step(f"delete ECR repository {name}"):
        try:
            repo = ecr.describe_repositories(repositoryNames=[name])["repositories"][0]
        except bce.ClientError as exc:
            if exc.response.get("Error", {}).get("Code") == "RepositoryNotFoundException":
                return True
            raise
        tags = ecr.list_tags_for_resource(resourceArn=repo["repositoryArn"]).get("tags", [])
        if {"Key": TAG_KEY, "Value": deployment} not in tags:
            log(f"kept ECR repository {name}: not tagged {TAG_KEY}={deployment}")
            return False
        if ecr.list_images(repositoryName=name).get("imageIds"):
            log(f"kept ECR repository {name}: it still holds images this deployment did not push")
            return False
        ecr.delete_repository(repositoryName=name)
    return True
