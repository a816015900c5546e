"""FSMoE planner (ASPLOS'25): pipeline degrees per pass and gradient all-reduce partitioning.

1. **Pipeline degree** (FSMoE, finding the pipeline degree r). With per-chunk times
   ``t_x,r = alpha_x + work_x / r`` the step time of a pass takes one of four forms:

   * inter-node bound: ``2r t_a2a,r + t_gar``
   * compute bound:    ``2 t_a2a,r + t_ag,r + t_rs,r + r t_exp,r``
   * a2a bound:        ``2r t_a2a,r + t_ag,r + t_rs,r``
   * intra-node bound: ``2 t_a2a,r + r t_ag,r + r t_rs,r``

   Each is ``A r + B / r + C`` (:func:`four_cases`), minimised at ``r = sqrt(B / A)``. The
   **continuous relaxation** solves each case under its own condition (that it is the dominant
   form there) and also the crossing points of the forms, which is where ``max`` of convex
   forms has its minimum when no case's own optimum is feasible (the paper uses SLSQP per case;
   the closed form is exact for this family). The **integer search** then evaluates the floor
   and ceiling of each relaxed optimum and their neighbours with the task-graph simulator (or
   with the four-case model, ``evaluator="model"``) and keeps the fastest. Forward and backward
   are planned separately; backward doubles the expert GEMM work and carries ``t_gar``.

2. **Gradient partitioning** (FSMoE, adaptive gradient partitioning). The
   data-parallel gradient of layer ``l`` is ready after its backward; it can be all-reduced in
   the idle inter-node link time ``t_olp`` of any later (lower-index) MoE backward. Greedy pass:
   ``n_j = g^-1(min(t_grad(available), t_olp_j))`` with ``g^-1(t) = (t - alpha_ar)/beta_ar``;
   the rest carries over, and what is left after layer 0 is all-reduced at the end. Refinement:
   minimise ``sum_j T_bwd,j(n_j) + t_ar(tail)`` under the cumulative availability bounds with a
   deterministic pattern search (the paper uses differential evolution; this is a 1-D convex-ish
   problem per window and the search is exact on the grid it visits).

Pure Python, no torch, no scipy.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from moeflow.errors import PlanError
from moeflow.perf.cost import PerfModel
from moeflow.perf.layer import PassCost
from moeflow.plan.plan import LayerPlan, Plan, build_workload_table
from moeflow.plan.workload import LayerWorkload
from moeflow.sim.builders import pass_idle_inter, pass_time

R_MAX = 16


@dataclass(frozen=True)
class Case:
    """One bounding form ``T(r) = A r + B / r + C``."""

    name: str
    A: float
    B: float
    C: float

    def t(self, r: float) -> float:
        return self.A * r + self.B / r + self.C

    def argmin(self, r_max: float) -> float:
        if self.B <= 0:
            return 1.0
        if self.A <= 0:
            return float(r_max)
        return min(max(math.sqrt(self.B / self.A), 1.0), float(r_max))


def four_cases(pc: PassCost, gar_ms: float = 0.0) -> list[Case]:
    """FSMoE's four step-time forms as ``A r + B/r + C`` (FSMoE, ASPLOS'25: the inter-node,
    compute, a2a and intra-node bound cases of the pipeline degree)."""
    aa, wa = pc.alpha_a2a, pc.work_a2a
    ag_a, ag_w, rs_a, rs_w = pc.alpha_ag, pc.work_ag, pc.alpha_rs, pc.work_rs
    xa, xw = pc.alpha_exp, pc.work_exp
    return [
        Case("inter", A=2 * aa, B=0.0, C=2 * wa + gar_ms),
        Case("compute", A=xa, B=2 * wa + ag_w + rs_w, C=2 * aa + ag_a + rs_a + xw),
        Case("a2a", A=2 * aa, B=ag_w + rs_w, C=2 * wa + ag_a + rs_a),
        Case("intra", A=ag_a + rs_a, B=2 * wa, C=2 * aa + ag_w + rs_w),
    ]


def model_time(cases: Sequence[Case], r: float) -> float:
    """The four-case step time: the largest (binding) form at ``r``."""
    return max(c.t(r) for c in cases)


def relax(cases: Sequence[Case], r_max: int = R_MAX) -> tuple[float, str, list[float]]:
    """Continuous relaxation: ``(r*, binding case, per-case feasible optima)``.

    Each case's unconstrained optimum counts only if that case is the dominant form there (its
    condition). ``max`` of the forms is convex in ``r``, so its minimum is at a feasible case
    optimum or at a crossing of two forms; both are candidates.
    """
    cands: list[float] = [1.0, float(r_max)]
    feasible: list[float] = []
    for c in cases:
        r = c.argmin(r_max)
        if c.t(r) >= model_time(cases, r) - 1e-12:
            feasible.append(r)
        cands.append(r)
    for i in range(len(cases)):
        for j in range(i + 1, len(cases)):
            a = cases[i].A - cases[j].A
            b = cases[i].C - cases[j].C
            c = cases[i].B - cases[j].B
            # a r^2 + b r + c = 0 (multiply T_i - T_j = 0 by r)
            roots: list[float] = []
            if abs(a) < 1e-300:
                if abs(b) > 1e-300:
                    roots.append(-c / b)
            else:
                disc = b * b - 4 * a * c
                if disc >= 0:
                    s = math.sqrt(disc)
                    roots += [(-b + s) / (2 * a), (-b - s) / (2 * a)]
            cands += [r for r in roots if 1.0 <= r <= r_max]
    best = min(cands, key=lambda r: (model_time(cases, r), r))
    binding = max(cases, key=lambda c: c.t(best)).name
    return best, binding, feasible


@dataclass(frozen=True)
class PassDecision:
    r: int
    t_ms: float  # evaluated time of the chosen r
    r_relaxed: float
    case: str
    candidates: tuple[int, ...]


def integer_candidates(r_relaxed: float, feasible: Sequence[float], r_max: int) -> list[int]:
    cands = set()
    for x in [r_relaxed, *feasible]:
        lo = int(math.floor(x))
        for r in (lo - 1, lo, lo + 1, lo + 2):
            if 1 <= r <= r_max:
                cands.add(r)
    return sorted(cands)


def plan_pass(
    pc: PassCost,
    *,
    r_max: int = R_MAX,
    gar_ms: float = 0.0,
    backward: bool = False,
    evaluator: str = "sim",
    sim_kw: tuple = (),
) -> PassDecision:
    """Choose the pipeline degree of one pass (relaxation, then integer search).

    ``sim_kw``: ``(name, value)`` pairs for the simulator's pass (:func:`shared_resources`)."""
    cases = four_cases(pc, gar_ms)
    r_rel, binding, feasible = relax(cases, r_max)
    cands = integer_candidates(r_rel, feasible, r_max)
    if sim_kw and 1 not in cands:
        # the relaxation models separate resources; on shared ones one chunk may win
        cands = [1, *cands]
    if evaluator == "sim":

        def ev(r: int) -> float:
            return pass_time(pc, r, gar_ms, backward, **dict(sim_kw))
    elif evaluator == "model":

        def ev(r: int) -> float:
            return model_time(cases, r)
    else:
        raise PlanError(f"evaluator={evaluator!r} is not allowed: 'sim' or 'model'")
    scored = [(ev(r), r) for r in cands]
    t, r = min(scored)
    if evaluator == "model":
        t = pass_time(pc, r, gar_ms, backward, **dict(sim_kw))
    return PassDecision(r=r, t_ms=t, r_relaxed=r_rel, case=binding, candidates=tuple(cands))


#: below this measured overlap (``meta["overlap"]`` of ``moeflow profile``) the planner
#: models the link and the compute as one resource
SHARED_BELOW = 0.5


def shared_resources(perf: PerfModel) -> tuple:
    """Simulator keywords for ``perf``'s host: ``(("link", "cpu"), ("compute", "cpu"))``
    when its profile measured that an all-to-all barely progresses while the rank computes
    (``meta["overlap"] < SHARED_BELOW``, e.g. gloo on loopback), else ``()`` (separate link
    and compute, FSMoE's setting; also for presets without a measured overlap)."""
    eta = (perf.meta or {}).get("overlap")
    if eta is not None and float(eta) < SHARED_BELOW:
        return (("link", "cpu"), ("compute", "cpu"))
    return ()


@dataclass(frozen=True)
class LayerDecision:
    fwd: PassDecision
    bwd: PassDecision
    solve_ms: float

    @property
    def r_fwd(self) -> int:
        return self.fwd.r

    @property
    def r_bwd(self) -> int:
        return self.bwd.r

    @property
    def t_ms(self) -> float:
        return self.fwd.t_ms + self.bwd.t_ms


def plan_layer(
    w: LayerWorkload,
    perf: PerfModel,
    *,
    r_max: int = R_MAX,
    gar_bytes: float = 0.0,
    evaluator: str = "sim",
) -> LayerDecision:
    """Forward and backward degrees of one MoE layer, planned separately; on a host whose
    profile says link and compute share the cores (:func:`shared_resources`) the simulated
    chunks cannot overlap."""
    t0 = time.perf_counter()
    kw = shared_resources(perf)
    gar_ms = perf.cost("ar")(gar_bytes) if gar_bytes > 0 else 0.0
    fwd = plan_pass(w.pass_cost(perf, False), r_max=r_max, evaluator=evaluator, sim_kw=kw)
    bwd = plan_pass(
        w.pass_cost(perf, True),
        r_max=r_max,
        gar_ms=gar_ms,
        backward=True,
        evaluator=evaluator,
        sim_kw=kw,
    )
    return LayerDecision(fwd=fwd, bwd=bwd, solve_ms=(time.perf_counter() - t0) * 1e3)


# ---- gradient partitioning ------------------------------------------------------------------
@dataclass(frozen=True)
class GradPartition:
    gar_bytes: tuple[float, ...]  # per layer index: bytes all-reduced in its backward window
    tail_bytes: float
    objective_ms: float
    greedy_objective_ms: float


def _feasible(n: Sequence[float], grad: Sequence[float]) -> bool:
    """Cumulative bounds: windows j..L-1 can hold at most the gradients of layers > j."""
    L = len(n)
    used = 0.0
    avail = 0.0
    for j in range(L - 1, -1, -1):
        used += n[j]
        if used > avail + 1e-6:
            return False
        avail += grad[j]
    return True


def partition_gradients(
    grad_bytes: Sequence[float],
    window_cost: Callable[[int, float], float],
    idle_ms: Sequence[float],
    ar,
    *,
    refine: bool = True,
) -> GradPartition:
    """Greedy placement, then pattern-search refinement (module docstring, part 2).

    ``window_cost(j, n)`` is layer ``j``'s backward time with ``n`` gradient bytes placed in it;
    ``idle_ms[j]`` its idle inter-node time without any; ``ar`` the all-reduce LinearCost.
    """
    L = len(grad_bytes)
    total = float(sum(grad_bytes))

    def objective(n: Sequence[float]) -> float:
        tail = total - sum(n)
        return sum(window_cost(j, n[j]) for j in range(L)) + (ar(tail) if tail > 1e-9 else 0.0)

    n = [0.0] * L
    carry = 0.0
    for j in range(L - 1, -1, -1):
        fit = ar.inverse(idle_ms[j]) if idle_ms[j] > ar.alpha else 0.0
        n[j] = min(carry, fit)
        carry -= n[j]
        carry += grad_bytes[j]
    greedy = objective(n)
    best = greedy
    if refine and total > 0:
        step = max(max(grad_bytes), 1.0) / 2
        min_step = step / 256
        while step >= min_step:
            improved = True
            while improved:
                improved = False
                for j in range(L):
                    for delta in (step, -step):
                        trial = list(n)
                        trial[j] = max(0.0, trial[j] + delta)
                        if trial[j] == n[j] or not _feasible(trial, grad_bytes):
                            continue
                        val = objective(trial)
                        if val < best - 1e-9:
                            n, best, improved = trial, val, True
                            break
            step /= 2
    return GradPartition(
        gar_bytes=tuple(n),
        tail_bytes=max(0.0, total - sum(n)),
        objective_ms=best,
        greedy_objective_ms=greedy,
    )


# ---- whole plans ----------------------------------------------------------------------------
def plan(
    workloads: LayerWorkload | Sequence[LayerWorkload],
    perf: PerfModel,
    cluster=None,
    *,
    num_layers: int | None = None,
    r_max: int = R_MAX,
    include_attention: bool = True,
    overlap_grad: bool = True,
    evaluator: str = "sim",
    model: str = "",
) -> Plan:
    """FSMoE plan for a stack of MoE layers (one workload, repeated ``num_layers`` times, or one
    workload per layer). Returns a :class:`Plan` whose predicted step time is simulated."""
    from moeflow.sim.builders import simulate_plan

    t0 = time.perf_counter()
    if isinstance(workloads, LayerWorkload):
        workloads = [workloads] * (num_layers or 1)
    workloads = list(workloads)
    if not workloads:
        raise PlanError("plan needs at least one layer workload")
    table, widx = build_workload_table(workloads)
    ar = perf.cost("ar")
    kw = shared_resources(perf)
    fwd_dec: dict[int, PassDecision] = {}
    for wi, d in enumerate(table):
        w = LayerWorkload.from_dict(d)
        fwd_dec[wi] = plan_pass(
            w.pass_cost(perf, False), r_max=r_max, evaluator=evaluator, sim_kw=kw
        )
    bwd_cache: dict[tuple[int, float], PassDecision] = {}

    def bwd_decision(wi: int, n: float) -> PassDecision:
        key = (wi, round(n, 3))
        if key not in bwd_cache:
            w = LayerWorkload.from_dict(table[wi])
            bwd_cache[key] = plan_pass(
                w.pass_cost(perf, True),
                r_max=r_max,
                gar_ms=ar(n) if n > 0 else 0.0,
                backward=True,
                evaluator=evaluator,
                sim_kw=kw,
            )
        return bwd_cache[key]

    grads = [w.grad_bytes if w.n_dp * w.n_ep * w.n_esp > 1 else 0.0 for w in workloads]
    if overlap_grad and sum(grads) > 0:
        idle = []
        for wi in widx:
            w = LayerWorkload.from_dict(table[wi])
            idle.append(pass_idle_inter(w.pass_cost(perf, True), bwd_decision(wi, 0.0).r))
        part = partition_gradients(grads, lambda j, n: bwd_decision(widx[j], n).t_ms, idle, ar)
        gar, tail = list(part.gar_bytes), part.tail_bytes
        meta = {
            "grad_objective_ms": part.objective_ms,
            "grad_greedy_objective_ms": part.greedy_objective_ms,
        }
    else:
        gar, tail, meta = [0.0] * len(workloads), float(sum(grads)), {}
    layers = []
    for j, wi in enumerate(widx):
        b = bwd_decision(wi, gar[j])
        layers.append(
            LayerPlan(
                index=j,
                r_fwd=fwd_dec[wi].r,
                r_bwd=b.r,
                gar_bytes=gar[j],
                workload=wi,
                t_fwd_ms=fwd_dec[wi].t_ms,
                t_bwd_ms=b.t_ms,
            )
        )
    p = Plan(
        method="fsmoe",
        perf=perf.to_dict(),
        workload_table=table,
        layers=layers,
        tail_ar_bytes=tail,
        include_attention=include_attention,
        model=model,
        cluster=getattr(cluster, "name", cluster or ""),
        meta=meta,
    )
    p.solve_ms = (time.perf_counter() - t0) * 1e3
    p.predicted_step_ms = simulate_plan(p).makespan
    return p
