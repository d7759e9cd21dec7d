"""TGI's native generate API: request schema and answer shapes (SPEC section 3).

Lenient where TGI annoyed its users: `temperature: 0` means greedy and `top_p: 1.0` means no
nucleus cut (TGI rejects both). Limits that come from the server's configuration
(stop sequences, top_n_tokens, best_of) are checked by `GenerateRequest.check_limits`.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field, StrictStr, field_validator, model_validator

from serve.protocol.errors import validation
from serve.protocol.fields import StopSequences


class GenerateParameters(BaseModel):
    """`parameters` of a generate request; every field optional, unknown keys ignored."""

    model_config = ConfigDict(extra="ignore")

    best_of: int | None = Field(default=None, gt=0)
    decoder_input_details: bool = False
    details: bool = False
    do_sample: bool = False
    frequency_penalty: float | None = Field(default=None, ge=-2.0, le=2.0)
    grammar: Any | None = None
    max_new_tokens: int | None = Field(default=None, gt=0)
    repetition_penalty: float | None = Field(default=None, gt=0.0)
    return_full_text: bool | None = None
    seed: int | None = Field(default=None, ge=0)
    stop: StopSequences = Field(default_factory=list)
    temperature: float | None = Field(default=None, ge=0.0)
    top_k: int | None = Field(default=None, gt=0)
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

    def check_limits(self, max_stop: int, max_top_n: int, max_best_of: int) -> None:
        """The server-configured limits; raises a 422 ApiError naming the field."""
        p = self.parameters
        if not self.inputs:
            raise validation("Input validation error: `inputs` cannot be empty", "inputs")
        if len(p.stop) > max_stop:
            raise validation(
                f"Input validation error: `stop` supports up to {max_stop} stop sequences. Given: {len(p.stop)}",
                "parameters.stop",
            )
        if (p.top_n_tokens or 0) > max_top_n:
            raise validation(
                f"Input validation error: `top_n_tokens` must be >= 0 and <= {max_top_n}. Given: {p.top_n_tokens}",
                "parameters.top_n_tokens",
            )
        if (p.best_of or 1) > max_best_of:
            raise validation(
                f"Input validation error: `best_of` must be > 0 and <= {max_best_of}. Given: {p.best_of}",
                "parameters.best_of",
            )
        if self.stream and (p.best_of or 1) > 1:
            raise validation("Input validation error: `best_of` != 1 is not allowed for streaming", "parameters.best_of")
        if self.stream and p.decoder_input_details:
            raise validation(
                "Input validation error: `decoder_input_details` == true is not supported when streaming tokens",
                "parameters.decoder_input_details",
            )
        if p.grammar is not None:
            raise validation("Input validation error: `grammar` is not supported by this server yet", "parameters.grammar")


def token_json(token: Any) -> dict[str, Any]:
    """A generated token: `{id, text, logprob, special}` (a TokenInfo)."""
    return {"id": token.id, "text": token.text, "logprob": token.logprob, "special": token.special}


def prefill_json(token: Any) -> dict[str, Any]:
    """A prompt token as TGI's `InputToken`: no `special` field; the first logprob is null."""
    logprob = token.logprob
    if logprob is not None and logprob != logprob:  # NaN for the first prompt token
        logprob = None
    return {"id": token.id, "text": token.text, "logprob": logprob}


def sequence_details(seq: Any, prefill: list[Any], with_top: bool) -> dict[str, Any]:
    """The `details` object of one finished sequence (a handlers' SequenceResult)."""
    out: dict[str, Any] = {
        "finish_reason": seq.finish.reason.value,
        "generated_tokens": seq.finish.generated_tokens,
        "seed": seq.finish.seed,
        "prefill": [prefill_json(t) for t in prefill],
        "tokens": [token_json(t) for t in seq.tokens],
    }
    if with_top:
        out["top_tokens"] = [[token_json(t) for t in top] for top in seq.top_tokens]
    return out


def stream_event(
    index: int, token: Any, top_tokens: list[Any] | None, generated_text: str | None, details: dict | None
) -> dict[str, Any]:
    """One SSE event of a generate stream (`generated_text`/`details` only on the last one)."""
    event: dict[str, Any] = {"index": index, "token": token_json(token)}
    if top_tokens:
        event["top_tokens"] = [token_json(t) for t in top_tokens]
    event["generated_text"] = generated_text
    event["details"] = details
    return event
