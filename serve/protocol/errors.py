"""One error type inside, two error shapes on the wire (SPEC section 5).

Handlers raise `ApiError`; the app renders it in the shape of the protocol the request spoke:
TGI's flat `{"error", "error_type"}` for generate, OpenAI's nested object for chat/completions.
"""

from __future__ import annotations

import json
from typing import Any

from pydantic import ValidationError

GENERATE = "generate"
OPENAI = "openai"


class ApiError(Exception):
    """An error answer: HTTP status, SPEC error type, a message that says what to fix."""

    def __init__(self, status: int, error_type: str, message: str, param: str | None = None):
        super().__init__(message)
        self.status = status
        self.error_type = error_type
        self.message = message
        self.param = param

    def body(self, protocol: str) -> dict[str, Any]:
        """The JSON body in the shape of `protocol` (GENERATE or OPENAI)."""
        if protocol == OPENAI:
            return {
                "error": {
                    "message": self.message,
                    "type": self.error_type,
                    "param": self.param,
                    "code": self.status,
                }
            }
        return {"error": self.message, "error_type": self.error_type}

    def sse(self, protocol: str) -> str:
        """The error as the last event of a stream that already started."""
        if protocol == OPENAI:
            return f"data: {json.dumps(self.body(OPENAI))}\n\ndata: [DONE]\n\n"
        return f"data:{json.dumps(self.body(GENERATE))}\n\n"


def validation(message: str, param: str | None = None) -> ApiError:
    """422 `validation`: a field is out of range or the input is too long."""
    return ApiError(422, "validation", message, param)


def bad_request(message: str) -> ApiError:
    """400 `validation`: the body is not JSON or not UTF-8."""
    return ApiError(400, "validation", message)


def template_error(message: str) -> ApiError:
    """422 `template_error`: no chat template, or the template raised."""
    return ApiError(422, "template_error", f"Template error: {message}")


def generation(message: str) -> ApiError:
    """424 `generation`: the model failed on this request."""
    return ApiError(424, "generation", f"Request failed during generation: {message}")


def overloaded(limit: int) -> ApiError:
    """429 `overloaded`: more than MAX_CONCURRENT_REQUESTS in flight."""
    return ApiError(429, "overloaded", f"Model is overloaded: more than {limit} requests in flight, retry later")


def unhealthy(message: str = "the model is not ready (loading, failed or shutting down)") -> ApiError:
    """503 `unhealthy`: not ready, failed, or draining."""
    return ApiError(503, "unhealthy", message)


def from_pydantic(err: ValidationError) -> ApiError:
    """A 422 naming the first offending field the way a user wrote it (`parameters.top_k`)."""
    first = err.errors()[0]
    loc = ".".join(str(p) for p in first.get("loc", ()))
    msg = first.get("msg", "invalid value")
    # pydantic prefixes custom errors with "Value error, "; the user only needs the reason.
    msg = msg.removeprefix("Value error, ")
    text = f"Input validation error: `{loc}`: {msg}" if loc else f"Input validation error: {msg}"
    return validation(text, param=loc or None)
