"""One error type inside, two error shapes on the wire (docs/api.md, "Errors").

Handlers and the validation boundary raise `ApiError`; the app renders it in the shape of the API
family the request spoke: TGI's flat `{"error", "error_type"}` for generate, OpenAI's nested object
for chat and completions.
"""

from __future__ import annotations

import enum

from pydantic import ValidationError

from serve.protocol.fields import WireModel, omitted_when_none, sse


class Api(enum.Enum):
    """The API family of a request: it decides the error shape and the stream framing."""

    GENERATE = "generate"
    OPENAI = "openai"

    @classmethod
    def default_for(cls, mode: str) -> Api:
        """The family of answers no request chose (bad JSON, 404, 413): OpenAI's only in openai mode."""
        return cls.OPENAI if mode == "openai" else cls.GENERATE


class GenerateError(WireModel):
    """TGI's error body."""

    error: str
    error_type: str


class OpenAIErrorDetail(WireModel):
    message: str
    type: str
    param: str | None
    code: int


class OpenAIError(WireModel):
    """OpenAI's error body."""

    error: OpenAIErrorDetail


class HealthcheckError(WireModel):
    """/ping's 503 body; `reason` only when the worker knows why it failed (loading, engine loop)."""

    error: str = "unhealthy"
    error_type: str = "healthcheck"
    reason: str | None = omitted_when_none()


class ApiError(Exception):
    """An error answer: HTTP status, error type (docs/api.md), a message that says what to fix."""

    def __init__(self, status: int, error_type: str, message: str, param: str | None = None):
        super().__init__(message)
        self.status = status
        self.error_type = error_type
        self.message = message
        self.param = param

    def model(self, api: Api) -> WireModel:
        """The body in the shape of `api`."""
        if api is Api.OPENAI:
            return OpenAIError(error=OpenAIErrorDetail(message=self.message, type=self.error_type, param=self.param,
                                                       code=self.status))
        return GenerateError(error=self.message, error_type=self.error_type)

    def body(self, api: Api) -> dict:
        """The JSON body as a dict."""
        return self.model(api).wire()

    def sse(self, api: Api) -> str:
        """The error as the last event of a stream that already started (OpenAI's then ends it)."""
        if api is Api.OPENAI:
            return sse(self.model(api)) + sse("[DONE]")
        return sse(self.model(api), space=False)


def validation(message: str, param: str | None = None) -> ApiError:
    """422 `validation`: a field is out of range or the input is too long."""
    return ApiError(422, "validation", message, param)


def bad_request(message: str) -> ApiError:
    """400 `validation`: the body is not JSON or not UTF-8."""
    return ApiError(400, "validation", message)


def payload_too_large(limit: int) -> ApiError:
    """413 `payload_too_large`: the body is over PAYLOAD_LIMIT."""
    return ApiError(413, "payload_too_large", f"Payload is larger than PAYLOAD_LIMIT ({limit} bytes)")


def request_timeout(seconds: float) -> ApiError:
    """408 `request_timeout`: the body did not arrive within BODY_READ_TIMEOUT (nginx's, TGI's front's)."""
    return ApiError(408, "request_timeout",
                    f"The request body was not received within BODY_READ_TIMEOUT ({seconds:g} s); send it at once")


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
