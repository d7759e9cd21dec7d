"""Quantized weights: TGI's `QUANTIZE` names on GPU, int8 and int4 weight-only on CPU.

What each name does (README, "Quantized weights"):

- A checkpoint quantized ahead of time (AWQ, GPTQ, compressed-tensors, fp8: its config.json's
  `quantization_config`) loads as it is, with or without `QUANTIZE`; `QUANTIZE=awq` (or gptq, ...)
  only checks that the checkpoint really is one, so a wrong model fails at start-up, not later.
- `bitsandbytes`, `bitsandbytes-nf4`, `bitsandbytes-fp4`, `eetq` and `fp8` quantize a float
  checkpoint while it loads, through transformers' quantizers; they need a CUDA GPU.
- `int8` and `int4` quantize a float checkpoint's linear layers after it loads, weight-only, for the
  CPU: int8 per output channel, run by PyTorch's `_weight_int8pack_mm` kernel; int4 in groups of 32
  along the input, packed by torchao's `Int4OpaqueTensor` for `_weight_int4pack_mm_for_cpu`. A decode
  step at one stream reads its weights once, so fewer bytes per weight is what makes it faster. Both
  kernels are fast only with bf16 activations, so these two always compute in bf16.

A combination that cannot run (a GPU scheme on the CPU, int8 on a GPU, `QUANTIZE=awq` on a float
checkpoint) raises `QuantizeError` before the weights load. The KV budget is sized from the memory
left once the weights are in place (serve/model_loading.py trims the heap after quantizing), so
smaller weights leave more of it to the cache.
"""

from __future__ import annotations

import abc
import importlib.util
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from serve.engine.fuse import fused_like

# QUANTIZE=name -> the `quant_method`s of a checkpoint's quantization_config that it accepts.
PREQUANTIZED = {
    "awq": {"awq"},
    "gptq": {"gptq"},
    "marlin": {"gptq", "awq"},  # TGI's Marlin kernels run GPTQ/AWQ checkpoints; transformers picks its own kernel
    "compressed-tensors": {"compressed-tensors"},
    "fp8": {"fp8", "fbgemm_fp8", "compressed-tensors"},
}
ON_THE_FLY_GPU = ("bitsandbytes", "bitsandbytes-nf4", "bitsandbytes-fp4", "eetq", "fp8")
# The package each on-the-fly scheme's kernels come from (fp8's come with CUDA torch's triton).
GPU_PACKAGES = {"bitsandbytes": "bitsandbytes", "bitsandbytes-nf4": "bitsandbytes", "bitsandbytes-fp4": "bitsandbytes",
                "eetq": "eetq"}
CPU_WEIGHT_ONLY = ("int8", "int4")
UNSUPPORTED = {"exl2": "transformers has no EXL2 loader; serve a GPTQ or AWQ build of the model instead"}
INT4_GROUP = 32  # int4 scales per 32 input features: the finest group torchao's CPU kernel takes (best quality)


class QuantizeError(ValueError):
    """QUANTIZE asks for something this model, device or build cannot do; the message says what instead."""


@dataclass
class QuantizePlan:
    """How to load the weights: extra `from_pretrained` arguments, then a transform of the loaded model."""

    name: str | None
    load_kwargs: dict[str, Any] = field(default_factory=dict)
    transform: Callable[[torch.nn.Module], int] | None = None
    description: str = "weights as the checkpoint stores them"


def checkpoint_method(config: Any) -> str | None:
    """The checkpoint's own `quantization_config.quant_method` (None for a float checkpoint)."""
    qc = getattr(config, "quantization_config", None)
    if qc is None:
        return None
    method = qc.get("quant_method") if isinstance(qc, dict) else getattr(qc, "quant_method", None)
    return str(getattr(method, "value", method)).lower() if method is not None else None


def plan(name: str | None, method: str | None, on_gpu: bool, dtype: torch.dtype, gguf: bool = False) -> QuantizePlan:
    """What QUANTIZE=`name` means for a checkpoint quantized with `method` (None: float) on this device.

    A GGUF file (`gguf`) is always unpacked to float weights while it loads (transformers' GGUF
    kernels come from the Hub at run time, which a server must not depend on), then treated as a
    float checkpoint; transformers cannot combine it with a quantizer of its own.
    """
    chosen = _plan(name, method, on_gpu, dtype)
    if gguf:
        if "quantization_config" in chosen.load_kwargs:
            raise QuantizeError(f"QUANTIZE={name} cannot quantize a GGUF file while it loads (transformers "
                                f"refuses to combine the two): serve the model's safetensors checkpoint instead")
        import transformers

        chosen.load_kwargs["quantization_config"] = transformers.GgufConfig(dequantize=True)
    return chosen


def _plan(name: str | None, method: str | None, on_gpu: bool, dtype: torch.dtype) -> QuantizePlan:
    if method is not None:
        if name is not None and method not in PREQUANTIZED.get(name, set()):
            raise QuantizeError(
                f"QUANTIZE={name}, but the checkpoint is already quantized with {method}: unset QUANTIZE "
                f"(a pre-quantized checkpoint loads as it is) or set QUANTIZE to match it"
            )
        return QuantizePlan(name, description=f"pre-quantized checkpoint ({method}), loaded as it is")
    if name is None:
        return QuantizePlan(None)
    if name in UNSUPPORTED:
        raise QuantizeError(f"QUANTIZE={name} is not supported: {UNSUPPORTED[name]}")
    if name in PREQUANTIZED and name not in ON_THE_FLY_GPU:
        raise QuantizeError(
            f"QUANTIZE={name} needs a checkpoint quantized with {name} (a quantization_config in its "
            f"config.json); this one holds float weights. Unset QUANTIZE, or quantize on the fly: "
            f"{'bitsandbytes, eetq or fp8 on a GPU' if on_gpu else 'int8 or int4 on the CPU'}"
        )
    if name in ON_THE_FLY_GPU:
        if not on_gpu:
            raise QuantizeError(f"QUANTIZE={name} needs a CUDA GPU; on the CPU use QUANTIZE=int8 or int4")
        package = GPU_PACKAGES.get(name)
        if package and importlib.util.find_spec(package) is None:
            raise QuantizeError(f"QUANTIZE={name} needs the {package} package, which this image does not hold "
                                f"(the GPU image holds bitsandbytes)")
        return QuantizePlan(name, {"quantization_config": _gpu_config(name, dtype)}, None,
                            f"{name}, quantized by transformers while loading")
    if name in CPU_WEIGHT_ONLY:
        if on_gpu:
            raise QuantizeError(
                f"QUANTIZE={name} is the CPU's weight-only scheme; on a GPU use bitsandbytes, eetq or fp8"
            )
        if dtype != torch.bfloat16:  # their kernels' fp32 paths are 7-66x slower than the bf16 ones
            raise QuantizeError(f"QUANTIZE={name} computes in bfloat16: unset DTYPE (or set it to bfloat16)")
        if name == "int8":
            return QuantizePlan(name, transform=quantize_int8, description="int8 weight-only, per output channel")
        return QuantizePlan(name, transform=quantize_int4, description=f"int4 weight-only, groups of {INT4_GROUP}")
    raise QuantizeError(f"unknown QUANTIZE={name!r}")


def _gpu_config(name: str, dtype: torch.dtype) -> Any:
    """transformers' quantization config for an on-the-fly GPU scheme."""
    import transformers

    if name == "bitsandbytes":
        return transformers.BitsAndBytesConfig(load_in_8bit=True)
    if name.startswith("bitsandbytes-"):
        return transformers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=name.split("-")[1],
                                               bnb_4bit_compute_dtype=dtype)
    if name == "eetq":
        return transformers.EetqConfig("int8")
    return transformers.FineGrainedFP8Config()  # fp8 weights in blocks, on GPUs with fp8 (compute capability 8.9+)


class WeightOnlyLinear(torch.nn.Module, abc.ABC):
    """A linear layer whose weight is kept quantized and multiplied by one PyTorch CPU kernel (inference only).

    A plain module calling the kernel, rather than a tensor subclass standing in for the weight: a
    subclass's `__torch_function__` dispatch costs ~20 us per matmul in Python, as much as half the
    kernel's own time at one stream (~210 matmuls per decode step). The float weight is not kept (a
    tied embedding keeps its own).
    """

    # The buffers that hold one entry per output channel, and on which dim: a fused layer concatenates them
    CHANNEL_DIMS: dict[str, int] = {}
    bias: torch.Tensor | None

    def __init__(self, linear: torch.nn.Linear):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.bias = linear.bias

    @abc.abstractmethod
    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        """[M, in_features] -> [M, out_features], in x's dtype."""

    @classmethod
    def fuse(cls, parts: Sequence[WeightOnlyLinear]) -> WeightOnlyLinear | None:
        """One layer whose output is the `parts`' outputs side by side (same input, same kind), bit for
        bit, or None (serve/engine/fuse.py calls it on parts of one kind, read from one input)."""
        return fused_like(parts, cls.CHANNEL_DIMS)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.matmul(x.reshape(-1, self.in_features).contiguous())
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*x.shape[:-1], self.out_features)


class Int8Linear(WeightOnlyLinear):
    """int8 weights, one scale per output channel (symmetric): `_weight_int8pack_mm`."""

    CHANNEL_DIMS = {"qweight": 0, "scales": 0}
    qweight: torch.Tensor
    scales: torch.Tensor

    def __init__(self, linear: torch.nn.Linear):
        super().__init__(linear)
        from torchao.quantization import PerRow
        from torchao.quantization.quantize_.workflows.int8.int8_tensor import Int8Tensor

        w = linear.weight.detach()
        q = Int8Tensor.from_hp(w.float(), PerRow())
        self.register_buffer("qweight", q.qdata.contiguous())
        self.register_buffer("scales", q.scale.reshape(-1).to(w.dtype))

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.aten._weight_int8pack_mm(x, self.qweight, self.scales)  # scales: x's dtype

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int8 weight-only"


class Int4Linear(WeightOnlyLinear):
    """int4 weights with a scale and zero point per group of INT4_GROUP inputs (asymmetric):
    `_weight_int4pack_mm_for_cpu`, on the weight packed once by torchao's `Int4OpaqueTensor`."""

    # The packed weight keeps its output channels in blocks of rows (64 on AVX-512); the scales and
    # zero points are [groups, N, 2], which a part cannot read as a view (the kernel ignores strides).
    CHANNEL_DIMS = {"qweight": 0, "scale_and_zero": 1}
    qweight: torch.Tensor
    scale_and_zero: torch.Tensor

    def __init__(self, linear: torch.nn.Linear):
        super().__init__(linear)
        from torchao.prototype.quantization.int4.int4_opaque_tensor import Int4OpaqueTensor

        q = Int4OpaqueTensor.from_hp(linear.weight.detach(), [1, INT4_GROUP])
        self.register_buffer("qweight", q.qdata)
        self.register_buffer("scale_and_zero", q.scale_and_zero)

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.ops.aten._weight_int4pack_mm_for_cpu(x, self.qweight, INT4_GROUP, self.scale_and_zero)
        return y[:, : self.out_features] if y.shape[1] != self.out_features else y  # the kernel pads N

    @classmethod
    def fuse(cls, parts: Sequence[WeightOnlyLinear]) -> WeightOnlyLinear | None:
        """As for any weight-only layer, where the parts' packed rows line up with the kernel's blocks
        (the layout is the kernel's own, so this is checked on one input rather than assumed)."""
        int4 = [p for p in parts if isinstance(p, Int4Linear)]
        if len(int4) < len(parts) or any(p.qweight.shape[0] != p.out_features for p in int4):
            return None  # padded rows
        probe = torch.randn(1, int4[0].in_features, generator=torch.Generator().manual_seed(0))
        x = probe.to(int4[0].scale_and_zero.dtype)
        with torch.no_grad():
            want = torch.cat([p(x) for p in parts], dim=-1)
            fused = super().fuse(parts)  # the parts' rows are now views of its weight: the same bytes
            return fused if fused is not None and torch.equal(fused(x), want) else None

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int4 weight-only, groups of {INT4_GROUP}"


def _cpu_linears(model: torch.nn.Module) -> list[tuple[torch.nn.Module, str, torch.nn.Linear]]:
    return [(parent, name, child) for parent in model.modules() for name, child in parent.named_children()
            if type(child) is torch.nn.Linear and child.weight.device.type == "cpu"]


def _swap(model: torch.nn.Module, kind: type[WeightOnlyLinear], group: int = 1) -> int:
    """Swap every CPU `nn.Linear` of `model` whose width divides into `group`s for a `kind`; how many were."""
    found = [(parent, name, child) for parent, name, child in _cpu_linears(model) if child.in_features % group == 0]
    for parent, name, child in found:
        setattr(parent, name, kind(child))
    return len(found)


def quantize_int8(model: torch.nn.Module) -> int:
    """Swap every CPU `nn.Linear` of `model` for an Int8Linear; returns how many were swapped."""
    return _swap(model, Int8Linear)


def quantize_int4(model: torch.nn.Module) -> int:
    """Swap every CPU `nn.Linear` whose width divides into groups of INT4_GROUP for an Int4Linear."""
    return _swap(model, Int4Linear, INT4_GROUP)


def is_quantized(linear: torch.nn.Module) -> bool:
    """Whether a linear layer's weight is quantized (ours, or a tensor subclass of some quantizer's): never packed for oneDNN."""
    weight = getattr(linear, "weight", None)
    return isinstance(linear, WeightOnlyLinear) or (weight is not None and type(weight.data) is not torch.Tensor)
