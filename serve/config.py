"""Every setting of the container, read once from the environment (README, "Configuration").

Nothing else in the package reads `os.environ`: the app, the handlers and gunicorn's config all
receive a `Settings`. Names follow TGI's SageMaker container so existing endpoint configs carry
over. This module must stay importable without torch: gunicorn's master imports it before forking.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import overload

_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}
# QUANTIZE values: TGI's names, plus the CPU's weight-only int8 and int4 (serve/quantize.py)
QUANTIZE_NAMES = ("awq", "gptq", "marlin", "compressed-tensors", "exl2", "fp8", "eetq", "bitsandbytes",
                  "bitsandbytes-nf4", "bitsandbytes-fp4", "int8", "int4")


class ConfigError(ValueError):
    """An environment variable holds a value we cannot use; the message names it."""


def _flag(env: Mapping[str, str], name: str) -> bool | None:
    """A tri-state boolean: None when unset or empty."""
    raw = env.get(name, "").strip().lower()
    if not raw:
        return None
    if raw in _TRUE:
        return True
    if raw in _FALSE:
        return False
    raise ConfigError(f"{name} must be true or false, got {env[name]!r}")


@overload
def _int(env: Mapping[str, str], name: str, default: int, minimum: int = 1) -> int: ...
@overload
def _int(env: Mapping[str, str], name: str, default: None, minimum: int = 1) -> int | None: ...
def _int(env: Mapping[str, str], name: str, default: int | None, minimum: int = 1) -> int | None:
    raw = env.get(name, "").strip()
    if not raw:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise ConfigError(f"{name} must be an integer, got {raw!r}") from None
    if value < minimum:
        raise ConfigError(f"{name} must be >= {minimum}, got {value}")
    return value


@overload
def _str(env: Mapping[str, str], name: str, default: str) -> str: ...
@overload
def _str(env: Mapping[str, str], name: str, default: None = None) -> str | None: ...
def _str(env: Mapping[str, str], name: str, default: str | None = None) -> str | None:
    raw = env.get(name, "").strip()
    return raw or default


def _chat_template(env: Mapping[str, str]) -> str | None:
    """CHAT_TEMPLATE is either a path to a Jinja file or the template text itself."""
    raw = env.get("CHAT_TEMPLATE", "")
    if not raw.strip():
        return None
    if "{" not in raw and os.path.isfile(raw.strip()):
        with open(raw.strip(), encoding="utf-8") as fh:
            return fh.read()
    if "{" not in raw:
        raise ConfigError(f"CHAT_TEMPLATE is neither a file nor a Jinja template: {raw!r}")
    return raw


@dataclass(frozen=True)
class Settings:
    """The container's configuration. Build it with `Settings.from_env()`."""

    port: int = 8080
    host: str = "0.0.0.0"
    oai_enabled: bool | None = None  # None: dispatch on the body's shape
    model_dir: str = "/opt/ml/model"
    hf_model_id: str | None = None
    hf_model_revision: str | None = None
    trust_remote_code: bool = False
    num_gpus: int | None = None  # None: all visible
    dtype: str | None = None
    quantize: str | None = None  # None: weights as the checkpoint stores them
    cpu_packed_linear: bool = True  # CPU: linear layers on oneDNN-packed weights
    max_input_tokens: int | None = None  # None: from the model's context length
    max_total_tokens: int | None = None
    max_batch_prefill_tokens: int | None = None  # None: sized from free memory
    max_batch_total_tokens: int | None = None
    prefix_cache_tokens: int | None = None  # None: min(8192, 1/8 of the KV budget); 0: off
    max_batch_size: int | None = None  # rows decoded together; None: 256
    max_concurrent_requests: int = 128
    # Lines of one application/jsonlines batch in the engine at once; None: a quarter of
    # max_concurrent_requests (at least 1), so a batch never crowds out real-time traffic.
    jsonlines_concurrency_limit: int | None = None
    max_stop_sequences: int = 4
    max_top_n_tokens: int = 5
    max_best_of: int = 2
    max_logit_bias: int = 300  # OpenAI's own cap on `logit_bias` entries
    max_stop_length: int = 256  # characters of one stop string (the stream's holdback is this long)
    max_prompts: int = 64  # entries of a legacy completions `prompt` list (each is tokenized and submitted)
    max_messages: int = 1024  # chat `messages` (each is rendered by the template and tokenized)
    payload_limit: int = 6 * 1024 * 1024
    body_read_timeout: int = 60  # seconds to receive a whole body (408 past it, then the connection closes)
    prepare_threads: int = 2  # OS threads that tokenize and render chat templates off the gevent hub (serve/offhub.py)
    chat_template: str | None = None
    log_level: str = "info"
    graceful_timeout: int = 28  # SageMaker kills the container 30 s after SIGTERM
    engine_stall_timeout: int | None = None  # None: sized from the model at start-up; 0: no stall watchdog
    grammar_max_bytes: int = 256 * 1024  # a response_format schema, regex or tool set, as text
    grammar_compile_timeout: int = 5  # seconds a request waits for its grammar to compile
    grammar_cache_size: int = 64  # compiled grammars kept (LRU): a repeated schema compiles once

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Settings:
        """Read every variable of the README's configuration table; raises ConfigError naming a bad one."""
        env = os.environ if env is None else env
        oai = _flag(env, "OAI_ENABLED")
        if oai is None:  # TGI's own name for the same switch
            oai = _flag(env, "MESSAGES_API_ENABLED")
        return cls(
            port=_int(env, "SAGEMAKER_BIND_TO_PORT", 8080),
            host=_str(env, "SAGEMAKER_BIND_HOST", "0.0.0.0"),
            oai_enabled=oai,
            model_dir=_str(env, "SM_MODEL_DIR", "/opt/ml/model"),
            hf_model_id=_str(env, "HF_MODEL_ID"),
            hf_model_revision=_str(env, "HF_MODEL_REVISION"),
            trust_remote_code=bool(_flag(env, "HF_MODEL_TRUST_REMOTE_CODE")),
            num_gpus=_int(env, "SM_NUM_GPUS", None, minimum=0),
            dtype=_dtype(env),
            quantize=_quantize(env),
            cpu_packed_linear=_flag(env, "CPU_PACKED_LINEAR") is not False,
            max_input_tokens=_int(env, "MAX_INPUT_TOKENS", None) or _int(env, "MAX_INPUT_LENGTH", None),
            max_total_tokens=_int(env, "MAX_TOTAL_TOKENS", None),
            max_batch_prefill_tokens=_int(env, "MAX_BATCH_PREFILL_TOKENS", None),
            max_batch_total_tokens=_int(env, "MAX_BATCH_TOTAL_TOKENS", None),
            prefix_cache_tokens=_int(env, "PREFIX_CACHE_TOKENS", None, minimum=0),
            max_batch_size=_int(env, "MAX_BATCH_SIZE", None),
            max_concurrent_requests=_int(env, "MAX_CONCURRENT_REQUESTS", 128),
            jsonlines_concurrency_limit=_int(env, "JSONLINES_CONCURRENCY", None),
            max_stop_sequences=_int(env, "MAX_STOP_SEQUENCES", 4, minimum=0),
            max_top_n_tokens=_int(env, "MAX_TOP_N_TOKENS", 5, minimum=0),
            max_best_of=_int(env, "MAX_BEST_OF", 2),
            max_logit_bias=_int(env, "MAX_LOGIT_BIAS", 300, minimum=0),
            max_stop_length=_int(env, "MAX_STOP_LENGTH", 256),
            max_prompts=_int(env, "MAX_PROMPTS", 64),
            max_messages=_int(env, "MAX_MESSAGES", 1024),
            payload_limit=_int(env, "PAYLOAD_LIMIT", 6 * 1024 * 1024),
            body_read_timeout=_int(env, "BODY_READ_TIMEOUT", 60, minimum=0),
            prepare_threads=_int(env, "PREPARE_THREADS", 2),
            chat_template=_chat_template(env),
            log_level=(_str(env, "LOG_LEVEL", "info") or "info").lower(),
            graceful_timeout=_int(env, "GRACEFUL_TIMEOUT", 28),
            engine_stall_timeout=_int(env, "ENGINE_STALL_TIMEOUT", None, minimum=0),
            grammar_max_bytes=_int(env, "GRAMMAR_MAX_BYTES", 256 * 1024),
            grammar_compile_timeout=_int(env, "GRAMMAR_COMPILE_TIMEOUT", 5),
            grammar_cache_size=_int(env, "GRAMMAR_CACHE_SIZE", 64),
        )

    @property
    def jsonlines_concurrency(self) -> int:
        """How many lines of one JSON-lines batch run at once (JSONLINES_CONCURRENCY)."""
        if self.jsonlines_concurrency_limit is not None:
            return self.jsonlines_concurrency_limit
        return max(1, self.max_concurrent_requests // 4)

    @property
    def mode(self) -> str:
        """`openai`, `generate` or `auto`: how /invocations dispatches."""
        if self.oai_enabled is None:
            return "auto"
        return "openai" if self.oai_enabled else "generate"


def _dtype(env: Mapping[str, str]) -> str | None:
    raw = _str(env, "DTYPE")
    if raw is None:
        return None
    aliases = {"bf16": "bfloat16", "fp16": "float16", "half": "float16", "fp32": "float32", "float": "float32"}
    value = aliases.get(raw.lower(), raw.lower())
    if value not in ("bfloat16", "float16", "float32"):
        raise ConfigError(f"DTYPE must be bfloat16, float16 or float32, got {raw!r}")
    return value


def _quantize(env: Mapping[str, str]) -> str | None:
    raw = _str(env, "QUANTIZE")
    if raw is None:
        return None
    if raw.lower() not in QUANTIZE_NAMES:
        raise ConfigError(f"QUANTIZE must be one of {', '.join(QUANTIZE_NAMES)}, got {raw!r}")
    return raw.lower()
