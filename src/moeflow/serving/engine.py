"""Continuous batching: an engine whose batch changes at every step (Orca's iteration-level
scheduling, Yu et al., OSDI'22; vLLM, Kwon et al., SOSP'23).

Requests are submitted from any thread (:meth:`Engine.submit`) and run on the engine's own
thread (:meth:`Engine.start`) or by calling :meth:`Engine.step` directly. Each running
request owns a row of a :class:`~moeflow.serving.kv_blocks.PagedKVCache` block table and the
blocks its tokens fill; the pool holds at most ``num_blocks`` blocks, so KV memory is bounded.

Scheduling rule, one step:

1. **Admit** waiting requests first come, first served while a block-table row is free and
   the pool has the blocks of the request's prompt. The head of the queue that does not fit
   blocks the ones behind it (no starvation of long requests).
2. **Prefill** admitted requests whose prompt is not fully in the cache, oldest first, in
   chunks, up to ``max_prefill_tokens`` prompt tokens in the step (chunked prefill as in
   Sarathi-Serve, Agrawal et al., OSDI'24, and vLLM): a long prompt cannot stall the
   running decodes for more than one chunk. The step's chunks run as few right-padded
   forward calls: longest first, a chunk joins a call while padding at most doubles the
   call's tokens. A request whose prompt completes samples its
   first token in the same step (its time to first token is one prefill, not the running
   requests' remaining decodes).
3. **Decode** every request whose prompt is in the cache and that has not finished: one
   batched forward of one token each; each samples its next token.

Blocks are taken as sequences grow (vLLM's block-by-block allocation). When the pool runs
dry, the most recently admitted running request is preempted (vLLM's recompute preemption):
its blocks go back to the pool and it returns to the head of the queue; readmitted, it
prefills its prompt and the tokens it had generated, then goes on decoding from its last
token with the same sampling state, so its tokens are those it would have drawn without the
interruption. The oldest request always fits alone (a request that could not is refused at
:meth:`Engine.submit`), so every request finishes.

A request leaves as soon as it finishes (a stop token, ``max_new_tokens``, the context
length, or :meth:`RequestHandle.abort`), and its blocks go back to the pool for the next
step's admissions. Sampling is :func:`moeflow.models.generate.sample` with the request's own
seeded generator, so a request draws the same tokens as in :func:`moeflow.models.generate`
whatever else shares its steps.
"""

from __future__ import annotations

import collections
import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from moeflow.errors import ConfigError, InputError, MoeflowError
from moeflow.models import GenerationResult, Request, SamplingParams, validate_request
from moeflow.models.generate import PAD_ID, sample
from moeflow.serving.kv_blocks import PagedKVCache, default_kv_cache_bytes, kv_bytes_per_token
from moeflow.validate import is_int

log = logging.getLogger(__name__)


class EngineClosedError(MoeflowError, RuntimeError):
    """The engine is shutting down (or stopped) and takes no new requests."""


class EngineError(MoeflowError, RuntimeError):
    """A step of the engine failed; the requests in that step end with this error."""


class RankDiedError(MoeflowError, RuntimeError):
    """A rank of a disaggregated server died; the requests in flight end with this error,
    which names the rank (:mod:`moeflow.serving.disagg_server`)."""


@dataclass(frozen=True)
class EngineConfig:
    """``block_size`` token positions per KV block; ``num_blocks`` blocks in the pool, or
    ``kv_cache_bytes`` to derive it (whichever is given; default: room for ``max_seqs``
    full-context sequences, capped by :func:`~moeflow.serving.kv_blocks.default_kv_cache_bytes`
    but never below one); ``max_seqs`` requests running at once; ``max_prefill_tokens``
    prompt tokens prefilled per step (the chunk budget)."""

    block_size: int = 16
    num_blocks: int | None = None
    kv_cache_bytes: int | None = None
    max_seqs: int = 32
    max_prefill_tokens: int = 512

    def check(self) -> None:
        for name in ("block_size", "max_seqs", "max_prefill_tokens"):
            v = getattr(self, name)
            if not is_int(v) or v < 1:
                raise ConfigError(name, v, "an int >= 1")
        if self.num_blocks is not None and (not is_int(self.num_blocks) or self.num_blocks < 1):
            raise ConfigError("num_blocks", self.num_blocks, "None or an int >= 1")
        if self.kv_cache_bytes is not None and (
            not is_int(self.kv_cache_bytes) or self.kv_cache_bytes < 1
        ):
            raise ConfigError("kv_cache_bytes", self.kv_cache_bytes, "None or an int >= 1")
        if self.num_blocks is not None and self.kv_cache_bytes is not None:
            raise ConfigError("num_blocks", self.num_blocks, "None when kv_cache_bytes is given")


class RequestHandle:
    """A submitted request: its :class:`GenerationResult` (filled as tokens come), and
    :meth:`wait` / :meth:`abort`. ``on_token(handle, token)`` and ``on_finish(handle)`` run on
    the engine's thread and must not block."""

    def __init__(self, request_id, prompt_len: int, on_token=None, on_finish=None):
        self.request_id = request_id
        self.result = GenerationResult(request_id, prompt_len, start_time=time.perf_counter())
        self.submit_time = self.result.start_time
        self._on_token, self._on_finish = on_token, on_finish
        self._done = threading.Event()
        self._abort = False

    @property
    def done(self) -> bool:
        return self._done.is_set()

    @property
    def first_token_time(self) -> float | None:
        return self.result.token_times[0] if self.result.token_times else None

    def abort(self) -> None:
        """Ask the engine to drop the request at its next step (finish reason ``abort``)."""
        self._abort = True

    def wait(self, timeout: float | None = None) -> GenerationResult:
        if not self._done.wait(timeout):
            raise TimeoutError(f"request {self.request_id!r} not finished after {timeout} s")
        return self.result


class _Seq:
    __slots__ = ("handle", "prompt", "params", "gen", "row", "blocks", "computed", "target")

    def __init__(self, handle: RequestHandle, prompt: list[int], params: SamplingParams):
        self.handle, self.prompt, self.params = handle, prompt, params
        self.gen = None
        if params.temperature > 0:
            self.gen = torch.Generator()
            seed = params.seed if params.seed is not None else int(torch.randint(2**62, ()))
            self.gen.manual_seed(seed)
        self.row = -1
        self.blocks: list[int] = []
        self.computed = 0  # positions of this sequence whose keys/values are in the cache
        self.target = len(prompt)  # positions a (re)prefill must fill before decoding

    @property
    def tokens(self) -> list[int]:
        return self.handle.result.tokens

    @property
    def prefilling(self) -> bool:
        return self.computed < self.target

    def ids(self, start: int, stop: int) -> list[int]:
        """Token ids at positions ``start .. stop-1`` (prompt, then generated tokens)."""
        n = len(self.prompt)
        return self.prompt[start:stop] + self.tokens[max(start - n, 0) : max(stop - n, 0)]

    def max_positions(self, context: int) -> int:
        """Positions this request may write: every prompt and generated token but the last."""
        return min(len(self.prompt) + self.params.max_new_tokens - 1, context)


class Engine:
    """Continuous batching over one :class:`moeflow.models.MoEDecoder` (see the module doc).

    ``forward``: a function of the engine's KV cache returning the forward pass
    ``(ids_BT, rows_B, start_B) -> logits_BTV`` to run instead of ``model(ids, cache, ...)``,
    e.g. a :class:`~moeflow.serving.disaggregated.DisaggregatedForward` over that cache (an
    attention rank whose routed experts live on expert ranks)."""

    def __init__(self, model, config: EngineConfig | None = None, forward: Callable | None = None):
        config = config or EngineConfig()
        config.check()
        self.model, self.config = model, config
        cfg = model.cfg
        self.context = cfg.max_position_embeddings
        p = next(model.parameters())
        bs = config.block_size
        per_seq = -(-self.context // bs)
        if config.num_blocks is not None:
            num_blocks = config.num_blocks
        elif config.kv_cache_bytes is not None:
            num_blocks = config.kv_cache_bytes // (bs * kv_bytes_per_token(cfg, p.dtype))
            if num_blocks < 1:
                raise ConfigError(
                    "kv_cache_bytes",
                    config.kv_cache_bytes,
                    f">= {bs * kv_bytes_per_token(cfg, p.dtype)} (one block of {bs} positions)",
                )
        else:  # max_seqs full-context sequences, within a share of the device's memory
            budget = default_kv_cache_bytes(p.device)
            by_budget = budget // (bs * kv_bytes_per_token(cfg, p.dtype))
            num_blocks = max(per_seq, min(per_seq * config.max_seqs, by_budget))
        self.cache = PagedKVCache(cfg, num_blocks, bs, config.max_seqs, p.dtype, p.device)
        #: the forward pass built by ``forward`` (None: ``model(ids, cache, rows, starts)``)
        self.model_forward = None if forward is None else forward(self.cache)
        self.preemptions = 0
        self.finished: collections.Counter[str] = collections.Counter()  # by finish reason
        self.device = p.device
        self._waiting: collections.deque[_Seq] = collections.deque()
        self._running: list[_Seq] = []
        self._free_rows = list(range(config.max_seqs - 1, -1, -1))
        self._cond = threading.Condition()
        self._closing = False
        self._thread: threading.Thread | None = None
        self.steps = 0
        self._step_listeners: list[Callable[[], None]] = []

    # ---- submission (any thread) ------------------------------------------------------

    def submit(
        self,
        prompt: Sequence[int],
        params: SamplingParams | None = None,
        request_id=None,
        *,
        on_token: Callable | None = None,
        on_finish: Callable | None = None,
    ) -> RequestHandle:
        """Queue a request; raises its typed error (InputError, ConfigError) at once when it
        is malformed or can never fit the KV pool, EngineClosedError while shutting down."""
        params = params or SamplingParams()
        req = Request(prompt, params, request_id)
        validate_request(req, self.model.cfg.vocab_size, self.context)
        prompt = [int(t) for t in prompt]
        seq = _Seq(RequestHandle(request_id, len(prompt), on_token, on_finish), prompt, params)
        need = self.cache.blocks_for(seq.max_positions(self.context))
        if need > self.cache.pool.num_blocks:
            raise InputError(
                f"request {request_id!r} needs {need} KV blocks of {self.cache.block_size} "
                f"positions (prompt {len(prompt)} + max_new_tokens {params.max_new_tokens}); "
                f"the pool has {self.cache.pool.num_blocks}"
            )
        with self._cond:
            if self._closing:
                raise EngineClosedError("the engine is shutting down and takes no new requests")
            self._waiting.append(seq)
            self._cond.notify()
        return seq.handle

    def generate(self, requests: Sequence[Request]) -> list[GenerationResult]:
        """Submit every request and wait (needs :meth:`start`, or steps run here if not)."""
        handles = [self.submit(r.prompt, r.params, r.request_id) for r in requests]
        if self._thread is None:
            while not all(h.done for h in handles):
                self.step()
        return [h.wait() for h in handles]

    # ---- state --------------------------------------------------------------------------

    @property
    def num_waiting(self) -> int:
        return len(self._waiting)

    @property
    def num_running(self) -> int:
        return len(self._running)

    @property
    def has_work(self) -> bool:
        return bool(self._waiting or self._running)

    def health(self) -> dict:
        """What ``GET /health`` reports: ``status`` ("ok"), requests running and waiting, free
        KV blocks."""
        return {
            "status": "ok",
            "running": self.num_running,
            "waiting": self.num_waiting,
            "free_kv_blocks": self.cache.pool.free,
        }

    def add_step_listener(self, fn: Callable[[], None]) -> None:
        """Call ``fn()`` on the engine's thread at the end of every :meth:`step`, after the
        step's ``on_token`` and ``on_finish`` callbacks (a listener can hand their events on
        in one batch), and also between a step's prefill and its decode when the prefill
        produced first tokens (so they do not wait for the decode). Like the callbacks, it
        must not block."""
        self._step_listeners = [*self._step_listeners, fn]  # copy: step() may be iterating

    def remove_step_listener(self, fn: Callable[[], None]) -> None:
        self._step_listeners = [f for f in self._step_listeners if f != fn]

    # ---- one iteration ----------------------------------------------------------------

    def step(self) -> bool:
        """Run one iteration (admit, prefill, decode); False when there was nothing to do."""
        try:
            return self._step()
        finally:
            self._notify_step_listeners()

    def _notify_step_listeners(self) -> None:
        for fn in self._step_listeners:
            try:
                fn()
            except Exception:  # a listener must not stop the engine
                log.exception("step listener failed")

    def _step(self) -> bool:
        with self._cond:
            for s in [s for s in self._waiting if s.handle._abort]:
                self._waiting.remove(s)
                self._finish(s, "abort")
            for s in [s for s in self._running if s.handle._abort]:
                self._finish(s, "abort")
            self._admit()
        if not self._running:
            return False
        self.steps += 1
        try:
            with torch.no_grad():
                if self._prefill():  # first tokens go out now, not after the decode
                    self._notify_step_listeners()
                self._decode()
        except Exception as e:  # a failed forward ends its step's requests, not the engine
            log.exception("engine step failed")
            err = e if isinstance(e, MoeflowError) else EngineError(f"{type(e).__name__}: {e}")
            for s in list(self._running):
                s.handle.result.error = err
                self._finish(s, "error")
        return True

    def _admit(self) -> None:
        while self._waiting and self._free_rows:
            s = self._waiting[0]
            blocks = self.cache.pool.allocate(self.cache.blocks_for(s.target))
            if blocks is None:
                return  # FCFS: the head waits for blocks, the rest wait behind it
            self._waiting.popleft()
            s.row, s.blocks = self._free_rows.pop(), blocks
            self.cache.assign(s.row, blocks)
            self._running.append(s)

    def _release(self, s: _Seq) -> None:
        self._running.remove(s)
        self.cache.pool.release(s.blocks)
        self._free_rows.append(s.row)
        s.blocks, s.row = [], -1

    def _preempt(self, s: _Seq) -> None:
        """Free ``s``'s blocks and queue it first, to recompute its cache when readmitted."""
        self._release(s)
        s.computed = 0
        s.target = len(s.prompt) + max(len(s.tokens) - 1, 0)
        with self._cond:
            self._waiting.appendleft(s)
        self.preemptions += 1

    def _grow(self, s: _Seq, positions: int) -> bool:
        """Give ``s`` the blocks of its first ``positions`` positions, preempting the newest
        running requests if the pool is short; False when ``s`` itself was preempted."""
        need = self.cache.blocks_for(positions) - len(s.blocks)
        while need > self.cache.pool.free:
            victim = self._running[-1]
            self._preempt(victim)
            if victim is s:
                return False
        if need > 0:
            s.blocks += self.cache.pool.allocate(need)
            self.cache.assign(s.row, s.blocks)
        return True

    def _forward(self, ids: list[list[int]], rows: list[int], starts: list[int]) -> torch.Tensor:
        dev = self.device
        if self.model_forward is not None:
            return self.model_forward(
                torch.tensor(ids, device=dev),
                torch.tensor(rows, device=dev),
                torch.tensor(starts, device=dev),
            )
        return self.model(
            torch.tensor(ids, device=dev),
            self.cache,
            torch.tensor(rows, device=dev),
            torch.tensor(starts, device=dev),
        )

    def _prefill(self) -> bool:
        """Prefill this step's chunks; True when a request emitted its first token."""
        budget, chunks, emitted = self.config.max_prefill_tokens, [], False
        for s in self._running:
            if budget == 0:
                break
            if s.prefilling:
                n = min(budget, s.target - s.computed)
                chunks.append((s, n))
                budget -= n
        groups: list[list[tuple[_Seq, int]]] = []
        for s, n in sorted(chunks, key=lambda c: -c[1]):
            for g in groups:
                width, real = g[0][1], sum(m for _, m in g) + n
                # padding rows stay inside the context and cost at most the real tokens
                if s.computed + width <= self.context and (len(g) + 1) * width <= 2 * real:
                    g.append((s, n))
                    break
            else:
                groups.append([(s, n)])
        for g in groups:
            width = g[0][1]
            ids = [s.ids(s.computed, s.computed + n) + [PAD_ID] * (width - n) for s, n in g]
            logits = self._forward(ids, [s.row for s, _ in g], [s.computed for s, _ in g])
            first: list[tuple[int, _Seq, int]] = []
            for b, (s, n) in enumerate(g):
                s.computed += n
                if not s.prefilling and not s.tokens:  # a fresh prompt: its first token
                    first.append((b, s, n - 1))
            if first:
                b_M = torch.tensor([b for b, _, _ in first], device=logits.device)
                t_M = torch.tensor([t for _, _, t in first], device=logits.device)
                seqs = [s for _, s, _ in first]
                for s, tok in zip(seqs, self._sample(seqs, logits[b_M, t_M])):
                    self._emit(s, tok)
                emitted = True
        return emitted

    def _decode(self) -> None:
        batch = [s for s in self._running if not s.prefilling and s.tokens]
        for s in batch:
            if s.row >= 0:
                self._grow(s, s.computed + 1)
        batch = [s for s in batch if s.row >= 0]
        if not batch:
            return
        logits = self._forward(
            [[s.tokens[-1]] for s in batch], [s.row for s in batch], [s.computed for s in batch]
        )
        for s, tok in zip(batch, self._sample(batch, logits[:, 0])):
            s.computed += 1
            self._emit(s, tok)

    @staticmethod
    def _sample(seqs: list[_Seq], logits_BV: torch.Tensor) -> list[int]:
        """The next token of each of ``seqs`` from its row of ``logits_BV``: the greedy rows
        with one ``argmax`` and one host transfer for the batch (the first maximum, as
        :func:`~moeflow.models.generate.sample`'s), the others with :func:`sample` and the
        request's own generator."""
        toks = logits_BV.argmax(dim=-1).tolist()
        for j, s in enumerate(seqs):
            if s.params.temperature > 0:
                logits_V = logits_BV[j]
                if logits_V.device.type != "cpu":
                    logits_V = logits_V.cpu()  # the request's seeded generator lives on the CPU
                toks[j] = sample(logits_V, s.params, s.gen)
        return toks

    def _emit(self, s: _Seq, tok: int) -> None:
        res = s.handle.result
        res.tokens.append(tok)
        res.token_times.append(time.perf_counter())
        if s.handle._on_token is not None:
            try:
                s.handle._on_token(s.handle, tok)
            except Exception:  # a listener that went away must not stop the engine
                log.exception("on_token callback failed")
        if tok in s.params.stop_token_ids:
            self._finish(s, "stop")
        elif len(res.tokens) >= s.params.max_new_tokens:
            self._finish(s, "length")
        elif s.computed >= self.context:
            self._finish(s, "context")

    def _finish(self, s: _Seq, reason: str) -> None:
        if s in self._running:
            self._release(s)
        s.handle.result.finish_reason = reason
        self.finished[reason] += 1
        if s.handle._on_finish is not None:
            try:
                s.handle._on_finish(s.handle)
            except Exception:
                log.exception("on_finish callback failed")
        s.handle._done.set()

    # ---- background thread ------------------------------------------------------------

    def start(self) -> Engine:
        """Run steps on a daemon thread until :meth:`shutdown`."""
        if self._thread is not None:
            return self
        self._thread = threading.Thread(target=self._loop, name="moeflow-engine", daemon=True)
        self._thread.start()
        return self

    def _loop(self) -> None:
        while True:
            with self._cond:
                while not self.has_work and not self._closing:
                    self._cond.wait()
                if self._closing and not self.has_work:
                    return
            self.step()

    def shutdown(self, drain: bool = True, timeout: float | None = None) -> None:
        """Take no new requests; with ``drain`` let those in flight finish (else abort them),
        then stop the thread."""
        with self._cond:
            self._closing = True
            if not drain:
                for s in list(self._waiting) + list(self._running):
                    s.handle.abort()
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)
        else:
            while self.has_work:
                self.step()
