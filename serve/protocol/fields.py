"""What both APIs share: the `stop` field type, the base of every response model, SSE framing."""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from typing import Annotated, Any

from pydantic import AfterValidator, BaseModel, BeforeValidator, Field, StrictStr


def _as_list(value: Any) -> Any:
    """`stop` may be one string, a list, or null (OpenAI and TGI clients send all three)."""
    return [value] if isinstance(value, str) else ([] if value is None else value)


def _no_empty(value: list[str]) -> list[str]:
    if any(s == "" for s in value):
        raise ValueError("stop sequences must not be empty strings")
    return value


StopSequences = Annotated[list[StrictStr], BeforeValidator(_as_list), AfterValidator(_no_empty)]


I32_MAX = 2**31 - 1
I64_MIN, I64_MAX = -(2**63), 2**63 - 1
U64_MAX = 2**64 - 1
LOGPROB_FLOOR = -9999.0  # what vLLM writes for a -inf logprob (a token the grammar or a bias ruled out)


def _finite_logprob(value: float | None) -> float | None:
    """JSON has no NaN or Infinity: a logprob is written as a number in LOGPROB_FLOOR..0 (or null)."""
    if value is None:
        return None
    if math.isnan(value):
        return LOGPROB_FLOOR
    return min(0.0, max(LOGPROB_FLOOR, value))


Logprob = Annotated[float | None, AfterValidator(_finite_logprob)]


def _is_none(value: Any) -> bool:
    return value is None


def omitted_when_none() -> Any:
    """A key that is left out of the JSON when None (e.g. `top_tokens`), instead of written `null`."""
    return Field(default=None, exclude_if=_is_none)


class WireModel(BaseModel):
    """A response body. Field order is key order on the wire; `None` is written `null` unless the
    field is `omitted_when_none()`. Serialised with `json.dumps` (`", "` and `": "` separators,
    UTF-8 kept as is), the bytes clients have always received."""

    def wire(self, exclude: set[str] | None = None) -> dict[str, Any]:
        """The JSON object as a dict (`exclude`: top-level keys to leave out)."""
        return self.model_dump(exclude=exclude)

    def dumps(self, exclude: set[str] | None = None) -> str:
        """The JSON text."""
        return json.dumps(self.model_dump(exclude=exclude), ensure_ascii=False)


def dumps(body: WireModel | Sequence[WireModel]) -> str:
    """The JSON text of a body: one model, or a list of them (TGI's generate answer)."""
    if isinstance(body, WireModel):
        return body.dumps()
    return json.dumps([m.wire() for m in body], ensure_ascii=False)


def sse(event: WireModel | str, space: bool = True, exclude: set[str] | None = None) -> str:
    """One SSE event: OpenAI writes `data: {...}`, TGI `data:{...}`; both end with a blank line."""
    data = event if isinstance(event, str) else event.dumps(exclude)
    return f"data: {data}\n\n" if space else f"data:{data}\n\n"
