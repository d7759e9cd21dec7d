"""TGI's native generate API: the request and the answers (docs/api.md, "Generate").

Lenient where TGI annoyed its users: `temperature: 0` means greedy and `top_p: 1.0` means no
nucleus cut (TGI rejects both). The schemas check each field's type and range; the limits that
come from the server's configuration (stop sequences, top_n_tokens, best_of, token counts) are
checked by `serve/validation.py`.
"""

from __future__ import annotations

import math
from typing import Annotated, Any

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    StrictStr,
    field_validator,
    model_validator,
)

from serve.protocol.fields import I32_MAX, U64_MAX, Logprob, StopSequences, WireModel, omitted_when_none
from serve.protocol.structured import GrammarParam


class GenerateParameters(BaseModel):
    """`parameters` of a generate request; every field optional, unknown keys ignored."""

    model_config = ConfigDict(extra="ignore")

    best_of: int | None = Field(default=None, gt=0)
    decoder_input_details: bool = False
    details: bool = False
    do_sample: bool = False
    frequency_penalty: float | None = Field(default=None, ge=-2.0, le=2.0)
    grammar: GrammarParam | None = None
    max_new_tokens: int | None = Field(default=None, gt=0)
    repetition_penalty: float | None = Field(default=None, gt=0.0)
    return_full_text: bool | None = None
    seed: int | None = Field(default=None, ge=0, le=U64_MAX)  # TGI's u64
    stop: StopSequences = Field(default_factory=list)
    temperature: float | None = Field(default=None, ge=0.0)
    top_k: int | None = Field(default=None, gt=0, le=I32_MAX)  # TGI's i32
    top_n_tokens: int | None = Field(default=None, ge=0)
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)
    truncate: int | None = Field(default=None, gt=0)
    typical_p: float | None = Field(default=None, gt=0.0, le=1.0)
    watermark: bool = False
    adapter_id: str | None = None

    @model_validator(mode="after")
    def _best_of_rules(self) -> GenerateParameters:
        if self.best_of and self.best_of > 1:
            if self.seed is not None:
                raise ValueError("`seed` must not be set when `best_of` > 1")
            sampling = self.do_sample or any(
                v is not None and v != neutral
                for v, neutral in ((self.temperature, 1.0), (self.top_k, None), (self.top_p, 1.0), (self.typical_p, 1.0))
            )
            if not sampling or self.temperature == 0:
                raise ValueError("you must use sampling when `best_of` is > 1")
        return self


class GenerateRequest(BaseModel):
    """`{"inputs": str, "parameters": {...}, "stream": bool}`."""

    model_config = ConfigDict(extra="ignore")

    inputs: StrictStr
    parameters: GenerateParameters = Field(default_factory=GenerateParameters)
    stream: bool = False

    @field_validator("parameters", mode="before")
    @classmethod
    def _null_parameters(cls, value: Any) -> Any:
        return {} if value is None else value


# -- answers -------------------------------------------------------------------------------------
class Token(WireModel):
    """A generated token (or one of its `top_tokens` alternatives)."""

    id: int
    text: str
    logprob: Logprob
    special: bool


def _nan_is_null(value: Any) -> Any:
    # The first prompt token has no logprob: the engine says NaN, TGI's clients expect null.
    return None if isinstance(value, float) and math.isnan(value) else value


class PrefillToken(WireModel):
    """A prompt token as TGI's `InputToken`: no `special` field; the first logprob is null."""

    id: int
    text: str
    logprob: Annotated[Logprob, BeforeValidator(_nan_is_null)]


class SequenceDetails(WireModel):
    """What `details` says about one finished sequence."""

    finish_reason: str
    generated_tokens: int
    seed: int | None
    prefill: list[PrefillToken]
    tokens: list[Token]
    top_tokens: list[list[Token]] | None = omitted_when_none()


class _Text(WireModel):
    generated_text: str


class BestOfSequence(SequenceDetails, _Text):
    """One of the other `best_of` candidates. Its text comes first: pydantic orders the fields of
    the right-most base first."""


class Details(SequenceDetails):
    """`details` of the answer (asked with `parameters.details`)."""

    best_of_sequences: list[BestOfSequence] | None = omitted_when_none()


class GeneratedText(WireModel):
    """The one element of the answer list."""

    generated_text: str
    details: Details | None = omitted_when_none()


class StreamDetails(WireModel):
    """`details` of a stream's last event."""

    finish_reason: str
    generated_tokens: int
    seed: int | None
    input_length: int


class StreamEvent(WireModel):
    """One SSE event of a generate stream (`generated_text`/`details` only set on the last one)."""

    index: int
    token: Token
    top_tokens: list[Token] | None = omitted_when_none()
    generated_text: str | None = None
    details: StreamDetails | None = None
