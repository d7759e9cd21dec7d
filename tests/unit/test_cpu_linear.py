"""oneDNN-packed linear layers: same outputs as nn.Linear, and the engine stays exact on them."""

from __future__ import annotations

import copy

import pytest
import torch

from serve.cpu_linear import PackedLinear, can_pack, pack_linear_layers
from tests.unit.conftest import decode_all, generate_alone, running_engine, tiny_llama

pytestmark = pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="needs oneDNN")


@pytest.mark.parametrize("dtype,atol", [(torch.float32, 1e-4), (torch.bfloat16, 0.15)])
def test_packed_model_gives_the_same_logits(tokenizer, dtype, atol):
    if not can_pack(dtype):
        pytest.skip(f"this CPU's oneDNN cannot pack {dtype} (see test_unpackable_dtype_is_left_alone)")
    plain = tiny_llama(len(tokenizer), seed=3).to(dtype)
    plain.config.tie_word_embeddings = True
    plain.tie_weights()
    packed = copy.deepcopy(plain)
    assert pack_linear_layers(packed) == 2 * 7 + 1  # q k v o gate up down per layer, and lm_head
    assert isinstance(packed.lm_head, PackedLinear)
    assert packed.lm_head.weight is packed.model.embed_tokens.weight  # still tied
    assert packed.get_output_embeddings().weight.shape == plain.lm_head.weight.shape
    ids = torch.tensor([tokenizer.encode("Packed weights must not change the answer at all.")])
    with torch.inference_mode():
        want, got = plain(ids).logits.float(), packed(ids).logits.float()
    assert torch.allclose(want, got, atol=atol, rtol=1e-2)
    assert (want.argmax(-1) == got.argmax(-1)).float().mean() > 0.9


def test_unpackable_dtype_is_left_alone(tokenizer, monkeypatch):
    """A CPU without bf16 packing support (AVX2-only) keeps bf16 layers plain instead of failing to load."""
    def refuse(weight):
        raise RuntimeError("mkldnn_reorder_linear_weight: bf16 path needs the cpu support avx512bw")

    model = tiny_llama(len(tokenizer), seed=3).to(torch.bfloat16)
    monkeypatch.setattr(torch.ops.mkldnn, "_reorder_linear_weight", refuse)
    assert pack_linear_layers(model) == 0
    assert type(model.lm_head) is torch.nn.Linear


def test_engine_on_a_packed_model_matches_generate(tokenizer):
    model = tiny_llama(len(tokenizer), seed=4)
    pack_linear_layers(model)
    prompts = [tokenizer.encode("packed " * (1 + 5 * i) + f"row {i}") for i in range(6)]
    with running_engine(model, tokenizer, max_batch_total_tokens=50_000) as engine:
        outs = decode_all(engine, prompts, 16)
    with torch.inference_mode():
        for p, out in zip(prompts, outs):
            assert out == generate_alone(model, p, 16)
