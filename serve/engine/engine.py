"""The engine: one OS thread running schedule -> one forward (decode every row, prefill newcomers) -> sample, forever.

API: `submit` (returns a RequestHandle), `cancel`, `step` (one iteration; the thread calls it),
`healthy`, `drain`, `shutdown`, and for a watchdog `seconds_since_progress` and `abort`. The thread
is a real OS thread even under gevent's monkey-patching (a patched `threading.Thread` would be a
greenlet and freeze the hub while the model runs). What a failure costs is decided in faults.py.
"""

from __future__ import annotations

import collections
import contextlib
import functools
import inspect
import logging
import random
import time
from collections.abc import Iterator

import torch

from serve.engine.batch import KVBatch
from serve.engine.blocks import BlockPool
from serve.engine.channel import OSEvent, RequestHandle
from serve.engine.config import EngineConfig, kv_shape
from serve.engine.decoder import Decoder
from serve.engine.detokenize import TokenTexts
from serve.engine.faults import Action, EngineFault, Scope, StepHealth, decide, describe
from serve.engine.grammar_gate import GrammarGate
from serve.engine.grammar_pool import GrammarCompiler
from serve.engine.idle import IdleReport, trim_heap
from serve.engine.interfaces import CausalLM, Tokenizer, eos_ids_of
from serve.engine.osthread import allocate_lock, start_os_thread
from serve.engine.paged import ATTENTION, PagedCache
from serve.engine.prefix_cache import PrefixCache
from serve.engine.publish import Publisher
from serve.engine.request import (
    EngineError,
    EngineOverloaded,
    EngineUnavailable,
    GenerationRequest,
    GrammarRejected,
    PrefillEvent,
    RequestState,
    RequestStatus,
    SamplingParams,
    TokenInfo,
)
from serve.engine.sampling import SampleResult, SamplingState, sample_rowwise
from serve.engine.scheduler import Scheduler
from serve.engine.sequence import SequenceState

log = logging.getLogger(__name__)

__all__ = ["Engine"]

GATE_TICK = 0.5  # seconds: the longest the loop sleeps while requests only wait for their grammar


class Engine:
    """Continuous batching over a paged KV cache (see batch.py)."""

    def __init__(self, model: CausalLM, tokenizer: Tokenizer, config: EngineConfig,
                 grammars: GrammarCompiler | None = None):
        """`grammars` compiles the requests' `SamplingParams.grammar` (without it, such requests are refused)."""
        self.model, self.tokenizer, self.config = model, tokenizer, config
        self.grammars = grammars
        self.device = next(model.parameters()).device
        text_cfg = model.config.get_text_config()
        self.num_layers = text_cfg.num_hidden_layers
        head = model.get_output_embeddings()  # an nn.Linear, or a quantized one without a float weight
        self.vocab_size = getattr(head, "out_features", None) or head.weight.shape[0]
        self.eos_token_ids = eos_ids_of(model, tokenizer)
        self.special_ids = frozenset(tokenizer.all_special_ids) | frozenset(self.eos_token_ids)
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else min(self.eos_token_ids)
        self.token_text = TokenTexts(tokenizer)
        self._publisher = Publisher(self.vocab_size, self.token_text, self.special_ids, self._fail,
                                    functools.partial(self._end, status=RequestStatus.FINISHED))
        self.scheduler = Scheduler(config)
        self.prefix_cache = PrefixCache(config.prefix_cache_tokens)
        self.pool = BlockPool(config.pool_blocks, config.block_size, *kv_shape(model))
        model.set_attn_implementation(ATTENTION)  # attention reads the pool (paged.py); plain SDPA otherwise
        self._keep_arg = "logits_to_keep" in inspect.signature(model.forward).parameters
        self.decoder = Decoder.of(model)  # the engine's own forward for Llama-shaped models (decoder.py)
        # Raw locks only: this object is shared between a real OS thread and gevent greenlets.
        self._lock = allocate_lock()
        self._wake = OSEvent()
        self._exited = OSEvent()
        self._loop_done = False  # read by other threads (the OSEvent above is consumed by its waiter)
        self._waiting: collections.deque[RequestState] = collections.deque()
        # Requests whose grammar is still compiling wait here, off the admission queue (grammar_gate.py).
        self._gate: GrammarGate[RequestState] = GrammarGate(self._wake.set)
        self._cancelled: set[str] = set()
        self._requests: dict[str, RequestState] = {}
        self._rows: list[SequenceState] = []  # one per batch row, in row order
        self._batch: KVBatch | None = None
        self._sampling: SamplingState | None = None
        self._last_ids: torch.Tensor | None = None
        self._thread: int | None = None
        self._stopping = False
        self._draining = False
        self.healthy = False
        self.error: str | None = None
        self.steps = 0
        # Health over time: when a step last finished (or work reached an idle engine), for the
        # watchdog; failed steps in a row and out-of-memory errors, for faults.py's rules.
        self.last_progress = time.monotonic()
        self._health = StepHealth()
        self.idle_report = IdleReport()  # when the loop logs `idle_summary` (idle.py)

    # -- public API -------------------------------------------------------------------------------
    def start(self) -> None:
        """Start the decode loop on a real OS thread."""
        # `threading.Thread`, even the original class, would start a greenlet under monkey-patching.
        self.healthy = True
        self._thread = start_os_thread(self._run)

    def warmup(self, timeout: float = 300.0) -> None:
        """Push one tiny request through prefill and decode (and fail loudly if that breaks)."""
        handle = self.submit(GenerationRequest([self.pad_id, self.pad_id], SamplingParams(max_new_tokens=2)))
        deadline = time.monotonic() + timeout
        for _ in handle:
            if time.monotonic() > deadline:
                raise TimeoutError("engine warmup timed out")

    @property
    def active_requests(self) -> int:
        """Requests waiting or running."""
        return len(self._requests)

    def submit(self, request: GenerationRequest) -> RequestHandle:
        """Queue a request; raises ValueError (a broken invariant), EngineOverloaded or EngineUnavailable.

        Requests arrive validated (the HTTP boundary owns every limit and message); the checks here
        only keep out what would break the engine itself.
        """
        check_invariants(request, self.config, self.vocab_size, self.grammars is not None)
        with self._lock:
            if not self.healthy or self._draining or self._stopping:
                raise EngineUnavailable(self.error or "the engine is not accepting requests")
            # A cancelled request (its client left) no longer counts, though its rows leave the batch
            # only at the next step: under load a step takes seconds, and its slot is free now.
            cancelled = sum(1 for rid in self._cancelled if rid in self._requests)
            if len(self._requests) - cancelled >= self.config.max_concurrent_requests:
                raise EngineOverloaded(
                    f"Model is overloaded: more than {self.config.max_concurrent_requests} requests in flight"
                )
            if not self._requests:  # the engine was idle: the stall clock starts now, not at the last step
                self.last_progress = time.monotonic()
            handle = RequestHandle(request.request_id, self.cancel)
            state = RequestState(request, handle)
            self._requests[request.request_id] = state
            if self.grammars is None or request.params.grammar is None:
                self._waiting.append(state)
            else:  # never blocks: a cached grammar is ready at the next step, others compile on their threads
                self._gate.hold(state, self.grammars.submit(request.params.grammar))
        self._wake.set()
        return handle

    def cancel(self, request_id: str) -> None:
        """Drop a request at the next step (its rows leave the batch then)."""
        with self._lock:
            self._cancelled.add(request_id)
        self._wake.set()

    def drain(self) -> None:
        """Refuse new requests; those in flight finish."""
        self._draining = True

    def shutdown(self, timeout: float = 10.0) -> None:
        """Stop the loop; requests still in flight fail. Waits up to `timeout` s (0: not at all)."""
        self._stopping = True
        self._wake.set()
        if self._thread is not None and timeout > 0:
            self._exited.wait(timeout)

    @property
    def stopped(self) -> bool:
        """The loop has exited (or never started)."""
        return self._thread is None or self._loop_done

    def seconds_since_progress(self) -> float:
        """How long work has waited for a step to finish (0 when idle). Reads two attributes only."""
        return time.monotonic() - self.last_progress if self._requests else 0.0

    def abort(self, reason: str, error: type[EngineError] = EngineError) -> None:
        """Another thread's verdict (the loop is stuck, or shutdown's deadline came): refuse new work
        and fail every request now with `error(reason)`.

        Only the handles are touched (they are thread-safe); the loop's own state is left to its
        thread, and the worker is about to exit anyway.
        """
        self.error, self.healthy, self._stopping = reason, False, True
        self._wake.set()
        with self._lock:
            pending = list(self._requests.values())
        for req in pending:
            req.handle.fail(error(reason))

    def idle_summary(self) -> str:
        """What the engine holds, as its idle line says it: all zeros once every request has ended."""
        held, queued = self._holding()
        return (f"engine idle: {held} requests held ({queued} queued), {len(self._rows)} rows, KV blocks held "
                f"by rows {self.pool.blocks_in_use} of {self.pool.num_blocks}, at most {self.pool.peak_in_use} so far "
                f"(the prefix cache keeps "
                f"{self.prefix_cache.tokens} tokens in {len(self.prefix_cache)} prompts, outside the pool)")

    def _holding(self) -> tuple[int, int]:
        """Requests the engine holds, and how many of them wait for admission or their grammar."""
        with self._lock:
            return len(self._requests), len(self._waiting) + len(self._gate)

    @property
    def batch_size(self) -> int:
        """Rows in the running batch (for tests and metrics)."""
        batch = self._batch  # read once: the engine thread may drop it meanwhile
        return batch.size if batch is not None else 0

    @property
    def kv_tokens(self) -> int:
        """Tokens cached for the running rows (for tests and metrics)."""
        batch = self._batch
        return batch.tokens if batch is not None else 0

    @property
    def kv_bytes(self) -> int:
        """KV bytes held now: the block pool's tensors and the prefix cache's entries."""
        return self.pool.nbytes + self.prefix_cache.nbytes

    @property
    def kv_peak_bytes(self) -> int:
        """The most KV bytes held at any moment so far, at most `config.kv_budget_bytes`.

        An upper bound: the pool, plus the prefix cache at its largest, plus the largest gather of
        one layer's keys and values for attention (the only transient KV copy).
        """
        per_layer = self.config.kv_bytes_per_token // self.num_layers
        return self.pool.nbytes + self.prefix_cache.peak_nbytes + self.pool.peak_gathered * per_layer

    # -- the loop -----------------------------------------------------------------------------------
    def _run(self) -> None:
        try:
            with torch.inference_mode():
                while not self._stopping:
                    if self._waiting or self._rows or self._cancelled:
                        self._step_and_check()
                    elif len(self._gate):
                        # Only compiles pending: sleep until one finishes (its callback sets the event),
                        # a deadline passes, or a tick; the step after marks progress, so the
                        # watchdog never mistakes a request waiting for its grammar for a stall.
                        self._wake.wait(min(GATE_TICK, self._gate.wake_in() or 0.0))
                        self._step_and_check()
                    else:
                        self._wake.wait(self._report_idle())  # submit/cancel/shutdown set it: no polling
        except BaseException as exc:  # a fault, or the loop itself broke: nothing can be trusted any more
            self.healthy = False  # first: /ping says 503 from this moment
            if isinstance(exc, EngineFault):
                self.error = str(exc)
            else:
                self.error = f"engine failure: {type(exc).__name__}: {describe(exc)}"
            log.critical("engine stopped: %s", self.error, exc_info=exc)
        self._fail_all(self.error or "the engine stopped")
        self._loop_done = True
        self._exited.set()

    def _report_idle(self) -> float:
        """Log the idle line when it is due; how long the idle loop may sleep before looking again (-1: for ever)."""
        due = self.idle_report.due_in()
        if due is not None and due <= 0:
            held, queued = self._holding()
            # Idle, yet a request not queued or a block still held: nothing will ever free it.
            leaked = held > queued or self.pool.blocks_in_use > 0
            summary = self.idle_summary()  # the state that made it idle (a request may arrive during the trim)
            trim_heap()  # before the line: whoever reads the worker's RSS on seeing it sees the trimmed heap
            log.log(logging.WARNING if leaked else logging.INFO, summary)
            self.idle_report.reported()
            due = None
        return -1 if due is None else due

    def _step_and_check(self) -> None:
        """One step, then faults.py's rules over time (failed steps in a row); release memory after an OOM."""
        self.idle_report.busy()
        self._health.begin()
        self.step()
        self.last_progress = time.monotonic()
        self._health.end()
        if self._health.out_of_memory and self.device.type == "cuda":
            torch.cuda.empty_cache()  # the failed step's tensors are gone now: hand their blocks back

    def _forward_last(self, kind: str, inputs: dict) -> torch.Tensor:
        """`_forward`, keeping only the logits of each row's last new token: [rows, V]."""
        return self._forward(kind, inputs, inputs["paged_kv"].last)

    def _forward(self, kind: str, inputs: dict, keep: torch.Tensor | None = None) -> torch.Tensor:
        """Run a "prefill" or "decode" forward and count the outcome; a device error ends the loop (faults.py)."""
        try:
            logits = self.forward_model(inputs, keep)
        except Exception as exc:
            self._health.forward_failed(kind, exc)
            raise
        self._health.forward_succeeded(kind)
        return logits

    def forward_model(self, inputs: dict, keep: torch.Tensor | None) -> torch.Tensor:
        """The logits [N, V] of a forward's packed tokens (`batch.py`'s inputs), or of the `keep` ones only."""
        if self.decoder is not None:
            return self.decoder(inputs["input_ids"], inputs["paged_kv"], keep)
        # transformers' forward: the cache it writes through, and `logits_to_keep` where the model takes it
        extra = {"past_key_values": PagedCache(inputs["paged_kv"]), "use_cache": True}
        if keep is not None and self._keep_arg:
            return self.model(**inputs, **extra, logits_to_keep=keep).logits[0]
        logits = self.model(**inputs, **extra).logits[0]
        return logits if keep is None else logits.index_select(0, keep)

    @contextlib.contextmanager
    def _updating(self, what: str) -> Iterator[None]:
        """Marks an update of the running batch: an exception inside leaves it half-updated (faults.py)."""
        try:
            yield
        except Exception as exc:
            raise EngineFault(f"engine failure while {what}: {describe(exc)}") from exc

    def step(self) -> None:
        """One iteration: schedule (cancellations, admission), then one forward that decodes every row
        and prefills the newcomers (two when nothing runs yet, or a newcomer wants prompt logprobs)."""
        self._apply_cancellations()
        self._release_grammars()
        if self._batch is None and self.pool.blocks_in_use:  # a batch was dropped without handing its blocks back
            log.warning("reclaiming %d KV blocks of a dropped batch", self.pool.blocks_in_use)
            self.pool.reset()
        outstanding = self._batch.outstanding if self._batch is not None else 0
        free_tokens = (self.pool.free_blocks - outstanding) * self.config.block_size
        with self._lock:
            admitted = self.scheduler.admit(self._waiting, free_tokens, self.batch_size, self._cancelled)
        if admitted and self._rows and not any(r.params.prefill_logprobs for r in admitted):
            self._decode_joining(admitted)
        else:
            if admitted:
                self._prefill(admitted)
            if self._rows:
                self._decode()
        self.steps += 1

    def _apply_cancellations(self) -> None:
        with self._lock:
            cancelled, self._cancelled = self._cancelled, set()
            if not cancelled:
                return
            self._waiting = collections.deque(r for r in self._waiting if r.request.request_id not in cancelled)
        self._gate.drop(lambda r: r.request.request_id in cancelled)
        for rid in cancelled:
            req = self._requests.get(rid)
            if req is not None and req.active:
                self._end(req, RequestStatus.CANCELLED)
        self._drop_rows([i for i, s in enumerate(self._rows) if not s.req.active])

    def _release_grammars(self) -> None:
        """Requests whose grammar compiled join the admission queue (in arrival order); failed ones fail alone."""
        if not len(self._gate):
            return
        ready, failed = self._gate.release()
        for req, error in failed:
            self._fail(req, GrammarRejected(error.message))
        with self._lock:
            for req, grammar in ready:
                if req.active:
                    req.grammar = grammar
                    self._waiting.append(req)

    # -- prefill ------------------------------------------------------------------------------------
    def _prefill(self, admitted: list[RequestState]) -> None:
        _started(admitted)
        try:
            self._prefill_group(admitted)
        except Exception as exc:
            if len(admitted) == 1:
                log.exception("prefill failed")
                self._fail(admitted[0], f"prefill failed: {exc}")
                return
            for req in admitted:  # find the culprit: each request alone
                try:
                    self._prefill_group([req])
                except Exception as one_exc:
                    log.exception("prefill failed")
                    self._fail(req, f"prefill failed: {one_exc}")

    def _prefill_group(self, group: list[RequestState]) -> None:
        batch = self._allocate(group)
        try:
            last, prompt_logprobs = self._prefill_forward(batch, group)
            self._start_rows(batch, group, last, prompt_logprobs)
        finally:
            batch.release()  # rows that did not join the running batch (none once `_join` took them)

    def _allocate(self, group: list[RequestState]) -> KVBatch:
        """Blocks for the newcomers' prompts, with the cached prefixes of their prompts written in."""
        cfg = self.config
        prompts = [r.request.prompt_ids for r in group]
        # Prompt logprobs need every prompt position computed, so those requests skip the prefix cache.
        prefixes = [None if r.params.prefill_logprobs else self.prefix_cache.lookup(p) for r, p in zip(group, prompts)]
        limits = [cfg.row_blocks(len(p), r.params.max_new_tokens) for r, p in zip(group, prompts)]
        return KVBatch.allocate(self.pool, prompts, limits, prefixes, cfg.attention_tokens, self.device)

    def _start_rows(self, batch: KVBatch, group: list[RequestState], last: torch.Tensor,
                    prompt_logprobs: list[list[float]]) -> None:
        """The newcomers are prefilled (`last`: the logits of each prompt's last position): cache their
        prompts, fork their n sequences, sample their first tokens and join them to the running batch."""
        for i, req in enumerate(group):
            self.prefix_cache.insert(req.request.prompt_ids, functools.partial(batch.row_kv, i))
        repeats = [r.n for r in group]
        rows = [self._new_row(r, k) for r in group for k in range(r.n)]
        if any(n != 1 for n in repeats):
            batch.fork(repeats)
            last = last.repeat_interleave(torch.tensor(repeats, device=last.device), dim=0)
        sampling = SamplingState([s.req.params for s in rows], [s.seed for s in rows], [s.history for s in rows],
                                 self.vocab_size, self.device, [s.matcher for s in rows], self._grammar_vocab)
        result = self._sample(sampling, last, rows)
        for req in group:
            req.handle.timings.first_token = time.monotonic()
        self._join(batch, sampling, rows, result, self._prompt_events(group, prompt_logprobs))

    def _prefill_forward(self, batch: KVBatch, group: list[RequestState]) -> tuple[torch.Tensor, list[list[float]]]:
        """Run the prefill; returns the logits of each prompt's last position and the prompt logprobs asked.

        Logits of every position (prompt logprobs, or a model that cannot keep only some) are
        computed max_batch_size positions at a time, so they never outgrow a decode step's.
        """
        want_lp = [r.params.prefill_logprobs for r in group]
        every = any(want_lp) or not self._keep_arg
        chunk = self.config.max_batch_size if every else self.config.max_batch_prefill_tokens
        prompts = [r.request.prompt_ids for r in group]
        chosen: list[list[float]] = [[] for _ in group]
        last: list[torch.Tensor | None] = [None] * len(group)
        for inputs, first in batch.prefill_chunks(prompts, chunk):
            layout = inputs["paged_kv"]
            logits = self._forward("prefill", inputs) if every else self._forward_last("prefill", inputs)
            kept = 0
            for i, prompt in enumerate(prompts):
                n = layout.new[i]
                if n == 0:
                    continue
                mine = logits[layout.offsets[i] : layout.offsets[i] + n] if every else logits[kept : kept + 1]
                kept += 1
                if want_lp[i]:
                    chosen[i] += _prompt_logprobs(mine, prompt, first[i])
                if first[i] + n == len(prompt):
                    last[i] = mine[-1]
        assert all(t is not None for t in last), "a prompt was not prefilled to its end"
        return torch.stack(last), chosen  # type: ignore[arg-type]  # no None left, asserted above

    def _new_row(self, req: RequestState, k: int) -> SequenceState:
        p = req.params
        seed = None
        if not p.greedy:
            seed = p.seed + k if p.seed is not None else random.getrandbits(63)
        return SequenceState(req, k, seed, self.tokenizer, self.eos_token_ids, self.special_ids)

    def _prompt_events(self, group: list[RequestState], chosen: list[list[float]]) -> list[tuple[RequestState, PrefillEvent]]:
        """The prompt tokens with their logprobs, for the requests that asked."""
        events = []
        for req, lps in zip(group, chosen, strict=True):
            if req.params.prefill_logprobs:
                ids = req.request.prompt_ids
                tokens = [TokenInfo(ids[0], self.token_text(ids[0]), None, ids[0] in self.special_ids)]
                tokens += [TokenInfo(t, self.token_text(t), v, t in self.special_ids) for t, v in zip(ids[1:], lps)]
                events.append((req, PrefillEvent(tokens)))
        return events

    def _join(self, batch: KVBatch, sampling: SamplingState, rows: list[SequenceState], result,
              prompt_events: list[tuple[RequestState, PrefillEvent]]) -> None:
        """Merge freshly prefilled rows into the running batch, then send their prompt logprobs and first tokens.

        The merge comes first: if it raises, nothing of these rows was sent, so no client sees a
        first token twice; the running state may be half-merged, so that is an engine fault.
        Rows that finish with their first token leave right after.
        """
        with self._updating("merging new rows into the batch"):
            if self._batch is None or self._sampling is None or self._last_ids is None:
                state = (KVBatch(self.pool, [], self.config.attention_tokens, self.device).merged(batch), sampling,
                         list(rows), result.ids)
            else:
                last_ids = torch.cat([self._last_ids, result.ids])
                merged = self._batch.merged(batch)
                self._sampling.extend(sampling)
                state = (merged, self._sampling, self._rows + rows, last_ids)
            self._batch, self._sampling, self._rows, self._last_ids = state
        offset = len(self._rows) - len(rows)
        for req, event in prompt_events:
            req.handle.put(event)
        done = self._publish(rows, result)
        self._drop_rows([offset + i for i in done])

    # -- decode -------------------------------------------------------------------------------------
    def _decode(self) -> None:
        batch, sampling, last_ids = self._batch, self._sampling, self._last_ids
        if batch is None or sampling is None or last_ids is None:
            return
        try:
            logits = self._forward_last("decode", batch.decode_inputs(last_ids))
        except Exception as exc:  # the cache may hold half a step: drop the batch (TGI's clear_cache)
            log.error("decode step failed, failing its %d rows: %s", len(self._rows), describe(exc), exc_info=exc)
            self._discard_batch(f"generation failed: {describe(exc)}")
            return
        self._decoded(sampling, logits)

    def _decoded(self, sampling: SamplingState, logits: torch.Tensor) -> None:
        """Sample every running row from its logits [rows, V], send the tokens, drop the finished rows."""
        result = self._sample(sampling, logits, self._rows)
        self._last_ids = result.ids
        self._drop_rows(self._publish(self._rows, result))

    def _decode_joining(self, admitted: list[RequestState]) -> None:
        """Decode every running row and prefill the newcomers in one forward (one pass over the weights,
        so the running streams' next token does not wait for a separate prefill forward).

        Whatever goes wrong before the newcomers have joined is left to the two-forward path
        (`_prefill` then `_decode`), which decides who fails: the step is redone as two.
        """
        batch, sampling, last_ids = self._batch, self._sampling, self._last_ids
        assert batch is not None and sampling is not None and last_ids is not None
        _started(admitted)
        try:
            newcomers = self._allocate(admitted)
        except Exception as exc:
            log.warning("fused step: allocating the newcomers failed (%s); running them apart", describe(exc))
            self._prefill(admitted)
            self._decode()
            return
        try:
            advanced = False
            try:
                inputs = batch.decode_inputs(last_ids, newcomers, [r.request.prompt_ids for r in admitted])
                advanced = True
                logits = self._forward_last("decode", inputs)
            except Exception as exc:
                log.warning("a decode step fused with a prefill failed (%s); running them apart", describe(exc))
                if advanced:
                    batch.rewind()
                newcomers.release()
                self._prefill(admitted)
                self._decode()
                return
            running = len(self._rows)
            self._decoded(sampling, logits[:running])
            try:
                self._start_rows(newcomers, admitted, logits[running:], [[] for _ in admitted])
            except Exception as exc:  # e.g. one newcomer's sampling state: find it as `_prefill` does
                log.warning("starting the newcomers of a fused step failed (%s); prefilling them again", describe(exc))
                newcomers.release()
                self._prefill([r for r in admitted if r.active])
        finally:
            newcomers.release()  # rows that did not join the running batch (none once `_join` took them)

    def _sample(self, sampling: SamplingState, logits: torch.Tensor, rows: list[SequenceState]) -> SampleResult:
        """Vectorised sampling; if it raises, sample row by row so only the faulty request fails."""
        try:
            result = sampling.sample(logits)
        except Exception as exc:
            if decide(exc, Scope.REQUEST) is Action.RESTART:
                raise EngineFault(f"engine failure: device error while sampling: {describe(exc)}") from exc
            log.warning("batched sampling failed (%s); sampling row by row", describe(exc))
            result = sample_rowwise(sampling, logits)
        with self._updating("recording the sampled tokens"):
            sampling.observe(result.ids)
        return result

    @property
    def _grammar_vocab(self) -> int:
        """The width of the grammar masks (the compiler tokenizer's vocabulary); 0 without a compiler."""
        return self.grammars.tokenizer.vocab_size if self.grammars is not None else 0

    # -- postprocess --------------------------------------------------------------------------------
    def _publish(self, rows: list[SequenceState], result: SampleResult) -> list[int]:
        """Send the step's events (publish.py); returns the rows that are done."""
        return self._publisher.publish(rows, result)

    def _drop_rows(self, done: list[int]) -> None:
        batch, sampling, last_ids = self._batch, self._sampling, self._last_ids
        if not done or batch is None or sampling is None or last_ids is None:
            return
        with self._updating("dropping finished rows"):
            order = batch.remove(done)
            sampling.select(order)
            self._rows = [self._rows[i] for i in order]
            self._last_ids = last_ids.index_select(0, torch.tensor(order, dtype=torch.long, device=last_ids.device))
        if not self._rows:
            self._batch = self._sampling = self._last_ids = None

    def _discard_batch(self, message: str) -> None:
        """Drop the whole running batch without touching it (its state is unknown) and fail its requests."""
        requests = {id(s.req): s.req for s in self._rows}.values()
        self._rows, self._batch, self._sampling, self._last_ids = [], None, None, None
        self.pool.reset()  # the rows' block tables went with the batch; no other batch is alive between steps
        for req in requests:
            self._fail(req, message)

    # -- request endings ----------------------------------------------------------------------------
    def _end(self, req: RequestState, status: RequestStatus) -> None:
        if not req.active:
            return
        req.status = status
        req.handle.timings.finished = time.monotonic()
        with self._lock:
            self._requests.pop(req.request.request_id, None)
        if status is not RequestStatus.FAILED:
            req.handle.close()

    def _fail(self, req: RequestState, error: str | EngineError) -> None:
        """End `req` with `error` (its client's EngineError, or the message of one)."""
        if req.active:
            self._end(req, RequestStatus.FAILED)
            req.handle.fail(error if isinstance(error, EngineError) else RuntimeError(error))

    def _fail_all(self, message: str) -> None:
        with self._lock:
            pending = list(self._requests.values())
            self._waiting.clear()
        self._rows, self._batch, self._sampling, self._last_ids = [], None, None, None
        for req in pending:
            self._fail(req, message)


def _started(admitted: list[RequestState]) -> None:
    now = time.monotonic()
    for req in admitted:
        req.status = RequestStatus.RUNNING
        req.handle.timings.prefill_start = now


def check_invariants(request: GenerationRequest, config: EngineConfig, vocab_size: int,
                     grammars: bool = False) -> None:
    """Raise ValueError for what the engine cannot run at all (the HTTP boundary has said why already)."""
    ids, p = request.prompt_ids, request.params
    if p.grammar is not None and not grammars:
        raise ValueError("a grammar was given but this engine has no grammar compiler")
    if not ids:
        raise ValueError("empty prompt")
    if min(ids) < 0 or max(ids) >= vocab_size:
        raise ValueError(f"prompt token id out of range [0, {vocab_size})")
    if p.max_new_tokens < 1 or p.n < 1:
        raise ValueError(f"max_new_tokens ({p.max_new_tokens}) and n ({p.n}) must be at least 1")
    if len(ids) + p.max_new_tokens > config.max_total_tokens:
        raise ValueError(f"prompt ({len(ids)}) + max_new_tokens ({p.max_new_tokens}) exceeds max_total_tokens "
                         f"({config.max_total_tokens})")
    unfit = config.unfit_reason(len(ids), p.max_new_tokens, p.n)
    if unfit:
        raise ValueError(unfit)
    if any(not 0 <= t < vocab_size for t in p.logit_bias):
        raise ValueError(f"logit_bias token id out of range [0, {vocab_size})")


def _prompt_logprobs(logits: torch.Tensor, prompt: list[int], first: int) -> list[float]:
    """Logprobs of the prompt tokens that one forward's logits [Q, V] of a row predict (logits j are those
    of prompt position first + j)."""
    hi = min(logits.shape[0], len(prompt) - 1 - first)
    if hi <= 0:
        return []
    lp = torch.log_softmax(logits[:hi].float(), dim=-1)
    targets = torch.tensor(prompt[first + 1 : first + hi + 1], device=lp.device).unsqueeze(1)
    return lp.gather(1, targets).squeeze(1).tolist()
