"""Durations the runtime measures while it runs, kept for :meth:`PerfModel.update`.

The expert-parallel pipeline (:mod:`moeflow.parallel.expert_parallel`) times what it
already does: each chunk's local work (gathers, the expert GEMMs, placing the results) and
the all-to-alls it can time without overlap. A :class:`DurationRecorder` holds those
``(cost key, n, ms)`` samples in the units of :mod:`moeflow.perf.cost` (bytes for
collectives, forward FLOPs for the expert task), bounded so that recording never grows
without limit. Online refinement (FSMoE, ASPLOS'25, profiles its alpha-beta costs online;
Tutel adapts its pipelining on warm-up iterations) refits the model from them.

Pure Python: a sample is three floats appended to a deque.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Iterable, Mapping

from moeflow.errors import ConfigError, InputError
from moeflow.perf.cost import _check_key

#: samples a recorder keeps (the oldest go first)
MAX_SAMPLES = 8192


class DurationRecorder:
    """A bounded log of ``(cost key, n, t_ms)`` samples measured at run time.

    ``add`` checks the key (one of :data:`moeflow.perf.cost.PRIMITIVES`, optionally with its
    ``@`` suffix) and the values; :meth:`samples` groups them as :meth:`PerfModel.update`
    reads them."""

    def __init__(self, max_samples: int = MAX_SAMPLES):
        if not (isinstance(max_samples, int) and max_samples >= 1):
            raise ConfigError("max_samples", max_samples, "an int >= 1")
        self._log: deque = deque(maxlen=max_samples)
        self._passes: deque = deque(maxlen=max_samples)
        self.steps = 0  # calls of the layer that recorded (forward + backward = one step)

    def add(self, key: str, n: float, t_ms: float) -> None:
        _check_key(key)
        n, t_ms = float(n), float(t_ms)
        if not (math.isfinite(n) and math.isfinite(t_ms)) or n < 0 or t_ms < 0:
            raise InputError(f"DurationRecorder.add({key!r}): n and t_ms must be finite, >= 0")
        self._log.append((key, n, t_ms))

    def add_pass(self, key: str, r: int, t_ms: float) -> None:
        """One whole chunked pass: its expert cost key (``expert_fwd@<dtype>`` /
        ``expert_bwd@<dtype>``), its degree ``r`` and its wall time (ms)."""
        _check_key(key)
        t_ms = float(t_ms)
        if not (isinstance(r, int) and r >= 1) or not math.isfinite(t_ms) or t_ms < 0:
            raise InputError(f"DurationRecorder.add_pass({key!r}): r >= 1 and finite t_ms >= 0")
        self._passes.append((key, r, t_ms))

    def passes(self) -> dict[str, list[tuple[int, float]]]:
        """``{expert key: [(r, t_ms), ...]}`` of the recorded passes, in recording order."""
        out: dict[str, list[tuple[int, float]]] = {}
        for key, r, t in self._passes:
            out.setdefault(key, []).append((r, t))
        return out

    def __len__(self) -> int:
        return len(self._log)

    def clear(self) -> None:
        self._log.clear()
        self._passes.clear()
        self.steps = 0

    def samples(self) -> dict[str, list[tuple[float, float]]]:
        """``{key: [(n, t_ms), ...]}`` in recording order (sizes > 0 only)."""
        out: dict[str, list[tuple[float, float]]] = {}
        for key, n, t in self._log:
            if n > 0:
                out.setdefault(key, []).append((n, t))
        return out


def merge_samples(
    parts: Iterable[Mapping[str, Iterable[tuple[float, float]]]],
) -> dict[str, list[tuple[float, float]]]:
    """One sample set from several (every rank's, in rank order): keys sorted, each key's
    samples in the order of ``parts``. Every rank that merges the same parts gets the same
    set, so a model refitted from it is the same on every rank."""
    out: dict[str, list[tuple[float, float]]] = {}
    for part in parts:
        for key in sorted(part):
            out.setdefault(key, []).extend((float(n), float(t)) for n, t in part[key])
    return {k: out[k] for k in sorted(out)}


def bucket_medians(
    pairs: Iterable[tuple[float, float]], width: float = 1.25
) -> list[tuple[float, float]]:
    """Samples reduced to one ``(median n, median t)`` point per size bucket (sizes within
    ``width`` of the bucket's smallest): a pipeline's chunks of one degree fall in one
    bucket, and a median point is what a least-squares line should see on a shared machine,
    where some samples catch a stall (a first use, another process) that no cost model
    should learn."""
    if width < 1:
        raise ConfigError("width", width, ">= 1")
    pts = sorted((float(n), float(t)) for n, t in pairs)
    out: list[tuple[float, float]] = []
    i = 0
    while i < len(pts):
        j = i
        while j < len(pts) and pts[j][0] <= width * pts[i][0]:
            j += 1
        ns = [n for n, _ in pts[i:j]]
        ts = sorted(t for _, t in pts[i:j])
        out.append((_median(ns), _median(ts)))
        i = j
    return out


def _median(xs: list[float]) -> float:
    xs = sorted(xs)
    k = len(xs)
    return xs[k // 2] if k % 2 else 0.5 * (xs[k // 2 - 1] + xs[k // 2])
