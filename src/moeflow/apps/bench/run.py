"""Run the settings of one ``moeflow bench`` invocation and assemble its report.

:func:`settings_grid` picks the settings (one factor at a time from the first value of each,
or the full grid); :func:`bench` runs them on fresh workloads (same seed, so the same weights
and batch), each dissected (:mod:`moeflow.apps.bench.dissect`), counted
(:mod:`moeflow.apps.bench.flops`) and, given a PerfModel, predicted
(:mod:`moeflow.apps.bench.predict`); the result is a
``moeflow.bench/1`` report (:mod:`moeflow.apps.bench.report`).
"""

from __future__ import annotations

import itertools
import platform
import socket
from dataclasses import dataclass, field
from functools import partial

import torch

from moeflow.apps.bench.dissect import StepDissection, dissect
from moeflow.apps.bench.flops import active_params, count_flops, mfu, step_flops
from moeflow.apps.bench.report import FORMAT
from moeflow.apps.bench.workloads import (
    Setting,
    Shape,
    Workload,
    build_workload,
    model_dims,
    moe_layers,
)
from moeflow.errors import ConfigError, MoeflowError
from moeflow.progress import Progress
from moeflow.validate import positive_int

PEAK_GEMM = 1024


def settings_grid(
    kernels=("grouped_mm",),
    dtypes=("float32",),
    recompute=(False,),
    compile_=(False,),
    *,
    finetune=("full",),
    zero3=(False,),
    quant=("none",),
    sdpa=("default",),
    full: bool = False,
    mode: str = "train",
) -> list[Setting]:
    """The settings to compare. One factor at a time (default): the first value of every
    factor, then each other value of one factor with the others at their first. ``full``:
    every combination. Factors a mode has no use for are dropped: recomputation, LoRA and
    ZeRO-3 for decode (there is no backward), weight-only int8 for train."""
    if mode == "decode":
        recompute, finetune, zero3 = (False,), ("full",), (False,)
    else:
        quant = ("none",)
    factors = [
        list(dict.fromkeys(f))
        for f in (kernels, dtypes, recompute, compile_, finetune, zero3, quant, sdpa)
    ]
    if full:
        combos = list(itertools.product(*factors))
    else:
        base = [f[0] for f in factors]
        combos = [tuple(base)]
        for i, f in enumerate(factors):
            for v in f[1:]:
                c = list(base)
                c[i] = v
                combos.append(tuple(c))
    names = ("kernel", "dtype", "recompute", "compile", "finetune", "zero3", "quant", "sdpa")
    return [Setting(**dict(zip(names, c))) for c in combos]


def measure_peak(dtype: str = "float32", m: int = PEAK_GEMM, reps: int = 5) -> float:
    """FLOP/s of an ``m x m`` GEMM on this process (the median of ``reps`` calls, by the one
    harness :func:`moeflow.perf.measure.time_ms`): the stated peak when none is given."""
    from moeflow.perf.measure import time_ms

    td = getattr(torch, dtype)
    a = torch.randn(m, m).to(td)
    b = torch.randn(m, m).to(td)
    return 2.0 * m**3 / (time_ms(partial(torch.mm, a, b), trials=reps) / 1e3)


@dataclass
class BenchJob:
    """What to run: model, mode, shape, settings and how many steps."""

    kind: str = "demo"
    mode: str = "train"
    shape: Shape = field(default_factory=Shape)
    settings: list = field(default_factory=lambda: [Setting()])
    warmup: int = 2
    steps: int = 3
    unprofiled: int = 3
    seed: int = 0
    path: str | None = None
    dims: dict | None = None
    peak_flops: dict | None = None  # dtype -> FLOP/s; None: measured
    perf: object = None  # a PerfModel: adds the simulator's prediction
    count: bool = True  # FlopCounterMode check of every eager setting
    nproc: int = 1
    r: int = 2
    trace_dir: str | None = None
    progress: bool = True

    def __post_init__(self) -> None:
        self.warmup = positive_int("warmup", self.warmup)
        self.steps = positive_int("steps", self.steps)
        self.unprofiled = positive_int("unprofiled", self.unprofiled)
        self.nproc = positive_int("nproc", self.nproc)
        self.r = positive_int("r", self.r)


def _routed(w: Workload) -> list[int]:
    out = []
    for m in moe_layers(w.model):
        layer = getattr(m, "layer", m)
        out.append(int(layer.last_counts_E.sum()))
    return out


def _counted_flops(w: Workload) -> int:
    """FlopCounterMode over one more step (weights move on, the shapes do not)."""
    from moeflow.apps.bench.dissect import run_step

    w.before_step()
    total, _ = count_flops(lambda: run_step(w))
    return total


def _setting_result(
    job: BenchJob, w: Workload, d: StepDissection, peak: float, counted: int | None, ep: dict | None
) -> dict:
    dims = model_dims(w)
    B, L = job.shape.batch, job.shape.seq_len
    q_len = 1 if (job.mode == "decode" and job.kind != "demo") else L
    kv_len = L + 1 if q_len == 1 else L
    fl = step_flops(
        dims,
        batch=B,
        q_len=q_len,
        kv_len=kv_len,
        train=job.mode == "train",
        routed_per_layer=_routed(w) if job.nproc == 1 else None,
        recompute=w.setting.recompute,
    )
    total, active = active_params(w.model)
    tokens = B * q_len
    n6 = (6 if job.mode == "train" else 2) * active * tokens
    step = d.unprofiled_ms
    res = {
        "setting": w.setting.to_dict(),
        "status": "ok",
        "error": None,
        "step_ms": step,
        "profiled_step_ms": d.step_ms,
        "wall_ms": d.wall_ms,
        "step_ms_each": d.step_ms_each,
        "breakdown": [{"phase": p, "row": r, "ms": v} for (p, r), v in sorted(d.rows.items())],
        "operators": [
            {"phase": p, "row": r, "op": o, "ms": v[0], "calls": v[1]}
            for (p, r, o), v in sorted(d.ops.items(), key=lambda kv: -kv[1][0])
        ],
        "flops": {
            "model": int(fl["total"]),
            "hardware": int(fl["hardware_total"]),
            "counted": counted,
            "forward": fl["forward"],
            "backward": fl.get("backward", {}),
        },
        "tokens_per_s": tokens / (step * 1e-3) if step > 0 else 0.0,
        "peak_flops": peak,
        "mfu": mfu(fl["total"], step, peak) if step > 0 else 0.0,
        "mfu_6n": mfu(n6, step, peak) if step > 0 else 0.0,
        "prediction": None,
        "ep": ep,
    }
    if job.perf is not None:
        # compiled steps too: their inventory lists each inductor graph call (dissect)
        if w.setting.matrix:
            from moeflow.apps.bench.predict_matrix import compare_matrix

            res["prediction"] = compare_matrix(d, job.perf, w.setting, w.units, w.kind)
        else:
            from moeflow.apps.bench.predict import compare

            res["prediction"] = compare(d, job.perf, w.setting.dtype)
    return res


def _failed(setting: Setting, exc: BaseException) -> dict:
    text = " ".join(str(exc).split())[:300] or type(exc).__name__
    return {
        "setting": setting.to_dict(),
        "status": "failed",
        "error": f"{type(exc).__name__}: {text}",
        "breakdown": [],
        "operators": [],
        "flops": {},
        "prediction": None,
        "ep": None,
    }


def _run_single(job: BenchJob, setting: Setting, peak: float, tick) -> tuple[dict, Workload]:
    w = build_workload(
        job.kind, job.mode, setting, job.shape, seed=job.seed, path=job.path, dims=job.dims
    )
    try:
        d = dissect(
            w,
            warmup=job.warmup,
            steps=job.steps,
            unprofiled=job.unprofiled,
            on_step=tick,
            keep_trace=job.trace_dir is not None,
        )
        counted = _counted_flops(w) if (job.count and not setting.compile) else None
    finally:
        if setting.zero3:
            from moeflow.apps.bench.matrix import release_group

            release_group()
    res = _setting_result(job, w, d, peak, counted, None)
    if job.trace_dir is not None:
        from moeflow.apps.bench.report import write_trace

        write_trace(d.trace, _trace_dir(job, setting), 0, 1, "none")
    return res, w


def _trace_dir(job: BenchJob, setting: Setting) -> str:
    import os

    return os.path.join(job.trace_dir, f"{job.mode}_{setting.label.replace('/', '_')}")


def under_torchrun() -> bool:
    """Started by torchrun (or any launcher that sets the env:// variables), e.g. one rank per
    node of a cluster."""
    import os

    return all(k in os.environ for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"))


def _ep_in_group(spec: dict, job: BenchJob) -> list | None:
    """This rank's part of an env:// job; rank 0 gets every rank's result, others None."""
    import datetime

    import torch.distributed as dist

    from moeflow.apps.bench.ep import ep_rank
    from moeflow.errors import DistributedConfigError

    if not dist.is_initialized():
        dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=300))
    world, rank = dist.get_world_size(), dist.get_rank()
    if world != job.nproc:
        raise DistributedConfigError(
            f"--nproc {job.nproc} does not match the launcher's WORLD_SIZE={world}"
        )
    res = ep_rank(rank, world, spec)
    gathered = [None] * world if rank == 0 else None
    dist.gather_object(res, gathered, dst=0)
    return gathered if rank == 0 else None


def _run_ep(job: BenchJob, setting: Setting, peak: float) -> tuple[dict, Workload]:
    from moeflow.apps.bench.ep import ep_rank, summarize
    from moeflow.launch import launch

    spec = {
        "kind": job.kind,
        "mode": job.mode,
        "setting": setting,
        "shape": job.shape,
        "seed": job.seed,
        "path": job.path,
        "dims": job.dims,
        "r": job.r,
        "warmup": job.warmup,
        "steps": job.steps,
        "unprofiled": job.unprofiled,
        "trace": job.trace_dir is not None,
    }
    if under_torchrun():
        results = _ep_in_group(spec, job)
        if results is None:
            return None, None  # not rank 0: rank 0 reports
    else:
        threads = max(1, torch.get_num_threads() // job.nproc)
        results = launch(
            ep_rank, job.nproc, spec, name="moeflow bench", threads=threads, progress=job.progress
        )
    ep = summarize(results, job.r)
    d = results[0]["dissection"]
    w = build_workload(
        job.kind, job.mode, setting, job.shape, seed=job.seed, path=job.path, dims=job.dims
    )
    perf, job.perf = job.perf, None  # the single-process prediction does not apply
    try:
        res = _setting_result(job, w, d, peak, None, ep)
    finally:
        job.perf = perf
    if perf is not None:
        from moeflow.apps.bench.predict import compare_ep

        res["prediction"] = compare_ep(d, perf, setting.dtype, job.r)
    if job.trace_dir is not None:
        from moeflow.apps.bench.report import write_trace

        for r in results:
            write_trace(
                r["dissection"].trace, _trace_dir(job, setting), r["rank"], job.nproc, "gloo"
            )
    return res, w


def bench(job: BenchJob) -> dict | None:
    """Run every setting of ``job``; return the ``moeflow.bench/1`` report (None on the
    non-zero ranks of a job started by torchrun: rank 0 reports)."""
    if job.nproc > 1:
        for s in job.settings:
            if s.matrix:
                raise ConfigError(
                    "setting", s.label, "no LoRA, ZeRO-3, int8 or SDPA factor with nproc > 1"
                )
    peaks = dict(job.peak_flops or {})
    source = "stated"
    threads = torch.get_num_threads()
    per_rank = max(1, threads // job.nproc)
    if not job.peak_flops:
        source = f"measured: best {PEAK_GEMM}^3 torch.mm per dtype, {per_rank} threads" + (
            f", x {job.nproc} ranks" if job.nproc > 1 else ""
        )
        torch.set_num_threads(per_rank)  # what each rank runs with
        try:
            for s in job.settings:
                if s.dtype not in peaks:
                    peaks[s.dtype] = measure_peak(s.dtype) * job.nproc
        finally:
            torch.set_num_threads(threads)
    per_step = job.warmup + job.unprofiled + job.steps + 1
    results, last = [], None
    with Progress(
        len(job.settings) * per_step if job.nproc == 1 else len(job.settings),
        f"bench {job.mode}",
        enabled=job.progress,
    ) as bar:
        for s in job.settings:
            bar.update(0, setting=s.label)
            try:
                if job.nproc == 1:
                    res, last = _run_single(job, s, peaks[s.dtype], lambda: bar.update(1))
                else:
                    res, last = _run_ep(job, s, peaks[s.dtype])
                    bar.update(1)
                    if res is None:  # a non-zero rank of an env:// job
                        continue
            except MoeflowError:
                raise
            except Exception as exc:  # a setting that does not build (compile) fails alone
                res = _failed(s, exc)
            results.append(res)
    if job.nproc > 1 and under_torchrun():
        import torch.distributed as dist

        if dist.get_rank() != 0:
            return None
    if last is None:
        last = build_workload(
            job.kind,
            job.mode,
            job.settings[0],
            job.shape,
            seed=job.seed,
            path=job.path,
            dims=job.dims,
        )
    total, active = active_params(last.model)
    dims = model_dims(last)
    dims = {k: (v.to_dict() if hasattr(v, "to_dict") else v) for k, v in dims.items()}
    return {
        "format": FORMAT,
        "mode": job.mode,
        "model": {
            "kind": job.kind,
            "path": job.path,
            "params_total": total,
            "params_active": active,
            "dims": dims,
        },
        "shape": {"batch": job.shape.batch, "seq_len": job.shape.seq_len, "tokens": last.tokens},
        "machine": {
            "host": socket.gethostname(),
            "cpu": platform.processor() or platform.machine(),
            "threads": torch.get_num_threads(),
            "torch": torch.__version__,
        },
        "peak_flops": peaks[job.settings[0].dtype],
        "peak_source": source,
        "steps": {"warmup": job.warmup, "profiled": job.steps, "unprofiled": job.unprofiled},
        "nproc": job.nproc,
        "r": job.r,
        "perf_model": job.perf.to_dict() if job.perf is not None else None,
        "settings": results,
    }
