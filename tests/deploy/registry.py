"""A local Docker registry (Debian's `docker-registry`) on loopback, with basic auth.

It stands in for the ECR registry in the push test: the credentials it accepts are the ones moto's
GetAuthorizationToken hands out, so the test proves the push logs in with them. Docker treats
127.0.0.0/8 as an insecure registry by default, so plain HTTP works without daemon configuration.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass

import bcrypt
import requests

REGISTRY_BIN = "docker-registry"


def ensure_installed() -> str:
    """The registry binary, apt-installing Debian's package when it is missing (the machine is root)."""
    found = shutil.which(REGISTRY_BIN)
    if found:
        return found
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    subprocess.run(["apt-get", "update", "-q"], check=True, env=env, timeout=600, stdout=subprocess.DEVNULL)
    subprocess.run(["apt-get", "install", "-y", "-q", "--no-install-recommends", "docker-registry"], check=True,
                   env=env, timeout=600, stdout=subprocess.DEVNULL)
    return shutil.which(REGISTRY_BIN) or "/usr/bin/docker-registry"


def free_port() -> int:
    """A free TCP port on 127.0.0.1."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass
class Registry:
    """A running registry: host:port to push to, and the credentials it accepts."""

    host: str
    username: str
    password: str

    def get(self, path: str, **headers: str) -> requests.Response:
        """GET a registry API path with the credentials."""
        return requests.get(f"http://{self.host}{path}", auth=(self.username, self.password),
                            headers=headers, timeout=30)


CONFIG = """version: 0.1
log:
  level: warn
storage:
  filesystem:
    rootdirectory: {root}/data
  delete:
    enabled: true
http:
  addr: {host}
auth:
  htpasswd:
    realm: test-registry
    path: {root}/htpasswd
"""


@contextlib.contextmanager
def running_registry(username: str, password: str, start_timeout: float = 30) -> Iterator[Registry]:
    """Start the registry on a free loopback port; stop it and delete its storage afterwards."""
    binary = ensure_installed()
    root = tempfile.mkdtemp(prefix="registry-")
    host = f"127.0.0.1:{free_port()}"
    with open(os.path.join(root, "htpasswd"), "w") as handle:  # the registry accepts bcrypt only
        handle.write(f"{username}:{bcrypt.hashpw(password.encode(), bcrypt.gensalt(rounds=5)).decode()}\n")
    with open(os.path.join(root, "config.yml"), "w") as handle:
        handle.write(CONFIG.format(root=root, host=host))
    log = open(os.path.join(root, "registry.log"), "wb")
    proc = subprocess.Popen([binary, "serve", os.path.join(root, "config.yml")], stdout=log, stderr=subprocess.STDOUT,
                            stdin=subprocess.DEVNULL, start_new_session=True)
    registry = Registry(host=host, username=username, password=password)
    try:
        deadline = time.monotonic() + start_timeout
        while True:
            with contextlib.suppress(requests.RequestException):
                if registry.get("/v2/").status_code == 200:
                    break
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"docker-registry did not start: {open(log.name).read()[-2000:]}")
            time.sleep(0.2)
        yield registry
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)
        log.close()
        shutil.rmtree(root, ignore_errors=True)
