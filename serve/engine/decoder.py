"""The engine's own forward for decoders built like Llama's (Llama, Mistral, Qwen2 and their fine-tunes).

transformers' forward serves every use of a model (training, `generate`, any cache, any mask), and
walks that generality on every call: keyword plumbing, output records, a mask builder, hooks and
~400 module calls per decode step. At one stream on the CPU that Python costs as much as the
matmuls of a small model (SmolLM2-135M: 5-9 ms a step, `bench/forward_ab.py`). This forward runs the
same modules -- the same `nn.Linear`s whatever holds their weights (plain, oneDNN-packed, int8,
int4 or a quantizer's), the same rotary embedding, the engine's paged attention -- in one flat
loop, per layer:

    x = rms_norm(h);  q, k, v = x Wq, x Wk, x Wv;  rotate q and k;  write k, v to the pool
    h = h + attention(q, pool) Wo
    x = rms_norm(h);  h = h + (act(x Wgate) * x Wup) Wdown

then the final norm and `lm_head`, on the rows whose logits are wanted only. That is the whole
computation of these families' decoder layers (Mistral and Qwen2 add a sliding window, read per
layer; Qwen2's q/k/v biases live in its linears). `Decoder.of` returns None for anything else --
another `model_type`, a layer with other parts, a model spread over devices by accelerate's hooks
-- and the engine then calls the model itself (transformers' forward with the same paged attention).
tests/unit/test_decoder.py checks that both give the same logits, bit for bit, for each family.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from serve.engine.paged import Layout, paged_attention

FAMILIES = frozenset({"llama", "mistral", "qwen2"})  # model_types whose decoder layer is the loop above
LAYER_PARTS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
               "mlp.up_proj", "mlp.down_proj", "mlp.act_fn", "input_layernorm", "post_attention_layernorm")


@dataclass(frozen=True)
class _Layer:
    """One decoder layer's parts, looked up once."""

    index: int
    attn: torch.nn.Module  # paged_attention reads its `layer_idx`
    q: torch.nn.Module
    k: torch.nn.Module
    v: torch.nn.Module
    o: torch.nn.Module
    gate: torch.nn.Module
    up: torch.nn.Module
    down: torch.nn.Module
    act: torch.nn.Module
    norm_in: torch.nn.Module
    norm_post: torch.nn.Module
    head_dim: int
    scaling: float
    window: int | None


def _rms_norm(norm: Any, x: torch.Tensor) -> torch.Tensor:
    """transformers' RMSNorm to the bit: normalized in fp32, rounded to x's dtype, then scaled.
    (One fused `F.rms_norm` in bf16 rounds once, which is closer to exact but flips near-tied greedy
    choices against every other transformers-based server, for 5 us a norm.)"""
    return norm.weight * F.rms_norm(x.float(), norm.weight.shape, None, norm.variance_epsilon).to(x.dtype)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary embedding of [N, H, D] states (transformers' `apply_rotary_pos_emb`, halves layout)."""
    half = x.shape[-1] // 2
    return x * cos + torch.cat((-x[..., half:], x[..., :half]), dim=-1) * sin


class Decoder:
    """Llama-shaped forward over the paged KV cache: `decoder(input_ids, layout, keep)` -> logits."""

    def __init__(self, model: Any):
        body = model.model
        self.embed, self.norm, self.rotary, self.head = body.embed_tokens, body.norm, body.rotary_emb, model.lm_head
        config = model.config
        self.layers = [self._layer(i, layer, config) for i, layer in enumerate(body.layers)]

    @staticmethod
    def _layer(index: int, layer: Any, config: Any) -> _Layer:
        attn, mlp = layer.self_attn, layer.mlp
        # Qwen2 keeps each layer's window on its attention (None for full-attention layers); Mistral on its config
        window = attn.sliding_window if hasattr(attn, "sliding_window") else getattr(config, "sliding_window", None)
        return _Layer(index, attn, attn.q_proj, attn.k_proj, attn.v_proj, attn.o_proj, mlp.gate_proj, mlp.up_proj,
                      mlp.down_proj, mlp.act_fn, layer.input_layernorm, layer.post_attention_layernorm,
                      attn.head_dim, attn.scaling, window)

    @classmethod
    def of(cls, model: Any) -> Decoder | None:
        """The decoder for `model`, or None when this forward would not compute what the model's own does."""
        config = getattr(model, "config", None)
        if getattr(config, "model_type", None) not in FAMILIES or not isinstance(model, torch.nn.Module):
            return None
        body: Any = getattr(model, "model", None)
        if not all(hasattr(body, part) for part in ("embed_tokens", "layers", "norm", "rotary_emb")):
            return None
        if not hasattr(model, "lm_head") or any(hasattr(m, "_hf_hook") for m in model.modules()):
            return None  # accelerate moves tensors between devices in hooks this loop does not run
        for layer in body.layers:
            if not all(_has(layer, part) for part in LAYER_PARTS):
                return None
            if not all(hasattr(norm, "variance_epsilon") for norm in (layer.input_layernorm,
                                                                       layer.post_attention_layernorm)):
                return None
        return cls(model)

    def __call__(self, input_ids: torch.Tensor, layout: Layout, keep: torch.Tensor | None = None) -> torch.Tensor:
        """Logits [N, V] of the packed tokens `input_ids` [1, N] (only the `keep` [R] ones: [R, V]),
        writing each layer's keys and values into the layout's slots. Run under inference mode."""
        h = self.embed(input_ids[0])  # [N, hidden]
        tokens = h.shape[0]
        positions = layout.positions.to(h.device)
        cos, sin = self.rotary(h, positions)  # [1, N, D] each
        cos, sin = cos[0, :, None, :], sin[0, :, None, :]  # broadcast over heads
        slots = layout.slots.to(h.device)
        for layer in self.layers:
            x = _rms_norm(layer.norm_in, h)
            q = _rotate(layer.q(x).view(tokens, -1, layer.head_dim), cos, sin)
            k = _rotate(layer.k(x).view(tokens, -1, layer.head_dim), cos, sin)
            v = layer.v(x).view(tokens, -1, layer.head_dim)
            layout.pool.write(layer.index, slots, torch.stack([k, v]).transpose(1, 2))  # [2, H, N, D]
            out, _ = paged_attention(layer.attn, q.transpose(0, 1)[None], k.transpose(0, 1)[None],
                                     v.transpose(0, 1)[None], None, scaling=layer.scaling, paged_kv=layout,
                                     sliding_window=layer.window)
            h = h + layer.o(out.reshape(tokens, -1))
            x = _rms_norm(layer.norm_post, h)
            h = h + layer.down(layer.act(layer.gate(x)) * layer.up(x))
        if keep is not None:
            h = h.index_select(0, keep.to(h.device))
        return self.head(_rms_norm(self.norm, h))


def _has(module: torch.nn.Module, path: str) -> bool:
    for name in path.split("."):
        if not hasattr(module, name):
            return False
        module = getattr(module, name)
    return True
