"""Pipeline degrees chosen by measurement on warm-up batches.

FSMoE's planner (:func:`moeflow.plan.fsmoe.plan_layer`) picks ``(r_fwd, r_bwd)`` from a cost
model. Where the model misses what the machine does (collectives and experts sharing a
host's cores, per-chunk host work, overlap a bounding case assumes away), its pick can lose to
a fixed degree. :func:`tune_degrees` closes that gap the way Tutel's adaptive pipelining
does: it runs forward + backward of each candidate pair on batches the caller has already
seen (never the batch it will time), and keeps the fastest.

Rules that make it fair and safe under expert parallelism:

* every rank runs the same candidates in the same order (the order rotates per round, so a
  drifting machine does not favour whichever runs first), and each trial's figure is the
  slowest rank's (``all_reduce(MAX)``), since a collective ends when its last rank ends;
* a candidate's figure is the median of its rounds, and every figure is returned;
* the layer's gradients are what they were before tuning (the trial gradients are discarded).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist

from moeflow.errors import ConfigError, InputError

#: the fixed degrees tried beside the planner's pick (r_fwd = r_bwd = r)
FIXED_DEGREES = (1, 2, 4, 8)


@dataclass(frozen=True)
class DegreeTrial:
    r_fwd: int
    r_bwd: int
    ms: tuple[float, ...]  # one figure per round: forward + backward over the batches

    @property
    def median_ms(self) -> float:
        xs = sorted(self.ms)
        n = len(xs)
        return xs[n // 2] if n % 2 else 0.5 * (xs[n // 2 - 1] + xs[n // 2])


@dataclass(frozen=True)
class DegreeTuning:
    r_fwd: int
    r_bwd: int
    trials: tuple[DegreeTrial, ...]
    seconds: float  # wall time the tuning took on this rank

    def to_dict(self) -> dict:
        return {
            "r_fwd": self.r_fwd,
            "r_bwd": self.r_bwd,
            "seconds": self.seconds,
            "trials": [
                {"r_fwd": t.r_fwd, "r_bwd": t.r_bwd, "ms": list(t.ms), "median_ms": t.median_ms}
                for t in self.trials
            ],
        }


def degree_candidates(
    planned: tuple[int, int] | None = None, fixed: Sequence[int] = FIXED_DEGREES
) -> list[tuple[int, int]]:
    """The planner's pair (if any) and ``(r, r)`` for each fixed ``r``, without repeats."""
    out: list[tuple[int, int]] = []
    pairs = ([tuple(planned)] if planned is not None else []) + [(r, r) for r in fixed]
    for p in pairs:
        p = _check_pair(p)
        if p not in out:
            out.append(p)
    return out


def _check_pair(p) -> tuple[int, int]:
    if (
        not isinstance(p, tuple | list)
        or len(p) != 2
        or not all(isinstance(r, int) and not isinstance(r, bool) and r >= 1 for r in p)
    ):
        raise ConfigError("degree candidate", p, "a pair of ints >= 1 (r_fwd, r_bwd)")
    return int(p[0]), int(p[1])


def _default_loss(y: torch.Tensor) -> torch.Tensor:
    return y.float().square().mean()


def tune_degrees(
    ep,
    batches: Sequence[torch.Tensor],
    *,
    candidates: Sequence[tuple[int, int]] | None = None,
    rounds: int = 3,
    loss_fn: Callable[[torch.Tensor], torch.Tensor] = _default_loss,
    apply: bool = True,
) -> DegreeTuning:
    """Time forward + backward of ``ep`` (an :class:`~moeflow.parallel.ExpertParallel`) at
    each candidate ``(r_fwd, r_bwd)`` over ``batches`` and return the fastest (median over
    ``rounds``, slowest rank per trial); with ``apply``, set ``ep``'s degrees to it.

    Every rank of ``ep``'s group must call this with the same candidates, rounds and number
    of batches. ``batches`` are this rank's earlier inputs: never the batch being timed.
    Each candidate runs once untimed first (warm-up)."""

    cands = _check(batches, candidates, rounds)

    def step(x):
        x = x.detach().requires_grad_(x.is_floating_point())
        loss_fn(ep(x)).backward()

    return _tune([ep], ep, ep.group, batches, step, cands, rounds, apply)


def tune_model_degrees(
    model: torch.nn.Module,
    batches: Sequence,
    step: Callable[[object], None],
    *,
    group=None,
    candidates: Sequence[tuple[int, int]] | None = None,
    rounds: int = 3,
    apply: bool = True,
) -> DegreeTuning:
    """:func:`tune_degrees` for a whole model: each candidate pair is set on every
    :class:`~moeflow.parallel.ExpertParallel` module of ``model`` at once, and
    ``step(batch)`` (forward and backward of one of the caller's earlier batches, no
    optimizer step) is timed over ``batches``. Every rank of ``group`` calls it alike."""
    from moeflow.parallel.expert_parallel import ExpertParallel

    cands = _check(batches, candidates, rounds)
    eps = [m for m in model.modules() if isinstance(m, ExpertParallel)]
    if not eps:
        raise ConfigError("model", type(model).__name__, "a model with ExpertParallel layers")
    return _tune(eps, model, group, batches, step, cands, rounds, apply)


def _check(batches, candidates, rounds) -> list[tuple[int, int]]:
    if not batches:
        raise InputError("tune_degrees needs at least one warm-up batch")
    if not (isinstance(rounds, int) and not isinstance(rounds, bool) and rounds >= 1):
        raise ConfigError("rounds", rounds, "an int >= 1")
    cands = (
        degree_candidates() if candidates is None else [_check_pair(tuple(c)) for c in candidates]
    )
    if not cands:
        raise ConfigError("candidates", candidates, "at least one (r_fwd, r_bwd) pair")
    if len(set(cands)) != len(cands):
        raise ConfigError("candidates", candidates, "distinct pairs")
    return cands


def _tune(eps, owner, group, batches, step, cands, rounds, apply) -> DegreeTuning:
    t_start = time.perf_counter()
    params = [p for p in owner.parameters() if p.requires_grad]
    saved = [None if p.grad is None else p.grad.clone() for p in params]

    def run(pair) -> None:
        for ep in eps:
            ep.r_fwd, ep.r_bwd = pair
        for b in batches:
            step(b)

    times: dict[tuple[int, int], list[float]] = {c: [] for c in cands}
    old = [(ep.r_fwd, ep.r_bwd) for ep in eps]
    try:
        for c in cands:
            run(c)
        n = len(cands)
        for k in range(rounds):
            for i in range(n):
                c = cands[(i + k) % n]  # rotate the order per round, the same on every rank
                if group is not None or dist.is_initialized():
                    dist.barrier(group=group)
                t0 = time.perf_counter()
                run(c)
                buf = torch.tensor([(time.perf_counter() - t0) * 1e3], dtype=torch.float64)
                if group is not None or dist.is_initialized():
                    dist.all_reduce(buf, op=dist.ReduceOp.MAX, group=group)
                times[c].append(float(buf.item()))
    finally:
        for ep, pair in zip(eps, old):
            ep.r_fwd, ep.r_bwd = pair
        for p, g in zip(params, saved):
            p.grad = g
    trials = tuple(DegreeTrial(c[0], c[1], tuple(times[c])) for c in cands)
    best = min(trials, key=lambda t: (t.median_ms, cands.index((t.r_fwd, t.r_bwd))))
    if apply:
        for ep in eps:
            ep.r_fwd, ep.r_bwd = best.r_fwd, best.r_bwd
    return DegreeTuning(best.r_fwd, best.r_bwd, trials, time.perf_counter() - t_start)
