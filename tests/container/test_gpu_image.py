"""The default (CUDA) image on a machine without a GPU: it builds, starts, says it runs on the CPU, serves.

Opt-in (`make gpu-image-check`, which sets RUN_GPU_IMAGE_CHECK=1): the cold build downloads several GB
of CUDA wheels from PyPI, too much for every CI run. A rebuild after a code change takes seconds.
"""

from __future__ import annotations

import json
import os

import httpx
import pytest

from container.dockerengine import docker
from container.imagebuild import build_image
from tests.container.conftest import Container
from tests.server import default_cpu_dtype

pytestmark = [
    pytest.mark.slow, pytest.mark.timeout(3600),
    pytest.mark.skipif(os.environ.get("RUN_GPU_IMAGE_CHECK") != "1",
                       reason="opt-in: `make gpu-image-check` (builds the multi-GB CUDA image)"),
]
TAG = "sagemaker-llm-serve:gpu"


@pytest.fixture(scope="module")
def gpu_container(docker_engine, tmp_path_factory: pytest.TempPathFactory):
    log_path = tmp_path_factory.mktemp("gpu-image") / "docker-build.log"
    report = build_image(TAG, variant="gpu", log_path=str(log_path), timeout=3600)
    print(f"\n{TAG}: {report.size_bytes / 1e9:.2f} GB, timings {report.timings}")
    container = Container.run(TAG, f"sls-test-gpu-{os.getpid()}", {"OAI_ENABLED": "true"})
    try:
        print(f"ready in {container.wait_ready(timeout=600):.1f} s")
        yield container
    finally:
        container.remove()


def test_the_cuda_image_serves_on_the_cpu_and_says_so(gpu_container: Container) -> None:
    cuda = docker("run", "--rm", "--entrypoint", "python3", TAG, "-c",
                  "import torch; print(torch.version.cuda, torch.cuda.is_available())", timeout=300).stdout.split()
    assert cuda[0] != "None" and cuda[1] == "False"  # a CUDA build of torch, and no GPU here
    logs = gpu_container.logs(tail=400)
    assert f"torch is a CUDA {cuda[0]} build but sees no GPU: running on the CPU" in logs
    assert "devices=cpu" in logs and f"dtype={default_cpu_dtype()}" in logs
    body = {"messages": [{"role": "user", "content": "What is the capital of France? Answer with the city name."}],
            "max_tokens": 12, "temperature": 0}
    answer = httpx.post(f"{gpu_container.base_url}/invocations", json=body, timeout=120)
    assert answer.status_code == 200, answer.text
    assert "Paris" in answer.json()["choices"][0]["message"]["content"]
    config = json.loads(docker("image", "inspect", "--format", "{{json .Config}}", TAG).stdout)
    assert config["Cmd"] == ["serve"] and config["Env"][0].startswith("PATH=/opt/venv/bin")
