"""OpenAI chat completions: messages -> chat template -> engine -> `chat.completion` or chunks."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from serve.engine.request import FinishInfo, TokenEvent, TokenInfo
from serve.handlers import common, openai
from serve.protocol import openai as proto
from serve.service import ModelService
from serve.structured.tool_parser import ToolCallStream, parse_tool_calls
from serve.structured.tools import ToolPlan


def handle(svc: ModelService, body: Any) -> common.Reply:
    """Answer one chat completion request (docs/api.md, "Chat completions")."""
    req = openai.parse(proto.ChatCompletionRequest, body)
    prompt = common.validator(svc).chat(req)
    handle_ = common.submit(svc, prompt.request)
    head = openai.head(svc, "chatcmpl", req.model)
    prompt_tokens = len(prompt.request.prompt_ids)
    if req.stream:
        stream = ChatStream(req, head, prompt_tokens, prompt.tools).run(handle_)
        return common.Reply(stream=stream, on_close=handle_.cancel)
    return _answer(svc, handle_, req, head, prompt_tokens, prompt.tools)


def finish_reason(finish: FinishInfo, plan: ToolPlan | None, made_calls: bool) -> str:
    """OpenAI's reason: `tool_calls` (or `stop` for a named function) when the answer is calls."""
    return plan.finish_reason if plan is not None and made_calls else openai.finish_reason(finish)


def logprob_entry(token: TokenInfo, top: list[TokenInfo] | None, k: int) -> proto.LogprobEntry:
    """One element of `logprobs.content`: the token and its `k` best alternatives."""
    alternatives = [proto.TopLogprob(token=t.text, logprob=t.logprob, bytes=list(t.text.encode("utf-8")))
                    for t in (top or [])[:k]]
    return proto.LogprobEntry(token=token.text, logprob=token.logprob, bytes=list(token.text.encode("utf-8")),
                              top_logprobs=alternatives)


def _answer(svc: ModelService, handle_: Any, req: proto.ChatCompletionRequest, head: dict[str, Any],
            prompt_tokens: int, plan: ToolPlan | None) -> common.Reply:
    got = common.collect(handle_, req.n)
    choices = []
    for i, seq in enumerate(got.sequences):
        logprobs = None
        if req.logprobs:
            k = req.top_logprobs or 0
            entries = [logprob_entry(t, top, k) for t, top in zip(seq.tokens, seq.top_tokens) if not t.special]
            logprobs = proto.ChatLogprobs(content=entries)
        content = openai.content_of(seq.finish)
        calls = parse_tool_calls(content) if plan is not None else None
        message = (proto.AssistantMessage(content=None, tool_calls=calls) if calls
                   else proto.AssistantMessage(content=content))
        choices.append(proto.ChatChoice(index=i, message=message, logprobs=logprobs,
                                        finish_reason=finish_reason(seq.finish, plan, bool(calls))))
    body = proto.ChatCompletion(**head, choices=choices, usage=proto.Usage.of(prompt_tokens, got.generated_tokens))
    return common.Reply(body=body, headers=common.timing_headers(svc, handle_, prompt_tokens, got.generated_tokens))


class ChatStream:
    """Engine events -> OpenAI chunks: the role first, content as the holdback releases it, logprobs
    with the content they belong to, one finish chunk per choice. With tools in play, each choice's
    text goes through a ToolCallStream, which turns calls into `tool_calls` deltas."""

    def __init__(self, req: proto.ChatCompletionRequest, head: dict[str, Any], prompt_tokens: int,
                 plan: ToolPlan | None = None):
        self.req, self.prompt_tokens, self.plan = req, prompt_tokens, plan
        self.writer = openai.ChunkWriter(proto.ChatCompletionChunk, head, req.include_usage)
        self.pending: list[list[proto.LogprobEntry]] = [[] for _ in range(req.n)]  # logprobs not yet sent
        self.calls = [ToolCallStream() for _ in range(req.n)] if plan is not None else None
        self.completion_tokens = 0

    def run(self, handle_: Any) -> Iterator[str]:
        """The whole SSE body: role chunks, content chunks, finish chunks, usage, [DONE]."""
        return self.writer.frame(self._chunks(handle_), lambda: proto.Usage.of(self.prompt_tokens,
                                                                               self.completion_tokens))

    def _chunks(self, handle_: Any) -> Iterator[str]:
        for i in range(self.req.n):
            yield self.writer.chunk([proto.ChunkChoice(index=i, delta=proto.Delta(role="assistant", content=""))])
        for ev, text in openai.released(handle_, self.req.n, self.req.stop):
            yield from self._on_token(ev, text)

    def _on_token(self, ev: TokenEvent, text: str) -> Iterator[str]:
        i = ev.seq_index
        if self.req.logprobs and not ev.token.special:
            self.pending[i].append(logprob_entry(ev.token, ev.top_tokens, self.req.top_logprobs or 0))
        for delta in self._deltas(i, text, ev.finish is not None):
            yield self.writer.chunk([self._choice(i, proto.Delta(**delta))])
        if ev.finish is not None:
            self.completion_tokens += ev.finish.generated_tokens
            made_calls = self.calls is not None and self.calls[i].tool_calls() is not None
            yield self.writer.chunk([self._choice(i, proto.Delta(), finish_reason(ev.finish, self.plan, made_calls))])

    def _deltas(self, i: int, text: str, last: bool) -> list[dict[str, Any]]:
        """The deltas `text` makes: itself as content, or what the choice's tool-call parser releases."""
        if self.calls is None:
            return [{"content": text}] if text else []
        deltas = self.calls[i].feed(text) if text else []
        return deltas + self.calls[i].finish() if last else deltas

    def _choice(self, i: int, delta: proto.Delta, reason: str | None = None) -> proto.ChunkChoice:
        logprobs = None
        if self.req.logprobs and (self.pending[i] or reason is None):
            logprobs, self.pending[i] = proto.ChatLogprobs(content=self.pending[i]), []
        return proto.ChunkChoice(index=i, delta=delta, logprobs=logprobs, finish_reason=reason)
