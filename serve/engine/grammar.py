"""Grammar constraints (JSON Schema, regex, Lark) compiled for the model's tokenizer with llguidance.

A `Constraint` is the text of one grammar; `compile_grammar` turns it into a `CompiledGrammar`, a
matcher in its start state that every constrained row copies (`new_matcher`). Compiling is bounded:
the constraint text by `GrammarLimits.max_bytes`, the work by llguidance's parser limits (fuel,
lexer states, grammar size), and the waiting by `GrammarLimits.compile_timeout` (grammar_pool.py).
A pathological schema must never hang the server: TGI (issue 2681) spun a CPU forever on a schema
with a dozen optional array properties, because its regex translation is exponential in them.

JSON is generated compact (no whitespace between tokens, `,` and `:` as separators): with flexible
whitespace a model can emit spaces until `max_tokens` and still be "valid" at every step.
"""

from __future__ import annotations

import enum
import json
import time
from dataclasses import dataclass
from typing import Any

import llguidance

# Forced on every JSON schema (as overrides, so a schema's own `x-guidance` cannot loosen them).
COMPACT_JSON: dict[str, Any] = {"whitespace_flexible": False, "item_separator": ",", "key_separator": ":"}
ANY_JSON_OBJECT: dict[str, Any] = {"type": "object"}


class GrammarKind(str, enum.Enum):
    """How the text of a constraint is read."""

    JSON_SCHEMA = "json_schema"
    REGEX = "regex"
    LARK = "lark"


@dataclass(frozen=True)
class Constraint:
    """One grammar as text; equal constraints share one compiled grammar (the cache key)."""

    kind: GrammarKind
    text: str

    @classmethod
    def json_schema(cls, schema: Any) -> Constraint:
        """A JSON Schema given as a parsed value. Key order is kept: it is the output's key order."""
        return cls(GrammarKind.JSON_SCHEMA, json.dumps(schema, separators=(",", ":"), ensure_ascii=False))

    @classmethod
    def json_object(cls) -> Constraint:
        """Any JSON object (OpenAI's `json_object` mode)."""
        return cls.json_schema(ANY_JSON_OBJECT)

    @classmethod
    def regex(cls, pattern: str) -> Constraint:
        """The whole output fully matches `pattern` (Rust regex syntax, close to Python's)."""
        return cls(GrammarKind.REGEX, pattern)

    @classmethod
    def lark(cls, grammar: str) -> Constraint:
        """A Lark grammar in llguidance's dialect (`%json {...}` embeds a schema)."""
        return cls(GrammarKind.LARK, grammar)


class GrammarError(ValueError):
    """A constraint that cannot be used; `message` is meant for the client (a 422)."""

    def __init__(self, message: str):
        super().__init__(message)
        self.message = message


class InvalidGrammar(GrammarError):
    """The schema, pattern or grammar is malformed or unsatisfiable."""


class GrammarTooLarge(GrammarError):
    """The constraint exceeds the size or complexity budget."""


class GrammarTooSlow(GrammarError):
    """The constraint did not compile within the time budget."""


@dataclass(frozen=True)
class GrammarLimits:
    """Budgets for one grammar. llguidance's own limits bound the CPU work deterministically.

    Speeds from llguidance's documentation: lexer fuel ~50k/ms at compile time and ~14k/ms per step,
    Earley items ~20k/ms, a lexer state costs 1-2 kB of memory.
    """

    max_bytes: int = 256 * 1024  # constraint text
    compile_timeout: float = 5.0  # seconds a request waits for its grammar, queueing included
    max_grammar_size: int = 500_000  # symbols in the productions (llguidance's default)
    initial_lexer_fuel: int = 2_000_000  # ~40 ms of lexer construction
    step_lexer_fuel: int = 200_000  # ~15 ms per token, at worst
    step_max_items: int = 50_000  # ~2.5 ms per token, at worst
    max_lexer_states: int = 20_000  # ~40 MB at worst per grammar
    probe_tokens: int = 4  # steps walked at compile time (`probe`): a grammar that fails on its first tokens is a 422
    # The walk's mean time per token, at most: past it the grammar would stall every row of the batch at
    # each step (a{500000} costs ~0.4 s a token on SmolLM2's vocabulary, more than a whole decode step).
    max_step_seconds: float = 0.1

    def parser_limits(self) -> llguidance.LLParserLimits:
        """The llguidance form; `verbose_errors` off so messages do not echo the whole grammar."""
        return llguidance.LLParserLimits(
            max_grammar_size=self.max_grammar_size,
            initial_lexer_fuel=self.initial_lexer_fuel,
            step_lexer_fuel=self.step_lexer_fuel,
            step_max_items=self.step_max_items,
            max_lexer_states=self.max_lexer_states,
            verbose_errors=False,
        )


DEFAULT_LIMITS = GrammarLimits()


class CompiledGrammar:
    """A constraint compiled for one tokenizer: a start-state matcher that rows copy."""

    def __init__(self, constraint: Constraint, template: llguidance.LLMatcher, seconds: float):
        self.constraint = constraint
        self.seconds = seconds  # compile time, for logs and the bench
        self._template = template  # never advanced: only copied

    def new_matcher(self) -> llguidance.LLMatcher:
        """A fresh matcher at the start of the grammar (a deep copy: tens of microseconds)."""
        return self._template.deep_copy()


def grammar_tokenizer(hf_tokenizer: Any, eos_ids: set[int] | None = None) -> llguidance.LLTokenizer:
    """llguidance's view of a fast Hugging Face tokenizer (~1-2 s: build it once per process).

    Every id in `eos_ids` (the engine's EOS set) ends a grammar where the grammar accepts.
    """
    import llguidance.hf  # imports transformers: only where a Hugging Face tokenizer is at hand

    eos = sorted(eos_ids) if eos_ids else None
    return llguidance.hf.from_tokenizer(hf_tokenizer, eos_token=eos)


def grammar_source(constraint: Constraint) -> str:
    """llguidance's serialized grammar for `constraint`; InvalidGrammar if it is not even readable."""
    try:
        if constraint.kind is GrammarKind.JSON_SCHEMA:
            options: Any = COMPACT_JSON  # llguidance types it as a TypedDict that exists only in its stubs
            return llguidance.LLMatcher.grammar_from_json_schema(constraint.text, overrides=options)
        if constraint.kind is GrammarKind.REGEX:
            return llguidance.LLMatcher.grammar_from_regex(constraint.text)
        return llguidance.LLMatcher.grammar_from_lark(constraint.text)
    except ValueError as exc:  # a schema that is not a JSON object
        raise InvalidGrammar(f"invalid {constraint.kind.value}: {exc}") from exc


def compile_grammar(
    constraint: Constraint, tokenizer: llguidance.LLTokenizer, limits: GrammarLimits = DEFAULT_LIMITS
) -> CompiledGrammar:
    """Compile `constraint` (blocking: call it on a worker thread). Raises a GrammarError subclass."""
    size = len(constraint.text.encode("utf-8"))
    if size > limits.max_bytes:
        raise GrammarTooLarge(
            f"the {constraint.kind.value} is {size} bytes; at most {limits.max_bytes} bytes can be compiled"
        )
    started = time.perf_counter()
    matcher = llguidance.LLMatcher(tokenizer, grammar_source(constraint), log_level=0, limits=limits.parser_limits())
    if not matcher.is_error():
        matcher.compute_bitmask()  # the first mask builds the start lexer state once, for every copy
    if matcher.is_error():
        raise _classify(constraint, matcher.get_error())
    walk_started = time.perf_counter()
    error = probe(matcher, limits.probe_tokens)
    if error is not None:
        raise _classify(constraint, error)
    per_token = (time.perf_counter() - walk_started) / max(1, limits.probe_tokens)
    if per_token > limits.max_step_seconds:
        raise GrammarTooLarge(
            f"the {constraint.kind.value} is too complex to follow: each token costs about {per_token * 1e3:.0f} ms "
            f"to constrain (at most {limits.max_step_seconds * 1e3:.0f} ms); simplify it")
    return CompiledGrammar(constraint, matcher, time.perf_counter() - started)


def probe(template: llguidance.LLMatcher, tokens: int) -> str | None:
    """Walk a copy of `template` `tokens` steps (the lowest allowed token id each time); llguidance's
    error if a step fails, else None.

    Some grammars build their start state and first mask, then fail on the first token: the lexer
    derives `a{1000000}` into `a{999999}` and runs out of expressions ("lexer error: too many
    expressions constructed"). Found here, that is a 422 before any byte is sent, not a 424 from
    the engine. The steps are the engine's own (mask, consume), within llguidance's step limits.
    """
    matcher = template.deep_copy()
    for _ in range(tokens):
        mask = matcher.compute_bitmask()
        if matcher.is_error():
            return matcher.get_error()
        for token in _set_bits(mask, 8):
            matcher.consume_token(token)
            if matcher.is_error():
                return matcher.get_error()
            if not matcher.is_stopped():
                break
            matcher.rollback(1)  # an end-of-sequence token (special ids are often the lowest): try the next
        else:
            return None  # nothing allowed but the end: the walk is over
    return None


def _set_bits(mask: bytes, most: int) -> list[int]:
    """The `most` lowest token ids a packed little-endian bitmask allows."""
    ids: list[int] = []
    start = len(mask) - len(mask.lstrip(b"\0"))  # the first non-zero byte, found in C
    for byte in range(start, len(mask)):
        value = mask[byte]
        while value and len(ids) < most:
            low = value & -value
            ids.append(byte * 8 + low.bit_length() - 1)
            value ^= low
        if len(ids) >= most:
            break
    return ids


def _classify(constraint: Constraint, error: str) -> GrammarError:
    """The client's message: llguidance's first line, plus the `error:` line regex errors put below
    a caret drawing (`regex parse error: ... error: unclosed group`)."""
    lines = [line.strip() for line in error.strip().splitlines() if line.strip()] or ["unknown error"]
    detail = " ".join([lines[0]] + [line for line in lines[1:] if line.startswith("error:")])[:300]
    if "too big" in error or "limit" in error or "too complex" in error.lower() or "too many" in error or "max is" in error:
        return GrammarTooLarge(f"the {constraint.kind.value} is too complex to compile: {detail}")
    return InvalidGrammar(f"invalid {constraint.kind.value}: {detail}")
