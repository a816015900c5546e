"""Geo-distributed training steps as task graphs: a GeoPlan's GPipe step and the data-parallel
baseline, event by event, to check the closed forms of :mod:`moeflow.plan.geo`.

GPipe (Huang et al., NeurIPS'19) with ``M`` micro-batches over ``S`` stages. Resources: one
compute stream per device (``dev:<name>``) and one per direction of each link
(``link:<a>-><b>``). Durations are in ms. Every device first runs the forward of micro-batches
``0..M-1``, then their backward (in the same order, as ``torch.distributed.pipelining``'s
``ScheduleGPipe`` does)::

    F(s,m) on dev s        deps: X(s-1,m)             (the activations arrived)
    X(s,m) on link s->s+1  deps: F(s,m)               (send the cut tensors)
    Y(s,m) on link s+1->s  deps: B(s+1,m)             (the gradients of the cut)
    B(s,m) on dev s        deps: Y(s,m) or F(S-1,m)   (backward = 2 x forward)

With ``blocking`` (the default) stage ``s``'s device is busy during both transfers of its
outgoing link: it sends the activations (the next forward waits for the send) and receives the
gradients (the transfer starts once the device is free); its neighbour's ends of those
transfers do not block. That is the planner's cost model, where stage ``s`` pays
``c_s + l_s``. Without ``blocking`` every transfer overlaps compute (a lower bound). With
``blocking`` and identical micro-batches the forward and the backward are each a flow line, so
the step takes ``sum_s t_s + (M-1) (max_s (f_s + x_s) + max_s (2 f_s + y_s))`` where the closed
form charges ``(M-1) max_s (3 f_s + x_s + y_s)`` (``f`` forward compute, ``x``/``y`` forward and
backward transfer, :func:`moeflow.plan.geo.stage_costs`): the two are equal when one stage is
the slowest in both directions, and otherwise the simulated step is longer by at most one sixth
of ``(M-1)`` bottlenecks on symmetric exact links (``x = y``; a compute-bound stage next to a
link-bound one). A link that AdaTopK sparsifies (FusionLLM, arXiv 2410.12707) sends values and
positions forward but only values backward, so ``y <= x <= 2 y`` on a symmetric link and the
bound is one third.

Data parallelism: each device computes its share, then a ring all-reduce runs ``2 (N - 1)``
steps; device ``ring[k]`` sends step ``t`` to ``ring[k+1]`` once it received step ``t-1`` from
``ring[k-1]`` (reduce-scatter then all-gather).

Pure Python.
"""

from __future__ import annotations

from moeflow.plan.geo import (
    DeviceGraph,
    GeoPlan,
    OpGraph,
    data_parallel_costs,
    stage_costs,
)
from moeflow.sim.engine import TaskGraph, Timeline, simulate


def gpipe_graph(
    ops: OpGraph, graph: DeviceGraph, plan: GeoPlan, *, blocking: bool = True
) -> TaskGraph:
    """The task graph of one GPipe step of ``plan`` (module docstring)."""
    costs = stage_costs(ops, graph, plan)
    S, M = plan.num_stages, plan.microbatches
    name = [graph.devices[d].name for d in plan.devices]
    dev = [f"dev:{x}" for x in name]
    g = TaskGraph()
    busy: list[int | None] = [None] * S  # with ``blocking``: the last task holding device s

    def on_device(s: int, deps: list[int]) -> list[int]:
        return deps + [busy[s]] if blocking and busy[s] is not None else deps

    fwd_f: dict[tuple[int, int], int] = {}
    fwd_x: dict[tuple[int, int], int] = {}
    for m in range(M):
        for s in range(S):
            f_ms, x_ms, _ = (1e3 * c for c in costs[s])
            deps = [fwd_x[(s - 1, m)]] if s > 0 else []
            busy[s] = fwd_f[(s, m)] = g.add(
                f"F{s}.m{m}", dev[s], f_ms, on_device(s, deps), kind="forward"
            )
            if s + 1 < S:  # stage s sends its activations
                busy[s] = fwd_x[(s, m)] = g.add(
                    f"X{s}.m{m}",
                    f"link:{name[s]}->{name[s + 1]}",
                    x_ms,
                    [fwd_f[(s, m)]],
                    kind="activations",
                )
    bwd_b: dict[tuple[int, int], int] = {}
    for m in range(M):
        for s in range(S - 1, -1, -1):
            f_ms, _, y_ms = (1e3 * c for c in costs[s])
            if s + 1 < S:  # stage s receives the gradients of its cut
                y = g.add(
                    f"Y{s}.m{m}",
                    f"link:{name[s + 1]}->{name[s]}",
                    y_ms,
                    on_device(s, [bwd_b[(s + 1, m)]]),
                    kind="gradients",
                )
                deps = [y]
            else:
                deps = [fwd_f[(s, m)]]
            busy[s] = bwd_b[(s, m)] = g.add(
                f"B{s}.m{m}", dev[s], 2.0 * f_ms, on_device(s, deps), kind="backward"
            )
    return g


def simulate_gpipe(
    ops: OpGraph, graph: DeviceGraph, plan: GeoPlan, *, blocking: bool = True
) -> Timeline:
    return simulate(gpipe_graph(ops, graph, plan, blocking=blocking))


def gpipe_step_s(
    ops: OpGraph, graph: DeviceGraph, plan: GeoPlan, *, blocking: bool = True
) -> float:
    """Simulated seconds of one GPipe step of ``plan``."""
    return simulate_gpipe(ops, graph, plan, blocking=blocking).makespan / 1e3


def data_parallel_graph(
    ops: OpGraph, graph: DeviceGraph, *, microbatches: int, devices=None
) -> TaskGraph:
    """The task graph of one data-parallel step (compute, then the ring all-reduce) over
    ``devices`` (default all)."""
    dp = data_parallel_costs(ops, graph, microbatches=microbatches, devices=devices)
    g = TaskGraph()
    comp = {}
    for i, c in zip(dp.devices, dp.compute_s):
        name = graph.devices[i].name
        comp[i] = g.add(f"compute.{name}", f"dev:{name}", 1e3 * c, kind="compute")
    n = len(dp.ring)
    prev: list[int] = []
    for t in range(dp.steps):
        cur = []
        for k in range(n):
            a, b = dp.ring[k], dp.ring[(k + 1) % n]
            deps = [comp[a]] if t == 0 else [prev[(k - 1) % n]]
            cur.append(
                g.add(
                    f"ar{t}.{graph.devices[a].name}",
                    f"link:{graph.devices[a].name}->{graph.devices[b].name}",
                    1e3 * dp.hop_s[k],
                    deps,
                    kind="allreduce",
                )
            )
        prev = cur
    return g


def data_parallel_sim_s(
    ops: OpGraph, graph: DeviceGraph, *, microbatches: int, devices=None
) -> float:
    """Simulated seconds of one step of the data-parallel baseline."""
    g = data_parallel_graph(ops, graph, microbatches=microbatches, devices=devices)
    return simulate(g).makespan / 1e3
