"""Batched generation: greedy or sampled (temperature, top-p, seed), requests of different
lengths in one batch, a bad request failing alone.

Every request gets a KV-cache slot. Prefill runs all prompts in one call (right-padded; a
row's logits are read at its own last prompt token), then each decode step feeds every
unfinished row its last token at its own position. A request whose prompt is empty, longer
than the context, holds ids outside the vocabulary, or whose sampling parameters are out of
range gets a :class:`GenerationResult` with ``error`` set (a typed moeflow error naming the
field) and no tokens; the other requests run as if it were not there.

Sampling: ``temperature == 0`` is greedy (argmax). Otherwise logits are divided by the
temperature, the smallest set of tokens whose probability reaches ``top_p`` is kept (nucleus
sampling, Holtzman et al., ICLR'20) and one token is drawn with the request's own
``torch.Generator`` seeded with ``seed``, so a request draws the same tokens whatever else is
in the batch.

The forward pass is a seam: ``forward(ids_BT, rows_B, start_B) -> logits_BTV``. By default
it is the model over a local :class:`~moeflow.models.decoder.KVCache`; the disaggregated
serving runtime passes its own.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from moeflow.errors import ConfigError, InputError, MoeflowError
from moeflow.validate import is_int

PAD_ID = 0


@dataclass(frozen=True)
class SamplingParams:
    """``max_new_tokens`` >= 1; ``temperature`` >= 0 (0: greedy); ``top_p`` in (0, 1];
    ``seed`` an int or None (None: drawn from torch's global generator);
    ``stop_token_ids``: generation ends after emitting one of them."""

    max_new_tokens: int = 16
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    stop_token_ids: tuple[int, ...] = ()

    def check(self) -> None:
        if not is_int(self.max_new_tokens) or self.max_new_tokens < 1:
            raise ConfigError("max_new_tokens", self.max_new_tokens, "an int >= 1")
        t = self.temperature
        if isinstance(t, bool) or not isinstance(t, (int, float)) or not math.isfinite(t) or t < 0:
            raise ConfigError("temperature", t, "a finite float >= 0 (0: greedy)")
        p = self.top_p
        if isinstance(p, bool) or not isinstance(p, (int, float)) or not (0 < p <= 1):
            raise ConfigError("top_p", p, "a float in (0, 1]")
        if self.seed is not None and not is_int(self.seed):
            raise ConfigError("seed", self.seed, "None or an int")
        if not all(is_int(s) for s in self.stop_token_ids):
            raise ConfigError("stop_token_ids", self.stop_token_ids, "a tuple of ints")


@dataclass(frozen=True)
class Request:
    prompt: Sequence[int]
    params: SamplingParams = field(default_factory=SamplingParams)
    request_id: object = None


@dataclass
class GenerationResult:
    """``tokens`` generated; ``finish_reason`` is ``"length"`` (max_new_tokens), ``"stop"``,
    ``"context"`` (the context is full) or ``"error"``; ``token_times`` the wall clock
    (``time.perf_counter``) when each token was produced and ``start_time`` when the batch
    began; ``logits`` (with ``return_logits``) the logits each token was drawn from."""

    request_id: object
    prompt_len: int
    tokens: list[int] = field(default_factory=list)
    finish_reason: str = ""
    error: MoeflowError | None = None
    start_time: float = 0.0
    token_times: list[float] = field(default_factory=list)
    logits: list[torch.Tensor] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.error is None


def validate_request(req: Request, vocab_size: int, context: int) -> None:
    """Raise the typed error a request fails with (InputError or ConfigError), or nothing."""
    if not isinstance(req, Request):
        raise InputError(f"expected a Request, got {type(req).__name__}")
    if not isinstance(req.params, SamplingParams):
        raise ConfigError("params", type(req.params).__name__, "a SamplingParams")
    req.params.check()
    prompt = list(req.prompt) if isinstance(req.prompt, Sequence) else None
    if prompt is None or not all(is_int(t) for t in prompt):
        raise InputError(f"request {req.request_id!r}: prompt must be a sequence of token ids")
    if len(prompt) == 0:
        raise InputError(
            f"request {req.request_id!r}: prompt is empty; at least one token is needed"
        )
    if len(prompt) > context:
        raise InputError(
            f"request {req.request_id!r}: prompt has {len(prompt)} tokens, "
            f"longer than the context max_position_embeddings={context}"
        )
    bad = [t for t in prompt if not 0 <= t < vocab_size]
    if bad:
        raise InputError(
            f"request {req.request_id!r}: token ids {bad[:3]} outside [0, vocab_size={vocab_size})"
        )


def sample(logits_V: torch.Tensor, params: SamplingParams, gen: torch.Generator | None) -> int:
    """One token from ``logits_V`` (greedy, or temperature and top-p with ``gen``)."""
    if params.temperature == 0:
        return int(torch.argmax(logits_V))
    probs = torch.softmax(logits_V.float() / params.temperature, dim=-1)
    if params.top_p < 1.0:
        p_sorted, idx = torch.sort(probs, descending=True)
        before = torch.cumsum(p_sorted, 0) - p_sorted  # mass of strictly more likely tokens
        p_sorted = torch.where(before < params.top_p, p_sorted, torch.zeros_like(p_sorted))
        probs = torch.zeros_like(probs).scatter(0, idx, p_sorted)
    return int(torch.multinomial(probs / probs.sum(), 1, generator=gen))


def generate(
    model,
    requests: Sequence[Request],
    *,
    forward: Callable | None = None,
    return_logits: bool = False,
    on_token: Callable | None = None,
) -> list[GenerationResult]:
    """Generate for every request in one batch; results in request order.

    ``model`` supplies ``cfg`` (vocabulary and context) and, without ``forward``, the
    forward pass over a fresh cache. ``on_token(result)`` is called after each new token
    (progress bars).
    """
    cfg = model.cfg
    context = cfg.max_position_embeddings
    t0 = time.perf_counter()
    results = [
        GenerationResult(
            getattr(r, "request_id", None), len(getattr(r, "prompt", ()) or ()), start_time=t0
        )
        for r in requests
    ]
    live: list[int] = []
    for i, r in enumerate(requests):
        try:
            validate_request(r, cfg.vocab_size, context)
            live.append(i)
        except MoeflowError as e:
            results[i].error, results[i].finish_reason = e, "error"
    if not live:
        return results
    if forward is None:
        cache = model.new_cache(len(live), context)

        def forward(ids_BT, rows_B, start_B):
            return model(ids_BT, cache, rows_B, start_B)

    gens = []
    for i in live:
        p = requests[i].params
        g = None
        if p.temperature > 0:
            g = torch.Generator()
            g.manual_seed(p.seed if p.seed is not None else int(torch.randint(2**62, ())))
        gens.append(g)
    prompts = [list(requests[i].prompt) for i in live]
    lens = [len(p) for p in prompts]
    width = max(lens)
    ids_BT = torch.tensor([p + [PAD_ID] * (width - len(p)) for p in prompts])
    rows = torch.arange(len(live))
    with torch.no_grad():
        logits_BTV = forward(ids_BT, rows, torch.zeros(len(live), dtype=torch.long))
        last = [logits_BTV[b, lens[b] - 1] for b in range(len(live))]
        length = list(lens)  # tokens in each slot's cache after the next write
        active = list(range(len(live)))
        while active:
            now = time.perf_counter()
            still = []
            for b in active:
                res, p = results[live[b]], requests[live[b]].params
                tok = sample(last[b], p, gens[b])
                res.tokens.append(tok)
                res.token_times.append(now)
                if return_logits:
                    res.logits.append(last[b].clone())
                if on_token is not None:
                    on_token(res)
                if tok in p.stop_token_ids:
                    res.finish_reason = "stop"
                elif len(res.tokens) >= p.max_new_tokens:
                    res.finish_reason = "length"
                elif length[b] >= context:
                    res.finish_reason = "context"
                else:
                    still.append(b)
            active = still
            if not active:
                break
            rows_B = torch.tensor(active)
            ids_B1 = torch.tensor([[results[live[b]].tokens[-1]] for b in active])
            start_B = torch.tensor([length[b] for b in active])
            logits_B1V = forward(ids_B1, rows_B, start_B)
            for j, b in enumerate(active):
                last[b] = logits_B1V[j, 0]
                length[b] += 1
    return results
