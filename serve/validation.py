"""The validation boundary: a parsed request and the server's limits in, engine requests out.

Every limit a client can run into, and the message it then reads, lives here, in the words TGI's
and OpenAI's clients know (TGI's `router/src/validation.rs` plays the same part). Before it, the
pydantic schemas of `serve/protocol/` have checked each field's type and range; after it, the
engine only asserts its own invariants. Each API goes through the same four stages:

1. fields: cheap checks with no tokenizer (how many stop strings, which combinations, what this
   server does not support);
2. prepare: render the chat template, tokenize, truncate (the costly stage: it runs on the
   off-hub pool's OS threads, serve/offhub.py, while the handler's greenlet waits cooperatively);
3. token counts: the prompt's length, the new-token budget, the KV budget; then `SamplingParams`;
4. grammar: a `response_format`, `grammar` or tool constraint is compiled (on the grammar compiler's
   threads; the handler's greenlet waits cooperatively), so that an invalid, too large or too slow
   one is a 422 before any byte of the answer is sent.

Every refusal is an `ApiError`, 422 `validation` naming the field (`template_error` for templates).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from serve import chat_template, offhub
from serve.config import Settings
from serve.engine.grammar import Constraint, GrammarError
from serve.engine.request import GenerationRequest, SamplingParams
from serve.protocol import errors
from serve.protocol.generate import GenerateParameters, GenerateRequest
from serve.protocol.openai import ChatCompletionRequest, CompletionRequest, SamplingFields
from serve.structured import StructuredRequestError
from serve.structured.constraints import grammar_constraint, response_format_constraint
from serve.structured.tool_prompt import tool_messages
from serve.structured.tools import ToolPlan, plan_tools

if TYPE_CHECKING:  # serve.engine.config imports torch; the app must import without it (docs/architecture.md)
    from serve.engine.config import EngineConfig
    from serve.engine.grammar_pool import GrammarCompiler


def invalid(message: str, param: str | None) -> errors.ApiError:
    """A 422 `validation` error in TGI's words ("Input validation error: ...")."""
    return errors.validation(f"Input validation error: {message}", param)


@dataclass(frozen=True)
class ChatPrompt:
    """A chat request as the engine runs it, and how it uses tools (None: no tool in play)."""

    request: GenerationRequest
    tools: ToolPlan | None


@dataclass(frozen=True)
class CompletionPrompt:
    """One prompt of a completions request: what the engine runs, and the text `echo` repeats."""

    request: GenerationRequest
    text: str


class Validator:
    """Checks requests against one server's limits: its Settings and its engine's EngineConfig."""

    def __init__(self, settings: Settings, limits: EngineConfig, tokenizer: Any, model_name: str,
                 model_vocab: int | None = None, grammars: GrammarCompiler | None = None,
                 prepare: offhub.OffHub | None = None):
        self.settings, self.limits, self.tokenizer = settings, limits, tokenizer
        self.model_name, self.model_vocab, self.grammars = model_name, model_vocab, grammars
        self.prepare = prepare or offhub.pool(settings.prepare_threads)  # the costly stage runs there

    @functools.cached_property
    def vocab_size(self) -> int:
        """How many token ids a request may name: those both the tokenizer and the model know."""
        size = len(self.tokenizer)
        return size if self.model_vocab is None else min(size, self.model_vocab)

    # -- TGI generate --------------------------------------------------------------------------------
    def generate(self, req: GenerateRequest) -> GenerationRequest:
        """A generate request as the engine runs it, or a 422."""
        p = req.parameters
        self._generate_fields(req)  # 1. fields
        constraint = structured(lambda: grammar_constraint(p.grammar))
        ids = self.prepare.run(self._generate_prompt, req)  # 2. prepare (off the hub)
        max_new = self._new_tokens(ids, "inputs", p.max_new_tokens, "max_new_tokens")  # 3. token counts
        self._kv_budget(len(ids), max_new, p.best_of or 1, "max_new_tokens", "best_of")
        params = generate_params(p, max_new)
        params.grammar = self._compiled(constraint, "parameters.grammar")  # 4. grammar
        return GenerationRequest(ids, params)

    def _generate_prompt(self, req: GenerateRequest) -> list[int]:
        """Tokenize as TGI does (with the model's special tokens), then keep the last `truncate`."""
        ids = list(self.tokenizer(req.inputs)["input_ids"])
        truncate = req.parameters.truncate
        return ids if truncate is None else ids[-truncate:]

    def _generate_fields(self, req: GenerateRequest) -> None:
        p, s = req.parameters, self.settings
        if not req.inputs:
            raise invalid("`inputs` cannot be empty", "inputs")
        self._stops(p.stop, "parameters.stop")
        if (p.top_n_tokens or 0) > s.max_top_n_tokens:
            raise invalid(f"`top_n_tokens` must be >= 0 and <= {s.max_top_n_tokens}. Given: {p.top_n_tokens}",
                          "parameters.top_n_tokens")
        if (p.best_of or 1) > s.max_best_of:
            raise invalid(f"`best_of` must be > 0 and <= {s.max_best_of}. Given: {p.best_of}", "parameters.best_of")
        if req.stream and (p.best_of or 1) > 1:
            raise invalid("`best_of` != 1 is not allowed for streaming", "parameters.best_of")
        if req.stream and p.decoder_input_details:
            raise invalid("`decoder_input_details` == true is not supported when streaming tokens",
                          "parameters.decoder_input_details")
        if p.adapter_id not in (None, "", self.model_name):
            raise invalid(f"adapter `{p.adapter_id}` is not loaded", "parameters.adapter_id")
        if p.truncate is not None and p.truncate > self.limits.max_input_tokens:
            raise invalid(f"`truncate` must be strictly positive and less than {self.limits.max_input_tokens}. "
                          f"Given: {p.truncate}", "parameters.truncate")

    # -- OpenAI chat completions and completions -----------------------------------------------------
    def chat(self, req: ChatCompletionRequest) -> ChatPrompt:
        """A chat request as the engine runs it, or a 422 (`template_error` when the template fails)."""
        self._openai_fields(req)  # 1. fields
        plan = structured(lambda: plan_tools(req.tools, req.tool_choice, req.parallel_tool_calls,
                                             req.response_format))
        constraint = plan.constraint if plan else structured(lambda: response_format_constraint(req.response_format))
        ids = self.prepare.run(self._chat_prompt, req, plan)  # 2. prepare (off the hub)
        max_new = self._new_tokens(ids, "messages", req.token_limit, "max_tokens")  # 3. token counts
        self._kv_budget(len(ids), max_new, req.n, "max_tokens", "n")
        top_n = (req.top_logprobs or 0) if req.logprobs else 0
        params = openai_params(req, max_new, req.n, top_n)
        params.grammar = self._compiled(constraint, "tools" if plan else "response_format")  # 4. grammar
        return ChatPrompt(GenerationRequest(ids, params), plan)

    def _chat_prompt(self, req: ChatCompletionRequest, plan: ToolPlan | None) -> list[int]:
        """The messages (with the tools offered, if any) rendered with the chat template, then tokenized."""
        for message in req.messages:
            for part in message.content if isinstance(message.content, list) else ():
                if part.type != "text":
                    raise invalid(f"content parts of type `{part.type}` are not supported by this text-only "
                                  "model; send `text` parts", "messages")
        template = chat_template.template_text(self.tokenizer, self.settings.chat_template)
        messages, tools = tool_messages([m.as_template_message() for m in req.messages], plan, template,
                                        req.tool_prompt)
        try:
            return chat_template.encode_messages(self.tokenizer, messages, self.settings.chat_template, tools)
        except chat_template.TemplateError as exc:
            raise errors.template_error(str(exc)) from None

    def completions(self, req: CompletionRequest) -> list[CompletionPrompt]:
        """Every prompt of a completions request as the engine runs it, or a 422 for the first bad one."""
        self._openai_fields(req)  # 1. fields
        constraint = structured(lambda: response_format_constraint(req.response_format))
        n, n_field = (req.best_of, "best_of") if req.best_of else (req.n, "n")
        out = []
        for prompt in req.prompts():
            ids, text = self.prepare.run(self._completion_prompt, prompt)  # 2. prepare (off the hub)
            max_new = self._new_tokens(ids, "prompt", req.max_tokens, "max_tokens")  # 3. token counts
            params = openai_params(req, max_new, n, req.logprobs or 0)
            params.prefill_logprobs = bool(req.echo and req.logprobs is not None)
            out.append(CompletionPrompt(GenerationRequest(ids, params), text))
        for done in out:  # every prompt's own limits first, then the KV budget, as the engine did
            self._kv_budget(len(done.request.prompt_ids), done.request.params.max_new_tokens, n, "max_tokens", n_field)
        grammar = self._compiled(constraint, "response_format")  # 4. grammar (once: the prompts share it)
        for done in out:
            done.request.params.grammar = grammar
        return out

    def _openai_fields(self, req: SamplingFields) -> None:
        s = self.settings
        self._stops(req.stop, "stop")
        if isinstance(req, ChatCompletionRequest):
            if len(req.messages) > s.max_messages:
                raise invalid(f"`messages` supports up to {s.max_messages} messages. Given: {len(req.messages)}",
                              "messages")
            top, top_field = (req.top_logprobs or 0) if req.logprobs else 0, "top_logprobs"
        else:
            assert isinstance(req, CompletionRequest)
            count = len(req.prompts())
            if count > s.max_prompts:
                raise invalid(f"`prompt` supports up to {s.max_prompts} prompts in one request. Given: {count}",
                              "prompt")
            top, top_field = req.logprobs or 0, "logprobs"
            if (req.best_of or 1) > s.max_best_of:  # best_of >= n (the schema checked it)
                raise invalid(f"`best_of` must be > 0 and <= {s.max_best_of}. Given: {req.best_of}", "best_of")
        if req.n > s.max_best_of:  # n sequences cost what TGI's best_of does: one row each
            raise invalid(f"`n` must be > 0 and <= {s.max_best_of}. Given: {req.n}", "n")
        if top > s.max_top_n_tokens:
            raise invalid(f"`{top_field}` must be >= 0 and <= {s.max_top_n_tokens}. Given: {top}", top_field)
        bias = req.logit_bias or {}
        if len(bias) > self.settings.max_logit_bias:
            raise invalid(f"`logit_bias` supports up to {self.settings.max_logit_bias} entries. Given: {len(bias)}",
                          "logit_bias")
        for token in bias:
            if token >= self.vocab_size:
                raise invalid(f"`logit_bias` token id {token} is out of range (vocabulary size {self.vocab_size})",
                              "logit_bias")

    def _completion_prompt(self, prompt: str | list[int]) -> tuple[list[int], str]:
        """(token ids, text) of one completions prompt; token-id prompts must be in the vocabulary."""
        if isinstance(prompt, str):
            return list(self.tokenizer(prompt)["input_ids"]), prompt
        if any(t < 0 or t >= self.vocab_size for t in prompt):
            raise invalid(f"`prompt` token ids must be in 0..{self.vocab_size - 1}", "prompt")
        return list(prompt), self.tokenizer.decode(prompt)

    # -- what every API shares -----------------------------------------------------------------------
    def _compiled(self, constraint: Constraint | None, param: str) -> Constraint | None:
        """`constraint`, once it is known to compile (the engine then finds it in the compiler's cache)."""
        if constraint is None:
            return None
        if self.grammars is None:
            raise invalid("structured output (`response_format`, `grammar`, `tools`) is not available: "
                          "this model's tokenizer cannot drive a grammar", param)
        try:
            self.grammars.submit(constraint).wait()
        except GrammarError as exc:
            raise invalid(f"`{param}` is not valid: {exc.message}", param) from None  # TGI: "grammar is not valid"
        return constraint

    def _stops(self, stop: list[str], param: str) -> None:
        limit, length = self.settings.max_stop_sequences, self.settings.max_stop_length
        if len(stop) > limit:
            raise invalid(f"`stop` supports up to {limit} stop sequences. Given: {len(stop)}", param)
        longest = max((len(s) for s in stop), default=0)
        if longest > length:
            raise invalid(f"`stop` sequences must be at most {length} characters long. Given: {longest}", param)

    def _new_tokens(self, ids: list[int], field: str, requested: int | None, limit_field: str) -> int:
        """The prompt's length, then the new tokens it leaves room for: `requested`, or when unset all
        that MAX_TOTAL_TOKENS leaves."""
        limit, total = self.limits.max_input_tokens, self.limits.max_total_tokens
        if not ids:
            raise invalid(f"`{field}` cannot be empty", field)
        if len(ids) > limit:
            raise invalid(f"`{field}` must have less than {limit} tokens. Given: {len(ids)}", field)
        room = total - len(ids)
        if requested is None and room < 1:
            raise invalid(f"`{field}` must have less than {total} tokens. Given: {len(ids)}", field)
        if requested is not None and requested > room:
            raise invalid(f"`inputs` tokens + `{limit_field}` must be <= {total}. "
                          f"Given: {len(ids)} `inputs` tokens and {requested} `{limit_field}`", limit_field)
        return room if requested is None else requested

    def _kv_budget(self, prompt_tokens: int, max_new: int, n: int, limit_field: str, n_field: str) -> None:
        """All `n` sequences of a request must fit in the KV cache at once, or it could never run."""
        reason = self.limits.unfit_reason(prompt_tokens, max_new, n)  # the engine's own block accounting
        if reason is not None:
            raise invalid(f"{reason}; lower `{limit_field}` or `{n_field}`", limit_field)


def structured(build: Callable[[], Any]) -> Any:
    """`build()`, with serve/structured's refusals turned into 422s naming their field."""
    try:
        return build()
    except StructuredRequestError as exc:
        raise invalid(exc.message, exc.field) from None


# -- SamplingParams: request value, else the neutral default (which switches the step off) ----------
SAMPLING_EPS = 1e-5  # vLLM's: a temperature below it means greedy
MIN_TEMPERATURE = 1e-2  # vLLM raises a lower one to this: logits / 1e-46 overflow float32, softmax gives NaN
MAX_TEMPERATURE = 1e4  # past it the distribution is already flat; 1e308 would be inf in float32 (inf / inf)


def sane_temperature(value: float | None) -> float:
    """A temperature the float32 sampler can divide by: 0 (greedy) or MIN_TEMPERATURE..MAX_TEMPERATURE."""
    if value is None:
        return 1.0
    if value < SAMPLING_EPS:
        return 0.0
    return min(max(value, MIN_TEMPERATURE), MAX_TEMPERATURE)


def generate_params(p: GenerateParameters, max_new: int) -> SamplingParams:
    """TGI semantics: greedy unless `do_sample` or a warper; multiplicative repetition penalty."""
    return SamplingParams(
        max_new_tokens=max_new,
        temperature=sane_temperature(p.temperature),
        do_sample=p.do_sample,
        top_k=p.top_k or 0,
        top_p=1.0 if p.top_p is None else p.top_p,
        typical_p=1.0 if p.typical_p is None else p.typical_p,
        repetition_penalty=p.repetition_penalty or 1.0,
        frequency_penalty=p.frequency_penalty or 0.0,
        seed=p.seed,
        stop=list(p.stop),
        top_n_tokens=p.top_n_tokens or 0,
        prefill_logprobs=p.decoder_input_details,
        n=p.best_of or 1,
        watermark=p.watermark,
    )


def openai_params(req: SamplingFields, max_new: int, n: int, top_n: int) -> SamplingParams:
    """OpenAI semantics: sampling unless temperature is 0; additive presence/frequency penalties."""
    temperature = sane_temperature(req.temperature)
    return SamplingParams(
        max_new_tokens=max_new,
        temperature=temperature,
        do_sample=temperature > 0,
        top_p=1.0 if req.top_p is None else req.top_p,
        frequency_penalty=req.frequency_penalty or 0.0,
        presence_penalty=req.presence_penalty or 0.0,
        logit_bias={int(k): float(v) for k, v in (req.logit_bias or {}).items()},
        seed=req.seed,
        stop=list(req.stop),
        top_n_tokens=top_n,
        n=n,
    )
