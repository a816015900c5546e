"""Predict a dissected step with the simulator, from a PerfModel profiled on this machine.

What is measured and what is predicted are kept apart:

* the *work* of the step comes from its operator inventory (each top-level aten operator,
  its row and phase, its input shapes and dtypes, the GEMMs inside it, the operators it
  calls; each module call, backward node and compiled graph call), which the profiled run
  records along with the times, but whose times the prediction never reads (only
  :func:`compare_terms` sets them beside the prediction, per cost term);
* the *cost* of each operator comes from the :class:`moeflow.perf.PerfModel` (the
  alpha-beta model of FSMoE, ASPLOS'25, profiled online before the run), every fit stored in
  ``meta["bench_costs"]`` under ``<primitive>@<dtype>``:

  - dense GEMMs ``alpha + beta * FLOPs`` over tall-skinny shapes with their operands out of
    cache (``gemm``; ``moeflow profile``'s square-GEMM fit is kept as ``gemm_square`` and the
    report also shows the prediction with it), expert GEMMs (``torch._grouped_mm``) and the
    attention core (causal SDPA) with fits of their own (``grouped_gemm``, ``attention``),
    and so have their backward kernels, which run at other rates than their forwards (most
    of all in bf16): the 2-D x 2-D weight-gradient ``_grouped_mm`` (``grouped_gemm_wgrad``)
    and the CPU flash-attention backward (``attention_bwd``);
  - any other operator ``alpha + beta * bytes`` (its inputs plus one output the size of its
    largest input, each at its own element size), fitted per class: element-wise,
    transcendental element-wise (silu, exp, rsqrt, ...), softmax and norms, plain reduction,
    indexing, copy (memory writes), views and allocations (no bytes: their fit is flat),
    and per dtype: an operator takes the fit of its largest floating input's dtype (the
    float32 statistics of a bf16 step are priced as float32);
  - fixed costs: the Python around each forward operator (``python_op``), each module call
    (``module_call``), each backward node (``autograd_node``), each optimizer operator
    (``optimizer_op``), and under ``torch.compile`` each inductor graph call, forward and
    backward (``compiled_call``, ``compiled_call_bwd``: guards, wrapper and fused kernels;
    the extern GEMMs a graph runs are operators of the inventory, priced as above);

  fits use relative least squares (:func:`moeflow.perf.measure.fit`) over medians;
* :mod:`moeflow.sim` turns the per-(phase, row) costs into a task graph on one compute
  resource and simulates it; with expert parallelism the dispatch and combine run on the link
  resource and overlap the experts (:func:`ep_step_graph`).
"""

from __future__ import annotations

import statistics
import time
from functools import partial

import torch

from moeflow.apps.bench.dissect import AUTOGRAD_NODE, COMPILED_CALL, MODULE_CALL, StepDissection
from moeflow.errors import ConfigError
from moeflow.perf.cost import LinearCost, PerfModel
from moeflow.perf.measure import fit, time_ms
from moeflow.sim import TaskGraph, simulate

#: sizes (elements) of the element-wise sweep: 4 KiB .. 16 MiB of fp32
ELEMENTWISE_SIZES = tuple(2**p for p in range(10, 23, 2))
GEMM_SIZES = (32, 64, 128, 192, 256, 384, 512)
ESIZE = {"float32": 4, "bfloat16": 2}


#: operator classes with a cost fit of their own; anything else is ``elementwise``
OP_CLASSES = {
    # element-wise operators that evaluate a transcendental function per element: several
    # times the cost of a multiply per byte, and more so in bf16 (converted per element)
    "transcendental": (
        "silu",
        "silu_",
        "silu_backward",
        "sigmoid",
        "sigmoid_backward",
        "exp",
        "exp_",
        "log",
        "tanh",
        "tanh_backward",
        "gelu",
        "gelu_",
        "gelu_backward",
        "rsqrt",
        "sqrt",
        "pow",
        "erf",
        "softplus",
    ),
    # normalisations along a row: softmax-like (exp per element) and the norms
    "softmax": (
        "softmax",
        "_softmax",
        "log_softmax",
        "_log_softmax",
        "_softmax_backward_data",
        "_log_softmax_backward_data",
        "cross_entropy_loss",
        "rms_norm",
        "_fused_rms_norm",
        "_fused_rms_norm_backward",
        "layer_norm",
        "native_layer_norm",
        "native_layer_norm_backward",
    ),
    # plain reductions, sorts and searches
    "reduce": (
        "sum",
        "mean",
        "amax",
        "amin",
        "max",
        "min",
        "topk",
        "sort",
        "argsort",
        "norm",
        "var",
        "std",
        "cumsum",
        "nll_loss_forward",
        "nll_loss_backward",
        "nll_loss",
        "nll_loss_nd",
        "linalg_vector_norm",
        "argmax",
        "bincount",
        "histc",
        "any",
        "all",
    ),
    "index": (
        "index_select",
        "index",
        "index_add",
        "index_add_",
        "index_put_",
        "index_put",
        "scatter",
        "scatter_",
        "scatter_add",
        "scatter_add_",
        "gather",
        "embedding",
        "embedding_dense_backward",
        "embedding_backward",
        "index_copy_",
        "index_copy",
        "repeat_interleave",
        "masked_fill",
        "masked_fill_",
        "where",
        "_index_put_impl_",
    ),
    # operators that write memory: copies, casts, concatenation, fills
    "copy": (
        "copy_",
        "to",
        "_to_copy",
        "clone",
        "contiguous",
        "cat",
        "stack",
        "zeros",
        "zeros_like",
        "new_zeros",
        "zero_",
        "fill_",
        "ones",
        "ones_like",
        "full",
        "arange",
        "repeat",
    ),
    # views and allocations: metadata only, no bytes moved whatever the size (priced by
    # bytes, a transpose of a large activation would cost as much as copying it)
    "view": (
        "empty",
        "empty_like",
        "new_empty",
        "empty_strided",
        "expand",
        "view",
        "reshape",
        "transpose",
        "t",
        "permute",
        "unsqueeze",
        "squeeze",
        "select",
        "slice",
        "narrow",
        "chunk",
        "split",
        "unbind",
        "as_strided",
        "detach",
        "alias",
        "_unsafe_view",
        "flatten",
        "split_with_sizes",
        "lift_fresh",
        "resize_",
        "unflatten",
    ),
}
_CLASS_OF = {op: cls for cls, ops in OP_CLASSES.items() for op in ops}


#: operators that copy only when they call a copying operator (``x.to(x.dtype)`` returns
#: ``x``; ``reshape`` of a contiguous tensor is a view), else they are views
MAYBE_COPY = ("to", "type_as", "contiguous", "reshape", "flatten", "expand_as", "view_as")
COPYING = ("aten::_to_copy", "aten::clone", "aten::copy_", "aten::_reshape_copy")


def op_class(name: str, calls=None) -> str:
    """``transcendental``, ``softmax``, ``reduce``, ``index``, ``copy``, ``view`` or
    ``elementwise`` for an ``aten::`` operator; ``calls`` (the operators it called, from the
    inventory) makes a :data:`MAYBE_COPY` operator a ``copy`` or a ``view``."""
    base = name.split("::", 1)[-1]
    if calls is not None and base in MAYBE_COPY:
        return "copy" if any(c in COPYING for c in calls) else "view"
    return _CLASS_OF.get(base, "elementwise")


def _sweep_fns(cls: str, n: int, td: torch.dtype):
    """(function, bytes it moves) for the representative op of a class on ``n`` elements."""
    g = torch.Generator().manual_seed(0)
    a = torch.randn(n, generator=g).to(td)
    b = torch.randn(n, generator=g).to(td)
    es = a.element_size()
    if cls == "elementwise":
        return (partial(torch.mul, a, b), 3 * n * es)
    if cls == "transcendental":
        return (partial(torch.nn.functional.silu, a), 2 * n * es)
    if cls == "softmax":
        x = a.view(-1, min(n, 128))
        return (partial(torch.softmax, x, -1), 2 * n * es)
    if cls == "reduce":
        x = a.view(-1, min(n, 128))
        return (partial(torch.sum, x, -1), 2 * n * es)
    if cls == "view":
        x = a.view(-1, min(n, 128))
        return (partial(torch.transpose, x, 0, 1), 2 * n * es)
    if cls == "index":
        x = a.view(-1, min(n, 128))
        idx = torch.randint(0, x.shape[0], (x.shape[0],), generator=g)
        return (partial(torch.index_select, x, 0, idx), 2 * n * es)
    out = torch.empty_like(a)
    return (partial(out.copy_, b), 2 * n * es)


def profile_op_class(cls: str, dtype: str, reps: int = 20, trials: int = 3) -> LinearCost:
    """``alpha + beta * bytes`` of one operator class on this process: ``alpha`` is the
    time of the op on 16 elements (dispatch and launch, which a least-squares intercept over
    large sizes would lose in the noise), ``beta`` the least-squares slope of the rest; the
    cost carries its fit quality on the sweep (``r2``, ``max_rel_err``, the points)."""
    td = getattr(torch, dtype)
    fn, _ = _sweep_fns(cls, 16, td)
    alpha = time_ms(fn, reps=reps * 5, trials=trials)
    xs, ys = [], []
    for n in ELEMENTWISE_SIZES:
        fn, nbytes = _sweep_fns(cls, n, td)
        xs.append(float(nbytes))
        ys.append(time_ms(fn, reps=reps, trials=trials))
    beta = max(0.0, sum(x * (y - alpha) for x, y in zip(xs, ys)) / sum(x * x for x in xs))
    return LinearCost(
        alpha=alpha,
        beta=beta,
        source="measured",
        note=f"bytes, {cls} ({fn.func.__name__}), {len(xs)} sizes, {dtype}, "
        f"{torch.get_num_threads()} threads",
    ).with_points(xs, ys)


#: GEMM shapes (m, k, n) of the tall-skinny sweep: token rows by model widths
GEMM_SHAPES = tuple(
    (m, k, n) for m in (64, 256, 1024, 4096) for k in (64, 256, 1024) for n in (64, 256, 1024)
)


def profile_gemm_shapes(dtype: str, reps: int = 3, trials: int = 3) -> LinearCost:
    """``alpha + beta * FLOPs`` over tall-skinny GEMMs (:data:`GEMM_SHAPES`), the shapes a
    transformer step runs (token rows times model widths), on this process, operands out of
    cache (:func:`moeflow.perf.measure.time_ms` with ``cold``: a step reads each weight once
    per pass). Square GEMMs
    (``moeflow profile``) run closer to peak on CPUs than these, so a square fit underrates
    the step's GEMMs; both fits are kept and the report shows the prediction with each."""
    td = getattr(torch, dtype)
    g = torch.Generator().manual_seed(0)
    xs, ys = [], []
    for m, k, n in GEMM_SHAPES:
        a = torch.randn(m, k, generator=g).to(td)
        b = torch.randn(k, n, generator=g).to(td)
        xs.append(2.0 * m * k * n)
        ys.append(time_ms(partial(torch.mm, a, b), trials=reps * trials, cold=True))
    return fit(
        xs,
        ys,
        relative=True,
        note=f"FLOPs, {len(xs)} tall-skinny shapes, relative least "
        f"squares, {dtype}, {torch.get_num_threads()} threads",
    )


def _expert_grid():
    """The expert GEMM grid of :func:`profile_grouped_gemm` and its weight gradient: E in
    {4, 8, 16} experts, 64 or 256 rows each, three (K, N) pairs; with the group offsets."""
    for E in (4, 8, 16):
        for rows in (64, 256):
            for K, N in ((128, 512), (512, 128), (256, 256)):
                yield E, rows, K, N, (torch.arange(1, E + 1) * rows).to(torch.int32)


def profile_grouped_gemm(dtype: str, reps: int = 3, trials: int = 3) -> LinearCost:
    """``alpha + beta * FLOPs`` of ``torch._grouped_mm`` as the expert kernel calls it (rows
    grouped by expert, one ``(E, K, N)`` weight seen through a transpose): the expert GEMM
    cost that FSMoE profiles apart from dense GEMMs (ASPLOS'25, t_exp), over E in {4, 8, 16},
    64 or 256 rows per expert and three (K, N) pairs. Relative least squares."""
    if not hasattr(torch, "_grouped_mm"):
        return profile_gemm_shapes(dtype, reps, trials)
    td = getattr(torch, dtype)
    g = torch.Generator().manual_seed(0)
    xs, ys = [], []
    for E, rows, K, N, offs in _expert_grid():
        a = torch.randn(E * rows, K, generator=g).to(td)
        w = torch.randn(E, N, K, generator=g).to(td)
        fn = partial(torch._grouped_mm, a, w.transpose(-2, -1), offs=offs)
        xs.append(2.0 * E * rows * K * N)
        ys.append(time_ms(fn, trials=reps * trials, cold=True))
    return fit(
        xs,
        ys,
        relative=True,
        note=f"FLOPs, torch._grouped_mm, {len(xs)} shapes, relative "
        f"least squares, {dtype}, {torch.get_num_threads()} threads",
    )


def profile_attention(dtype: str, reps: int = 3, trials: int = 3) -> LinearCost:
    """``alpha + beta * FLOPs`` of causal ``scaled_dot_product_attention`` (FLOPs over the
    full rectangle, as :mod:`moeflow.apps.bench.flops` counts them): the attention core, priced
    apart from GEMMs as FinDEP prices its t_a. Batches 1 and 8, 4 heads, L in {64, 128, 256},
    head dims 32 and 64. Relative least squares."""
    import torch.nn.functional as F

    td = getattr(torch, dtype)
    g = torch.Generator().manual_seed(0)
    xs, ys = [], []
    for B in (1, 8):
        for L in (64, 128, 256):
            for d in (32, 64):
                q, k, v = (torch.randn(B, 4, L, d, generator=g).to(td) for _ in range(3))
                fn = partial(F.scaled_dot_product_attention, q, k, v, is_causal=True)
                xs.append(4.0 * B * 4 * L * L * d)
                ys.append(time_ms(fn, reps=reps, trials=trials))
    return fit(
        xs,
        ys,
        relative=True,
        note=f"FLOPs, causal SDPA, {len(xs)} shapes, relative least "
        f"squares, {dtype}, {torch.get_num_threads()} threads",
    )


def profile_grouped_gemm_wgrad(dtype: str, reps: int = 3, trials: int = 3) -> LinearCost:
    """``alpha + beta * FLOPs`` of the expert weight gradient's ``torch._grouped_mm``: a
    2-D x 2-D call grouped along the contraction (the ``(O, N)`` transposed gradient times the
    ``(N, I)`` activations, one ``(O, I)`` product per expert), the class
    :class:`moeflow.kernels.grouped` runs backward besides the forward-shaped data gradient.
    CPU ``_grouped_mm`` loops ``mm`` per group over a transposed, strided operand, and bf16
    runs it well below its forward rate, so the forward fit misprices it. Same grid as
    :func:`profile_grouped_gemm`, operands out of cache, relative least squares."""
    if not hasattr(torch, "_grouped_mm"):
        return profile_gemm_shapes(dtype, reps, trials)
    td = getattr(torch, dtype)
    g = torch.Generator().manual_seed(0)
    xs, ys = [], []
    for E, rows, K, N, offs in _expert_grid():
        grad = torch.randn(E * rows, N, generator=g).to(td)
        act = torch.randn(E * rows, K, generator=g).to(td)
        fn = partial(torch._grouped_mm, grad.t(), act, offs=offs)
        xs.append(2.0 * E * rows * K * N)
        ys.append(time_ms(fn, trials=reps * trials, cold=True))
    return fit(
        xs,
        ys,
        relative=True,
        note=f"FLOPs, torch._grouped_mm weight gradient (2-D x 2-D), {len(xs)} shapes, "
        f"relative least squares, {dtype}, {torch.get_num_threads()} threads",
    )


def profile_attention_bwd(dtype: str, reps: int = 3, trials: int = 3) -> LinearCost:
    """``alpha + beta * FLOPs`` of the backward of causal ``scaled_dot_product_attention``
    (the CPU flash-attention backward kernel, n = twice the forward FLOPs, as
    :func:`gemm_flops` counts it), timed alone by replaying the backward of one recorded
    forward. The backward recomputes the probabilities block by block, and in bf16 runs far
    below the forward's rate, so the forward fit does not price it. Same shapes as
    :func:`profile_attention`, relative least squares."""
    import torch.nn.functional as F

    td = getattr(torch, dtype)
    g = torch.Generator().manual_seed(0)
    xs, ys = [], []
    for B in (1, 8):
        for L in (64, 128, 256):
            for d in (32, 64):
                q, k, v = (
                    torch.randn(B, 4, L, d, generator=g).to(td).requires_grad_() for _ in range(3)
                )
                out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
                grad = torch.randn_like(out)
                fn = partial(torch.autograd.grad, out, (q, k, v), grad, retain_graph=True)
                xs.append(2 * 4.0 * B * 4 * L * L * d)
                ys.append(time_ms(fn, reps=reps, trials=trials))
    return fit(
        xs,
        ys,
        relative=True,
        note=f"FLOPs (2x forward), causal SDPA backward, {len(xs)} shapes, relative "
        f"least squares, {dtype}, {torch.get_num_threads()} threads",
    )


def _reference_ops(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """Nine small operators written as module code writes them (an RMSNorm and a residual)."""
    x32 = x.float()
    v = x32.pow(2).mean(-1, keepdim=True)
    y = x32 * torch.rsqrt(v + 1e-6)
    return w * y.to(x.dtype) + x


REFERENCE_OPS = 9


def profile_python_op(reps: int = 200, trials: int = 5) -> LinearCost:
    """Time per operator of forward module code on tiny tensors, autograd recording: the
    interpreter and dispatch cost every forward operator pays, whatever its size (a bare op
    in a tight loop, the ``alpha`` of the class fits, pays less). ``alpha`` only."""
    x = torch.randn(1, 16)
    w = torch.ones(16, requires_grad=True)
    t = time_ms(partial(_reference_ops, x, w), reps=reps, trials=trials) / REFERENCE_OPS
    return LinearCost(
        alpha=t,
        beta=0.0,
        source="measured",
        note=f"ms per forward operator of module code ({REFERENCE_OPS} tiny ops, "
        "autograd recording)",
    )


class _Tiny(torch.nn.Module):
    def forward(self, x):
        return x


def profile_module_call(reps: int = 2000, trials: int = 5) -> LinearCost:
    """Time of one ``nn.Module`` call around a forward that does nothing: what each module
    of a step adds to its operators. ``alpha`` only."""
    m, x = _Tiny(), torch.zeros(1)
    return LinearCost(
        alpha=time_ms(partial(m, x), reps=reps, trials=trials),
        beta=0.0,
        source="measured",
        note="ms per nn.Module call (empty forward)",
    )


def profile_autograd_node(reps: int = 200, trials: int = 5) -> LinearCost:
    """Time per node of a backward pass over tiny tensors (the engine's own work per node:
    scheduling, grad buffers), from the backward of :func:`_reference_ops`. ``alpha`` only."""
    w = torch.ones(16, requires_grad=True)
    x = torch.randn(1, 16, requires_grad=True)

    def run():
        _reference_ops(x, w).sum().backward()

    def fwd():
        _reference_ops(x, w).sum()

    # nodes: the ops with a grad (8: ``float`` of a float tensor is a no-op), the sum, and
    # two AccumulateGrad
    nodes = REFERENCE_OPS - 1 + 1 + 2
    t = time_ms(run, reps=reps, trials=trials) - time_ms(fwd, reps=reps, trials=trials)
    return LinearCost(
        alpha=max(t, 0.0) / nodes,
        beta=0.0,
        source="measured",
        note="ms per autograd node (tiny tensors, backward minus forward)",
    )


def profile_compiled_call(reps: int = 200, trials: int = 5) -> tuple[LinearCost, LinearCost]:
    """Time of one inductor graph call of ``torch.compile`` (as the bench compiles its
    modules: ``dynamic=True``) on tiny tensors, forward with autograd recording
    (``compiled_call``: guards, the AOT wrapper, the graph's fused kernel) and its backward
    graph (``compiled_call_bwd``: the ``backward()`` call alone, timed after an untimed
    forward; a difference of two noisy timings could come out negative). The fused kernels of
    a compiled step are priced by these: at the bench's sizes their bytes cost less than the
    calls around them. ``alpha`` only."""
    fn = torch.compile(_reference_ops, dynamic=True)
    w = torch.ones(16, requires_grad=True)
    x = torch.randn(1, 16)

    def fwd():
        fn(x, w)

    def bwd_ms() -> float:  # mean of reps backward calls, each after its own forward
        total = 0.0
        for _ in range(reps):
            y = fn(x, w).sum()
            t0 = time.perf_counter()
            y.backward()
            total += time.perf_counter() - t0
        return total / reps * 1e3

    fn(x, w).sum().backward()  # compile both graphs outside the timing
    t_f = time_ms(fwd, reps=reps, trials=trials)
    t_b = statistics.median(bwd_ms() for _ in range(trials))
    note = "ms per inductor graph call (torch.compile(dynamic=True), tiny tensors)"
    return (
        LinearCost(alpha=t_f, beta=0.0, source="measured", note=note + ", forward"),
        LinearCost(alpha=t_b, beta=0.0, source="measured", note=note + ", backward graph"),
    )


def profile_optimizer_op(params: int = 16, reps: int = 20, trials: int = 5) -> LinearCost:
    """Time per operator of an ``AdamW`` step over ``params`` tiny tensors: the optimizer's
    Python loop around its operators (per-parameter bookkeeping, state lookups). ``alpha``
    only; the operators' own bytes are priced by their class fits."""
    from torch.profiler import ProfilerActivity, profile

    ps = [torch.zeros(16, requires_grad=True) for _ in range(params)]
    for p in ps:
        p.grad = torch.ones(16)
    opt = torch.optim.AdamW(ps, lr=1e-3)
    t = time_ms(opt.step, reps=reps, trials=trials)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        opt.step()
    ops = sum(
        1
        for e in prof.events()
        if e.name.startswith("aten::")
        and (e.cpu_parent is None or not e.cpu_parent.name.startswith("aten::"))
    )
    return LinearCost(
        alpha=t / max(1, ops),
        beta=0.0,
        source="measured",
        note=f"ms per operator of an AdamW step ({params} tiny parameters, {ops} operators)",
    )


def profile_machine(
    dtypes=("float32",),
    *,
    nproc: int = 1,
    reps: int = 5,
    trials: int = 3,
    progress: bool = False,
    compiled: bool = False,
) -> PerfModel:
    """``moeflow.perf.profile`` per dtype on ``nproc`` gloo ranks (the GEMM fit, and with
    ``nproc > 1`` the collectives), plus the operator-class fits of this process (run with
    the threads one rank gets); the extra fits go to ``meta["bench_costs"]`` keyed
    ``<primitive>@<dtype>``."""
    from moeflow.apps.profile import profile

    threads = torch.get_num_threads()
    per_rank = max(1, threads // nproc)
    # every forked profile first: a process forked after this one has run multi-threaded
    # OpenMP work can hang in its own OpenMP (GNU libgomp is not fork-safe)
    profiled = {
        dt: profile(
            nproc=nproc,
            sizes=tuple(2**p for p in range(12, 21, 2)),
            gemm_sizes=GEMM_SIZES,
            reps=reps,
            trials=trials,
            progress=progress,
            dtype=dt,
            threads_per_rank=per_rank,
        )
        for dt in dtypes
    }
    base = profiled[dtypes[0]]
    perf = PerfModel(
        name=base.name,
        costs=base.costs,
        bytes_per_element=base.bytes_per_element,
        notes=base.notes,
        meta=dict(base.meta),
    )
    out = with_op_costs(perf, dtypes, nproc=nproc, compiled=compiled)
    extra = dict(out.meta["bench_costs"])
    for dt, pm in profiled.items():
        extra[f"gemm_square@{dt}"] = pm.costs["gemm"].to_dict()
    meta = dict(base.meta)
    meta["bench_costs"] = extra
    return PerfModel(
        name=base.name,
        costs=base.costs,
        bytes_per_element=base.bytes_per_element,
        notes=base.notes + "; bench_costs: GEMM and element-wise fits per dtype",
        meta=meta,
    )


def with_op_costs(
    perf: PerfModel, dtypes=("float32",), *, nproc: int = 1, compiled: bool = False
) -> PerfModel:
    """``perf`` (e.g. from ``moeflow profile`` inside a cluster) plus this process's
    operator-class fits, with the threads one of ``nproc`` ranks gets; its GEMM and collective
    fits are kept (``gemm@<dtype>`` falls back to its ``gemm``). ``compiled``: also the
    inductor graph call costs (:func:`profile_compiled_call`) that compiled settings need."""
    threads = torch.get_num_threads()
    extra = {}
    torch.set_num_threads(max(1, threads // nproc))
    try:
        # a bf16 step still runs float32 operators (norm statistics, router, loss)
        for dt in dict.fromkeys((*dtypes, "float32")):
            extra[f"gemm_square@{dt}"] = perf.cost("gemm").to_dict()
            extra[f"gemm@{dt}"] = profile_gemm_shapes(dt).to_dict()
            extra[f"grouped_gemm@{dt}"] = profile_grouped_gemm(dt).to_dict()
            extra[f"attention@{dt}"] = profile_attention(dt).to_dict()
            extra[f"attention_bwd@{dt}"] = profile_attention_bwd(dt).to_dict()
            extra[f"grouped_gemm_wgrad@{dt}"] = profile_grouped_gemm_wgrad(dt).to_dict()
            for cls in ("elementwise", *OP_CLASSES):
                extra[f"{cls}@{dt}"] = profile_op_class(cls, dt).to_dict()
        extra["python_op"] = profile_python_op().to_dict()
        extra["module_call"] = profile_module_call().to_dict()
        extra["autograd_node"] = profile_autograd_node().to_dict()
        extra["optimizer_op"] = profile_optimizer_op().to_dict()
        if compiled:
            fwd, bwd = profile_compiled_call()
            extra["compiled_call"], extra["compiled_call_bwd"] = fwd.to_dict(), bwd.to_dict()
    finally:
        torch.set_num_threads(threads)
    meta = dict(perf.meta)
    meta["bench_costs"] = extra
    return PerfModel(
        name=perf.name,
        costs=perf.costs,
        bytes_per_element=perf.bytes_per_element,
        notes=perf.notes,
        meta=meta,
    )


def _cost(perf: PerfModel, kind: str, dtype: str) -> LinearCost:
    table = perf.meta.get("bench_costs", {})
    key = f"{kind}@{dtype}"
    if key in table:
        return LinearCost.from_dict(table[key])
    if key in perf.costs:  # fitted by `moeflow profile` (gemm, attention, elementwise)
        return perf.costs[key]
    if kind in ("gemm", "gemm_square", "grouped_gemm", "attention"):
        return (
            LinearCost.from_dict(table[f"gemm@{dtype}"])
            if f"gemm@{dtype}" in table and kind != "gemm_square"
            else perf.cost("gemm")
        )
    from moeflow.errors import ConfigError

    raise ConfigError(
        "perf model",
        perf.name,
        f"a meta['bench_costs'] entry {key!r} (moeflow bench --simulate profiles it, "
        "and adds the missing operator costs to a --perf model that has none)",
    )


def _numel(shape) -> int:
    n = 1
    for s in shape:
        n *= int(s)
    return n


def gemm_flops(name: str, shapes: list) -> int:
    """FLOPs of one GEMM-like operator from its recorded input shapes."""
    from moeflow.apps.bench.flops import grouped_mm_flop, sdpa_cpu_flop

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
        return grouped_mm_flop(s[0], s[1])
    if name.endswith("_backward"):
        return 2 * sdpa_cpu_flop(s[1], s[2], s[3])
    return sdpa_cpu_flop(s[0], s[1], s[2])


#: bytes per element of the profiler's input dtype names (``FunctionEvent.input_dtypes``)
PROFILER_ESIZE = {
    "float": 4,
    "double": 8,
    "c10::BFloat16": 2,
    "c10::Half": 2,
    "long int": 8,
    "int": 4,
    "short int": 2,
    "bool": 1,
    "unsigned char": 1,
    "signed char": 1,
}
#: the fit dtype of an operator whose largest input has this profiler dtype
PROFILER_DTYPE = {"float": "float32", "c10::BFloat16": "bfloat16"}


def op_bytes_and_dtype(rec, dtype: str) -> tuple[int, str]:
    """(bytes, fit dtype) of a non-GEMM operator: its tensor inputs plus one output the size
    of its largest input, each at its own element size when the inventory recorded dtypes;
    the fit is the one of its largest floating input's dtype (a float32 norm statistic in a
    bf16 step is priced as float32), else the step's ``dtype``."""
    dts = list(rec.dtypes) if getattr(rec, "dtypes", None) else []
    sizes = []
    for i, shp in enumerate(rec.shapes):
        if isinstance(shp, (list, tuple)) and shp:
            name = dts[i] if i < len(dts) else ""
            sizes.append((_numel(shp), PROFILER_ESIZE.get(name, ESIZE[dtype]), name))
    if not sizes:
        return 0, dtype
    nbytes = sum(n * es for n, es, _ in sizes) + max(n * es for n, es, _ in sizes)
    floats = [(n, name) for n, _, name in sizes if name in PROFILER_DTYPE]
    fit_dtype = PROFILER_DTYPE[max(floats)[1]] if floats else dtype
    return nbytes, fit_dtype


def is_wgrad(name: str, shapes: list) -> bool:
    """A 2-D x 2-D ``torch._grouped_mm``: grouped along the contraction (weight gradients)."""
    return name == "aten::_grouped_mm" and len(shapes) > 1 and len(shapes[0]) == len(shapes[1]) == 2


def priced_inventory(d: StepDissection, perf: PerfModel, dtype: str, gemm: str = "gemm"):
    """``(record, cost term, operator ms, host ms)`` for every entry of a step's inventory,
    priced from ``perf``; ``gemm``
    names the GEMM fit (``gemm``: the tall-skinny sweep when the model has one, else
    ``moeflow profile``'s square fit; ``gemm_square``: the square fit, for every GEMM).

    Expert GEMMs (``torch._grouped_mm``) are priced with ``grouped_gemm`` (2-D x 3-D: the
    forward and the data gradient) and ``grouped_gemm_wgrad`` (2-D x 2-D), the CPU
    flash-attention forward with ``attention`` and its backward with ``attention_bwd``;
    other operators with their class fit (:func:`op_class`) at their own dtype
    (:func:`op_bytes_and_dtype`): a model without a fit the step needs raises ConfigError
    naming it."""
    g = _cost(perf, gemm, dtype)
    square = gemm == "gemm_square"
    # expert GEMMs and the attention core have fits of their own, forward and backward
    grouped = g if square else _cost(perf, "grouped_gemm", dtype)
    attn = g if square else _cost(perf, "attention", dtype)
    gemms = [(n, s) for rec in d.inventory for n, s in rec.gemms]
    # the backward fits are read only when the step runs such a GEMM
    wgrad = (
        _cost(perf, "grouped_gemm_wgrad", dtype)
        if not square and any(is_wgrad(n, s) for n, s in gemms)
        else grouped
    )
    attn_bwd = (
        _cost(perf, "attention_bwd", dtype)
        if not square and any(n.endswith("_for_cpu_backward") for n, _ in gemms)
        else attn
    )
    cost: dict = {}

    def class_cost(cls: str, dt: str) -> LinearCost:
        if (cls, dt) not in cost:
            cost[(cls, dt)] = _cost(perf, cls, dt)
        return cost[(cls, dt)]

    table = perf.meta.get("bench_costs", {})
    fixed = {
        k: (LinearCost.from_dict(table[k]).alpha if k in table else 0.0)
        for k in ("python_op", "module_call", "autograd_node", "optimizer_op")
    }
    py = fixed["python_op"]
    for rec in d.inventory:
        if rec.name.startswith("c10d::"):
            continue  # collectives are the link's work (ep_step_graph), not compute
        if rec.name in (MODULE_CALL, AUTOGRAD_NODE):
            cost_key = "module_call" if rec.name == MODULE_CALL else "autograd_node"
            yield rec, cost_key, 0.0, fixed[cost_key]
            continue
        if rec.name == COMPILED_CALL:  # an inductor graph: its fused kernels and wrapper
            k = "compiled_call_bwd" if rec.phase == "backward" else "compiled_call"
            if k not in table:
                raise ConfigError(
                    "perf model",
                    perf.name,
                    f"a meta['bench_costs'] entry {k!r} for the compiled step's graph calls "
                    "(moeflow bench --simulate profiles it when a setting compiles)",
                )
            yield rec, k, LinearCost.from_dict(table[k]).alpha, 0.0
            continue
        if rec.gemms:

            def price(n, s):
                if n == "aten::_grouped_mm":
                    return (
                        ("grouped_gemm_wgrad", wgrad)
                        if is_wgrad(n, s)
                        else ("grouped_gemm", grouped)
                    )
                if n.endswith("_for_cpu_backward"):
                    return "attention_bwd", attn_bwd
                return ("attention", attn) if "attention" in n else (gemm, g)

            term = price(*rec.gemms[0])[0]
            yield rec, term, sum(price(n, s)[1](gemm_flops(n, s)) for n, s in rec.gemms), 0.0
        else:
            nbytes, dt = op_bytes_and_dtype(rec, dtype)
            cls = op_class(rec.name, getattr(rec, "calls", None))
            c = class_cost(cls, dt)
            host = 0.0
            if rec.phase == "forward":  # forward ops run from Python module code
                host = max(0.0, py - c.alpha)
            elif rec.phase == "optimizer":  # and the optimizer's ops from its Python loop
                host = max(0.0, fixed["optimizer_op"] - c.alpha)
            yield rec, f"{cls}@{dt}", c(nbytes), host


def predict_rows(d: StepDissection, perf: PerfModel, dtype: str, gemm: str = "gemm") -> dict:
    """{(phase, row): predicted ms} of one step: the sum of :func:`priced_inventory`."""
    out: dict = {}
    for rec, _, t_op, t_host in priced_inventory(d, perf, dtype, gemm):
        key = (rec.phase, rec.row)
        out[key] = out.get(key, 0.0) + t_op + t_host
    return out


def compare_terms(d: StepDissection, perf: PerfModel, dtype: str) -> list[dict]:
    """Predicted vs profiled time per (phase, cost term): where a prediction misses.

    Per term (a GEMM fit, an operator class at a dtype, a compiled graph call) the
    predicted time of its operators against their inclusive profiled time in the inventory's
    step (recorded with shapes, so somewhat slower than the plain step); per phase, ``host``
    is the predicted fixed costs (Python per operator, module calls, backward nodes,
    optimizer loop) against the profiled phase time that no operator covers."""
    pred: dict = {}
    meas: dict = {}
    calls: dict = {}
    for rec, term, t_op, t_host in priced_inventory(d, perf, dtype):
        if t_op or rec.total_us or term.startswith("compiled"):
            key = (rec.phase, term)
            pred[key] = pred.get(key, 0.0) + t_op
            meas[key] = meas.get(key, 0.0) + rec.total_us / 1e3
            calls[key] = calls.get(key, 0) + 1
        if t_host:
            pred[(rec.phase, "host")] = pred.get((rec.phase, "host"), 0.0) + t_host
    for phase in {p for p, _ in pred}:
        ops = sum(v for (p, t), v in meas.items() if p == phase)
        meas[(phase, "host")] = max(0.0, d.phase_total(phase) - ops)
    return [
        {
            "phase": p,
            "term": t,
            "calls": calls.get((p, t), 0),
            "measured_ms": meas.get((p, t), 0.0),
            "predicted_ms": pred.get((p, t), 0.0),
        }
        for p, t in sorted(set(pred) | set(meas))
    ]


def step_graph(rows: dict) -> TaskGraph:
    """One compute resource; the rows of each phase run in order, phases one after another."""
    g = TaskGraph()
    prev = None
    for (phase, row), ms in rows.items():
        i = g.add(f"{phase}/{row}", "compute", ms, deps=() if prev is None else (prev,), kind=phase)
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
            sends = [
                g.add(f"{phase}/dispatch/{c}", "link", disp / r, deps=deps, kind="a2a")
                for c in range(r)
            ]
            comps = [
                g.add(f"{phase}/experts/{c}", "compute", ms / r, deps=(sends[c],), kind=phase)
                for c in range(r)
            ]
            ends = [
                g.add(f"{phase}/combine/{c}", "link", comb / r, deps=(comps[c],), kind="a2a")
                for c in range(r)
            ]
            prev = g.add(f"{phase}/moe_join", None, 0.0, deps=ends)
            continue
        prev = g.add(
            f"{phase}/{row}", "compute", ms, deps=() if prev is None else (prev,), kind=phase
        )
    return g


def row_table(d: StepDissection, pred: dict) -> list[dict]:
    """Predicted vs measured per ``(phase, row)``; the measured rows are the profiler's,
    scaled by ``unprofiled / profiled`` step time so their sum is the plain step."""
    scale = d.unprofiled_ms / d.step_ms if d.step_ms > 0 else 1.0
    rows = []
    for key in sorted(set(pred) | set(d.rows)):
        m = d.rows.get(key, 0.0) * scale
        p = pred.get(key, 0.0)
        rows.append(
            {
                "phase": key[0],
                "row": key[1],
                "measured_ms": m,
                "predicted_ms": p,
                "ratio": p / m if m > 0 else None,
            }
        )
    return rows


def compare(d: StepDissection, perf: PerfModel, dtype: str) -> dict:
    """Predicted vs measured per row and in total.

    The measured rows are the profiler's, scaled by ``unprofiled / profiled`` step time so
    their sum is the plain step (the profiler's own overhead spread in proportion); the
    total is compared with the plain (unprofiled) step time."""
    pred = predict_rows(d, perf, dtype)
    tl = simulate(step_graph(pred))
    rows = row_table(d, pred)
    total_m = d.unprofiled_ms
    square = simulate(step_graph(predict_rows(d, perf, dtype, gemm="gemm_square"))).makespan
    return {
        "perf_model": perf.name,
        "dtype": dtype,
        "predicted_ms": tl.makespan,
        "predicted_ms_square_gemm": square,
        "measured_ms": total_m,
        "ratio": tl.makespan / total_m if total_m > 0 else None,
        "error": abs(tl.makespan - total_m) / total_m if total_m > 0 else None,
        "rows": rows,
        "terms": compare_terms(d, perf, dtype),
        "gemm_cost": _cost(perf, "gemm", dtype).to_dict(),
        "gemm_square_cost": _cost(perf, "gemm_square", dtype).to_dict(),
        "op_costs": {
            c: _cost(perf, c, dtype).to_dict()
            for c in ("elementwise", *OP_CLASSES)
            if f"{c}@{dtype}" in perf.meta.get("bench_costs", {})
        },
    }


def compare_ep(d: StepDissection, perf: PerfModel, dtype: str, r: int) -> dict:
    """:func:`compare` for an expert-parallel step (rank 0's inventory): the all-to-alls of
    each phase are priced with the PerfModel's ``a2a`` fit (its bytes from the recorded
    shapes), half dispatch, half combine, and overlap the MoE compute in ``r`` chunks."""
    from moeflow.apps.bench.ep import a2a_bytes

    pred = predict_rows(d, perf, dtype)
    a2a = perf.cost("a2a")
    comm: dict = {}
    for phase, n in a2a_bytes(d.inventory):
        comm[phase] = comm.get(phase, 0.0) + a2a(n * ESIZE[dtype])
    halves = {p: (t / 2, t / 2) for p, t in comm.items()}
    tl = simulate(ep_step_graph(pred, halves, r, moe_row="moe_other"))
    out = compare(d, perf, dtype)
    m = d.unprofiled_ms
    out.update(
        {
            "predicted_ms": tl.makespan,
            "ratio": tl.makespan / m if m > 0 else None,
            "error": abs(tl.makespan - m) / m if m > 0 else None,
            "comm_predicted_ms": comm,
            "a2a_cost": a2a.to_dict(),
            "r": r,
        }
    )
    return out
