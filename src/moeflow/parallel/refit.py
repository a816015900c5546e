"""Online refinement of an expert-parallel layer's ``auto`` choices.

An :class:`~moeflow.parallel.ExpertParallel` built with ``perf`` and ``refit_after=N``
records the durations its pipeline already measures (:mod:`moeflow.perf.record`: each
chunk's local work as the expert task, the all-to-alls nothing overlaps) over a warm-up
window of N calls (after one unrecorded first call), then, at its next call, refits its
:class:`~moeflow.perf.PerfModel` from them and decides its ``auto`` choices again on the
refitted model:

* FSMoE's pipeline degrees (``plan="auto"``; :func:`moeflow.plan.fsmoe.plan_layer`);
* ZipCCL's ``compress="auto"`` (the switch's link and codec costs);
* HierMoE's dedup ``level="auto"`` (``link_costs`` of the model);
* Parm's ``schedule="auto"`` (``cluster_from_perf`` of the model).

The window runs its calls at 1, 2 and 4 chunks in turn (:data:`PROBE_DEGREES`), so its
samples hold three chunk sizes per pass: a line fitted to them alone separates the
per-chunk alpha (host work, collective start-up) from the per-byte / per-FLOP beta. Keys
whose samples span sizes that way replace the profiled line (the running job's machine:
its shared cores, its routing, its host overhead); the others are merged into the
profiled points (:meth:`PerfModel.update`). Every rank refits from the samples of all
ranks, merged in rank order (one ``all_gather_object``), so the model, and every choice
made from it, is the same on every rank. The window's outputs are the layer's outputs at
those degrees (the chunking changes the order of floating-point sums, not the function).
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from moeflow.errors import ConfigError
from moeflow.perf.record import DurationRecorder, bucket_medians, merge_samples, spans_sizes

#: the degrees (r_fwd = r_bwd) the warm-up window cycles through
PROBE_DEGREES = (1, 2, 4)
#: the largest degree ``plan="auto"`` picks: the refitted model is trusted over the chunk
#: sizes the window measured
R_MAX_AUTO = max(PROBE_DEGREES)


def gather_samples(recorder: DurationRecorder, group=None) -> dict:
    """Every rank's samples, merged in rank order (collective over ``group``)."""
    mine = recorder.samples()
    if not dist.is_initialized() or dist.get_world_size(group) == 1:
        return merge_samples([mine])
    parts: list = [None] * dist.get_world_size(group)
    dist.all_gather_object(parts, mine, group=group)
    return merge_samples(parts)


def refit_model(perf, samples: dict, probed: bool):
    """``perf`` refitted from ``samples``, each key's samples reduced to one median point
    per size bucket (:func:`moeflow.perf.record.bucket_medians`): keys whose buckets span
    sizes (:func:`spans_sizes`) after a probing window are fitted afresh, the others merged
    into the stored points."""
    if not samples:
        return perf
    points = {k: bucket_medians(v) for k, v in samples.items()}
    fresh = [k for k, v in points.items() if probed and len(v) >= 2 and spans_sizes(v)]
    return perf.update(points, fresh=fresh)


def plan_degrees(ep, perf, tokens: int, bytes_per_element: int) -> tuple[int, int]:
    """FSMoE's ``(r_fwd, r_bwd)`` of ``ep``'s layer for ``tokens`` per rank under ``perf``."""
    from moeflow.plan.fsmoe import plan_layer
    from moeflow.plan.workload import LayerWorkload

    cfg = ep.cfg
    w = LayerWorkload(
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
    d = plan_layer(w, perf, r_max=R_MAX_AUTO)
    return d.r_fwd, d.r_bwd


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
    samples = gather_samples(ep.recorder, ep.group)
    new = refit_model(ep.perf, samples, ep.probed)
    redecide(ep, new)
    return new


def before_call(ep, x: torch.Tensor) -> None:
    """What :meth:`ExpertParallel.forward` does before each call: the first ``auto`` plan of
    the degrees (with the tokens every rank agrees on), the warm-up window's probing
    degrees, and the refit once the window has passed."""
    if ep.plan_dtype is None:
        ep.plan_dtype = str(x.dtype).removeprefix("torch.")
        ep.plan_bytes = x.element_size()
        if ep.auto_degrees:
            ep.plan_tokens = agreed_tokens(ep, x.reshape(-1, x.shape[-1]).shape[0])
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
