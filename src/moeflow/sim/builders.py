"""Builders: MoE passes, whole plans -> :class:`TaskGraph`.

Resources: ``inter`` (the EP a2a link between nodes), ``intra`` (the ESP ag/rs link inside a
node) and ``gpu`` (GEMMs). Chunk ``i`` of a forward pass is the chain (FSMoE, ASPLOS'25:
chunks overlap across the inter-node link, the intra-node link and the GPU)::

    dispatch a2a_i (inter) -> ag_i (intra) -> experts_i (gpu) -> rs_i (intra)
        -> combine a2a_i (inter)

Backward is the mirror image (grad of combine a2a, ag of grads = bwd of rs, expert GEMMs x2,
rs = bwd of ag, grad of dispatch a2a). Plan order per resource, chosen so that every one of
FSMoE's four bounding cases is reachable:
  * inter: all dispatches, then the gradient all-reduce piece (if any, in the idle window
    while experts run), then all combines;
  * intra: all ag, then all rs;
  * gpu:   experts in chunk order.

Pure Python; :func:`plan_graph` imports :mod:`moeflow.plan.workload` lazily.
"""

from __future__ import annotations

from collections.abc import Sequence

from moeflow.perf.layer import PassCost
from moeflow.sim.engine import TaskGraph, Timeline, simulate

INTER, INTRA, GPU = "inter", "intra", "gpu"


def add_moe_pass(
    g: TaskGraph,
    prefix: str,
    pc: PassCost,
    r: int,
    entry: Sequence[int] = (),
    gar_ms: float = 0.0,
    gar_deps: Sequence[int] = (),
    backward: bool = False,
    order: str = "fsmoe",
    link: str = INTER,
    intra: str = INTRA,
    compute: str = GPU,
) -> list[int]:
    """Append one chunked MoE pass; return the ids of its last tasks (the r final a2a).

    ``order="fsmoe"``: the per-resource order of the module docstring. ``order="wavefront"``:
    the order in which :func:`moeflow.parallel.run_wavefront` issues work - at step ``t`` chunk
    ``c`` (newest first) runs stage ``t - c``, a stage being local work followed by the
    collective it issues - so the link carries d0, d1, c0, d2, c1, ...
    ``link`` / ``intra`` / ``compute`` name the resources; give them the same name to model a
    host where communication and computation share the same cores (no overlap).
    """
    c = pc.chunk(r)
    esp = pc.has_esp
    first_a2a, last_a2a = ("gcomb", "gdisp") if backward else ("disp", "comb")
    # one chunk's chain of stages: (name, resource, duration, kind)
    stages = [(first_a2a, link, c.a2a, "a2a")]
    if esp:
        stages.append(("ag", intra, c.ag, "ag"))
    stages.append(("exp", compute, c.exp, "gemm"))
    if esp:
        stages.append(("rs", intra, c.rs, "rs"))
    stages.append((last_a2a, link, c.a2a, "a2a"))
    ids: list[list[int]] = [[-1] * len(stages) for _ in range(r)]

    def add(i: int, k: int) -> None:
        name, res, dur, kind = stages[k]
        deps = list(entry) if k == 0 else [ids[i][k - 1]]
        ids[i][k] = g.add(f"{prefix}.{name}{i}", res, dur, deps, kind=kind)

    def add_gar() -> None:
        if gar_ms > 0:
            g.add(f"{prefix}.gar", link, gar_ms, list(gar_deps) + list(entry), kind="ar")

    if order == "fsmoe":
        # by resource: every first-a2a, the gradient piece, then the rest stage by stage
        for i in range(r):
            add(i, 0)
        add_gar()
        for k in range(1, len(stages)):
            for i in range(r):
                add(i, k)
    elif order == "wavefront":
        # a runtime stage does its local work and then issues the next collective, so the
        # expert GEMMs and the collective after them belong to one stage
        groups = [[0], [1], [2, 3], [4]] if esp else [[0], [1, 2]]
        n = len(groups)
        for t in range(r + n - 1):
            for i in range(min(t, r - 1), max(-1, t - n), -1):
                for k in groups[t - i]:
                    add(i, k)
            if t == 0:
                add_gar()
    else:
        from moeflow.errors import ConfigError

        raise ConfigError("order", order, "'fsmoe' or 'wavefront'")
    return [ids[i][-1] for i in range(r)]


def moe_pass_graph(
    pc: PassCost, r: int, gar_ms: float = 0.0, backward: bool = False, **kw
) -> TaskGraph:
    g = TaskGraph()
    add_moe_pass(g, "bwd" if backward else "fwd", pc, r, gar_ms=gar_ms, backward=backward, **kw)
    return g


def pass_time(pc: PassCost, r: int, gar_ms: float = 0.0, backward: bool = False, **kw) -> float:
    """Simulated makespan of one chunked pass (ms); ``kw`` as :func:`add_moe_pass`."""
    return simulate(moe_pass_graph(pc, r, gar_ms, backward, **kw)).makespan


def pass_idle_inter(pc: PassCost, r: int, backward: bool = True) -> float:
    """Idle time on the inter-node link during a pass: FSMoE's ``t_olp``."""
    tl = simulate(moe_pass_graph(pc, r, 0.0, backward))
    return tl.makespan - tl.busy.get(INTER, 0.0)


def plan_graph(plan) -> TaskGraph:
    """A whole training step of ``plan`` (a :class:`moeflow.plan.Plan`) as one task graph.

    Forward: per layer, attention GEMMs (gpu) then the chunked MoE forward. Backward, in
    reverse layer order: chunked MoE backward (with the layer's gradient all-reduce piece on
    the inter link), then attention backward (2x FLOPs). The gradient bytes left over after the
    last backward layer are all-reduced at the end (``tail``). Layers with
    ``include_attention=False`` in the plan skip the attention tasks (layer sweeps).
    """
    perf = plan.perf_model()
    gemm, ar = perf.cost("gemm"), perf.cost("ar")
    g = TaskGraph()
    prev: list[int] = []
    for lp, w in zip(plan.layers, plan.workloads()):
        if plan.include_attention:
            prev = [g.add(f"L{lp.index}.attn_f", GPU, gemm(w.attention_flops), prev, kind="attn")]
        prev = add_moe_pass(g, f"L{lp.index}.f", w.pass_cost(perf, False), lp.r_fwd, prev)
    for lp, w in reversed(list(zip(plan.layers, plan.workloads()))):
        gar = ar(lp.gar_bytes) if lp.gar_bytes > 0 else 0.0
        prev = add_moe_pass(
            g, f"L{lp.index}.b", w.pass_cost(perf, True), lp.r_bwd, prev, gar_ms=gar, backward=True
        )
        if plan.include_attention:
            prev = [
                g.add(f"L{lp.index}.attn_b", GPU, gemm(2 * w.attention_flops), prev, kind="attn")
            ]
    if plan.tail_ar_bytes > 0:
        g.add("tail.ar", INTER, ar(plan.tail_ar_bytes), prev, kind="ar")
    return g


def simulate_plan(plan) -> Timeline:
    return simulate(plan_graph(plan))
