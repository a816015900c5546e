"""The one measuring harness: every profiler of moeflow (``moeflow profile``, ``moeflow
bench``'s cost fits, ``serve-bench``'s FinDEP model) times operations and fits their
``alpha + beta * n`` costs through these two functions, so every planner sees the same
machine.

* :func:`time_ms` - warm-up calls, then ``trials`` timed trials of ``reps`` back-to-back
  calls (or single cold calls after flushing the last-level cache); the figure is the median
  trial (the outlier rule: a shared machine only ever adds time to some trials, and a median
  pairs a typical cost with a typical measured step, where a minimum would be optimistic).
  With a process group, trials start at a barrier and the figure is the slowest rank's
  (``all_reduce(MAX)``): a collective ends when its last rank ends.
* :func:`fit` - least squares on absolute times (large sizes set the line, as for bandwidth
  terms) or on relative error (every size counts alike, for the many small operators of a
  step), with an optional non-negative intercept and a through-the-origin fallback when noise
  makes the time fall with size.

This module imports torch; ``moeflow.perf`` itself does not.
"""

from __future__ import annotations

import glob
import time
from collections.abc import Callable, Sequence

import torch

from moeflow.errors import ConfigError, InputError
from moeflow.perf.cost import LinearCost

DEFAULT_TRIALS = 5
#: the smallest time a relative fit weighs by (ms)
TINY_MS = 1e-6


def llc_bytes() -> int:
    """The last-level cache size (Linux sysfs), 32 MiB when unknown."""
    best = 0
    for path in glob.glob("/sys/devices/system/cpu/cpu0/cache/index*/size"):
        try:
            with open(path) as f:
                text = f.read().strip()
        except OSError:
            continue
        mult = {"K": 2**10, "M": 2**20, "G": 2**30}.get(text[-1:], 1)
        digits = text.rstrip("KMG")
        if digits.isdigit():
            best = max(best, int(digits) * mult)
    return best or 32 * 2**20


def _median(xs: list[float]) -> float:
    xs = sorted(xs)
    n = len(xs)
    return xs[n // 2] if n % 2 else 0.5 * (xs[n // 2 - 1] + xs[n // 2])


def time_ms(
    fn: Callable[[], object],
    *,
    reps: int = 1,
    trials: int = DEFAULT_TRIALS,
    warmup: int = 1,
    cold: bool = False,
    group=None,
    device: torch.device | None = None,
) -> float:
    """Median over ``trials`` of the mean time (ms) of ``reps`` back-to-back calls of ``fn``.

    ``cold``: each timed call follows a write of twice the last-level cache, so its operands
    come from memory, as a step's weights do (each weight is read once per pass, long after
    its previous use); ``reps`` is then the number of single calls per trial.
    ``group``: every rank of it must call this; the result is the slowest rank's figure.
    ``device``: a CUDA device is synchronised around each trial."""
    if reps < 1 or trials < 1 or warmup < 0:
        raise ConfigError("reps/trials/warmup", (reps, trials, warmup), ">= 1, >= 1, >= 0")
    cuda = device is not None and device.type == "cuda"
    flush = torch.empty(2 * llc_bytes() // 4) if cold else None
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(trials):
        if group is not None:
            import torch.distributed as dist

            dist.barrier(group=group)
        if cuda:
            torch.cuda.synchronize(device)
        if flush is None:
            t0 = time.perf_counter()
            for _ in range(reps):
                fn()
            if cuda:
                torch.cuda.synchronize(device)
            times.append((time.perf_counter() - t0) * 1e3 / reps)
        else:
            total = 0.0
            for _ in range(reps):
                flush.add_(1.0)
                t0 = time.perf_counter()
                fn()
                if cuda:
                    torch.cuda.synchronize(device)
                total += time.perf_counter() - t0
            times.append(total * 1e3 / reps)
    t = _median(times)
    if group is not None:
        import torch.distributed as dist

        buf = torch.tensor([t], dtype=torch.float64)
        if cuda:
            buf = buf.to(device)
        dist.all_reduce(buf, op=dist.ReduceOp.MAX, group=group)
        t = float(buf.item())
    return t


def _fit_relative(xs: Sequence[float], ys: Sequence[float], note: str, source: str) -> LinearCost:
    """``alpha + beta * n`` minimising sum ((fit - t) / t)^2 (weights 1/t^2), ``alpha`` >= 0;
    a falling line (noise) becomes the constant ``mean(t)``, as :meth:`LinearCost.fit` does."""
    w = [1.0 / max(y, TINY_MS) ** 2 for y in ys]  # a 0 ms point (noise) must not divide
    sw = sum(w)
    mx = sum(wi * x for wi, x in zip(w, xs)) / sw
    my = sum(wi * y for wi, y in zip(w, ys)) / sw
    sxx = sum(wi * (x - mx) ** 2 for wi, x in zip(w, xs))
    beta = sum(wi * (x - mx) * (y - my) for wi, x, y in zip(w, xs, ys)) / sxx
    alpha = my - beta * mx
    if alpha < 0:
        alpha = 0.0
        beta = sum(wi * x * y for wi, x, y in zip(w, xs, ys)) / sum(
            wi * x * x for wi, x in zip(w, xs)
        )
    mean = sum(ys) / len(ys)
    if beta < 0:  # noise: time cannot fall as the size grows (a planner would favour size)
        alpha, beta = mean, 0.0
    ss_tot = sum((y - mean) ** 2 for y in ys)
    ss_res = sum((y - alpha - beta * x) ** 2 for x, y in zip(xs, ys))
    return LinearCost(
        alpha=alpha,
        beta=beta,
        r2=1 - ss_res / ss_tot if ss_tot else 1.0,
        source=source,
        note=note,
    )


def fit(
    xs: Sequence[float],
    ys: Sequence[float],
    *,
    note: str = "",
    relative: bool = False,
    nonneg_alpha: bool = True,
    increasing: bool = False,
    source: str = "measured",
) -> LinearCost:
    """The measured ``alpha + beta * n`` cost of points ``(xs, ys)`` (ms).

    ``relative``: minimise relative rather than absolute squared error (``alpha`` >= 0).
    ``increasing``: when noise makes the fitted line fall with size, return the steepest
    per-unit rate through the origin instead (a cost must not shrink as ``n`` grows).
    ``source``: the label the cost carries (``"fitted"`` in ``moeflow profile`` files).
    The cost carries its fit quality (``r2``, ``max_rel_err``) and the points."""
    if len(xs) != len(ys) or len(xs) < 2:
        raise InputError(
            f"a cost fit needs at least 2 points of equal length, got {len(xs)} and {len(ys)}"
        )
    if relative:
        c = _fit_relative(xs, ys, note, source)
    else:
        c = LinearCost.fit(xs, ys, source=source, nonneg_alpha=nonneg_alpha, note=note)
    if increasing and c.beta <= 0:
        c = LinearCost(
            0.0,
            max(y / x for x, y in zip(xs, ys) if x > 0),
            source=source,
            note=(note + "; " if note else "") + "through the origin (the fit was not increasing)",
        )
    return c.with_points(xs, ys)
