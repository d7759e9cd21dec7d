"""Fused projections (serve/engine/fuse.py): the same bits as the parts, and no weight kept twice."""

from __future__ import annotations

import pytest
import torch

from serve.cpu_linear import PackedLinear, can_pack
from serve.engine.decoder import Decoder
from serve.engine.fuse import SideBySide, fuse
from serve.quantize import Int4Linear, Int8Linear
from tests.unit.conftest import tiny_llama

IN = 128


def linears(outs: tuple[int, ...], bias: bool = False, dtype: torch.dtype = torch.float32) -> list[torch.nn.Linear]:
    torch.manual_seed(5)
    return [torch.nn.Linear(IN, n, bias=bias, dtype=dtype) for n in outs]


def storages(modules) -> dict[int, int]:
    """Bytes of every distinct storage behind the modules' parameters and buffers."""
    seen = {}
    for module in modules:
        for t in [*module.parameters(), *module.buffers()]:
            seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
    return seen


class Subclass(torch.Tensor):
    """What a quantizer's weight looks like from outside: a tensor of another class."""


def same(got: torch.Tensor, want: torch.Tensor, kind: str) -> None:
    """Bit for bit, except plain fp32, whose matmul (MKL's sgemm) may split a sum differently for
    another output width: there to the last bits."""
    if kind.startswith("fp32"):
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    else:
        assert torch.equal(got, want)


KINDS = {
    "fp32": lambda outs: linears(outs),
    "fp32 with biases": lambda outs: linears(outs, bias=True),
    "bf16": lambda outs: linears(outs, dtype=torch.bfloat16),
    "int8": lambda outs: [Int8Linear(x) for x in linears(outs, dtype=torch.bfloat16)],
    "int4": lambda outs: [Int4Linear(x) for x in linears(outs, dtype=torch.bfloat16)],
}


@pytest.mark.parametrize("kind", list(KINDS))
def test_a_fused_layer_computes_its_parts_to_the_bit_and_shares_their_weights(kind):
    parts = KINDS[kind]((192, 64, 64))  # q, k and v of 3 query heads and 1 key/value head of 64
    x = torch.randn(5, IN, dtype=torch.float32 if kind.startswith("fp32") else torch.bfloat16)
    with torch.no_grad():
        before = [p(x) for p in parts]
        bytes_before = sum(storages(parts).values())
        fused = fuse(parts)
        assert not isinstance(fused, SideBySide)
        same(fused(x), torch.cat(before, dim=-1), kind)
        same(fused(x[:1]), torch.cat([p(x[:1]) for p in parts], dim=-1), kind)  # one row: another kernel path
        assert all(torch.equal(p(x), b) for p, b in zip(parts, before, strict=True))  # the parts still compute
    bytes_after = sum(storages([*parts, fused]).values())
    if kind == "int4":  # scales and zero points are [groups, N, 2]: a part cannot read its columns as a view
        scales = sum(p.scale_and_zero.nbytes for p in parts)
        assert bytes_after == bytes_before + scales
    else:
        assert bytes_after == bytes_before  # every part reads its rows out of the fused tensors


def test_layers_that_cannot_be_fused_run_side_by_side():
    x = torch.randn(3, IN, dtype=torch.bfloat16)
    cases = {
        "int4 rows that split the kernel's blocks": [Int4Linear(x) for x in linears((16, 48), dtype=torch.bfloat16)],
        "biased and not": [*linears((32,), bias=True, dtype=torch.bfloat16), *linears((32,), dtype=torch.bfloat16)],
        "two kinds": [Int8Linear(linears((32,), dtype=torch.bfloat16)[0]), *linears((32,), dtype=torch.bfloat16)],
        "a quantizer's tensor subclass": linears((32, 32), dtype=torch.bfloat16),
    }
    for part in cases["a quantizer's tensor subclass"]:
        part.weight = torch.nn.Parameter(part.weight.detach().as_subclass(Subclass), requires_grad=False)
    for what, parts in cases.items():
        with torch.no_grad():
            want = torch.cat([p(x) for p in parts], dim=-1)
            fused = fuse(parts)
            assert isinstance(fused, SideBySide), what
            assert torch.equal(fused(x), want), what


@pytest.mark.skipif(not can_pack(torch.bfloat16), reason="this CPU's oneDNN does not pack bf16")
def test_packed_layers_fuse_into_one_packed_copy():
    parts = [PackedLinear(x) for x in linears((192, 64, 64), dtype=torch.bfloat16)]
    x = torch.randn(4, IN, dtype=torch.bfloat16)
    with torch.no_grad():
        before = [p(x) for p in parts]
        fused = fuse(parts)
        assert type(fused) is PackedLinear and fused.packed is not None
        assert torch.equal(fused(x), torch.cat(before, dim=-1))
        # the parts gave their packed copies up (no second copy of these weights) and still compute, unpacked
        assert all(p.packed is None for p in parts)
        for p, b in zip(parts, before, strict=True):
            assert torch.allclose(p(x), b, rtol=0.02, atol=0.02)
            assert p.weight.untyped_storage().data_ptr() == fused.weight.untyped_storage().data_ptr()


def test_the_decoder_fuses_each_layer_without_growing_the_model(tokenizer):
    model = tiny_llama(len(tokenizer), seed=14)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    before = sum(storages([model]).values())
    decoder = Decoder.of(model)
    assert decoder is not None
    for layer in decoder.layers:
        assert type(layer.qkv) is torch.nn.Linear and layer.qkv.out_features == (4 + 2 * 2) * 16
        assert type(layer.gate_up) is torch.nn.Linear and layer.gate_up.out_features == 2 * 128
    after = sum(storages([model, *(m for layer in decoder.layers for m in (layer.qkv, layer.gate_up))]).values())
    assert after == before
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())  # what the model's forward reads
