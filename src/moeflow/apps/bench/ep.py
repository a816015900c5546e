"""Expert-parallel dissection: dispatch, experts and combine on forked gloo ranks.

Each rank builds the same workload, wraps every MoE layer in
:class:`moeflow.parallel.ExpertParallel` (experts sharded over the ranks, FSMoE's chunked
pipeline with degree ``r`` forward and backward, ASPLOS'25 §4) and is dissected like a single
process. On top of the module rows each rank reports, per phase:

* ``dispatch_wait_ms`` / ``combine_wait_ms``: time the host spent blocked in the wait of a
  dispatch or combine collective - the *exposed* communication (each wait runs in a profiler
  scope named after the collective);
* ``experts_ms``: the expert FFN operators inside the pipeline;
* ``comm_ms``: the same all-to-alls run alone, one after another, with the step's message
  sizes (every rank's size of each call, the largest across ranks, equal splits): the
  communication the pipeline has to hide;
* ``hidden_fraction = 1 - exposed / comm_ms`` (clamped to [0, 1]).

A wait also absorbs the skew between ranks (a rank waits for a peer still computing), so on
ranks that share a few cores the exposed time is an upper bound and the hidden fraction a
lower bound; on a link that costs real wall time (an emulated or real cluster) transfer
dominates the waits.
"""

from __future__ import annotations

import statistics
from contextlib import contextmanager
from functools import partial

import torch
from torch.profiler import record_function

from moeflow.apps.bench.dissect import dissect
from moeflow.perf.measure import time_ms

WAIT = "moeflow.bench::wait::"


@contextmanager
def scoped_waits():
    """Run every collective wait of this process inside a profiler scope named after it.

    The runtime waits through ``moeflow.comm.timeouts.wait_work(work, op, ...)``; this rebinds
    that module attribute for the duration (this process only: forked bench ranks).
    """
    import moeflow.comm.timeouts as timeouts

    orig = timeouts.wait_work

    def wait_work(work, op, *args, **kwargs):
        if work is None:
            return orig(work, op, *args, **kwargs)
        with record_function(WAIT + op):
            return orig(work, op, *args, **kwargs)

    timeouts.wait_work = wait_work
    try:
        yield
    finally:
        timeouts.wait_work = orig


def _wait_times(events) -> dict:
    """{(phase, 'dispatch' | 'combine' | 'other'): ms per step} from the wait scopes."""
    from moeflow.apps.bench.dissect import PHASE, STEP

    steps = [e for e in events if e.name == STEP]
    out: dict = {}
    for root in steps[1:]:  # the first profiled step is dropped, as in dissect()
        stack = [(root, "forward")]
        while stack:
            e, phase = stack.pop()
            if e.name.startswith(PHASE):
                phase = e.name[len(PHASE) :]
            if e.name.startswith(WAIT):
                op = e.name[len(WAIT) :]
                kind = "dispatch" if "dispatch" in op else "combine" if "combine" in op else "other"
                key = (phase, kind)
                out[key] = out.get(key, 0.0) + e.cpu_time_total / 1e3
                continue
            stack.extend((c, phase) for c in e.cpu_children)
    n = max(1, len(steps) - 1)
    return {k: v / n for k, v in out.items()}


def a2a_bytes(inventory) -> list[tuple[str, int]]:
    """(phase, bytes sent) of each all-to-all of the inventory step, in issue order."""
    out = []
    for rec in inventory:
        if "alltoall" in rec.name or "all_to_all" in rec.name:
            shapes = [s for s in rec.shapes if isinstance(s, (list, tuple)) and s]
            if len(shapes) >= 2:
                n = 1
                for s in shapes[1]:
                    n *= int(s)
                out.append((rec.phase, n))
    return out


def replay_comm(sizes: list[tuple[str, int]], esize: int, reps: int = 3) -> dict:
    """Serial time (ms, per phase) of the step's all-to-alls: call j with the largest
    element count any rank sent in its call j, equal splits, the median of ``reps`` (the slowest
    rank's, :func:`moeflow.perf.measure.time_ms`)."""
    import torch.distributed as dist

    world = dist.get_world_size()
    n_calls = torch.tensor([len(sizes)], dtype=torch.long)
    dist.all_reduce(n_calls, op=dist.ReduceOp.MIN)
    k = int(n_calls)
    counts = torch.tensor([n for _, n in sizes[:k]] or [0], dtype=torch.long)
    dist.all_reduce(counts, op=dist.ReduceOp.MAX)
    out: dict = {}
    for j in range(k):
        n = max(world, (int(counts[j]) // world) * world)
        x = torch.zeros(n, dtype=torch.float32 if esize == 4 else torch.bfloat16)
        y = torch.empty_like(x)
        t = time_ms(partial(dist.all_to_all_single, y, x), trials=reps, group=dist.group.WORLD)
        phase = sizes[j][0]
        out[phase] = out.get(phase, 0.0) + t
    return out


def ep_rank(rank: int, world: int, job: dict) -> dict:
    """One forked rank: build, shard, dissect; returns its rows and communication figures."""
    import torch.distributed as dist
    from torch.profiler import ProfilerActivity, profile

    from moeflow.apps.bench.workloads import build_workload
    from moeflow.comm import Topology
    from moeflow.parallel import ExpertParallel

    w = build_workload(
        job["kind"],
        job["mode"],
        job["setting"],
        job["shape"],
        seed=job["seed"],
        path=job.get("path"),
        dims=job.get("dims"),
    )
    topo = Topology.explicit(world, job.get("ranks_per_node") or world)
    r = job["r"]
    for parent in list(w.model.modules()):
        for name, child in list(parent.named_children()):
            if type(child).__name__ == "MoELayer":
                setattr(
                    parent,
                    name,
                    ExpertParallel(
                        child,
                        topology=topo,
                        r_fwd=r,
                        r_bwd=r,
                        dispatcher=job.get("dispatcher", "a2a"),
                    ),
                )
    # each rank trains on its own slice of the global batch (as moeflow train does)
    B = w.ids_BL.shape[0]
    b = max(1, B // world)
    w.ids_BL = w.ids_BL[rank * b : (rank + 1) * b]
    w.targets_BL = w.targets_BL[rank * b : (rank + 1) * b]
    if w.mode == "train":
        w.opt = torch.optim.AdamW(w.model.parameters(), lr=1e-4)
    with scoped_waits():
        # waits are timed in a profile of their own, so dissect() keeps its plain run
        d = dissect(
            w,
            warmup=job["warmup"],
            steps=job["steps"],
            unprofiled=job["unprofiled"],
            keep_trace=job.get("trace", False),
        )
        from moeflow.apps.bench.dissect import run_step

        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(job["steps"] + 1):
                w.before_step()
                run_step(w)
    waits = _wait_times(prof.events())
    esize = 4 if job["setting"].dtype == "float32" else 2
    comm = replay_comm(a2a_bytes(d.inventory), esize)
    experts = {}
    for (phase, row, op), (ms, _) in d.ops.items():
        if row in ("moe_experts", "moe_other") and op.startswith("aten::"):
            experts[phase] = experts.get(phase, 0.0) + ms
    dist.barrier()
    return {
        "rank": rank,
        "step_ms": d.unprofiled_ms,
        "dissection": d,
        "waits": waits,
        "comm": comm,
        "experts": experts,
    }


def summarize(results: list[dict], r: int) -> dict:
    """The EP figures of a run: rank means, per phase and in total."""
    world = len(results)
    phases = sorted(
        {p for res in results for p in res["comm"]}
        | {p for res in results for (p, _) in res["waits"]}
    )

    def mean(phase, key, kind=None):
        if kind is None:
            return statistics.fmean(res[key].get(phase, 0.0) for res in results)
        return statistics.fmean(res[key].get((phase, kind), 0.0) for res in results)

    per_phase = {}
    for p in phases:
        disp, comb = mean(p, "waits", "dispatch"), mean(p, "waits", "combine")
        comm = mean(p, "comm")
        per_phase[p] = {
            "dispatch_wait_ms": disp,
            "combine_wait_ms": comb,
            "experts_ms": mean(p, "experts"),
            "comm_ms": comm,
            "hidden_fraction": min(1.0, max(0.0, 1 - (disp + comb) / comm)) if comm > 0 else None,
        }
    disp = sum(v["dispatch_wait_ms"] for v in per_phase.values())
    comb = sum(v["combine_wait_ms"] for v in per_phase.values())
    comm = sum(v["comm_ms"] for v in per_phase.values())
    return {
        "world_size": world,
        "r": r,
        "dispatch_ms": disp,
        "combine_ms": comb,
        "experts_ms": sum(v["experts_ms"] for v in per_phase.values()),
        "comm_ms": comm,
        "hidden_fraction": min(1.0, max(0.0, 1 - (disp + comb) / comm)) if comm > 0 else 0.0,
        "step_ms_per_rank": [res["step_ms"] for res in results],
        "phases": per_phase,
        "method": "exposed = host time blocked in dispatch/combine waits; comm = the "
        "step's all-to-alls replayed alone (largest size across ranks)",
    }
