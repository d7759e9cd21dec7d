"""On CPU, run the model's linear layers through oneDNN on weights reordered once at load time.

`torch.nn.functional.linear` on CPU re-reads a plain row-major weight for every call. oneDNN can
keep the weight in its own blocked layout (`torch.ops.mkldnn._reorder_linear_weight`, the kernel
that torch.compile's CPU "freezing" path and Intel's extension use), which roughly halves the time
of the small-batch matmuls a decode step is made of; the math is the same fp32 or bf16 matmul.
Measured on the 2-core machine at 16 rows: 576x1536 projections 1.7x faster, the 49152-wide
`lm_head` 3x faster (see the README's benchmark section).

The packed copy costs as much memory as the weights it packs (a tied `lm_head` keeps sharing its
weight with the embedding, which still needs the plain one), so packing is skipped when it would not
fit comfortably, and `CPU_PACKED_LINEAR=false` turns it off.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import torch

from serve.engine.config import available_ram_bytes
from serve.engine.fuse import fused_like
from serve.quantize import is_quantized

log = logging.getLogger(__name__)

PACKABLE_DTYPES = (torch.float32, torch.bfloat16)
MEMORY_SHARE = 0.5  # pack only when the copies take at most this share of the free RAM


class PackedLinear(torch.nn.Module):
    """An `nn.Linear` whose matmul runs on a oneDNN-packed copy of its weight (inference only)."""

    bias: torch.Tensor | None

    def __init__(self, linear: torch.nn.Linear):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight = linear.weight  # the same Parameter: tying, state_dict and `.weight` readers still work
        self.bias = linear.bias
        self.packed: torch.Tensor | None = None
        self.repack()

    def repack(self) -> None:
        """(Re)build the packed copy from the plain weight: at load time, for a fused layer, and for a
        part that gave its copy to one when something should run it packed again (benchmarks)."""
        self.packed = torch.ops.mkldnn._reorder_linear_weight(self.weight.detach())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.packed is None:  # its packed rows went to a fused layer, which the engine calls instead
            return torch.nn.functional.linear(x, self.weight, self.bias)
        return torch.ops.mkldnn._linear_pointwise(x, self.packed, self.bias, "none", [], "")

    @classmethod
    def fuse(cls, parts: Sequence[PackedLinear]) -> PackedLinear:
        """One packed layer computing `parts` side by side (serve/engine/fuse.py). A packed copy cannot
        be shared as a view, so the parts give theirs up and keep only their plain weights (views of
        the fused layer's): the same memory as before; transformers' forward, which the engine no
        longer calls, then multiplies them unpacked."""
        fused: PackedLinear = fused_like(parts, {"weight": 0})
        fused.repack()
        for part in parts:
            part.packed = None
        return fused

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


def _free_ram() -> int:
    return available_ram_bytes()  # MemAvailable: free pages alone skipped packing whenever the page cache was full


def can_pack(dtype: torch.dtype) -> bool:
    """Whether this CPU's oneDNN packs weights of `dtype` (bf16 needs AVX512-BW/VL/DQ or AVX-NE-CONVERT)."""
    if dtype not in PACKABLE_DTYPES:
        return False
    try:
        torch.ops.mkldnn._reorder_linear_weight(torch.zeros(8, 8, dtype=dtype))
    except RuntimeError as exc:  # e.g. an AVX2-only CPU asked for bf16
        log.info("oneDNN cannot pack %s weights on this CPU: %s", dtype, exc)
        return False
    return True


def _candidates(model: torch.nn.Module) -> list[tuple[torch.nn.Module, str, torch.nn.Linear]]:
    found = []
    packable: dict[torch.dtype, bool] = {}
    for parent in model.modules():
        for name, child in parent.named_children():
            if type(child) is not torch.nn.Linear or child.weight.device.type != "cpu" or hasattr(child, "_hf_hook"):
                continue
            if is_quantized(child):  # QUANTIZE=int4: the weight is torchao's, its kernel is not oneDNN's
                continue
            dtype = child.weight.dtype
            if dtype not in packable:
                packable[dtype] = can_pack(dtype)
            if packable[dtype]:
                found.append((parent, name, child))
    return found


def pack_linear_layers(model: torch.nn.Module) -> int:
    """Swap every plain CPU `nn.Linear` of `model` for a PackedLinear; returns how many were swapped."""
    if not torch.backends.mkldnn.is_available() or not hasattr(torch.ops.mkldnn, "_linear_pointwise"):
        log.info("oneDNN is not available in this torch build: linear layers stay as they are")
        return 0
    found = _candidates(model)
    need = sum(child.weight.numel() * child.weight.element_size() for _, _, child in found)
    if need > MEMORY_SHARE * _free_ram():
        log.warning("not packing linear weights for oneDNN: %d MB of copies would not fit", need >> 20)
        return 0
    for parent, name, child in found:
        setattr(parent, name, PackedLinear(child))
    log.info("packed %d linear layers for oneDNN (%d MB)", len(found), need >> 20)
    return len(found)
