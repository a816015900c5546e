"""Baseline schedules, as :class:`Plan` objects the simulator can compare with FSMoE.

* ``deepspeed_moe``: no overlap (GShard-style dispatch, r = 1), gradient all-reduce after the
  backward pass.
* ``tutel``: Tutel-style fixed pipeline degree ``r`` for forward and backward (Tutel's
  ``overlap_degree``), gradient all-reduce after the backward pass.
* ``pipemoe``: PipeMoE's closed-form degree. PipeMoE models a two-resource pipeline (a2a link
  and expert compute, no ag/rs, no gradient all-reduce): comm bound when ``2 work_a2a >=
  work_exp`` with ``T = 2 alpha_a2a r + 2 work_a2a + alpha_exp + work_exp / r``, otherwise
  ``T = alpha_exp r + work_exp + 2 alpha_a2a + 2 work_a2a / r``; ``r* = sqrt(B/A)`` of the
  binding form, rounded to the nearest integer in [1, r_max]. One degree from the forward costs
  is used for both passes (Tutel with PipeMoE, FSMoE's baseline).
* ``lina``: Lina-style fixed-size chunks: ``r = ceil(a2a bytes / chunk_bytes)`` and a2a given
  priority over the gradient all-reduce, which therefore only uses idle link windows
  (greedy, no refinement); what does not fit goes after the backward pass.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable

from moeflow.perf.cost import PerfModel
from moeflow.plan.fsmoe import R_MAX, partition_gradients
from moeflow.plan.plan import LayerPlan, Plan, build_workload_table
from moeflow.plan.workload import LayerWorkload
from moeflow.sim.builders import pass_idle_inter, pass_time, simulate_plan


def pipemoe_degree(w: LayerWorkload, perf: PerfModel, r_max: int = R_MAX) -> int:
    pc = w.pass_cost(perf, False)
    if 2 * pc.work_a2a >= pc.work_exp:
        A, B = 2 * pc.alpha_a2a, pc.work_exp
    else:
        A, B = pc.alpha_exp, 2 * pc.work_a2a
    r = math.sqrt(B / A) if A > 0 else r_max
    return int(min(max(round(r), 1), r_max))


def lina_degree(w: LayerWorkload, chunk_bytes: float = 4 * 2**20, r_max: int = R_MAX) -> int:
    return int(min(max(math.ceil(w.a2a_bytes / chunk_bytes), 1), r_max))


def _fixed(
    method: str,
    workloads,
    perf: PerfModel,
    degree: Callable[[LayerWorkload], int],
    *,
    num_layers: int | None,
    include_attention: bool,
    greedy_grad: bool,
    model: str,
    cluster,
) -> Plan:
    t0 = time.perf_counter()
    if isinstance(workloads, LayerWorkload):
        workloads = [workloads] * (num_layers or 1)
    workloads = list(workloads)
    table, widx = build_workload_table(workloads)
    ar = perf.cost("ar")
    grads = [w.grad_bytes if w.n_dp * w.n_ep * w.n_esp > 1 else 0.0 for w in workloads]
    rs = [degree(w) for w in workloads]
    gar = [0.0] * len(workloads)
    tail = float(sum(grads))
    if greedy_grad and tail > 0:
        idle = [pass_idle_inter(w.pass_cost(perf, True), r) for w, r in zip(workloads, rs)]
        part = partition_gradients(
            grads,
            lambda j, n: pass_time(
                workloads[j].pass_cost(perf, True), rs[j], ar(n) if n > 0 else 0.0, True
            ),
            idle,
            ar,
            refine=False,
        )
        gar, tail = list(part.gar_bytes), part.tail_bytes
    layers = []
    for j, (w, r) in enumerate(zip(workloads, rs)):
        t_f = pass_time(w.pass_cost(perf, False), r)
        t_b = pass_time(w.pass_cost(perf, True), r, ar(gar[j]) if gar[j] > 0 else 0.0, True)
        layers.append(
            LayerPlan(
                index=j,
                r_fwd=r,
                r_bwd=r,
                gar_bytes=gar[j],
                workload=widx[j],
                t_fwd_ms=t_f,
                t_bwd_ms=t_b,
            )
        )
    p = Plan(
        method=method,
        perf=perf.to_dict(),
        workload_table=table,
        layers=layers,
        tail_ar_bytes=tail,
        include_attention=include_attention,
        model=model,
        cluster=getattr(cluster, "name", cluster or ""),
    )
    p.solve_ms = (time.perf_counter() - t0) * 1e3
    p.predicted_step_ms = simulate_plan(p).makespan
    return p


def deepspeed_moe(
    workloads,
    perf: PerfModel,
    cluster=None,
    *,
    num_layers: int | None = None,
    include_attention: bool = True,
    model: str = "",
) -> Plan:
    return _fixed(
        "deepspeed-moe",
        workloads,
        perf,
        lambda w: 1,
        num_layers=num_layers,
        include_attention=include_attention,
        greedy_grad=False,
        model=model,
        cluster=cluster,
    )


def tutel(
    workloads,
    perf: PerfModel,
    cluster=None,
    *,
    r: int = 2,
    num_layers: int | None = None,
    include_attention: bool = True,
    model: str = "",
) -> Plan:
    return _fixed(
        f"tutel(r={r})",
        workloads,
        perf,
        lambda w: r,
        num_layers=num_layers,
        include_attention=include_attention,
        greedy_grad=False,
        model=model,
        cluster=cluster,
    )


def pipemoe(
    workloads,
    perf: PerfModel,
    cluster=None,
    *,
    r_max: int = R_MAX,
    num_layers: int | None = None,
    include_attention: bool = True,
    model: str = "",
) -> Plan:
    return _fixed(
        "tutel+pipemoe",
        workloads,
        perf,
        lambda w: pipemoe_degree(w, perf, r_max),
        num_layers=num_layers,
        include_attention=include_attention,
        greedy_grad=False,
        model=model,
        cluster=cluster,
    )


def lina(
    workloads,
    perf: PerfModel,
    cluster=None,
    *,
    chunk_bytes: float = 4 * 2**20,
    r_max: int = R_MAX,
    num_layers: int | None = None,
    include_attention: bool = True,
    model: str = "",
) -> Plan:
    return _fixed(
        "lina",
        workloads,
        perf,
        lambda w: lina_degree(w, chunk_bytes, r_max),
        num_layers=num_layers,
        include_attention=include_attention,
        greedy_grad=True,
        model=model,
        cluster=cluster,
    )


BASELINES: dict[str, Callable[..., Plan]] = {
    "deepspeed-moe": deepspeed_moe,
    "tutel": tutel,
    "tutel+pipemoe": pipemoe,
    "lina": lina,
}


def all_baselines(workloads, perf: PerfModel, cluster=None, **kw) -> list[Plan]:
    return [fn(workloads, perf, cluster, **kw) for fn in BASELINES.values()]


__all__ = [
    "deepspeed_moe",
    "tutel",
    "pipemoe",
    "lina",
    "pipemoe_degree",
    "lina_degree",
    "BASELINES",
    "all_baselines",
]
