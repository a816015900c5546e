"""Online profiler: time GEMMs and collectives over a size sweep, fit alpha-beta costs.

    moeflow profile [--nproc N] [--nodes K] [--out perf.json]
    moeflow profile --refit samples.json --perf perf.json --out refit.json

* Inside a torchrun job (``torch.distributed`` already initialised) it profiles the current
  group; otherwise it forks ``N`` gloo ranks on 127.0.0.1 (a free port) with
  :func:`moeflow.launch.launch` (``N`` and every flag checked before forking). NCCL is
  used when the current group is NCCL (GPUs).
* Primitives: ``gemm`` (square fp32/bf16 matmuls, n = 2 m^3 FLOPs, every rank at once - the way
  they run in a step), ``a2a`` (``all_to_all_single``, n = bytes each rank sends), ``ag``
  (``all_gather_into_tensor``, n = gathered bytes), ``rs`` (``reduce_scatter_tensor``, n = input
  bytes), ``ar`` (``all_reduce``, n = bytes). With ``--nodes K`` the ranks are declared as K
  nodes of N/K ranks and ``a2a@intra`` (inside a node) and ``a2a@inter`` (ranks with the same
  local index across nodes) are timed too.
* ``send``: point-to-point ``isend`` / ``irecv`` between rank pairs ``(r, r + world/2)``
  (across the declared nodes when there are two), n = bytes one rank sends; fitted as
  Hockney's model where the sweep allows (:func:`_send_cost`).
* Compute, per dtype of ``compute_dtypes`` (float32 and bfloat16 by default), every rank at
  once (:func:`profile_compute`): ``gemm@<dtype>`` (square matmuls), ``expert_fwd@<dtype>``
  / ``expert_bwd@<dtype>`` (the SwiGLU expert FFN kernel ``moeflow.kernels.expert_ffn`` over
  two shape classes, n = forward FLOPs ``6 N D F``, ``meta["expert_experts"]`` experts per
  call), ``attention@<dtype>`` (SDPA forward,
  n = ``4 B H L^2 d`` FLOPs), ``elementwise@<dtype>`` (add), ``norm@<dtype>`` (RMS norm)
  and ``index@<dtype>`` (row gather), n = bytes of the input.
* Codec costs (ZipCCL's switch): ``zipccl_encode`` / ``zipccl_decode``, the collective
  codec's encode and decode of a Gaussian bf16 message (n = raw bytes), fitted the same way
  (:func:`profile_codec`) and stored as costs of the model.
* ``meta["overlap"]`` (:func:`overlap_probe`): how far an all-to-all progresses while the
  rank computes (1: separate resources, 0: the same cores carry both).
* Every cost carries its fit quality (R^2 and the largest relative residual) and its points;
  ``meta`` holds the measuring conditions (host, ranks, threads per rank, dtype, torch
  version, UTC date).
* Each point is timed and fitted by the one harness, :mod:`moeflow.perf.measure`: the median
  of ``trials`` means over ``reps`` back-to-back calls, the slowest rank's (a collective ends
  when its last rank ends), fitted by least squares on relative error (a planner splits work
  into chunks, so the small sizes' latency matters as much as the large sizes' rate).

``--op-costs`` (the CLI, :mod:`moeflow.cli.profile`) also measures, in this process with the
threads one rank gets, the per-operator costs ``moeflow bench --simulate`` prices a step with
(:func:`moeflow.apps.bench.predict.with_op_costs`: GEMMs by shape class and dtype, the
flash-attention and weight-gradient backward kernels, the element-wise, transcendental,
softmax, reduction, index, copy and view classes per dtype, the host costs per operator,
module call, autograd node and optimizer operator, and the inductor graph call of
``torch.compile``), each with its fit quality, into ``meta["bench_costs"]`` of the same file.

``--refit`` refits an existing model from durations measured at run time
(:meth:`moeflow.perf.PerfModel.update`) instead of profiling.

This module imports torch; ``moeflow.perf`` itself does not.
"""

from __future__ import annotations

import argparse
import os
import socket
import time
from collections.abc import Sequence
from functools import partial

import torch
import torch.distributed as dist

from moeflow.errors import ConfigError, DistributedConfigError, InputError
from moeflow.perf.cost import LinearCost, PerfModel
from moeflow.perf.measure import fit, time_ms
from moeflow.progress import Progress

# torch >= 2.13 renames the tensor variants; older torch only has the *_tensor names.
_ALL_GATHER = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
_REDUCE_SCATTER = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor

DEFAULT_SIZES = tuple(2**p for p in range(14, 23, 2))  # 16 KiB .. 4 MiB
DEFAULT_GEMM = (64, 128, 192, 256, 320, 384)
#: upper limits of the CLI flags, so a typo cannot allocate the machine away
MAX_KB = 2**20  # 1 GiB per collective buffer
MAX_GEMM = 8192  # three m x m matrices
MAX_POINTS = 64


def _profile_collectives(
    world_group,
    rank: int,
    world: int,
    nodes: int,
    sizes: Sequence[int],
    gemm_sizes: Sequence[int],
    reps: int,
    trials: int,
    progress: bool,
    dtype: torch.dtype,
    device: torch.device,
    compute_dtypes: Sequence[str] = ("float32", "bfloat16"),
    expert_rows: Sequence[int] = (),
) -> PerfModel:
    """Runs on every rank of ``world_group``; every rank returns the same fitted model."""
    if world % nodes:
        raise DistributedConfigError(f"--nodes {nodes} must divide the world size {world}")
    per_node = world // nodes
    esize = torch.empty((), dtype=dtype).element_size()
    levels: dict[str, object] = {}
    if nodes > 1 and per_node > 1:
        # every rank must create every group, in the same order
        intra = [
            dist.new_group(list(range(n * per_node, (n + 1) * per_node))) for n in range(nodes)
        ]
        inter = [dist.new_group([n * per_node + i for n in range(nodes)]) for i in range(per_node)]
        levels = {
            "a2a@intra": (intra[rank // per_node], per_node),
            "a2a@inter": (inter[rank % per_node], nodes),
        }
    kinds = ["a2a", "ag", "rs", "ar", *levels, *(["send"] if world % 2 == 0 else [])]
    bar = Progress(
        len(gemm_sizes)
        + len(kinds) * len(sizes)
        + len(compute_dtypes) * (COMPUTE_POINTS + len(EXPERT_SHAPES) * len(expert_rows)),
        "profile",
        enabled=progress and rank == 0,
    )
    samples: dict[str, tuple[list[float], list[float]]] = {}

    def record(key: str, n: float, t: float) -> None:
        xs, ys = samples.setdefault(key, ([], []))
        xs.append(n)
        ys.append(t)

    for m in gemm_sizes:
        a = torch.randn(m, m, dtype=dtype, device=device)
        b = torch.randn(m, m, dtype=dtype, device=device)
        record(
            "gemm",
            2.0 * m**3,
            time_ms(
                partial(torch.mm, a, b), reps=reps, trials=trials, group=world_group, device=device
            ),
        )
        bar.update(1, op=f"gemm {m}^3")
    for kind in kinds:
        if kind == "send":
            grp, p = world_group, 1
        else:
            grp, p = (world_group, world) if kind in ("a2a", "ag", "rs", "ar") else levels[kind]
        for nbytes in sizes:
            numel = max(p, (nbytes // esize) // p * p)
            x = torch.randn(numel, dtype=dtype, device=device)
            if kind.startswith("a2a"):
                out = torch.empty_like(x)
                fn = partial(dist.all_to_all_single, out, x, group=grp)
            elif kind == "ag":
                part = x[: numel // p].clone()
                fn = partial(_ALL_GATHER, x, part, group=grp)
            elif kind == "rs":
                out = torch.empty(numel // p, dtype=dtype, device=device)
                fn = partial(_REDUCE_SCATTER, out, x, group=grp)
            elif kind == "send":
                fn = partial(_exchange, x, torch.empty_like(x), (rank + world // 2) % world, rank)
            else:
                fn = partial(dist.all_reduce, x, group=grp)
            # level groups: time with the world barrier so all groups run at once
            record(
                kind,
                float(numel * esize),
                time_ms(fn, reps=reps, trials=trials, group=world_group, device=device),
            )
            bar.update(1, op=f"{kind} {numel * esize / 2**10:.0f} KiB")
    compute = profile_compute(
        compute_dtypes,
        group=world_group,
        device=device,
        reps=reps,
        trials=trials,
        bar=bar,
        expert_rows=expert_rows,
    )
    bar.close()
    codec = _codec_costs(sizes, reps, trials, world_group if device.type == "cpu" else None)
    probe = overlap_probe(world_group, max(sizes), dtype, device, reps, trials)
    costs = {
        k: fit(
            xs,
            ys,
            note=f"{'FLOPs' if k == 'gemm' else 'bytes'}, "
            f"{len(xs)} sizes, {dist.get_backend(world_group)}",
            relative=True,
            source="fitted",
        )
        for k, (xs, ys) in samples.items()
    }
    if "send" in samples:
        costs["send"] = _send_cost(*samples["send"], dist.get_backend(world_group))
    costs.update(compute)
    costs.update(codec)
    return PerfModel(
        name=f"profiled-{socket.gethostname()}-{world}r{nodes}n",
        costs=costs,
        bytes_per_element=esize,
        notes="fitted by moeflow profile",
        meta={
            "world_size": world,
            "nodes": nodes,
            "backend": dist.get_backend(world_group),
            "dtype": str(dtype).replace("torch.", ""),
            "device": str(device),
            "threads_per_rank": torch.get_num_threads(),
            "host": socket.gethostname(),
            "torch": torch.__version__,
            "compute_dtypes": list(compute_dtypes),
            "date": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
            "expert_experts": EXPERTS_PER_RANK if compute_dtypes else None,
            "expert_rows": sorted({*EXPERT_ROWS, *expert_rows}) if compute_dtypes else None,
            "overlap": probe["overlap"],
            "overlap_probe": probe,
        },
    )


def _send_cost(xs, ys, backend: str) -> LinearCost:
    """The point-to-point cost as Hockney's model is fitted, where the sweep has messages of
    256 KiB and more (two at least) and of 16 KiB and less: ``beta`` the least-squares slope
    over the large ones (what a byte costs once a shaped link's token bucket is drained, as
    in a step's stream of messages), ``alpha`` the median time of the small ones (which the
    bucket's burst passes at line rate, so their time is the per-message latency). Else the
    relative least-squares line of the other collectives.

    A relative fit over every size takes its slope from the small messages, and subtracting
    the drained rate from the small messages' times (``serve-bench``'s ``fit_link``) gave a
    latency of 0 across 100 Mbit/s (notes/REJECTED.md)."""
    import statistics

    note = f"bytes, {len(xs)} sizes, {backend}"
    big = [(n, t) for n, t in zip(xs, ys) if n >= 256 << 10]
    small = [t for n, t in zip(xs, ys) if n <= 16 << 10]
    if len(big) < 2 or not small:  # the sweep lacks the sizes: the line of the collectives
        return fit(xs, ys, note=note, relative=True, source="fitted")
    mx = statistics.fmean(n for n, _ in big)
    my = statistics.fmean(t for _, t in big)
    beta = sum((n - mx) * (t - my) for n, t in big) / sum((n - mx) ** 2 for n, _ in big)
    beta = max(beta, max(t / n for n, t in big) * 1e-3)  # never free or falling
    note += ", Hockney: slope >= 256 KiB, latency the median <= 16 KiB"
    return LinearCost(statistics.median(small), beta, source="fitted", note=note).with_points(
        xs, ys
    )


CODEC_DTYPE = "bfloat16"


def profile_codec(
    sizes: Sequence[int] = DEFAULT_SIZES,
    *,
    threads: int | None = 1,
    reps: int = 3,
    trials: int = 3,
    dtype: str = CODEC_DTYPE,
    group=None,
) -> dict:
    """Fit ``zipccl_encode`` and ``zipccl_decode`` (ms, n = raw bytes) of the collective
    codec (``moeflow.compress.collective``) on this process's CPU with ``threads`` threads:
    the costs ZipCCL's switch weighs against the bytes it saves. Each point is the median of
    ``trials`` means over ``reps`` calls (:func:`moeflow.perf.measure.time_ms`) on a Gaussian
    message of scale 0.02.

    With ``group``, every rank of it must call this, and each point is the slowest rank's
    time: every rank then fits the same costs, so the switch decides the same everywhere
    (collectives whose ranks decided differently would not pair up)."""
    from moeflow.compress import collective as codec

    g = torch.Generator().manual_seed(0)
    samples: dict[str, tuple[list[float], list[float]]] = {
        "zipccl_encode": ([], []),
        "zipccl_decode": ([], []),
    }
    tdtype = getattr(torch, dtype)
    esize = torch.empty((), dtype=tdtype).element_size()
    for nbytes in sizes:
        x = (torch.randn(max(1, nbytes // esize), generator=g) * 0.02).to(tdtype)
        msg = codec.encode(x, threads=threads)
        for key, fn in (
            ("zipccl_encode", partial(codec.encode, x, threads=threads)),
            ("zipccl_decode", partial(codec.decode, msg, threads=threads)),
        ):
            # the warm-up call also runs the JIT on the first size
            ms = time_ms(fn, reps=reps, trials=trials, group=group)
            samples[key][0].append(float(x.numel() * esize))
            samples[key][1].append(ms)
    out = {}
    for k, (xs, ys) in samples.items():
        note = f"bytes, {len(xs)} sizes, {dtype}, {threads} threads"
        out[k] = fit(xs, ys, note=note, relative=True, increasing=True)
    return out


def _codec_costs(sizes, reps: int, trials: int, group=None) -> dict:
    """``zipccl_encode`` / ``zipccl_decode`` costs (the slowest rank's of ``group``), or
    ``{}`` without numba."""
    try:
        return profile_codec(
            sizes, threads=torch.get_num_threads(), reps=reps, trials=trials, group=group
        )
    except ImportError:  # the compress extra is not installed: no codec costs
        return {}


def overlap_probe(group, nbytes: int, dtype, device, reps: int = 3, trials: int = 3) -> dict:
    """How far an all-to-all progresses while the rank computes: ``overlap = (t_c + t_a -
    t_both) / min(t_c, t_a)`` in [0, 1], with ``t_a`` an ``nbytes`` all-to-all alone, ``t_c``
    as many square matmuls as take about as long, and ``t_both`` the all-to-all issued
    asynchronously while the matmuls run. 1: link and compute are separate resources (a
    NIC and a GPU, a shaped wire); 0: the same cores carry both (gloo on loopback), so
    splitting work into chunks cannot hide one behind the other (FSMoE's planner reads it)."""
    esize = torch.empty((), dtype=dtype).element_size()
    world = dist.get_world_size(group)
    numel = max(world, (nbytes // esize) // world * world)
    x = torch.randn(numel, dtype=dtype, device=device)
    out = torch.empty_like(x)
    a = torch.randn(192, 192, dtype=dtype, device=device)
    timer = partial(time_ms, reps=reps, trials=trials, group=group, device=device)
    t_a = timer(partial(dist.all_to_all_single, out, x, group=group))
    t_mm = timer(partial(torch.mm, a, a))
    # the same count on every rank: the largest any rank needs
    k = torch.tensor([max(1, round(t_a / max(t_mm, 1e-6)))], dtype=torch.float64)
    dist.all_reduce(k, op=dist.ReduceOp.MAX, group=group)
    k = int(min(k.item(), 10_000))

    def compute():
        for _ in range(k):
            torch.mm(a, a)

    def both():
        work = dist.all_to_all_single(out, x, group=group, async_op=True)
        compute()
        work.wait()

    t_c, t_b = timer(compute), timer(both)
    eta = (t_c + t_a - t_b) / max(min(t_c, t_a), 1e-9)
    return {
        "overlap": max(0.0, min(1.0, eta)),
        "a2a_ms": t_a,
        "compute_ms": t_c,
        "both_ms": t_b,
        "bytes": numel * esize,
    }


def _exchange(x: torch.Tensor, out: torch.Tensor, peer: int, rank: int) -> None:
    """One point-to-point exchange with ``peer``: on CPU (gloo) a plain ``isend`` and
    ``irecv``, as the disaggregated runtime sends; elsewhere (NCCL, where two unpaired sends
    would wait on each other) one ``batch_isend_irecv``, the lower rank sending first. Gloo's
    batched path costs milliseconds per call (notes/REJECTED.md)."""
    if peer == rank:
        return
    if x.device.type == "cpu":
        works = [dist.isend(x, peer), dist.irecv(out, peer)]
        for w in works:
            w.wait()
        return
    ops = [dist.P2POp(dist.isend, x, peer), dist.P2POp(dist.irecv, out, peer)]
    for w in dist.batch_isend_irecv(ops if rank < peer else ops[::-1]):
        w.wait()


#: compute points per dtype (progress bar): 3 GEMMs + 6 expert shapes + 3 attention + 3 x 3 ops
COMPUTE_POINTS = 3 + 6 + 3 + 9
#: (D, F) shape classes of the expert FFN sweep, and its rows per rank
EXPERT_SHAPES = ((128, 256), (256, 512))
EXPERT_ROWS = (256, 1024, 2048)
EXPERTS_PER_RANK = 4


def profile_compute(
    dtypes: Sequence[str] = ("float32", "bfloat16"),
    *,
    group=None,
    device: torch.device | None = None,
    reps: int = 3,
    trials: int = 3,
    bar=None,
    expert_rows: Sequence[int] = (),
) -> dict[str, LinearCost]:
    """Fit the compute costs a planner or the simulator reads, per dtype (see the module
    docstring for keys and units). With ``group`` every rank of it must call this (they run
    at once, as in a step, and each point is the slowest rank's). ``expert_rows``: rows per
    rank timed in the expert sweep besides ``EXPERT_ROWS`` (a serving planner adds the few
    rows of a decode step, whose kernel start-up the default sweep only extrapolates)."""
    import torch.nn.functional as F

    from moeflow.kernels import expert_ffn

    device = device or torch.device("cpu")
    timer = partial(time_ms, reps=reps, trials=trials, group=group, device=device)
    gen = torch.Generator().manual_seed(0)

    def rand(*shape, dt, grad=False):
        t = torch.randn(*shape, generator=gen).to(device=device, dtype=dt)
        return t.requires_grad_(grad)

    out: dict[str, LinearCost] = {}
    for name in dtypes:
        dt = getattr(torch, name)
        esize = torch.empty((), dtype=dt).element_size()
        pts: dict[str, tuple[list[float], list[float]]] = {}

        def add(key, n, t, name=name, pts=pts):
            xs, ys = pts.setdefault(f"{key}@{name}", ([], []))
            xs.append(float(n))
            ys.append(t)
            if bar is not None:
                bar.update(1, op=f"{key}@{name}")

        for m in (128, 256, 384):
            a, b = rand(m, m, dt=dt), rand(m, m, dt=dt)
            add("gemm", 2.0 * m**3, timer(partial(torch.mm, a, b)))
        for D, Fh in EXPERT_SHAPES:
            E = EXPERTS_PER_RANK
            w_in, w_out = rand(E, 2 * Fh, D, dt=dt, grad=True), rand(E, D, Fh, dt=dt, grad=True)
            for N in sorted({*EXPERT_ROWS, *expert_rows}):
                x = rand(N, D, dt=dt, grad=True)
                c = torch.full((E,), N // E, dtype=torch.long)

                def fwd(x=x, c=c, w_in=w_in, w_out=w_out):
                    with torch.no_grad():
                        expert_ffn(x, c, w_in, w_out)

                def fwdbwd(x=x, c=c, w_in=w_in, w_out=w_out):
                    expert_ffn(x, c, w_in, w_out).float().sum().backward()

                flops = 6.0 * N * D * Fh
                tf = timer(fwd)
                add("expert_fwd", flops, tf)
                add("expert_bwd", flops, max(timer(fwdbwd) - tf, 0.0))
        for L in (128, 256, 512):
            q, k, v = (rand(1, 4, L, 64, dt=dt) for _ in range(3))
            add(
                "attention",
                4.0 * 4 * L * L * 64,
                timer(partial(F.scaled_dot_product_attention, q, k, v, is_causal=True)),
            )
        for numel in (2**14, 2**17, 2**20):
            x, y = rand(numel, dt=dt), rand(numel, dt=dt)
            add("elementwise", numel * esize, timer(partial(torch.add, x, y)))
            xr = x.view(-1, 256)
            wn = rand(256, dt=dt)
            add("norm", numel * esize, timer(partial(F.rms_norm, xr, (256,), wn)))
            idx = torch.randint(0, xr.shape[0], (xr.shape[0],), generator=gen).to(device)
            add("index", numel * esize, timer(partial(torch.index_select, xr, 0, idx)))
        for key, (xs, ys) in pts.items():
            unit = "bytes" if key.split("@")[0] in ("elementwise", "norm", "index") else "FLOPs"
            out[key] = fit(xs, ys, note=f"{unit}, {len(xs)} points", relative=True, source="fitted")
    return out


def _rank_profile(
    rank: int,
    world: int,
    nodes: int,
    sizes,
    gemm_sizes,
    reps,
    trials,
    progress,
    dtype_name,
    compute_dtypes=("float32", "bfloat16"),
    expert_rows=(),
) -> dict | None:
    """One forked rank (gloo group up): profile; rank 0 returns the model as a dict."""
    model = _profile_collectives(
        dist.group.WORLD,
        rank,
        world,
        nodes,
        sizes,
        gemm_sizes,
        reps,
        trials,
        progress,
        getattr(torch, dtype_name),
        torch.device("cpu"),
        compute_dtypes,
        expert_rows,
    )
    dist.barrier()
    return model.to_dict() if rank == 0 else None


def _under_torchrun() -> bool:
    return all(k in os.environ for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"))


def profile(
    group=None,
    *,
    nproc: int = 2,
    nodes: int = 1,
    sizes: Sequence[int] = DEFAULT_SIZES,
    gemm_sizes: Sequence[int] = DEFAULT_GEMM,
    reps: int = 3,
    trials: int = 3,
    progress: bool = True,
    dtype: str = "float32",
    threads_per_rank: int | None = None,
    force: bool = False,
    compute_dtypes: Sequence[str] = ("float32", "bfloat16"),
    expert_rows: Sequence[int] = (),
) -> PerfModel:
    """Profile and fit a :class:`PerfModel`.

    With ``torch.distributed`` initialised (or ``group`` given) the current group is profiled
    collectively (call it on every rank; all return the same model). Under torchrun without a
    group yet, one is initialised from the environment (NCCL with GPUs, else gloo). Otherwise
    ``nproc`` gloo ranks are forked on 127.0.0.1 by :func:`moeflow.launch.launch`
    (``force`` lifts its per-CPU cap on ``nproc``). ``expert_rows``: rows per rank added to
    the expert FFN sweep (:func:`profile_compute`; ``meta["expert_rows"]`` lists them all).
    """
    if group is None and not dist.is_initialized() and _under_torchrun():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group(backend)
    if group is not None or (dist.is_available() and dist.is_initialized()):
        grp = group or dist.group.WORLD
        device = (
            torch.device("cuda", torch.cuda.current_device())
            if dist.get_backend(grp) == "nccl"
            else torch.device("cpu")
        )
        return _profile_collectives(
            grp,
            dist.get_rank(grp),
            dist.get_world_size(grp),
            nodes,
            sizes,
            gemm_sizes,
            reps,
            trials,
            progress,
            getattr(torch, dtype),
            device,
            tuple(compute_dtypes),
            tuple(expert_rows),
        )
    from moeflow.launch import check_nproc, launch

    nproc = check_nproc(nproc, force=force)
    if nodes < 1 or nproc % nodes:
        raise DistributedConfigError(f"--nodes {nodes} must divide --nproc {nproc}")
    threads = threads_per_rank or max(1, (os.cpu_count() or 1) // nproc)
    res = launch(
        _rank_profile,
        nproc,
        nodes,
        tuple(sizes),
        tuple(gemm_sizes),
        reps,
        trials,
        progress,
        dtype,
        tuple(compute_dtypes),
        tuple(expert_rows),
        force=force,
        name="moeflow profile",
        threads=threads,
        progress=progress,
    )
    return PerfModel.from_dict(res[0])


# ---- CLI ----------------------------------------------------------------------------------
def add_profile_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--nproc",
        type=int,
        default=2,
        help="gloo ranks to spawn (ignored "
        "under torchrun); at most a few per CPU unless --force-nproc",
    )
    p.add_argument(
        "--force-nproc",
        action="store_true",
        help="allow more ranks than the per-CPU cap of --nproc",
    )
    p.add_argument(
        "--nodes",
        type=int,
        default=1,
        help="declare the ranks as this many nodes (adds a2a@intra / a2a@inter)",
    )
    p.add_argument(
        "--out",
        default="perf.json",
        help="where to write the PerfModel JSON (atomically; refused if it exists, unless --force)",
    )
    p.add_argument("--force", action="store_true", help="replace an existing --out file")
    p.add_argument("--min-kb", type=float, default=16, help="smallest collective size (KiB)")
    p.add_argument("--max-kb", type=float, default=4096, help="largest collective size (KiB)")
    p.add_argument("--points", type=int, default=5, help="collective sizes (log-spaced)")
    p.add_argument(
        "--gemm",
        type=int,
        nargs="+",
        default=list(DEFAULT_GEMM),
        help="square GEMM sizes m (n = 2 m^3 FLOPs)",
    )
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--trials", type=int, default=3)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument(
        "--op-costs",
        action="store_true",
        help="also measure the per-operator costs moeflow bench --simulate reads "
        "(meta['bench_costs']: GEMM shape classes, attention backward, element-wise classes "
        "per dtype, host overheads, compiled graph calls)",
    )
    p.add_argument(
        "--refit",
        metavar="SAMPLES",
        default=None,
        help="instead of profiling: refit --perf from measured durations, a JSON object "
        '{"<cost key>": [[n, t_ms], ...]} (PerfModel.update), and write --out',
    )
    p.add_argument("--perf", default=None, help="the PerfModel JSON that --refit updates")


def validate_profile_args(args) -> None:
    """Check every ``moeflow profile`` flag (and the output directory) before any rank starts;
    ConfigError / DistributedConfigError / InputError naming the flag."""
    from moeflow.validate import positive_float, positive_int

    args.nodes = positive_int("--nodes", args.nodes)
    if not _under_torchrun() and not dist.is_initialized():
        from moeflow.launch import check_nproc

        args.nproc = check_nproc(args.nproc, force=args.force_nproc)
        if args.nproc % args.nodes:
            raise DistributedConfigError(f"--nodes {args.nodes} must divide --nproc {args.nproc}")
    args.min_kb = positive_float("--min-kb", args.min_kb)
    args.max_kb = positive_float("--max-kb", args.max_kb)
    if args.max_kb > MAX_KB:
        raise ConfigError("--max-kb", args.max_kb, f"a finite number in (0, {MAX_KB}]")
    if args.min_kb > args.max_kb:
        raise ConfigError("--min-kb", args.min_kb, f"at most --max-kb ({args.max_kb:g})")
    args.points = positive_int("--points", args.points, maximum=MAX_POINTS)
    if args.points < 2:
        raise ConfigError(
            "--points", args.points, f"an int in [2, {MAX_POINTS}] (a line needs two sizes)"
        )
    args.gemm = [positive_int("--gemm", m, maximum=MAX_GEMM) for m in args.gemm]
    args.reps = positive_int("--reps", args.reps)
    args.trials = positive_int("--trials", args.trials)
    from moeflow.files import check_output

    check_output("--out", args.out, force=getattr(args, "force", False))


def log_sizes(min_bytes: float, max_bytes: float, points: int) -> list[int]:
    if points < 2:
        raise DistributedConfigError(f"--points {points} must be >= 2 to fit a line")
    ratio = (max_bytes / min_bytes) ** (1 / (points - 1))
    return sorted({int(min_bytes * ratio**i) for i in range(points)})


def format_table(model: PerfModel) -> str:
    lines = [
        f"{'primitive':<22} {'alpha (ms)':>11} {'beta (ms/unit)':>15} {'R^2':>7} "
        f"{'max rel':>8}  unit"
    ]
    for k, c in sorted(model.costs.items()):
        base = k.split("@")[0]
        unit = "FLOP" if base in ("gemm", "expert_fwd", "expert_bwd", "attention") else "byte"
        r2 = "-" if c.r2 is None else f"{c.r2:.4f}"
        rel = "-" if c.max_rel_err is None else f"{c.max_rel_err:.1%}"
        lines.append(f"{k:<22} {c.alpha:>11.4g} {c.beta:>15.4g} {r2:>7} {rel:>8}  {unit}")
    for k, d in sorted(model.meta.get("bench_costs", {}).items()):
        c = LinearCost.from_dict(d)
        r2 = "-" if c.r2 is None else f"{c.r2:.4f}"
        rel = "-" if c.max_rel_err is None else f"{c.max_rel_err:.1%}"
        lines.append(f"{k:<22} {c.alpha:>11.4g} {c.beta:>15.4g} {r2:>7} {rel:>8}  (bench)")
    return "\n".join(lines)


def refit_file(perf_path, samples_path):
    """``PerfModel.update`` of the model in ``perf_path`` with the samples in
    ``samples_path`` (``{"<cost key>": [[n, t_ms], ...]}``); InputError / ConfigError naming
    the file or the key."""
    from moeflow.plan.io import MAX_JSON_BYTES, load_perf_file
    from moeflow.validate import read_json_file

    perf = load_perf_file(perf_path)
    d = read_json_file(samples_path, "--refit", MAX_JSON_BYTES)
    if not isinstance(d, dict) or not all(
        isinstance(v, list) and all(isinstance(p, list) and len(p) == 2 for p in v)
        for v in d.values()
    ):
        raise InputError(
            f"--refit {str(samples_path)!r}: expected an object of cost key -> [[n, t_ms], ...]"
        )
    try:
        return perf.update({k: [(float(n), float(t)) for n, t in v] for k, v in d.items()})
    except (TypeError, ValueError) as e:
        if isinstance(e, (InputError, ConfigError)):
            raise
        raise InputError(f"--refit {str(samples_path)!r}: {e}") from None


def run_profile(args, extend=None) -> int:
    """``moeflow profile``. ``extend(model, args)``, when given, returns the profiled model
    with more costs before it is written (the CLI adds ``--op-costs`` this way)."""
    if getattr(args, "refit", None) is not None:
        if args.perf is None:
            raise ConfigError("--perf", None, "the PerfModel JSON that --refit updates")
        from moeflow.files import atomic_path, check_output

        check_output("--out", args.out, force=getattr(args, "force", False))
        model = refit_file(args.perf, args.refit)
        print(format_table(model))
        with atomic_path(args.out, force=getattr(args, "force", False)) as tmp:
            model.save(tmp)
        print(f"written to {args.out}")
        return 0
    validate_profile_args(args)
    sizes = log_sizes(args.min_kb * 1024, args.max_kb * 1024, args.points)
    owns_group = not dist.is_initialized() and _under_torchrun()
    model = profile(
        nproc=args.nproc,
        nodes=args.nodes,
        sizes=sizes,
        gemm_sizes=args.gemm,
        reps=args.reps,
        trials=args.trials,
        progress=not args.quiet,
        dtype=args.dtype,
        force=args.force_nproc,
    )
    if extend is not None and (not dist.is_initialized() or dist.get_rank() == 0):
        model = extend(model, args)
    if not dist.is_initialized() or dist.get_rank() == 0:
        print(format_table(model))
        from moeflow.files import atomic_path

        with atomic_path(args.out, force=getattr(args, "force", False)) as tmp:
            model.save(tmp)
        print(f"written to {args.out}")
    if owns_group:
        dist.destroy_process_group()
    return 0


add_arguments = add_profile_arguments
run = run_profile
