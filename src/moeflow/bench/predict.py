"""Predict a dissected step with the simulator, from a PerfModel profiled on this machine.

What is measured and what is predicted are kept apart:

* the *work* of the step comes from its operator inventory (each top-level aten operator,
  its row and phase, its input shapes, the GEMMs inside it), which the profiled run records
  along with the times, but whose times the prediction never reads;
* the *cost* of each operator comes from the :class:`moeflow.perf.PerfModel`: a GEMM costs
  ``alpha + beta * FLOPs`` (the ``gemm`` fit of ``moeflow profile``, FSMoE ASPLOS'25 §3.1,
  per dtype), any other operator ``alpha + beta * bytes`` with bytes = its inputs plus one
  output the size of its largest input, fitted per operator class (element-wise, reduction,
  indexing, copy/layout: :func:`profile_op_class`, stored in the same model's meta);
* :mod:`moeflow.sim` turns the per-(phase, row) costs into a task graph on one compute
  resource and simulates it; with expert parallelism the dispatch and combine run on the link
  resource and overlap the experts (:func:`ep_step_graph`).
"""

from __future__ import annotations

import math
import time
from functools import partial

import torch

from moeflow.bench.dissect import StepDissection
from moeflow.perf.cost import LinearCost, PerfModel
from moeflow.sim import TaskGraph, simulate

#: sizes (elements) of the element-wise sweep: 4 KiB .. 16 MiB of fp32
ELEMENTWISE_SIZES = tuple(2 ** p for p in range(10, 23, 2))
GEMM_SIZES = (32, 64, 128, 192, 256, 384, 512)
ESIZE = {"float32": 4, "bfloat16": 2}


def _best_ms(fn, reps: int, trials: int) -> float:
    fn()
    best = math.inf
    for _ in range(trials):
        t0 = time.perf_counter()
        for _ in range(reps):
            fn()
        best = min(best, (time.perf_counter() - t0) * 1e3 / reps)
    return best


#: operator classes with a cost fit of their own; anything else is ``elementwise``
OP_CLASSES = {
    "reduce": ("sum", "mean", "amax", "amin", "max", "min", "softmax", "_softmax",
               "log_softmax", "_log_softmax", "topk", "sort", "argsort", "rms_norm",
               "_fused_rms_norm", "_fused_rms_norm_backward", "norm", "layer_norm",
               "native_layer_norm", "native_layer_norm_backward", "var", "std", "cumsum",
               "nll_loss_forward", "nll_loss_backward", "nll_loss", "nll_loss_nd",
               "cross_entropy_loss", "_softmax_backward_data", "_log_softmax_backward_data",
               "linalg_vector_norm", "argmax", "bincount", "histc", "any", "all"),
    "index": ("index_select", "index", "index_add", "index_add_", "index_put_", "index_put",
              "scatter", "scatter_", "scatter_add", "scatter_add_", "gather", "embedding",
              "embedding_dense_backward", "embedding_backward", "index_copy_", "index_copy",
              "repeat_interleave", "masked_fill", "masked_fill_", "where", "_index_put_impl_"),
    "copy": ("copy_", "to", "_to_copy", "clone", "contiguous", "cat", "stack", "zeros",
             "zeros_like", "new_zeros", "zero_", "fill_", "empty", "empty_like", "new_empty",
             "ones", "ones_like", "full", "arange", "expand", "view", "reshape", "transpose",
             "t", "permute", "unsqueeze", "squeeze", "select", "slice", "narrow", "chunk",
             "split", "unbind", "as_strided", "detach", "alias", "_unsafe_view", "flatten",
             "split_with_sizes", "lift_fresh", "resize_", "empty_strided", "unflatten"),
}
_CLASS_OF = {op: cls for cls, ops in OP_CLASSES.items() for op in ops}


def op_class(name: str) -> str:
    """``reduce``, ``index``, ``copy`` or ``elementwise`` for an ``aten::`` operator."""
    return _CLASS_OF.get(name.split("::", 1)[-1], "elementwise")


def _sweep_fns(cls: str, n: int, td: torch.dtype):
    """(function, bytes it moves) for the representative op of a class on ``n`` elements."""
    g = torch.Generator().manual_seed(0)
    a = torch.randn(n, generator=g).to(td)
    b = torch.randn(n, generator=g).to(td)
    es = a.element_size()
    if cls == "elementwise":
        return (partial(torch.mul, a, b), 3 * n * es)
    if cls == "reduce":
        x = a.view(-1, min(n, 128))
        return (partial(torch.softmax, x, -1), 2 * n * es)
    if cls == "index":
        x = a.view(-1, min(n, 128))
        idx = torch.randint(0, x.shape[0], (x.shape[0],), generator=g)
        return (partial(torch.index_select, x, 0, idx), 2 * n * es)
    out = torch.empty_like(a)
    return (partial(out.copy_, b), 2 * n * es)


def profile_op_class(cls: str, dtype: str, reps: int = 20, trials: int = 3) -> LinearCost:
    """``alpha + beta * bytes`` of one operator class on this process: ``alpha`` is the
    time of the op on 16 elements (dispatch and launch, which a least-squares intercept over
    large sizes would lose in the noise), ``beta`` the least-squares slope of the rest."""
    td = getattr(torch, dtype)
    fn, _ = _sweep_fns(cls, 16, td)
    alpha = _best_ms(fn, reps * 5, trials)
    xs, ys = [], []
    for n in ELEMENTWISE_SIZES:
        fn, nbytes = _sweep_fns(cls, n, td)
        xs.append(float(nbytes))
        ys.append(_best_ms(fn, reps, trials))
    beta = max(0.0, sum(x * (y - alpha) for x, y in zip(xs, ys)) / sum(x * x for x in xs))
    my = sum(ys) / len(ys)
    ss_tot = sum((y - my) ** 2 for y in ys)
    ss_res = sum((y - alpha - beta * x) ** 2 for x, y in zip(xs, ys))
    return LinearCost(alpha=alpha, beta=beta, r2=1 - ss_res / ss_tot if ss_tot else 1.0,
                      source="measured",
                      note=f"bytes, {cls} ({fn.func.__name__}), {len(xs)} sizes, {dtype}, "
                           f"{torch.get_num_threads()} threads")


def profile_machine(dtypes=("float32",), *, nproc: int = 1, reps: int = 5, trials: int = 3,
                    progress: bool = False) -> PerfModel:
    """``moeflow.perf.profile`` per dtype on ``nproc`` gloo ranks (the GEMM fit, and with
    ``nproc > 1`` the collectives), plus the operator-class fits of this process (run with
    the threads one rank gets); the extra fits go to ``meta["bench_costs"]`` keyed
    ``<primitive>@<dtype>``."""
    from moeflow.perf import profile

    base = None
    extra = {}
    threads = torch.get_num_threads()
    per_rank = max(1, threads // nproc)
    for dt in dtypes:
        pm = profile(nproc=nproc, sizes=tuple(2 ** p for p in range(12, 21, 2)),
                     gemm_sizes=GEMM_SIZES, reps=reps, trials=trials, progress=progress,
                     dtype=dt, threads_per_rank=per_rank)
        base = base or pm
        extra[f"gemm@{dt}"] = pm.costs["gemm"].to_dict()
        torch.set_num_threads(per_rank)
        try:
            for cls in ("elementwise", *OP_CLASSES):
                extra[f"{cls}@{dt}"] = profile_op_class(cls, dt).to_dict()
        finally:
            torch.set_num_threads(threads)
    meta = dict(base.meta)
    meta["bench_costs"] = extra
    return PerfModel(name=base.name, costs=base.costs, bytes_per_element=base.bytes_per_element,
                     notes=base.notes + "; bench_costs: GEMM and element-wise fits per dtype",
                     meta=meta)


def with_op_costs(perf: PerfModel, dtypes=("float32",), *, nproc: int = 1) -> PerfModel:
    """``perf`` (e.g. from ``moeflow profile`` inside a cluster) plus this process's
    operator-class fits, with the threads one of ``nproc`` ranks gets; its GEMM and collective
    fits are kept (``gemm@<dtype>`` falls back to its ``gemm``)."""
    threads = torch.get_num_threads()
    extra = {}
    torch.set_num_threads(max(1, threads // nproc))
    try:
        for dt in dtypes:
            for cls in ("elementwise", *OP_CLASSES):
                extra[f"{cls}@{dt}"] = profile_op_class(cls, dt).to_dict()
    finally:
        torch.set_num_threads(threads)
    meta = dict(perf.meta)
    meta["bench_costs"] = extra
    return PerfModel(name=perf.name, costs=perf.costs, bytes_per_element=perf.bytes_per_element,
                     notes=perf.notes, meta=meta)


def _cost(perf: PerfModel, kind: str, dtype: str) -> LinearCost:
    table = perf.meta.get("bench_costs", {})
    key = f"{kind}@{dtype}"
    if key in table:
        return LinearCost.from_dict(table[key])
    if kind == "gemm":
        return perf.cost("gemm")
    from moeflow.errors import ConfigError
    raise ConfigError("perf model", perf.name, f"a meta['bench_costs'] entry {key!r} "
                                               "(profile with moeflow bench --profile)")


def _numel(shape) -> int:
    n = 1
    for s in shape:
        n *= int(s)
    return n


def gemm_flops(name: str, shapes: list) -> int:
    """FLOPs of one GEMM-like operator from its recorded input shapes."""
    from moeflow.bench.flops import _grouped_mm_flop, _sdpa_cpu_flop

    s = [list(x) for x in shapes]
    if name == "aten::mm":
        (m, k), (_, n) = s[0], s[1]
        return 2 * m * k * n
    if name == "aten::addmm":
        (m, k), (_, n) = s[1], s[2]
        return 2 * m * k * n
    if name in ("aten::bmm",):
        (b, m, k), (_, _, n) = s[0], s[1]
        return 2 * b * m * k * n
    if name == "aten::baddbmm":
        (b, m, k), (_, _, n) = s[1], s[2]
        return 2 * b * m * k * n
    if name == "aten::_grouped_mm":
        return _grouped_mm_flop(s[0], s[1])
    if name.endswith("_backward"):
        return 2 * _sdpa_cpu_flop(s[1], s[2], s[3])
    return _sdpa_cpu_flop(s[0], s[1], s[2])


def predict_rows(d: StepDissection, perf: PerfModel, dtype: str) -> dict:
    """{(phase, row): predicted ms} of one step from its inventory and ``perf``."""
    g = _cost(perf, "gemm", dtype)
    cost = {c: _cost(perf, c, dtype) for c in ("elementwise", *OP_CLASSES)}
    es = ESIZE[dtype]
    out: dict = {}
    for rec in d.inventory:
        if rec.name.startswith("c10d::"):
            continue  # collectives are the link's work (ep_step_graph), not compute
        if rec.gemms:
            t = sum(g(gemm_flops(n, s)) for n, s in rec.gemms)
        else:
            sizes = [_numel(s) for s in rec.shapes if isinstance(s, (list, tuple)) and s]
            nbytes = es * (sum(sizes) + (max(sizes) if sizes else 0))
            t = cost[op_class(rec.name)](nbytes)
        key = (rec.phase, rec.row)
        out[key] = out.get(key, 0.0) + t
    return out


def step_graph(rows: dict) -> TaskGraph:
    """One compute resource; the rows of each phase run in order, phases one after another."""
    g = TaskGraph()
    prev = None
    for (phase, row), ms in rows.items():
        i = g.add(f"{phase}/{row}", "compute", ms, deps=() if prev is None else (prev,),
                  kind=phase)
        prev = i
    return g


def ep_step_graph(rows: dict, comm: dict, r: int, moe_row: str = "moe_experts") -> TaskGraph:
    """The same step with each MoE layer's dispatch and combine on the link, chunked ``r``
    ways (FSMoE's pipeline: a2a of chunk i overlaps the experts of chunk i-1).

    ``comm`` is {phase: (dispatch ms, combine ms)} of all MoE layers of a phase; ``moe_row``
    is the row whose compute the link overlaps (``moe_other`` under ExpertParallel, whose
    expert GEMMs run inside the wrapper)."""
    g = TaskGraph()
    prev = None
    for (phase, row), ms in rows.items():
        if row == moe_row and phase in comm:
            disp, comb = comm[phase]
            deps = () if prev is None else (prev,)
            # link order: every dispatch, then every combine (a combine waits for its
            # chunk's experts, so dispatches queued behind it would stall the pipeline)
            sends = [g.add(f"{phase}/dispatch/{c}", "link", disp / r, deps=deps, kind="a2a")
                     for c in range(r)]
            comps = [g.add(f"{phase}/experts/{c}", "compute", ms / r, deps=(sends[c],),
                           kind=phase) for c in range(r)]
            ends = [g.add(f"{phase}/combine/{c}", "link", comb / r, deps=(comps[c],),
                          kind="a2a") for c in range(r)]
            prev = g.add(f"{phase}/moe_join", None, 0.0, deps=ends)
            continue
        prev = g.add(f"{phase}/{row}", "compute", ms, deps=() if prev is None else (prev,),
                     kind=phase)
    return g


def compare(d: StepDissection, perf: PerfModel, dtype: str) -> dict:
    """Predicted vs measured per row and in total.

    The measured rows are the profiler's, scaled by ``unprofiled / profiled`` step time so
    their sum is the plain step (the profiler's own overhead spread in proportion); the
    total is compared with the plain (unprofiled) step time."""
    pred = predict_rows(d, perf, dtype)
    tl = simulate(step_graph(pred))
    scale = d.unprofiled_ms / d.step_ms if d.step_ms > 0 else 1.0
    rows = []
    for key in sorted(set(pred) | set(d.rows)):
        m = d.rows.get(key, 0.0) * scale
        p = pred.get(key, 0.0)
        rows.append({"phase": key[0], "row": key[1], "measured_ms": m, "predicted_ms": p,
                     "ratio": p / m if m > 0 else None})
    total_m = d.unprofiled_ms
    return {"perf_model": perf.name, "dtype": dtype, "predicted_ms": tl.makespan,
            "measured_ms": total_m, "ratio": tl.makespan / total_m if total_m > 0 else None,
            "error": abs(tl.makespan - total_m) / total_m if total_m > 0 else None,
            "rows": rows, "gemm_cost": _cost(perf, "gemm", dtype).to_dict(),
            "op_costs": {c: _cost(perf, c, dtype).to_dict() for c in ("elementwise", *OP_CLASSES)}}


def compare_ep(d: StepDissection, perf: PerfModel, dtype: str, r: int) -> dict:
    """:func:`compare` for an expert-parallel step (rank 0's inventory): the all-to-alls of
    each phase are priced with the PerfModel's ``a2a`` fit (its bytes from the recorded
    shapes), half dispatch, half combine, and overlap the MoE compute in ``r`` chunks."""
    from moeflow.bench.ep import _a2a_bytes

    pred = predict_rows(d, perf, dtype)
    a2a = perf.cost("a2a")
    comm: dict = {}
    for phase, n in _a2a_bytes(d.inventory):
        comm[phase] = comm.get(phase, 0.0) + a2a(n * ESIZE[dtype])
    halves = {p: (t / 2, t / 2) for p, t in comm.items()}
    tl = simulate(ep_step_graph(pred, halves, r, moe_row="moe_other"))
    out = compare(d, perf, dtype)
    m = d.unprofiled_ms
    out.update({"predicted_ms": tl.makespan, "ratio": tl.makespan / m if m > 0 else None,
                "error": abs(tl.makespan - m) / m if m > 0 else None,
                "comm_predicted_ms": comm, "a2a_cost": a2a.to_dict(), "r": r})
    return out
