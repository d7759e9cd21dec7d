"""An isolated container never calls out: with HF_HUB_OFFLINE (which `deploy --network-isolation` sets)
the real server refuses a Hugging Face Hub id at start-up with a message that says what to do."""

from __future__ import annotations

import time

import pytest
import requests

from serve import model_loading
from tests.server import running_server

pytestmark = pytest.mark.slow
HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"


def test_the_server_refuses_a_hub_download_at_start_up() -> None:
    with running_server({"HF_HUB_OFFLINE": "1", "HF_MODEL_ID": HUB_ID}, wait=False) as srv:
        srv.wait_listening()
        deadline = time.monotonic() + 120
        while "model loading failed" not in srv.logs() and time.monotonic() < deadline:
            time.sleep(0.5)
        logs = srv.logs()
        assert f"HF_MODEL_ID={HUB_ID} is a Hugging Face Hub id, but HF_HUB_OFFLINE is set" in logs
        assert "deploy upload-model, --model-data" in logs
        assert srv.ping() == 503  # SageMaker sees an unhealthy container and fails the endpoint with this log
        answer = requests.post(srv.invocations, json={"inputs": "Hi"}, timeout=30)
        assert answer.status_code == 503


def test_offline_still_serves_model_data_and_local_folders(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    (tmp_path / "model.gguf").write_bytes(b"GGUF")
    assert model_loading.resolve_model(str(tmp_path), HUB_ID).path == str(tmp_path)  # SageMaker's copy wins
    assert model_loading.resolve_model("/nonexistent", str(tmp_path)).gguf_file == "model.gguf"
    with pytest.raises(RuntimeError, match="HF_HUB_OFFLINE is set"):
        model_loading.resolve_model("/nonexistent", HUB_ID)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    assert model_loading.resolve_model("/nonexistent", HUB_ID).path == HUB_ID
