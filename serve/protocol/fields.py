"""Field types both protocols share."""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import AfterValidator, BeforeValidator, StrictStr


def _as_list(value: Any) -> Any:
    """`stop` may be one string, a list, or null (OpenAI and TGI clients send all three)."""
    return [value] if isinstance(value, str) else ([] if value is None else value)


def _no_empty(value: list[str]) -> list[str]:
    if any(s == "" for s in value):
        raise ValueError("stop sequences must not be empty strings")
    return value


StopSequences = Annotated[list[StrictStr], BeforeValidator(_as_list), AfterValidator(_no_empty)]
