"""Online refinement of an expert-parallel layer's ``auto`` choices.

An :class:`~moeflow.parallel.ExpertParallel` built with ``perf`` and ``refit_after=N``
records the durations its pipeline already measures (:mod:`moeflow.perf.record`: each
chunk's local work as the expert task, the all-to-alls nothing overlaps) over a warm-up
window of N calls (after one unrecorded first call), then, at its next call, refits its
:class:`~moeflow.perf.PerfModel` from them and decides its ``auto`` choices again on the
refitted model:

* FSMoE's pipeline degrees (``plan="auto"``: FSMoE's simulated pass at each probed degree,
  :func:`plan_degrees`);
* ZipCCL's ``compress="auto"`` (the switch's link and codec costs);
* HierMoE's dedup ``level="auto"`` (``link_costs`` of the model);
* Parm's ``schedule="auto"`` (``cluster_from_perf`` of the model).

The window runs its calls at 1, 2 and 4 chunks in turn (:data:`PROBE_DEGREES`). The refit
merges each compute key's samples, as one median point per size bucket, into the profiled
points (:meth:`PerfModel.update`). The collectives keep their profiled, barrier-
synchronised costs: a recorded all-to-all ends when the last rank arrives, so it also holds
the ranks' skew, which no link choice removes (refitted from it, ZipCCL's switch paid the
codec to shrink a wait it cannot shrink). Then the refit calibrates the expert task of each
pass on the whole pass: the per-chunk alpha and the work under which FSMoE's simulated pass
matches the pass times measured at the three degrees (:func:`calibrate_expert`). That is
where the profile misses this job's machine: the host work each chunk adds (gathers,
issuing, placing), and compute slowed by ranks that share the cores. Every rank refits from
the samples of all ranks, merged in rank order (one ``all_gather_object``), so the model,
and every choice made from it, is the same on every rank. The window's outputs are the
layer's outputs at those degrees (the chunking changes the order of floating-point sums,
not the function).
"""

from __future__ import annotations

import math
from dataclasses import replace

import torch
import torch.distributed as dist

from moeflow.errors import ConfigError
from moeflow.perf.record import DurationRecorder, bucket_medians, merge_samples

#: cost keys the refit leaves as profiled: a recorded collective also holds the ranks'
#: skew (it ends when the last rank arrives), which no link choice removes
COLLECTIVES = ("a2a", "ag", "rs", "ar", "send")
#: the degrees (r_fwd = r_bwd) the warm-up window cycles through
PROBE_DEGREES = (1, 2, 4)


def gather_samples(recorder: DurationRecorder, group=None) -> tuple[dict, dict]:
    """Every rank's samples and passes, merged in rank order (collective over ``group``)."""
    mine = (recorder.samples(), recorder.passes())
    if not dist.is_initialized() or dist.get_world_size(group) == 1:
        parts = [mine]
    else:
        parts = [None] * dist.get_world_size(group)
        dist.all_gather_object(parts, mine, group=group)
    return merge_samples(p[0] for p in parts), merge_samples(p[1] for p in parts)


def refit_model(perf, samples: dict, passes: dict | None = None, workload=None):
    """``perf`` refitted from ``samples``, each compute key's samples reduced to one median
    point per size bucket (:func:`moeflow.perf.record.bucket_medians`) and merged into the
    stored points (:meth:`PerfModel.update`); collectives keep their profiled cost. Then
    each expert key with ``passes`` at two degrees or more (a probing window) and a
    ``workload`` is calibrated on the whole pass (:func:`calibrate_expert`), which
    replaces its per-chunk line."""
    compute = {k: v for k, v in (samples or {}).items() if k.split("@")[0] not in COLLECTIVES}
    if compute:
        perf = perf.update({k: bucket_medians(v) for k, v in compute.items()})
    if passes and workload is not None:
        costs = dict(perf.costs)
        for key, runs in sorted(passes.items()):
            if len({r for r, _ in runs}) >= 2:
                costs[key] = calibrate_expert(perf, key, runs, workload)
        perf = replace(perf, costs=costs)
    return perf


def _log_err(sim: dict[int, float], meas: dict[int, float]) -> float:
    return sum(math.log(max(sim[r], 1e-9) / meas[r]) ** 2 for r in meas)


def calibrate_expert(perf, key: str, runs, workload):
    """The expert task (``alpha`` ms per chunk, ``beta`` ms per forward FLOP) under which the
    planner's simulated pass (:func:`moeflow.sim.builders.pass_time` of
    ``workload.pass_cost`` in the runtime's wavefront order, on ``perf``'s link costs
    and its measured link / compute sharing) matches the pass times measured at each
    degree: the median over every rank's passes of a degree, matched in least squares of
    ``log(simulated / measured)`` by a zooming grid over ``(alpha, work)``. The per-
    chunk alpha so found is the host work and start-up each chunk adds in this job; the
    work, its size-proportional rest (compute under the job's contention, rank skew).
    The line's note lists the pass medians it matched."""
    from moeflow.perf.cost import LinearCost
    from moeflow.plan.fsmoe import shared_resources
    from moeflow.sim.builders import pass_time

    backward = key.startswith("expert_bwd")
    by_r: dict[int, list[float]] = {}
    for r, t in runs:
        by_r.setdefault(int(r), []).append(float(t))
    meas = {r: _median(ts) for r, ts in sorted(by_r.items()) if _median(ts) > 0}
    base = workload.pass_cost(perf, backward)
    kw = {**dict(shared_resources(perf)), "order": "wavefront"}  # the runtime's order
    flops = workload.expert_flops

    def sim(a: float, w: float) -> dict[int, float]:
        pc = replace(base, alpha_exp=a, work_exp=w)
        return {r: pass_time(pc, r, 0.0, backward, **kw) for r in meas}

    top = max(meas.values())
    a_lo, a_hi, w_lo, w_hi = 0.0, top, 0.0, top
    best = (math.inf, 0.0, 0.0)
    for _ in range(4):
        n = 12
        for i in range(n + 1):
            a = a_lo + (a_hi - a_lo) * i / n
            for j in range(n + 1):
                w = w_lo + (w_hi - w_lo) * j / n
                e = _log_err(sim(a, w), meas)
                if e < best[0]:
                    best = (e, a, w)
        _, a, w = best
        da, dw = 2 * (a_hi - a_lo) / n, 2 * (w_hi - w_lo) / n
        a_lo, a_hi, w_lo, w_hi = max(a - da, 0.0), a + da, max(w - dw, 0.0), w + dw
    _, a, w = best
    return LinearCost(
        a,
        w / flops if flops > 0 else 0.0,
        source="fitted",
        note="calibrated on whole passes at degrees "
        + ", ".join(f"r={r}: {t:.3f} ms" for r, t in meas.items()),
    )


def _median(xs: list[float]) -> float:
    xs = sorted(xs)
    k = len(xs)
    return xs[k // 2] if k % 2 else 0.5 * (xs[k // 2 - 1] + xs[k // 2])


def layer_workload(ep, tokens: int, bytes_per_element: int):
    """The :class:`moeflow.plan.workload.LayerWorkload` of ``ep``'s layer for ``tokens``
    per rank."""
    from moeflow.plan.workload import LayerWorkload

    cfg = ep.cfg
    return LayerWorkload(
        B=1,
        L=max(int(tokens), 1),
        M=cfg.hidden_size,
        H=cfg.ffn_hidden_size,
        E=cfg.num_experts,
        k=cfg.top_k,
        f=cfg.capacity_factor,
        ffn="mixtral" if ep.gated else "simple",
        n_ep=ep.ep_size,
        n_esp=ep.esp_size,
        bytes_per_element=bytes_per_element,
    )


def degree_times(perf, workload) -> dict[int, float]:
    """Predicted forward + backward pipeline time (ms) of ``workload`` at each degree of
    :data:`PROBE_DEGREES` (``r_fwd = r_bwd = r``): FSMoE's simulated pass
    (:func:`moeflow.sim.builders.pass_time`) in the runtime's wavefront order, link and
    compute shared where ``perf``'s profile measured that they barely overlap."""
    from moeflow.plan.fsmoe import shared_resources
    from moeflow.sim.builders import pass_time

    kw = {**dict(shared_resources(perf)), "order": "wavefront"}
    fwd, bwd = workload.pass_cost(perf, False), workload.pass_cost(perf, True)
    return {
        r: pass_time(fwd, r, 0.0, False, **kw) + pass_time(bwd, r, 0.0, True, **kw)
        for r in PROBE_DEGREES
    }


def plan_degrees(ep, perf, tokens: int, bytes_per_element: int) -> tuple[int, int]:
    """``plan="auto"``: the degree of :data:`PROBE_DEGREES` with the smallest predicted
    forward + backward (:func:`degree_times`), for both passes. The choice stays among the
    configurations the window measures: with ``r_fwd != r_bwd`` the runtime saves each
    chunk's expert residuals in canonical order for the backward's other chunking, a cost
    no probe calibrates (in the regret benchmark such picks of FSMoE's separate planning
    lost more than 5% in 8 of 10 cells; notes/REJECTED.md)."""
    times = degree_times(perf, layer_workload(ep, tokens, bytes_per_element))
    r = min(times, key=lambda k: (times[k], k))
    return r, r


def agreed_tokens(ep, T: int) -> int:
    """The largest token count of any rank (collective): the plan's workload, the same on
    every rank."""
    buf = torch.tensor([T], dtype=torch.long)
    if dist.is_initialized() and dist.get_world_size(ep.group) > 1:
        dist.all_reduce(buf, op=dist.ReduceOp.MAX, group=ep.group)
    return int(buf.item())


def redecide(ep, perf) -> None:
    """Set ``ep``'s model to ``perf`` and decide its ``auto`` choices again from it."""
    ep.perf = perf
    if ep.auto_degrees and ep.plan_tokens is not None:
        ep.r_fwd, ep.r_bwd = plan_degrees(ep, perf, ep.plan_tokens, ep.plan_bytes)
    cz = ep.dispatcher.compression
    if cz is not None and cz.mode == "auto":
        from moeflow.comm.compressed import codec_costs

        cz.perf, cz.costs = perf, codec_costs(perf)
    disp = ep.dispatcher
    if getattr(disp, "level", None) == "auto" and hasattr(disp, "links"):
        disp.links = perf.link_costs()
    if ep.parm_schedule == "auto" and ep.plan_dtype is not None:
        from moeflow.plan.parm import cluster_from_perf

        cfg = ep.cfg
        ep.parm_cluster = cluster_from_perf(
            perf,
            hidden=cfg.hidden_size,
            ffn=cfg.ffn_hidden_size,
            num_experts=cfg.num_experts,
            dtype=ep.plan_dtype,
        )


def refit(ep):
    """Refit ``ep.perf`` from ``ep.recorder``'s samples of every rank and re-decide ``ep``'s
    ``auto`` choices (collective over ``ep.group``); returns the refitted model."""
    if ep.perf is None:
        raise ConfigError("perf", None, "a PerfModel to refit (ExpertParallel(perf=...))")
    if ep.recorder is None:
        raise ConfigError("recorder", None, "a DurationRecorder that recorded the calls")
    samples, passes = gather_samples(ep.recorder, ep.group)
    w = None
    if ep.plan_tokens is not None and ep.mp_group is None:
        # Parm's passes run on an MP share of the tokens or rows, not on this workload:
        # there the per-chunk samples alone refit the expert task
        w = layer_workload(ep, ep.plan_tokens, ep.plan_bytes)
    new = refit_model(ep.perf, samples, passes if ep.probed else None, w)
    redecide(ep, new)
    return new


def before_call(ep, x: torch.Tensor) -> None:
    """What :meth:`ExpertParallel.forward` does before each call: the first ``auto`` plan of
    the degrees (with the tokens every rank agrees on), the warm-up window's probing
    degrees, and the refit once the window has passed."""
    if ep.plan_dtype is None:
        ep.plan_dtype = str(x.dtype).removeprefix("torch.")
        ep.plan_bytes = x.element_size()
        if ep.auto_degrees or ep.refit_after is not None:
            ep.plan_tokens = agreed_tokens(ep, x.reshape(-1, x.shape[-1]).shape[0])
        if ep.auto_degrees:
            ep.r_fwd, ep.r_bwd = plan_degrees(ep, ep.perf, ep.plan_tokens, ep.plan_bytes)
            ep.fixed_degrees = (ep.r_fwd, ep.r_bwd)
    n, c = ep.refit_after, ep.calls
    ep.calls += 1
    if n is None or c > n + 1:
        return
    ep.recording = 1 <= c <= n
    if c == 0:  # warms up the probes' path (first-use stalls of seconds), unrecorded
        ep.r_fwd = ep.r_bwd = PROBE_DEGREES[0]
    elif c <= n:
        ep.r_fwd = ep.r_bwd = PROBE_DEGREES[(c - 1) % len(PROBE_DEGREES)]
        ep.probed = n >= 2  # two chunk sizes or more per pass
    else:  # the window is over: refit, re-decide, stop recording
        ep.r_fwd, ep.r_bwd = ep.fixed_degrees
        refit(ep)
        ep.recorder = None
