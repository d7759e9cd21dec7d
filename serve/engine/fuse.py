"""Linear layers that read the same input, fused into one matmul: q/k/v, and an MLP's gate and up.

A decoder layer runs seven projections; three read the attention's input and two the MLP's. One
matmul over the concatenated weights computes the same outputs side by side, so a layer makes four
kernel calls instead of seven (vLLM's QKVParallelLinear and MergedColumnParallelLinear do the
same). That matters where a call's fixed cost is a large share of its time: small batches on a CPU,
kernel launches on a GPU (SmolLM2 on 2 CPU cores: 9-15% of a decode step in bf16, fp32 and int4,
bench/results/fuse_ab_xeon.txt).

Each output channel of a fused layer is computed by the same kernel from the same bytes as in its
part: the same bits with oneDNN's packed matmuls, int8 and int4; plain fp32 through MKL may sum in
another order for another width, a few ulps (tests/unit/test_fuse.py). No weight is kept twice: the
fused layer owns the concatenated tensors and each part reads its rows back as views, so the
model's own forward (transformers') still runs on the parts. oneDNN's packed copies cannot be
viewed: the fused layer packs the concatenated weight and the parts give theirs up (they multiply
their plain rows if called). int4's scales cannot be viewed either and are kept twice (1/4 of the
packed weight's bytes). Layers of a kind this does not know -- a quantizer's tensor subclass,
parts of different kinds -- are called one after another (`SideBySide`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch


class SideBySide(torch.nn.Module):
    """Layers that could not be fused, called one by one on the same input; outputs concatenated."""

    def __init__(self, parts: Sequence[torch.nn.Module]):
        super().__init__()
        self.parts = list(parts)  # not submodules: they stay registered where the model has them

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([part(x) for part in self.parts], dim=-1)


def fuse(parts: Sequence[torch.nn.Module]) -> torch.nn.Module:
    """One module computing `parts` (which read the same input) side by side: a fused layer where
    their kind supports it (a plain `nn.Linear`, or a layer class with a `fuse` classmethod), else
    a `SideBySide` of them."""
    kind = type(parts[0])
    fused = None
    if _alike(parts):
        if kind is torch.nn.Linear:
            fused = _fuse_linear(parts)
        elif callable(fuse_parts := getattr(kind, "fuse", None)):
            fused = fuse_parts(parts)
    return fused if fused is not None else SideBySide(parts)


def _alike(parts: Sequence[torch.nn.Module]) -> bool:
    """One class, one input width, and a bias on all of them or on none."""
    biased = {getattr(part, "bias", None) is not None for part in parts}
    return len({(type(part), getattr(part, "in_features", None)) for part in parts}) == 1 and len(biased) == 1


def _fuse_linear(parts: Sequence[Any]) -> torch.nn.Module | None:
    weights = [part.weight for part in parts]
    if len({(w.dtype, w.device) for w in weights}) > 1 or any(type(w.data) is not torch.Tensor for w in weights):
        return None  # a quantizer's tensor subclass holds more than rows of numbers
    return fused_like(parts, {"weight": 0})


def fused_like(parts: Sequence[Any], dims: dict[str, int]) -> Any:
    """A layer of the parts' class (made without its constructor: nothing is computed from a float
    weight) whose widths are theirs together and whose tensors are theirs concatenated
    (`concat_channels`); the class's `fuse` adds what else it needs."""
    kind: Any = type(parts[0])
    fused = kind.__new__(kind)
    torch.nn.Module.__init__(fused)
    fused.in_features, fused.out_features = parts[0].in_features, sum(part.out_features for part in parts)
    fused.bias = None
    concat_channels(parts, fused, dims)
    return fused


def concat_channels(parts: Sequence[Any], fused: torch.nn.Module, dims: dict[str, int]) -> None:
    """Give `fused` each tensor `name` of the parts, concatenated along `dims[name]` (the dim of their
    output channels), and their biases if they have them; the parts then read those held on dim 0
    as views of it (rows: contiguous)."""
    if parts[0].bias is not None:
        dims = {**dims, "bias": 0}
    for name, dim in dims.items():
        tensors = [getattr(part, name) for part in parts]
        whole = torch.cat([t.detach() for t in tensors], dim)
        is_parameter = isinstance(tensors[0], torch.nn.Parameter)
        if is_parameter:
            setattr(fused, name, torch.nn.Parameter(whole, requires_grad=False))
        else:
            fused.register_buffer(name, whole)
        if dim != 0:
            continue  # the part keeps its own (a column slice is not contiguous)
        start = 0
        for part, tensor in zip(parts, tensors, strict=True):
            rows = whole[start : start + tensor.shape[0]]
            setattr(part, name, torch.nn.Parameter(rows, requires_grad=False) if is_parameter else rows)
            start += tensor.shape[0]
