"""The engine's own forward for decoders built like Llama's (Llama, Mistral, Qwen2 and their fine-tunes).

transformers' forward serves every use of a model (training, `generate`, any cache, any mask), and
walks that generality on every call: keyword plumbing, output records, a mask builder, hooks and
~400 module calls per decode step. At one stream on the CPU that Python costs as much as the
matmuls of a small model (SmolLM2-135M: 5-9 ms a step, `bench/forward_ab.py`). This forward runs the
same modules -- the same `nn.Linear`s whatever holds their weights (plain, oneDNN-packed, int8,
int4 or a quantizer's), the same rotary embedding, the engine's paged attention -- in one flat
loop, per layer:

    x = rms_norm(h);  q, k, v = x [Wq Wk Wv];  rotate q and k;  write k, v to the pool
    h = h + attention(q, pool) Wo
    x = rms_norm(h);  gate, up = x [Wgate Wup];  h = h + (act(gate) * up) Wdown

then the final norm and `lm_head`, on the rows whose logits are wanted only. That is the whole
computation of these families' decoder layers (Mistral and Qwen2 add a sliding window, read per
layer; Qwen2's q/k/v biases live in its linears). The projections that read one input run as one
matmul over their weights side by side (fuse.py): four matmuls a layer instead of seven. `Decoder.of`
returns None for anything else --
another `model_type`, a layer with other parts, a model spread over devices by accelerate's hooks
-- and the engine then calls the model itself (transformers' forward with the same paged attention).
tests/unit/test_decoder.py checks that both give the same logits for each family: bit for bit in
bf16, within a few ulps in fp32 (where MKL may sum a fused matmul's products in another order).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from serve.engine.fuse import fuse
from serve.engine.paged import Layout, paged_attention

FAMILIES = frozenset({"llama", "mistral", "qwen2"})  # model_types whose decoder layer is the loop above
LAYER_PARTS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
               "mlp.up_proj", "mlp.down_proj", "mlp.act_fn", "input_layernorm", "post_attention_layernorm")


@dataclass(frozen=True)
class _Layer:
    """One decoder layer's parts, looked up once."""

    index: int
    attn: torch.nn.Module  # paged_attention reads its `layer_idx`
    qkv: torch.nn.Module  # q, k and v side by side: [N, hidden] -> [N, (heads + 2 * kv_heads) * head_dim]
    o: torch.nn.Module
    gate_up: torch.nn.Module  # gate and up side by side
    down: torch.nn.Module
    act: torch.nn.Module
    norm_in: torch.nn.Module
    norm_post: torch.nn.Module
    heads: int
    kv_heads: int
    head_dim: int
    scaling: float
    window: int | None


def _rms_norm(norm: Any, x: torch.Tensor) -> torch.Tensor:
    """transformers' RMSNorm to the bit: normalized in fp32, rounded to x's dtype, then scaled.
    (One fused `F.rms_norm` in bf16 rounds once, which is closer to exact but flips near-tied greedy
    choices against every other transformers-based server, for 5 us a norm.)"""
    return norm.weight * F.rms_norm(x.float(), norm.weight.shape, None, norm.variance_epsilon).to(x.dtype)


def _rotate(x: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor) -> torch.Tensor:
    """Rotary embedding of [N, H, D] states (transformers' `apply_rotary_pos_emb`, halves layout).

    transformers multiplies `cat(-x2, x1)` by sin; `roll` gives `cat(x2, x1)` in one operation and
    the sign moves onto sin's first half (`_signed`): the same products, to the bit, in 4 calls
    instead of 7."""
    return x * cos + x.roll(x.shape[-1] // 2, dims=-1) * signed_sin


def _signed(sin: torch.Tensor) -> torch.Tensor:
    half = sin.shape[-1] // 2
    return torch.cat((-sin[..., :half], sin[..., half:]), dim=-1)


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
        heads = config.num_attention_heads
        kv_heads = getattr(config, "num_key_value_heads", None) or heads
        return _Layer(index, attn, fuse([attn.q_proj, attn.k_proj, attn.v_proj]), attn.o_proj,
                      fuse([mlp.gate_proj, mlp.up_proj]), mlp.down_proj, mlp.act_fn, layer.input_layernorm,
                      layer.post_attention_layernorm, heads, kv_heads, attn.head_dim, attn.scaling, window)

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
        cos, sin = cos[0, :, None, :], _signed(sin[0, :, None, :])  # broadcast over heads
        slots = layout.slots.to(h.device)
        for layer in self.layers:
            x = _rms_norm(layer.norm_in, h)
            states = layer.qkv(x).view(tokens, -1, layer.head_dim)  # [N, heads + 2 * kv_heads, D]
            rotated = layer.heads + layer.kv_heads
            qk = _rotate(states[:, :rotated], cos, sin)  # q and k heads at once
            q, k, v = qk[:, : layer.heads], qk[:, layer.heads :], states[:, rotated:]
            layout.pool.write(layer.index, slots, torch.stack([k, v]).transpose(1, 2))  # [2, H, N, D]
            out, _ = paged_attention(layer.attn, q.transpose(0, 1)[None], k.transpose(0, 1)[None],
                                     v.transpose(0, 1)[None], None, scaling=layer.scaling, paged_kv=layout,
                                     sliding_window=layer.window)
            h = h + layer.o(out.reshape(tokens, -1))
            x = _rms_norm(layer.norm_post, h)
            gate, up = layer.gate_up(x).chunk(2, dim=-1)
            h = h + layer.down(layer.act(gate) * up)
        if keep is not None:
            h = h.index_select(0, keep.to(h.device))
        return self.head(_rms_norm(self.norm, h))


def _has(module: torch.nn.Module, path: str) -> bool:
    for name in path.split("."):
        if not hasattr(module, name):
            return False
        module = getattr(module, name)
    return True
