"""`Plan`: the planner's output, plain serializable data read by the simulator and the runtime.

A plan has one :class:`LayerPlan` per MoE layer with the forward and backward pipeline degrees
(``r_fwd``, ``r_bwd``: plain ints, what :class:`moeflow.parallel.ExpertParallel` runs) and the
bytes of data-parallel gradient all-reduce placed in that layer's backward window
(``gar_bytes``). ``tail_ar_bytes`` is all-reduced after the backward pass.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from moeflow.errors import ConfigError, InputError, PlanError
from moeflow.perf.cost import PerfModel
from moeflow.plan.workload import LayerWorkload
from moeflow.validate import positive_int


@dataclass(frozen=True)
class LayerPlan:
    index: int
    r_fwd: int
    r_bwd: int
    gar_bytes: float = 0.0
    workload: int = 0  # index into Plan.workload_table
    t_fwd_ms: float = 0.0  # predicted by the simulator
    t_bwd_ms: float = 0.0

    def __post_init__(self) -> None:
        for name in ("r_fwd", "r_bwd"):
            object.__setattr__(self, name, positive_int(f"LayerPlan.{name}", getattr(self, name)))
        if self.gar_bytes < 0:
            raise ConfigError("LayerPlan.gar_bytes", self.gar_bytes, "a float >= 0")


@dataclass
class Plan:
    method: str
    perf: dict  # PerfModel.to_dict()
    workload_table: list[dict]  # LayerWorkload.to_dict() entries
    layers: list[LayerPlan]
    tail_ar_bytes: float = 0.0
    include_attention: bool = False
    predicted_step_ms: float = 0.0
    model: str = ""
    cluster: str = ""
    solve_ms: float = 0.0
    meta: dict = field(default_factory=dict)

    def perf_model(self) -> PerfModel:
        return PerfModel.from_dict(self.perf)

    def workloads(self) -> list[LayerWorkload]:
        table = [LayerWorkload.from_dict(d) for d in self.workload_table]
        return [table[lp.workload] for lp in self.layers]

    def degrees(self) -> list[tuple[int, int]]:
        return [(lp.r_fwd, lp.r_bwd) for lp in self.layers]

    def to_dict(self) -> dict:
        return {
            "format": "moeflow.plan/1",
            "method": self.method,
            "model": self.model,
            "cluster": self.cluster,
            "perf": self.perf,
            "workload_table": self.workload_table,
            "layers": [dict(lp.__dict__) for lp in self.layers],
            "tail_ar_bytes": self.tail_ar_bytes,
            "include_attention": self.include_attention,
            "predicted_step_ms": self.predicted_step_ms,
            "solve_ms": self.solve_ms,
            "meta": self.meta,
        }

    @classmethod
    def from_dict(cls, d: dict) -> Plan:
        if d.get("format") != "moeflow.plan/1":
            raise InputError(
                f"not a moeflow plan: format={d.get('format')!r}, expected 'moeflow.plan/1'"
            )
        return cls(
            method=d["method"],
            model=d.get("model", ""),
            cluster=d.get("cluster", ""),
            perf=d["perf"],
            workload_table=d["workload_table"],
            layers=[LayerPlan(**lp) for lp in d["layers"]],
            tail_ar_bytes=float(d.get("tail_ar_bytes", 0.0)),
            include_attention=bool(d.get("include_attention", False)),
            predicted_step_ms=float(d.get("predicted_step_ms", 0.0)),
            solve_ms=float(d.get("solve_ms", 0.0)),
            meta=dict(d.get("meta", {})),
        )

    def to_json(self, indent: int | None = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent)

    @classmethod
    def from_json(cls, s: str) -> Plan:
        return cls.from_dict(json.loads(s))

    def save(self, path: str | Path) -> None:
        Path(path).write_text(self.to_json() + "\n")

    @classmethod
    def load(cls, path: str | Path) -> Plan:
        return cls.from_json(Path(path).read_text())


def build_workload_table(workloads: Sequence[LayerWorkload]) -> tuple[list[dict], list[int]]:
    """``(table, index)`` for :attr:`Plan.workload_table`: each distinct workload once (as a
    dict, in first-seen order) and, per layer, the position of its workload in the table.

    A stack of identical layers stores its workload once, so a plan's JSON stays small.
    """
    keys: dict[LayerWorkload, int] = {}
    index = [keys.setdefault(w, len(keys)) for w in workloads]
    return [w.to_dict() for w in keys], index


def degrees_for_layer(plan: Plan, layer_index: int) -> tuple[int, int]:
    """``(r_fwd, r_bwd)`` of MoE layer ``layer_index`` (what the EP runtime should run).

    A plan built for a single layer workload applies to every layer (index taken modulo 1).
    """
    if not plan.layers:
        raise PlanError("the plan has no layers")
    if len(plan.layers) == 1:
        lp = plan.layers[0]
        return int(lp.r_fwd), int(lp.r_bwd)
    for lp in plan.layers:
        if lp.index == layer_index:
            return int(lp.r_fwd), int(lp.r_bwd)
    raise ConfigError(
        "layer_index", layer_index, f"one of the plan's layers {[lp.index for lp in plan.layers]}"
    )
