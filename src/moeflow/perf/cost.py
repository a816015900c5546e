"""Linear (alpha-beta) cost models and the per-primitive :class:`PerfModel`.

Every primitive is modelled as ``t(n) = alpha + beta * n``, fitted by least squares from
micro-benchmarks taken before training (the alpha-beta model of FSMoE, ASPLOS'25, its online
profiling; HierMoE writes the same model as its Eq. 1). Units throughout moeflow: time in
**milliseconds**; ``n`` in **bytes** for collectives (the per-rank input buffer: what one rank
sends in an a2a, the gathered output of an all-gather, the reduced buffer of a reduce-scatter /
all-reduce) and in **FLOPs** for GEMMs (``2 * m * n * k``). The papers size GEMMs in FLOPs or
in M*H*tokens; we read FSMoE's published fits as FLOPs.

Presets live in :mod:`moeflow.perf.presets` (``perf_preset(name)``), which builds on this
module; nothing here imports them.

Pure Python: no torch, no numpy.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path

from moeflow.errors import ConfigError, InputError

#: every cost a PerfModel may hold. Collectives (``a2a``, ``ag``, ``rs``, ``ar``) and the
#: point-to-point ``send`` take ``n`` in bytes and an optional ``@<link level>`` (``a2a@inter``);
#: compute costs take a ``@<dtype>`` (``expert_fwd@bfloat16``): ``gemm`` (square matmuls,
#: FLOPs), ``expert_fwd`` / ``expert_bwd`` (the expert FFN kernel forward / backward, n =
#: forward FLOPs), ``attention`` (SDPA forward, FLOPs), ``elementwise`` / ``norm`` / ``index``
#: (bytes read); the collective codec's ``zipccl_encode`` / ``zipccl_decode`` take raw bytes.
PRIMITIVES = (
    "gemm",
    "a2a",
    "ag",
    "rs",
    "ar",
    "send",
    "expert_fwd",
    "expert_bwd",
    "attention",
    "elementwise",
    "norm",
    "index",
    "zipccl_encode",
    "zipccl_decode",
)
#: the costs the FSMoE planner and ``moeflow plan`` read
PLANNER_PRIMITIVES = ("gemm", "a2a", "ag", "rs", "ar")
SOURCES = ("published", "derived", "measured", "fitted", "assumed")


@dataclass(frozen=True)
class LinearCost:
    """``t(n) = alpha + beta * n`` in ms (FSMoE's alpha-beta cost model, ASPLOS'25).

    ``r2`` is the coefficient of determination of the least-squares fit that produced it
    (``None`` for costs that were not fitted here) and ``max_rel_err`` its largest relative
    residual ``max |fit(n) - t| / t`` over the fitted points; ``points`` are those ``(n, t)``
    points (kept so that :meth:`PerfModel.update` can refit with new samples);
    ``source`` says where the numbers come from.
    """

    alpha: float
    beta: float
    r2: float | None = None
    source: str = "fitted"
    note: str = ""
    max_rel_err: float | None = None
    points: tuple[tuple[float, float], ...] = ()

    def __post_init__(self) -> None:
        if not (math.isfinite(self.alpha) and math.isfinite(self.beta)):
            raise ConfigError("LinearCost", (self.alpha, self.beta), "finite alpha and beta")
        if self.source not in SOURCES:
            raise ConfigError("LinearCost.source", self.source, f"one of {SOURCES}")

    def __call__(self, n: float) -> float:
        return self.alpha + self.beta * n

    def chunked(self, n: float, r: int) -> float:
        """Per-chunk time when ``n`` is split into ``r`` equal chunks: ``alpha + beta*n/r``."""
        return self.alpha + self.beta * n / r

    def inverse(self, t: float) -> float:
        """``g^-1(t) = (t - alpha) / beta``: the largest ``n`` that fits in time ``t`` (>= 0).

        FSMoE's adaptive gradient partitioning (ASPLOS'25) uses this to turn idle link time
        into bytes.
        """
        if self.beta <= 0:
            return math.inf if t >= self.alpha else 0.0
        return max(0.0, (t - self.alpha) / self.beta)

    @classmethod
    def fit(
        cls,
        n: Iterable[float],
        t: Iterable[float],
        *,
        source: str = "fitted",
        note: str = "",
        nonneg_alpha: bool = False,
    ) -> LinearCost:
        """Ordinary least squares of ``t`` on ``n`` (closed form), with R^2.

        ``beta = cov(n, t) / var(n)``, ``alpha = mean(t) - beta * mean(n)``,
        ``R^2 = 1 - SS_res / SS_tot``. With ``nonneg_alpha`` a negative intercept (noise on a
        start-up latency that cannot be negative) is clamped to 0 and beta refitted through
        the origin, ``beta = sum(n t) / sum(n^2)``: a negative alpha would make the planner
        believe that more chunks are cheaper. Likewise a negative slope (noise on a loaded
        machine: time cannot fall as the size grows) becomes ``beta = 0``, ``alpha = mean(t)``,
        which the planner can still use.
        """
        xs = [float(v) for v in n]
        ys = [float(v) for v in t]
        if len(xs) != len(ys):
            raise InputError(f"fit needs as many times as sizes, got {len(xs)} and {len(ys)}")
        if len(xs) < 2:
            raise InputError(f"fit needs at least 2 points, got {len(xs)}")
        mx = sum(xs) / len(xs)
        my = sum(ys) / len(ys)
        sxx = sum((x - mx) ** 2 for x in xs)
        if sxx == 0:
            raise InputError("fit needs at least 2 distinct sizes")
        sxy = sum((x - mx) * (y - my) for x, y in zip(xs, ys))
        beta = sxy / sxx
        alpha = my - beta * mx
        if nonneg_alpha and alpha < 0:
            alpha = 0.0
            beta = sum(x * y for x, y in zip(xs, ys)) / sum(x * x for x in xs)
        if nonneg_alpha and beta < 0:
            alpha, beta = max(my, 0.0), 0.0
        return cls(alpha=alpha, beta=beta, source=source, note=note).with_points(xs, ys)

    def with_points(self, n: Iterable[float], t: Iterable[float]) -> LinearCost:
        """This line with its fit quality on the points ``(n, t)``: ``r2``, ``max_rel_err``
        and the points themselves."""
        xs = [float(v) for v in n]
        ys = [float(v) for v in t]
        my = sum(ys) / len(ys)
        ss_tot = sum((y - my) ** 2 for y in ys)
        ss_res = sum((y - self(x)) ** 2 for x, y in zip(xs, ys))
        rel = [abs(self(x) - y) / y for x, y in zip(xs, ys) if y > 0]
        return replace(
            self,
            r2=1.0 - ss_res / ss_tot if ss_tot > 0 else 1.0,
            max_rel_err=max(rel) if rel else None,
            points=tuple(zip(xs, ys)),
        )

    def to_dict(self) -> dict:
        d = {
            "alpha": self.alpha,
            "beta": self.beta,
            "r2": self.r2,
            "source": self.source,
            "note": self.note,
        }
        if self.max_rel_err is not None:
            d["max_rel_err"] = self.max_rel_err
        if self.points:
            d["points"] = [list(p) for p in self.points]
        return d

    @classmethod
    def from_dict(cls, d: Mapping) -> LinearCost:
        return cls(
            alpha=float(d["alpha"]),
            beta=float(d["beta"]),
            r2=None if d.get("r2") is None else float(d["r2"]),
            source=d.get("source", "fitted"),
            note=d.get("note", ""),
            max_rel_err=None if d.get("max_rel_err") is None else float(d["max_rel_err"]),
            points=tuple((float(n), float(t)) for n, t in d.get("points", ())),
        )


def _check_key(key: str) -> None:
    base = key.split("@", 1)[0]
    if base not in PRIMITIVES:
        raise ConfigError(
            "primitive",
            key,
            f"one of {PRIMITIVES}, optionally '@<link level>' or '@<dtype>' "
            "(e.g. 'a2a@inter', 'expert_fwd@bfloat16')",
        )


@dataclass(frozen=True)
class PerfModel:
    """Costs per primitive: ``gemm``, ``a2a``, ``ag``, ``rs``, ``ar`` and per-level variants
    such as ``a2a@intra`` / ``a2a@inter``.

    :meth:`cost` resolves ``"a2a@inter"`` to the level-specific fit when there is one and falls
    back to the plain ``"a2a"`` fit otherwise.
    """

    name: str
    costs: Mapping[str, LinearCost]
    bytes_per_element: int = 2
    notes: str = ""
    meta: Mapping[str, object] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for k in self.costs:
            _check_key(k)
        if "gemm" not in self.costs:
            raise ConfigError("PerfModel.costs", sorted(self.costs), "a 'gemm' entry")

    def cost(self, primitive: str) -> LinearCost:
        _check_key(primitive)
        if primitive in self.costs:
            return self.costs[primitive]
        base = primitive.split("@", 1)[0]
        if base in self.costs:
            return self.costs[base]
        raise ConfigError(
            "primitive",
            primitive,
            f"a cost of PerfModel {self.name!r}: one of {sorted(self.costs)} "
            "(`moeflow profile` measures every cost a planner reads)",
        )

    def has(self, primitive: str) -> bool:
        return primitive in self.costs or primitive.split("@", 1)[0] in self.costs

    def link_costs(self) -> dict[int, tuple[float, float]]:
        """``{level: (alpha s, beta s per byte that crosses the link)}`` for link level 1
        (inside a node) and 2 (across nodes), the form HierMoE's Eq. 1 and Parm's schedule
        model read, from the profiled ``a2a@intra`` / ``a2a@inter`` (else ``a2a``).

        A profiled a2a's ``n`` is a rank's whole buffer, of which ``(p-1)/p`` leaves the rank
        in a group of ``p``, so beta per crossing byte is ``beta * p / (p-1)``; ``p`` comes
        from ``meta`` (``world_size``, ``nodes``)."""
        self.require("a2a", who="link_costs")
        world = int(self.meta.get("world_size", 2))
        nodes = int(self.meta.get("nodes", 1))
        out = {}
        for level, key, p in ((1, "a2a@intra", world // nodes), (2, "a2a@inter", nodes)):
            if key not in self.costs:
                key, p = "a2a", world
            c = self.costs[key]
            share = p / (p - 1) if p > 1 else 1.0
            out[level] = (c.alpha * 1e-3, c.beta * share * 1e-3)
        return out

    def require(self, *primitives: str, who: str = "the planner") -> None:
        """ConfigError naming every cost of ``primitives`` this model lacks (resolved as
        :meth:`cost` resolves them): a planner calls this before it plans, so a model
        without a cost it reads is refused by name rather than replaced by a guess."""
        for p in primitives:
            _check_key(p)
        missing = [p for p in primitives if not self.has(p)]
        if missing:
            raise ConfigError(
                "perf",
                self.name,
                f"a PerfModel with the cost(s) {missing} that {who} reads "
                "(`moeflow profile` measures them)",
            )

    def update(self, samples: Mapping[str, Iterable[tuple[float, float]]]) -> PerfModel:
        """A copy refitted from measured durations: ``samples`` maps a cost key to
        ``(n, t_ms)`` pairs the runtime recorded (per chunk, per collective).

        Per key, the new samples replace the stored points at the same sizes (the latest
        measurement of a size wins; the others are kept) and the line is refitted by least
        squares with ``alpha >= 0``. When the merged points hold a single size, the line
        cannot be refitted, so it is scaled by ``median(t) / cost(n)`` at that size (same
        shape, calibrated level). A key that is not in the model needs samples of two sizes
        (InputError otherwise). ``meta["refits"]`` counts the samples taken per key.
        """
        costs = dict(self.costs)
        refits = dict(self.meta.get("refits", {}))
        for key, pairs in samples.items():
            _check_key(key)
            new = [(float(n), float(t)) for n, t in pairs]
            if not new:
                continue
            if any(not (math.isfinite(n) and math.isfinite(t)) or t < 0 for n, t in new):
                raise InputError(f"update({key!r}): samples must be finite with t >= 0")
            old = costs.get(key)
            sizes = {n for n, _ in new}
            kept = [p for p in (old.points if old else ()) if p[0] not in sizes]
            pts = new + kept
            note = f"refit from {len(new)} runtime samples"
            if len({n for n, _ in pts}) >= 2:
                c = LinearCost.fit(
                    [n for n, _ in pts],
                    [t for _, t in pts],
                    nonneg_alpha=True,
                    source="fitted",
                    note=note,
                )
            elif old is not None:
                n0 = new[0][0]
                ts = sorted(t for _, t in new)
                med = (
                    ts[len(ts) // 2]
                    if len(ts) % 2
                    else 0.5 * (ts[len(ts) // 2 - 1] + ts[len(ts) // 2])
                )
                s = med / old(n0) if old(n0) > 0 else 1.0
                c = LinearCost(
                    old.alpha * s, old.beta * s, source="fitted", note=note + " (one size: scaled)"
                ).with_points([n for n, _ in pts], [t for _, t in pts])
            else:
                raise InputError(
                    f"update({key!r}): the model has no {key!r} cost, so its samples need at "
                    f"least 2 distinct sizes, got {sorted(sizes)}"
                )
            costs[key] = c
            refits[key] = refits.get(key, 0) + len(new)
        return replace(self, costs=costs, meta={**self.meta, "refits": refits})

    def time(self, primitive: str, n: float) -> float:
        return self.cost(primitive)(n)

    # ---- JSON ---------------------------------------------------------------------------
    def to_dict(self) -> dict:
        return {
            "format": "moeflow.perf/1",
            "name": self.name,
            "bytes_per_element": self.bytes_per_element,
            "notes": self.notes,
            "meta": dict(self.meta),
            "costs": {k: c.to_dict() for k, c in sorted(self.costs.items())},
        }

    @classmethod
    def from_dict(cls, d: Mapping) -> PerfModel:
        if d.get("format") != "moeflow.perf/1":
            raise InputError(
                f"not a moeflow perf model: format={d.get('format')!r}, expected 'moeflow.perf/1'"
            )
        return cls(
            name=d["name"],
            bytes_per_element=int(d.get("bytes_per_element", 2)),
            notes=d.get("notes", ""),
            meta=dict(d.get("meta", {})),
            costs={k: LinearCost.from_dict(v) for k, v in d["costs"].items()},
        )

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    @classmethod
    def from_json(cls, s: str) -> PerfModel:
        return cls.from_dict(json.loads(s))

    def save(self, path: str | Path) -> None:
        Path(path).write_text(self.to_json() + "\n")

    @classmethod
    def load(cls, path: str | Path) -> PerfModel:
        return cls.from_json(Path(path).read_text())
