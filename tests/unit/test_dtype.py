"""DTYPE's default follows the hardware: what each kind of machine gets, and that DTYPE still wins."""

from __future__ import annotations

import pytest
import torch

from serve import model_loading
from serve.model_loading import pick_dtype


@pytest.fixture
def cpu(monkeypatch):
    """Set which native bf16 instructions the CPU reports: cpu(avx512_bf16=..., amx=...)."""
    def set_features(avx512_bf16: bool = False, amx: bool = False) -> None:
        monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: avx512_bf16, raising=False)
        monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx, raising=False)
    return set_features


@pytest.mark.parametrize("features,expected", [
    ({}, torch.float32),
    ({"avx512_bf16": True}, torch.bfloat16),
    ({"amx": True}, torch.bfloat16),
])
def test_a_cpu_gets_bf16_only_where_it_computes_it_natively(cpu, features, expected):
    cpu(**features)
    dtype, why = pick_dtype(None, on_gpu=False)
    assert dtype == expected
    if expected == torch.bfloat16:
        assert "natively" in why and next(iter(features)) in why
    else:
        assert "no native bf16" in why


@pytest.mark.parametrize("bf16,expected", [(True, torch.bfloat16), (False, torch.float16)])
def test_a_gpu_gets_bf16_where_it_has_it_and_fp16_on_older_ones(monkeypatch, bf16, expected):
    asked = {}

    def supported(including_emulation: bool = True) -> bool:
        asked["emulation"] = including_emulation
        return bf16

    monkeypatch.setattr(torch.cuda, "is_bf16_supported", supported)
    dtype, why = pick_dtype(None, on_gpu=True)
    assert dtype == expected and asked == {"emulation": False}  # emulated bf16 is no reason to pick it
    assert ("natively" in why) == bf16


def test_dtype_set_wins_over_the_hardware(cpu):
    cpu(avx512_bf16=True)
    assert pick_dtype("float32", on_gpu=False) == (torch.float32, "DTYPE is set")
    cpu()
    assert pick_dtype("bfloat16", on_gpu=False) == (torch.bfloat16, "DTYPE is set")
    with pytest.raises(ValueError, match="DTYPE must be"):
        pick_dtype("int8", on_gpu=False)


def test_this_machines_features_are_read_without_error():
    features = model_loading.cpu_bf16_features()
    assert set(features) == {"avx512_bf16", "amx"} and all(isinstance(v, bool) for v in features.values())
