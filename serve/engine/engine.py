"""The engine: one OS thread running schedule -> prefill newcomers -> decode every row, forever.

API: `submit` (returns a RequestHandle), `cancel`, `step` (one iteration; the thread calls it),
`healthy`, `drain`, `shutdown`. The thread is a real OS thread even under gevent's monkey-patching
(a patched `threading.Thread` would be a greenlet and freeze the hub while the model runs).
"""

from __future__ import annotations

import collections
import inspect
import logging
import random
import time

import torch

from serve.engine.batch import KVBatch
from serve.engine.channel import OSEvent, RequestHandle, _original
from serve.engine.detokenize import TokenTexts
from serve.engine.prefix_cache import PrefixCache
from serve.engine.request import (
    EngineOverloaded,
    EngineUnavailable,
    GenerationRequest,
    PrefillEvent,
    RequestState,
    RequestStatus,
    SamplingParams,
    TokenInfo,
)
from serve.engine.sampling import SampleResult, SamplingState, sample_rowwise
from serve.engine.scheduler import EngineConfig, Scheduler, validate
from serve.engine.sequence import SequenceState

log = logging.getLogger(__name__)

__all__ = ["Engine", "EngineConfig"]


def eos_ids_of(model, tokenizer) -> set[int]:
    """Every EOS id the generation config, the model config and the tokenizer know of."""
    ids: set[int] = set()
    for source in (getattr(model, "generation_config", None), model.config.get_text_config()):
        value = getattr(source, "eos_token_id", None)
        if value is not None:
            ids.update([value] if isinstance(value, int) else value)
    if tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    return ids


class Engine:
    """Continuous batching over one left-padded KV batch (see batch.py)."""

    def __init__(self, model, tokenizer, config: EngineConfig):
        self.model, self.tokenizer, self.config = model, tokenizer, config
        self.device = next(model.parameters()).device
        text_cfg = model.config.get_text_config()
        self.num_layers = text_cfg.num_hidden_layers
        self.vocab_size = model.get_output_embeddings().weight.shape[0]
        self.eos_token_ids = eos_ids_of(model, tokenizer)
        self.special_ids = frozenset(tokenizer.all_special_ids) | frozenset(self.eos_token_ids)
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else min(self.eos_token_ids)
        self.token_text = TokenTexts(tokenizer)
        self.scheduler = Scheduler(config)
        self.prefix_cache = PrefixCache(config.prefix_cache_tokens)
        self._keep_arg = "logits_to_keep" in inspect.signature(model.forward).parameters
        # Raw locks only: this object is shared between a real OS thread and gevent greenlets.
        self._lock = _original("_thread", "allocate_lock")()
        self._wake = OSEvent()
        self._exited = OSEvent()
        self._waiting: collections.deque[RequestState] = collections.deque()
        self._cancelled: set[str] = set()
        self._requests: dict[str, RequestState] = {}
        self._rows: list[SequenceState] = []  # one per batch row, in row order
        self._batch: KVBatch | None = None
        self._sampling: SamplingState | None = None
        self._last_ids: torch.Tensor | None = None
        self._reserved = 0
        self._thread = None
        self._stopping = False
        self._draining = False
        self.healthy = False
        self.error: str | None = None
        self.steps = 0

    # -- public API -------------------------------------------------------------------------------
    def start(self) -> None:
        """Start the decode loop on a real OS thread."""
        # `threading.Thread`, even the original class, would start a greenlet under monkey-patching.
        self.healthy = True
        self._thread = _original("_thread", "start_new_thread")(self._run, ())

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
        """Queue a request; raises ValueError (bad input), EngineOverloaded or EngineUnavailable."""
        validate(request, self.config, self.vocab_size)
        with self._lock:
            if not self.healthy or self._draining or self._stopping:
                raise EngineUnavailable(self.error or "the engine is not accepting requests")
            if len(self._requests) >= self.config.max_concurrent_requests:
                raise EngineOverloaded(
                    f"Model is overloaded: more than {self.config.max_concurrent_requests} requests in flight"
                )
            handle = RequestHandle(request.request_id, len(request.prompt_ids), request.params.n, self.cancel)
            state = RequestState(request, handle)
            self._requests[request.request_id] = state
            self._waiting.append(state)
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
        """Stop the loop; requests still in flight fail."""
        self._stopping = True
        self._wake.set()
        if self._thread is not None:
            self._exited.wait(timeout)

    @property
    def batch_size(self) -> int:
        """Rows in the running batch (for tests and metrics)."""
        batch = self._batch  # read once: the engine thread may drop it meanwhile
        return batch.size if batch is not None else 0

    @property
    def cache_shape(self) -> tuple[int, ...] | None:
        """Shape of layer 0's live keys, [B, H, T, D] (for tests and metrics)."""
        batch = self._batch
        return tuple(batch.layers[0].keys.shape) if batch is not None else None

    # -- the loop -----------------------------------------------------------------------------------
    def _run(self) -> None:
        try:
            with torch.inference_mode():
                while not self._stopping:
                    if self._waiting or self._rows or self._cancelled:
                        self.step()
                    else:
                        self._wake.wait()  # submit/cancel/shutdown set it: no polling
        except BaseException as exc:  # the loop itself broke: nothing can be served any more
            log.exception("engine loop failed")
            self.error = f"engine failure: {exc!r}"
            self.healthy = False
        self._fail_all(self.error or "the engine stopped")
        self._exited.set()

    def step(self) -> None:
        """One iteration: schedule (cancellations, admission), prefill newcomers, decode all rows."""
        self._apply_cancellations()
        with self._lock:
            admitted = self.scheduler.admit(self._waiting, self._reserved, self.batch_size)
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
        for rid in cancelled:
            req = self._requests.get(rid)
            if req is not None and req.active:
                self._end(req, RequestStatus.CANCELLED)
        self._drop_rows([i for i, s in enumerate(self._rows) if not s.req.active])

    # -- prefill ------------------------------------------------------------------------------------
    def _prefill(self, admitted: list[RequestState]) -> None:
        now = time.monotonic()
        for req in admitted:
            req.status = RequestStatus.RUNNING
            req.handle.timings.prefill_start = now
            self._reserved += req.reserved_tokens
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
        prompts = [r.request.prompt_ids for r in group]
        # Prompt logprobs need every prompt position computed, so those requests skip the prefix cache.
        prefixes = [None if r.params.prefill_logprobs else self.prefix_cache.lookup(p) for r, p in zip(group, prompts)]
        inputs, cache = KVBatch.prefill_inputs(prompts, self.pad_id, self.device, self.num_layers, prefixes)
        want_prompt_lp = any(r.params.prefill_logprobs for r in group)
        kwargs = {"logits_to_keep": 0 if want_prompt_lp else 1} if self._keep_arg else {}
        logits = self.model(**inputs, past_key_values=cache, use_cache=True, **kwargs).logits
        if want_prompt_lp:
            self._send_prompt_logprobs(group, logits)
        batch = KVBatch.from_prefill(cache, inputs)
        for i, p in enumerate(prompts):
            self.prefix_cache.insert(p, lambda i=i: batch.row_kv(i))
        repeats = [r.n for r in group]
        rows = [self._new_row(r, k) for r in group for k in range(r.n)]
        last = logits[:, -1, :]
        if any(n != 1 for n in repeats):
            batch.repeat_rows(repeats)
            last = last.repeat_interleave(torch.tensor(repeats, device=last.device), dim=0)
        sampling = SamplingState([s.req.params for s in rows], [s.seed for s in rows],
                                 [s.history for s in rows], self.vocab_size, self.device)
        result = self._sample(sampling, last, rows)
        for req in group:
            req.handle.timings.first_token = time.monotonic()
        self._join(batch, sampling, rows, result)

    def _new_row(self, req: RequestState, k: int) -> SequenceState:
        p = req.params
        seed = None
        if not p.greedy:
            seed = p.seed + k if p.seed is not None else random.getrandbits(63)
        return SequenceState(req, k, seed, self.tokenizer, self.eos_token_ids, self.special_ids)

    def _send_prompt_logprobs(self, group, logits: torch.Tensor) -> None:
        width = logits.shape[1]
        for i, req in enumerate(group):
            if not req.params.prefill_logprobs:
                continue
            ids = req.request.prompt_ids
            start = width - len(ids)
            lp = torch.log_softmax(logits[i, start : width - 1].float(), dim=-1)
            chosen = lp.gather(1, torch.tensor(ids[1:], device=lp.device).unsqueeze(1)).squeeze(1).tolist()
            tokens = [TokenInfo(ids[0], self.token_text(ids[0]), None, ids[0] in self.special_ids)]
            tokens += [TokenInfo(t, self.token_text(t), v, t in self.special_ids) for t, v in zip(ids[1:], chosen)]
            req.handle.put(PrefillEvent(tokens))

    def _join(self, batch: KVBatch, sampling: SamplingState, rows: list[SequenceState], result) -> None:
        """Merge freshly prefilled rows into the running batch, minus those already finished."""
        ids = result.ids
        done = self._publish(rows, result)
        if done:
            order = batch.remove(done)
            sampling.select(order)
            rows = [rows[i] for i in order]
            ids = ids.index_select(0, torch.tensor(order, dtype=torch.long, device=ids.device))
        if not rows:
            return
        if self._batch is None:
            self._batch, self._sampling, self._rows, self._last_ids = batch, sampling, rows, ids
            return
        self._batch.add(batch)
        self._sampling.extend(sampling)
        self._rows += rows
        self._last_ids = torch.cat([self._last_ids, ids])

    # -- decode -------------------------------------------------------------------------------------
    def _decode(self) -> None:
        try:
            inputs = self._batch.decode_inputs(self._last_ids)
            logits = self.model(**inputs, use_cache=True).logits[:, -1, :]
        except Exception as exc:
            log.exception("decode step failed")
            for req in {id(s.req): s.req for s in self._rows}.values():
                self._fail(req, f"generation failed: {exc}")
            self._drop_rows(list(range(len(self._rows))))
            return
        result = self._sample(self._sampling, logits, self._rows)
        self._last_ids = result.ids
        self._drop_rows(self._publish(self._rows, result))

    def _sample(self, sampling: SamplingState, logits: torch.Tensor, rows) -> SampleResult:
        """Vectorised sampling; if it raises, sample row by row so only the faulty request fails."""
        try:
            result = sampling.sample(logits)
        except Exception:
            log.exception("batched sampling failed; isolating the faulty rows")
            result = sample_rowwise(sampling, logits)
        sampling.observe(result.ids)
        return result

    # -- postprocess --------------------------------------------------------------------------------
    def _publish(self, rows: list[SequenceState], result: SampleResult) -> list[int]:
        """Turn sampled ids into events (one host sync), send them; return rows that are done."""
        ids, lps = torch.stack([result.ids.double(), result.logprobs.double()]).tolist()
        tops = None
        if result.top_ids is not None:
            tops = (result.top_ids.tolist(), result.top_logprobs.tolist())
        done: list[int] = []
        batches: dict[int, tuple[RequestState, list]] = {}
        for i, seq in enumerate(rows):
            req = seq.req
            if i in result.failed and req.active:
                self._fail(req, f"sampling failed: {result.failed[i]!r}")
            if not req.active:
                done.append(i)
                continue
            top = self._top_tokens(tops, i, req.params.top_n_tokens) if tops else None
            event = seq.advance(int(ids[i]), lps[i], top)
            batches.setdefault(id(req), (req, []))[1].append(event)
            if event.finish is not None:
                done.append(i)
                req.unfinished -= 1
        for req, events in batches.values():
            req.handle.put_many(events)
            if req.unfinished == 0:
                self._end(req, RequestStatus.FINISHED)
        return done

    def _top_tokens(self, tops, i: int, n: int) -> list[TokenInfo] | None:
        if n <= 0:
            return None
        ids, lps = tops[0][i][:n], tops[1][i][:n]
        return [TokenInfo(t, self.token_text(t), lp, t in self.special_ids) for t, lp in zip(ids, lps)]

    def _drop_rows(self, done: list[int]) -> None:
        if not done or self._batch is None:
            return
        order = self._batch.remove(done)
        self._sampling.select(order)
        self._rows = [self._rows[i] for i in order]
        idx = torch.tensor(order, dtype=torch.long, device=self._last_ids.device)
        self._last_ids = self._last_ids.index_select(0, idx)
        if not self._rows:
            self._batch = self._sampling = self._last_ids = None

    # -- request endings ----------------------------------------------------------------------------
    def _end(self, req: RequestState, status: RequestStatus) -> None:
        if not req.active:
            return
        if req.status is RequestStatus.RUNNING:
            self._reserved -= req.reserved_tokens
        req.status = status
        req.handle.timings.finished = time.monotonic()
        with self._lock:
            self._requests.pop(req.request.request_id, None)
        if status is not RequestStatus.FAILED:
            req.handle.close()

    def _fail(self, req: RequestState, message: str) -> None:
        if req.active:
            self._end(req, RequestStatus.FAILED)
            req.handle.fail(RuntimeError(message))

    def _fail_all(self, message: str) -> None:
        with self._lock:
            pending = list(self._requests.values())
            self._waiting.clear()
        for req in pending:
            self._fail(req, message)
        self._rows, self._batch, self._sampling, self._last_ids = [], None, None, None

