"""Build the container image on a machine that reaches no image registry.

Used by the container tests, the deploy tests (which push the image to a local registry) and by
hand: `python3 -m container.imagebuild --variant cpu`. Standard library only, so the system
python3 runs it before any venv exists.

What it does, each step only when needed (so a second run is a cached rebuild):
1. installs Debian's `docker.io` and `debootstrap` if they are missing (the machine is root);
2. starts a Docker engine when none answers, and stops it again when done (DockerEngine);
3. makes the Dockerfile's `FROM` image locally when it is absent: a minbase Debian bookworm made
   with debootstrap and `docker import`ed as BASE_IMAGE_LOCAL; it stays cached in the engine;
4. passes the host's CA bundle (BuildKit secret) and the local CPU torch wheel (a bind mount from a
   throw-away wheels image) in at build time only: neither ends up in a layer of the image.
"""

from __future__ import annotations

import argparse
import contextlib
import glob
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from container.dockerengine import DockerEngine, docker, docker_cli, ensure_packages, host_lock, image_exists

REPO_ROOT = Path(__file__).resolve().parent.parent
PRODUCTION_BASE = "debian:bookworm-slim"  # the Dockerfile's default FROM
BASE_IMAGE_LOCAL = "local/debian:bookworm-minbase"  # its stand-in, made here by debootstrap
DEFAULT_TAG = "sagemaker-llm-serve:cpu"
DEBIAN_MIRROR = os.environ.get("DEBIAN_MIRROR", "http://deb.debian.org/debian")
CA_BUNDLE = "/etc/ssl/certs/ca-certificates.crt"
WHEEL_DIR = "/opt/wheels"
TORCH_VERSION = "2.13.0"


def _debootstrap_rootfs(rootfs: str, suite: str) -> None:
    """A minbase Debian like the official slim image: apt sources with updates and security, no caches."""
    subprocess.run(
        ["debootstrap", "--variant=minbase", suite, rootfs, DEBIAN_MIRROR],
        check=True, timeout=1200, stdout=subprocess.DEVNULL,
    )
    security = DEBIAN_MIRROR.rstrip("/") + "-security"
    Path(rootfs, "etc/apt/sources.list").unlink(missing_ok=True)
    Path(rootfs, "etc/apt/sources.list.d/debian.sources").write_text(
        f"Types: deb\nURIs: {DEBIAN_MIRROR}\nSuites: {suite} {suite}-updates\nComponents: main\n"
        f"Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg\n\n"
        f"Types: deb\nURIs: {security}\nSuites: {suite}-security\nComponents: main\n"
        f"Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg\n"
    )
    for pattern in ("var/cache/apt/archives/*.deb", "var/cache/apt/*.bin", "var/lib/apt/lists/*", "var/log/*.log"):
        for path in glob.glob(os.path.join(rootfs, pattern)):
            if os.path.isfile(path):
                os.unlink(path)


def ensure_base_image(tag: str = BASE_IMAGE_LOCAL, suite: str = "bookworm") -> str:
    """Return `tag`, first making it with debootstrap + `docker import` when the engine lacks it."""
    with host_lock("base-image"):
        if image_exists(tag):
            return tag
        ensure_packages()
        rootfs = tempfile.mkdtemp(prefix="rootfs-", dir="/var/tmp")
        try:
            _debootstrap_rootfs(rootfs, suite)
            tar = subprocess.Popen(["tar", "-C", rootfs, "--numeric-owner", "-c", "."], stdout=subprocess.PIPE)
            changes = ['CMD ["bash"]', "ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"]
            docker("import", *(a for c in changes for a in ("--change", c)), "-", tag, stdin=tar.stdout, timeout=600)
            if tar.wait(timeout=60) != 0:
                raise RuntimeError("tar of the debootstrapped rootfs failed")
        finally:
            shutil.rmtree(rootfs, ignore_errors=True)
    return tag


def ensure_wheels_image(wheels: Sequence[str]) -> str:
    """A data-only image holding `wheels`, named by their content, for the Dockerfile's bind mount."""
    digest = hashlib.sha256()
    for wheel in sorted(wheels):
        digest.update(f"{os.path.basename(wheel)}:{os.path.getsize(wheel)}:{os.path.getmtime(wheel)}".encode())
    tag = f"local/wheels:{digest.hexdigest()[:16]}"
    with host_lock("wheels-image"):
        if not image_exists(tag):
            names = [os.path.basename(w) for w in wheels]
            tar = subprocess.Popen(["tar", "-C", os.path.dirname(wheels[0]), "-c", *names], stdout=subprocess.PIPE)
            docker("import", "-", tag, stdin=tar.stdout, timeout=600)
            tar.wait(timeout=60)
    return tag


def local_torch_wheels(version: str = TORCH_VERSION, wheel_dir: str = WHEEL_DIR) -> list[str]:
    """The CPU torch wheels of `version` for the image's Python (Debian bookworm: CPython 3.11)."""
    return sorted(glob.glob(os.path.join(wheel_dir, f"torch-{version}+cpu-cp311-*.whl")))


def host_pip_indexes() -> dict[str, str]:
    """The host's pip index URLs (http(s) only: file:// indexes do not exist inside the build)."""
    proc = subprocess.run([sys.executable, "-m", "pip", "config", "list"], capture_output=True, text=True, timeout=60)
    found: dict[str, list[str]] = {}
    for line in proc.stdout.splitlines():
        key, _, value = line.partition("=")
        option = key.rsplit(".", 1)[-1]
        if option in ("index-url", "extra-index-url"):
            urls = [u for u in value.strip("'\"").split() if u.startswith(("http://", "https://"))]
            found.setdefault(option, [])
            found[option] += [u for u in urls if u not in found[option]]
    return {option: " ".join(urls) for option, urls in found.items() if urls}


@dataclass
class BuildReport:
    """What `build_image` made and how long each step took (seconds)."""

    tag: str
    variant: str
    base_image: str
    image_id: str = ""
    size_bytes: int = 0
    timings: dict[str, float] = field(default_factory=dict)


def _build_command(tag: str, variant: str, base_image: str, wheels_image: str) -> list[str]:
    cmd = [docker_cli(), "build", "--progress=plain", "--tag", tag, "--build-arg", f"VARIANT={variant}",
           "--build-arg", f"BASE_IMAGE={base_image}", "--build-arg", f"WHEELS_IMAGE={wheels_image}",
           "--build-arg", f"TORCH_VERSION={TORCH_VERSION}"]
    if os.path.isfile(CA_BUNDLE):  # pip inside the build trusts what the host trusts
        cmd += ["--secret", f"id=ca_bundle,src={CA_BUNDLE}"]
    indexes = host_pip_indexes()
    if "index-url" in indexes:
        cmd += ["--build-arg", f"PIP_INDEX={indexes['index-url']}"]
    if "extra-index-url" in indexes:
        cmd += ["--build-arg", f"PIP_EXTRA_INDEX={indexes['extra-index-url']}"]
    return [*cmd, str(REPO_ROOT)]


def build_image(
    tag: str = DEFAULT_TAG, variant: str = "cpu", base_image: str | None = None, log_path: str | None = None,
    timeout: float = 1800,
) -> BuildReport:
    """Build the Dockerfile at the repo root; needs a running engine (see DockerEngine).

    `base_image` defaults to the Dockerfile's own FROM when the engine has it, else to the local
    debootstrapped stand-in (made on first use). The build's output goes to `log_path` (or stderr).
    """
    report = BuildReport(tag=tag, variant=variant, base_image=base_image or PRODUCTION_BASE)
    started = time.monotonic()
    if base_image is None and not image_exists(PRODUCTION_BASE):
        report.base_image = ensure_base_image()
    report.timings["base_image_s"] = round(time.monotonic() - started, 1)
    wheels = local_torch_wheels() if variant == "cpu" else []
    wheels_image = ensure_wheels_image(wheels) if wheels else "scratch"
    cmd = _build_command(tag, variant, report.base_image, wheels_image)
    build_started = time.monotonic()
    env = {**os.environ, "DOCKER_BUILDKIT": "1"}
    with open(log_path, "w") if log_path else contextlib.nullcontext(sys.stderr) as out:
        proc = subprocess.run(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, timeout=timeout)
    if proc.returncode != 0:
        where = f"; see {log_path}" if log_path else ""
        raise RuntimeError(f"docker build failed ({proc.returncode}){where}")
    report.timings["docker_build_s"] = round(time.monotonic() - build_started, 1)
    report.timings["total_s"] = round(time.monotonic() - started, 1)
    info = json.loads(docker("image", "inspect", tag).stdout)[0]
    report.image_id, report.size_bytes = info["Id"], info["Size"]
    # Rebuilds leave the previous image untagged: drop those of this project, keep the build cache.
    docker("image", "prune", "--force", "--filter", "label=org.opencontainers.image.title=sagemaker-llm-serve",
           check=False)
    return report


def main(argv: Sequence[str] | None = None) -> int:
    """CLI: build the image (starting and afterwards stopping a Docker engine if none runs)."""
    parser = argparse.ArgumentParser(
        prog="python3 -m container.imagebuild",
        description="Build the sagemaker-llm-serve image here: starts a Docker engine if none runs, makes "
        "a local Debian base image with debootstrap when the FROM image is absent, passes the host's CA "
        "certificates and the local CPU torch wheel in at build time only.",
    )
    parser.add_argument("--tag", default=DEFAULT_TAG, help=f"image name (default {DEFAULT_TAG})")
    parser.add_argument("--variant", choices=("cpu", "gpu"), default="cpu",
                        help="cpu: local CPU torch wheel; gpu: PyPI's CUDA torch (the Dockerfile's default)")
    parser.add_argument("--base-image", help="FROM image (default: debian:bookworm-slim if present, "
                        f"else {BASE_IMAGE_LOCAL}, made with debootstrap)")
    parser.add_argument("--log", help="write the docker build output to this file instead of stderr")
    parser.add_argument("--keep-engine", action="store_true",
                        help="leave a dockerd started by this command running afterwards")
    args = parser.parse_args(argv)
    engine = DockerEngine().start()
    try:
        report = build_image(args.tag, args.variant, args.base_image, args.log)
    finally:
        if not args.keep_engine:
            engine.stop()
    print(json.dumps(report.__dict__, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
