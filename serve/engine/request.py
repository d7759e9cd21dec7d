"""What goes into the engine and what comes out of it.

The engine never sees JSON: handlers turn a request body into a `GenerationRequest` (prompt token
ids + `SamplingParams`) and read back `TokenEvent`s from the handle that `Engine.submit` returns.
"""

from __future__ import annotations

import enum
import itertools
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # torch is not imported at run time: the HTTP layer imports this module, and a
    # replacement worker must answer /ping within milliseconds of its fork, long before torch loads.
    import torch

    from serve.engine.channel import RequestHandle
    from serve.engine.grammar import CompiledGrammar, Constraint

# A per-request logits processor: (token ids so far: prompt + generated, logits row [vocab]) -> row.
# It runs on the engine thread for its own row only; if it raises, only its request fails.
LogitsProcessor = Callable[[Sequence[int], "torch.Tensor"], "torch.Tensor"]


class FinishReason(str, enum.Enum):
    """Why a sequence stopped, in TGI's words (chat handlers map these to OpenAI's)."""

    LENGTH = "length"
    EOS = "eos_token"
    STOP = "stop_sequence"


@dataclass
class SamplingParams:
    """Per-request decoding parameters. Neutral values switch a step off.

    Precedence is decided by the handlers (request value, then server default, then these).
    """

    max_new_tokens: int = 20
    temperature: float = 1.0  # 0 (or do_sample False with no warper) means greedy
    do_sample: bool = False
    top_k: int = 0  # 0: off
    top_p: float = 1.0  # 1.0: off
    typical_p: float = 1.0  # 1.0: off
    repetition_penalty: float = 1.0  # HF/TGI multiplicative, over prompt and output
    frequency_penalty: float = 0.0  # OpenAI additive: minus penalty * count in the output
    presence_penalty: float = 0.0  # OpenAI additive: minus penalty if the token is in the output
    logit_bias: dict[int, float] = field(default_factory=dict)
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    ignore_eos: bool = False
    top_n_tokens: int = 0  # alternatives reported per generated token
    prefill_logprobs: bool = False  # TGI decoder_input_details
    n: int = 1  # sequences sampled from one prefill
    watermark: bool = False  # TGI's watermark (Kirchenbauer et al.): bias a greenlist seeded by the previous token
    logits_processors: list[LogitsProcessor] = field(default_factory=list)
    # The output must match this grammar (serve/engine/grammar.py). The engine compiles it off its
    # loop (equal constraints share one cached compilation) and finishes the sequence with
    # FinishReason.EOS once the grammar is complete.
    grammar: Constraint | None = None

    @property
    def greedy(self) -> bool:
        """True when the next token is the argmax (TGI: sampling needs do_sample or a warper)."""
        if self.temperature == 0:
            return True
        warps = self.temperature != 1.0 or self.top_k > 0 or self.top_p < 1.0 or self.typical_p < 1.0
        return not (self.do_sample or warps)


_ids = itertools.count()


@dataclass
class GenerationRequest:
    """A prompt already tokenized (special tokens included as the model expects them)."""

    prompt_ids: list[int]
    params: SamplingParams = field(default_factory=SamplingParams)
    request_id: str = field(default_factory=lambda: f"req-{next(_ids)}")


@dataclass
class TokenInfo:
    """One token as the APIs report it. `text` is this token's share of the decoded text."""

    id: int
    text: str
    logprob: float | None
    special: bool = False


@dataclass
class FinishInfo:
    """Attached to the last `TokenEvent` of a sequence."""

    reason: FinishReason
    text: str  # the output text of the non-special tokens, cut just after a matched stop sequence
    stop_sequence: str | None = None  # the stop string that matched
    stop_start: int | None = None  # where in `text` the stop string starts (chat cuts there)
    generated_tokens: int = 0
    seed: int | None = None  # the seed actually used; None when greedy
    cumulative_logprob: float = 0.0


@dataclass
class TokenEvent:
    """One generated token of sequence `seq_index` (0..n-1)."""

    seq_index: int
    index: int  # position of this token in its sequence, from 0
    token: TokenInfo
    top_tokens: list[TokenInfo] | None = None
    finish: FinishInfo | None = None


@dataclass
class PrefillEvent:
    """Sent first, once, when `prefill_logprobs` was asked: the prompt tokens with their logprobs."""

    tokens: list[TokenInfo]


class EngineError(RuntimeError):
    """Generation of this request failed (maps to 424 `generation`)."""


class GrammarRejected(EngineError):
    """The request's grammar could not be compiled (invalid, too large, too slow); nothing was generated.

    A handler that compiled the constraint itself before submitting (to answer 422 up front) sees
    this only when the compile it waited for was evicted from the cache and then failed again.
    """


class EngineShutdown(EngineError):
    """The server is shutting down and this request could not finish in time (maps to 503 `unhealthy`)."""


class EngineOverloaded(RuntimeError):
    """More than MAX_CONCURRENT_REQUESTS in flight (maps to 429 `overloaded`)."""


class EngineUnavailable(RuntimeError):
    """The engine is not running or is draining (maps to 503 `unhealthy`)."""


class RequestStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"
    FAILED = "failed"
    CANCELLED = "cancelled"


@dataclass
class Timings:
    """Monotonic timestamps (seconds) for the TGI timing headers."""

    queued: float = field(default_factory=time.monotonic)
    prefill_start: float | None = None
    first_token: float | None = None
    finished: float | None = None


class RequestState:
    """The engine's side of one request: its handle, its status and its sequences' bookkeeping."""

    def __init__(self, request: GenerationRequest, handle: RequestHandle):
        self.request = request
        self.handle = handle
        self.status = RequestStatus.WAITING
        self.unfinished = request.params.n
        self.grammar: CompiledGrammar | None = None  # set once compiled, before admission

    @property
    def params(self) -> SamplingParams:
        return self.request.params

    @property
    def prompt_len(self) -> int:
        return len(self.request.prompt_ids)

    @property
    def n(self) -> int:
        return self.request.params.n

    @property
    def active(self) -> bool:
        return self.status in (RequestStatus.WAITING, RequestStatus.RUNNING)
