"""QUANTIZE on the real server: int4 weights on the CPU still chat, and a GPU-only scheme on the CPU
leaves a worker that says why at /ping (SageMaker then fails the endpoint with that log)."""

from __future__ import annotations

import time

import pytest
import requests

from tests.server import running_server

pytestmark = pytest.mark.slow


def test_int4_weights_answer_the_chat_and_the_log_says_what_was_quantized() -> None:
    with running_server({"QUANTIZE": "int4", "OAI_ENABLED": "true"}) as srv:
        body = {"messages": [{"role": "user", "content": "What is the capital of France?"}], "max_tokens": 16,
                "temperature": 0}
        answer = requests.post(srv.invocations, json=body, timeout=120)
        assert answer.status_code == 200, answer.text
        assert "Paris" in answer.json()["choices"][0]["message"]["content"]
        logs = srv.logs()
        assert "dtype bfloat16: QUANTIZE=int4 computes in bf16" in logs
        assert "weights: int4 weight-only, groups of 32" in logs
        assert "quantized 211 linear layers to int4" in logs  # 30 layers x 7, and lm_head
        # torchao's import on a CPU build: one warning per CUDA kernel library, one per enum (quieted)
        assert "Failed to load" not in logs and "is an Enum subclass" not in logs


def test_a_gpu_scheme_on_the_cpu_fails_at_start_up_with_what_to_do() -> None:
    with running_server({"QUANTIZE": "bitsandbytes-nf4"}, wait=False) as srv:
        srv.wait_listening()
        deadline = time.monotonic() + 120
        while "model loading failed" not in srv.logs() and time.monotonic() < deadline:
            time.sleep(0.5)
        assert "QUANTIZE=bitsandbytes-nf4 needs a CUDA GPU; on the CPU use QUANTIZE=int8 or int4" in srv.logs()
        ping = requests.get(srv.url + "/ping", timeout=10)
        assert ping.status_code == 503
        assert "needs a CUDA GPU" in ping.text
        assert requests.post(srv.invocations, json={"inputs": "Hi"}, timeout=30).status_code == 503
