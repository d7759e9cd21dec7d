"""OpenAI chat completions and legacy completions: the requests and the answers (docs/api.md).

Lenient like OpenAI's own server: unknown fields are ignored (and logged at debug level by the
handler). Structured output and tool fields come from `serve/protocol/structured.py`.
The limits that come from the server's configuration are checked by `serve/validation.py`.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictStr, field_validator, model_validator

from serve.protocol.fields import I64_MAX, I64_MIN, Logprob, StopSequences, WireModel, omitted_when_none
from serve.protocol.structured import ResponseFormat, StructuredFields, ToolCall


class ContentPart(BaseModel):
    """One part of a message's `content` list; only `text` parts reach a text-only model."""

    model_config = ConfigDict(extra="ignore")

    type: str
    text: str | None = None


class CalledFunction(BaseModel):
    """`tool_calls[].function` of an assistant message in the history; `arguments` is a JSON string
    (OpenAI's form) or, as some clients send it, an object."""

    model_config = ConfigDict(extra="ignore")

    name: str
    arguments: str | dict[str, Any] = "{}"


class HistoryToolCall(BaseModel):
    """One call an assistant message of the history made."""

    model_config = ConfigDict(extra="ignore")

    id: str = ""
    type: str = "function"
    function: CalledFunction


class ChatMessage(BaseModel):
    """A message; `content` is a string or a list of parts (joined with no separator). An assistant
    message may carry the `tool_calls` it made; a `tool` message answers one by `tool_call_id`."""

    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "user", "assistant", "tool", "developer"]
    content: StrictStr | list[ContentPart] | None = None
    name: str | None = None
    tool_call_id: str | None = None
    tool_calls: list[HistoryToolCall] | None = None

    def as_template_message(self) -> dict[str, Any]:
        """The plain dict a chat template (and serve/structured/tool_prompt.py) reads."""
        out: dict[str, Any] = {"role": self.role, "content": self.text()}
        if self.name is not None:
            out["name"] = self.name
        if self.tool_call_id is not None:
            out["tool_call_id"] = self.tool_call_id
        if self.tool_calls:
            out["tool_calls"] = [c.model_dump() for c in self.tool_calls]
        return out

    def text(self) -> str:
        """The message's text: the string, or the `text` parts joined with no separator."""
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text or "" for part in self.content)


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore")

    include_usage: bool = False


class SamplingFields(BaseModel):
    """Fields shared by chat completions and legacy completions."""

    model_config = ConfigDict(extra="ignore")

    model: str | None = None
    temperature: float | None = Field(default=None, ge=0.0, le=2.0)
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)
    seed: int | None = Field(default=None, ge=I64_MIN, le=I64_MAX)  # vLLM's bounds (a torch seed)
    stop: StopSequences = Field(default_factory=list)
    frequency_penalty: float | None = Field(default=None, ge=-2.0, le=2.0)
    presence_penalty: float | None = Field(default=None, ge=-2.0, le=2.0)
    logit_bias: dict[int, float] | None = None
    n: int = Field(default=1, ge=1, le=16)
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None

    @field_validator("logit_bias")
    @classmethod
    def _bias_range(cls, value: dict[int, float] | None) -> dict[int, float] | None:
        for token, bias in (value or {}).items():
            if token < 0:
                raise ValueError(f"token id {token} is negative")
            if not -100.0 <= bias <= 100.0:
                raise ValueError(f"bias {bias} for token {token} is outside -100..100")
        return value

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


class ChatCompletionRequest(StructuredFields, SamplingFields):
    """POST body of chat completions; `response_format` and the tool fields come from StructuredFields."""

    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(default=None, ge=0, le=20)

    @model_validator(mode="after")
    def _refuse_unsupported(self) -> ChatCompletionRequest:
        if self.top_logprobs and not self.logprobs:
            raise ValueError("`top_logprobs` requires `logprobs` to be true")
        return self

    @property
    def token_limit(self) -> int | None:
        """`max_completion_tokens` (the new name) wins over `max_tokens`."""
        return self.max_completion_tokens or self.max_tokens


class CompletionRequest(SamplingFields):
    """POST body of legacy completions; `prompt` is text, texts, token ids or lists of token ids."""

    prompt: StrictStr | list[StrictStr] | list[int] | list[list[int]]
    max_tokens: int | None = Field(default=None, ge=1)
    echo: bool = False
    suffix: str | None = None
    logprobs: int | None = Field(default=None, ge=0, le=5)
    best_of: int | None = Field(default=None, ge=1, le=16)
    response_format: ResponseFormat | None = None  # as on chat (vLLM accepts it here too)

    @model_validator(mode="after")
    def _refuse_unsupported(self) -> CompletionRequest:
        if self.suffix:
            raise ValueError("`suffix` (fill-in-the-middle) is not supported by this model")
        if self.best_of is not None and self.best_of < self.n:
            raise ValueError("`best_of` must be greater than or equal to `n`")
        if self.stream and self.best_of and self.best_of > self.n:
            raise ValueError("`best_of` > `n` cannot be streamed")
        if isinstance(self.prompt, list) and not self.prompt:
            raise ValueError("`prompt` must not be an empty list")
        return self

    def prompts(self) -> list[str | list[int]]:
        """The prompts as a list: each a string or a list of token ids."""
        p = self.prompt
        if isinstance(p, str):
            return [p]
        if all(isinstance(x, int) for x in p):
            return [[x for x in p if isinstance(x, int)]]  # one prompt of token ids
        return [x for x in p if not isinstance(x, int)]


def unknown_fields(model: type[BaseModel], body: dict[str, Any]) -> list[str]:
    """Top-level keys the schema ignores (the handler logs them at debug level)."""
    return sorted(set(body) - set(model.model_fields))


# -- answers -------------------------------------------------------------------------------------
class Usage(WireModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int

    @classmethod
    def of(cls, prompt_tokens: int, completion_tokens: int) -> Usage:
        """The usage of a request that read `prompt_tokens` and generated `completion_tokens`."""
        return cls(prompt_tokens=prompt_tokens, completion_tokens=completion_tokens,
                   total_tokens=prompt_tokens + completion_tokens)


class TopLogprob(WireModel):
    token: str
    logprob: Logprob
    bytes: list[int]


class LogprobEntry(TopLogprob):
    """One element of a chat choice's `logprobs.content`: a token and its alternatives."""

    top_logprobs: list[TopLogprob]


class ChatLogprobs(WireModel):
    content: list[LogprobEntry]


class AssistantMessage(WireModel):
    """`content` is null when the answer is `tool_calls` (OpenAI's shape); `tool_calls` is left out otherwise."""

    role: Literal["assistant"] = "assistant"
    content: str | None
    tool_calls: list[ToolCall] | None = omitted_when_none()


class ChatChoice(WireModel):
    index: int
    message: AssistantMessage
    logprobs: ChatLogprobs | None
    finish_reason: str


class OpenAIResponse(WireModel):
    """The keys every OpenAI answer and chunk starts with (the same `id` on every chunk of a stream)."""

    id: str
    created: int
    model: str
    system_fingerprint: str


class ChatCompletion(OpenAIResponse):
    object: Literal["chat.completion"] = "chat.completion"
    choices: list[ChatChoice]
    usage: Usage


class Delta(WireModel):
    """What a chunk adds to a choice: the role once, then pieces of content; `{}` on the last one."""

    role: str | None = omitted_when_none()
    content: str | None = omitted_when_none()
    # OpenAI's streamed calls as serve/structured/tool_parser.py writes them: the first element of a
    # call holds `index`, `id`, `type` and the name with `"arguments": ""`, the next ones fragments.
    tool_calls: list[dict[str, Any]] | None = omitted_when_none()


class ChunkChoice(WireModel):
    index: int
    delta: Delta
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None = None


class ChatCompletionChunk(OpenAIResponse):
    """A chat stream event. `usage` is written (null but on the last chunk) only when the request
    asked for `stream_options.include_usage`; the stream leaves the key out otherwise."""

    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    choices: list[ChunkChoice]
    usage: Usage | None = None


class LegacyLogprobs(WireModel):
    """The completions `logprobs` shape: parallel lists and character offsets."""

    tokens: list[str] = Field(default_factory=list)
    token_logprobs: list[Logprob] = Field(default_factory=list)
    top_logprobs: list[dict[str, Logprob] | None] = Field(default_factory=list)
    text_offset: list[int] = Field(default_factory=list)


class CompletionChoice(WireModel):
    index: int
    text: str
    logprobs: LegacyLogprobs | None = None
    finish_reason: str | None = None


class Completion(OpenAIResponse):
    """A completions answer, and each event of its stream (`usage` as in `ChatCompletionChunk`)."""

    object: Literal["text_completion"] = "text_completion"
    choices: list[CompletionChoice]
    usage: Usage | None = None
