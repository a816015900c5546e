"""``moeflow bench train|decode``: dissect an MoE training or decode step.

    moeflow bench train --kernel grouped_mm bmm loop --dtype float32 bfloat16 \\
        --recompute off on --compile off on --json out.json --png out.png
    moeflow bench decode --model decoder
    moeflow bench train --model hf --path ./tiny-qwen3-moe
    moeflow bench train --nproc 2 --r 2          # expert parallel over 2 gloo ranks
    moeflow bench train --finetune full lora --zero3 off on --sdpa default math
    moeflow bench decode --quant none int8       # weight-only int8 (torchao)

Every flag is checked before any model is built; typed errors name the flag.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from moeflow.errors import ConfigError, InputError
from moeflow.files import atomic_path, check_output
from moeflow.validate import positive_float, positive_int

_ONOFF = {"off": False, "on": True}
#: upper limits of the size flags, so a typo cannot allocate the machine away
MAX = {
    "--batch-size": 4096,
    "--seq-len": 65536,
    "--dim": 16384,
    "--layers": 256,
    "--experts": 1024,
    "--top-k": 1024,
    "--ffn": 65536,
    "--warmup": 1000,
    "--steps": 1000,
    "--unprofiled": 1000,
    "--r": 64,
}


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--model",
        default="demo",
        choices=["demo", "decoder", "hf"],
        help="demo: moeflow demo's LM; decoder: moeflow.models.MoEDecoder (fresh, "
        "or --path a transformers checkpoint); hf: a transformers model "
        "directory (--path) patched by moeflow.patch_model",
    )
    p.add_argument("--path", default=None, help="model directory for --model decoder / hf")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument(
        "--seq-len",
        type=int,
        default=128,
        help="tokens per sequence (decode: the context before the new token)",
    )
    p.add_argument("--dim", type=int, default=None, help="demo/decoder hidden size")
    p.add_argument("--layers", type=int, default=None)
    p.add_argument("--experts", type=int, default=None)
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--ffn", type=int, default=None, help="expert FFN width")
    p.add_argument(
        "--kernel",
        nargs="+",
        default=["grouped_mm"],
        help="expert kernels to compare: grouped_mm bmm loop",
    )
    p.add_argument(
        "--dtype", nargs="+", default=["float32"], help="dtypes to compare: float32 bfloat16"
    )
    p.add_argument(
        "--recompute",
        nargs="+",
        default=["off"],
        help="activation recomputation: off on (train only)",
    )
    p.add_argument("--compile", nargs="+", default=["off"], help="torch.compile: off on")
    p.add_argument(
        "--finetune",
        nargs="+",
        default=["full"],
        help="full: every parameter trains; lora: peft LoRA adapters on the attention "
        "projections, the rest frozen (train only; moeflow[bench])",
    )
    p.add_argument(
        "--zero3",
        nargs="+",
        default=["off"],
        help="ZeRO-3 through FSDP2 fully_shard per block, on a world of one process: off on "
        "(train only)",
    )
    p.add_argument(
        "--quant",
        nargs="+",
        default=["none"],
        help="none; int8: torchao weight-only int8 of the Linears outside the MoE layers "
        "(decode only; moeflow[bench])",
    )
    p.add_argument(
        "--sdpa",
        nargs="+",
        default=["default"],
        help="SDPA back-end forced by sdpa_kernel: default math flash efficient cudnn "
        "(one this build cannot run on CPU is refused)",
    )
    p.add_argument(
        "--full-grid", action="store_true", help="every combination (default: one factor at a time)"
    )
    p.add_argument("--warmup", type=int, default=2, help="untimed steps per setting")
    p.add_argument("--steps", type=int, default=3, help="profiled steps averaged")
    p.add_argument(
        "--unprofiled",
        type=int,
        default=3,
        help="plain timed steps (their median is the step time)",
    )
    p.add_argument(
        "--nproc", type=int, default=1, help="expert parallelism over this many forked gloo ranks"
    )
    p.add_argument("--r", type=int, default=2, help="pipeline degree with --nproc")
    p.add_argument(
        "--peak-tflops",
        type=float,
        default=None,
        help="peak for MFU (default: measured 1024^3 GEMM per dtype)",
    )
    p.add_argument(
        "--perf",
        default=None,
        help="a PerfModel JSON (moeflow profile, or --profile-out); operator-class "
        "costs are profiled here when it has none",
    )
    p.add_argument(
        "--simulate",
        action="store_true",
        help="profile this machine (moeflow.perf.profile) and add the simulator's "
        "prediction of every setting",
    )
    p.add_argument("--profile-out", default=None, help="save the profiled PerfModel here")
    p.add_argument("--no-count", action="store_true", help="skip the FlopCounterMode check")
    p.add_argument("--json", default=None, help="write the moeflow.bench/1 report here")
    p.add_argument("--png", default=None, help="write the stacked-bar chart here")
    p.add_argument(
        "--trace-dir",
        default=None,
        help="write Chrome traces (one file per rank, HTA layout) under here",
    )
    p.add_argument(
        "--force",
        action="store_true",
        help="replace existing --json/--png/--profile-out files and write into an existing "
        "--trace-dir (never over an input); outputs are written atomically",
    )
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: leave as is)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def add_bench_arguments(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="bench_mode", metavar="MODE")
    for mode, help_ in (
        ("train", "dissect a training step (forward, backward, optimizer)"),
        ("decode", "dissect a decode step (one new token per sequence)"),
    ):
        _common(sub.add_parser(mode, help=help_, description=help_))


def _onoff(flag: str, values) -> list[bool]:
    out = []
    for v in values:
        if v not in _ONOFF:
            raise ConfigError(flag, v, "off or on")
        out.append(_ONOFF[v])
    return out


def _check_moe_config(path: str) -> None:
    """ConfigError naming ``--path`` when its ``config.json`` names no experts (a dense
    model); an unreadable file is left to the loader, which names it."""
    try:
        with open(os.path.join(path, "config.json"), "rb") as f:
            cfg = json.loads(f.read().decode("utf-8"))
    except (OSError, ValueError):
        return
    if not isinstance(cfg, dict):
        return
    keys = ("num_experts", "num_local_experts", "n_routed_experts")

    def names_experts(d) -> bool:  # also in a nested text_config (vision-language models)
        if any(isinstance(d.get(k), int) and d[k] > 0 for k in keys):
            return True
        return any(isinstance(v, dict) and names_experts(v) for v in d.values())

    if not names_experts(cfg):
        raise ConfigError(
            "--path", path, "a mixture-of-experts model (its config.json names no experts)"
        )


def build_job(args):
    """Validate every flag; return a :class:`moeflow.apps.bench.run.BenchJob`."""
    from moeflow.apps.bench.run import BenchJob, settings_grid
    from moeflow.apps.bench.workloads import BENCH_KERNELS, DTYPES, Shape

    if getattr(args, "bench_mode", None) not in ("train", "decode"):
        raise InputError("moeflow bench needs a mode: train or decode")
    for k in args.kernel:
        if k not in BENCH_KERNELS:
            raise ConfigError("--kernel", k, f"one of {BENCH_KERNELS}")
    for d in args.dtype:
        if d not in DTYPES:
            raise ConfigError("--dtype", d, f"one of {DTYPES}")
    rc = _onoff("--recompute", args.recompute)
    cp = _onoff("--compile", args.compile)
    z3 = _onoff("--zero3", args.zero3)
    from moeflow.apps.bench.matrix import FINETUNES, QUANTS, check_sdpa

    for flag, values, allowed in (
        ("--finetune", args.finetune, FINETUNES),
        ("--quant", args.quant, QUANTS),
    ):
        for v in values:
            if v not in allowed:
                raise ConfigError(flag, v, f"one of {allowed}")
    for b in args.sdpa:
        for d in args.dtype:
            check_sdpa(b, d, "--sdpa")
    if args.bench_mode == "decode":
        if "lora" in args.finetune:
            raise ConfigError("--finetune", "lora", "full in decode (LoRA trains)")
        if True in z3:
            raise ConfigError("--zero3", "on", "off in decode (ZeRO-3 shards training state)")
    elif "int8" in args.quant:
        raise ConfigError("--quant", "int8", "none in train (weight-only int8 serves)")
    shape = Shape(
        batch=positive_int("--batch-size", args.batch_size, maximum=MAX["--batch-size"]),
        seq_len=positive_int("--seq-len", args.seq_len, maximum=MAX["--seq-len"]),
    )
    dims = {}
    for flag, key in (
        ("--dim", "dim"),
        ("--layers", "num_layers"),
        ("--experts", "num_experts"),
        ("--top-k", "top_k"),
        ("--ffn", "ffn_hidden_size"),
    ):
        v = getattr(args, flag[2:].replace("-", "_"))
        if v is not None:
            if args.model == "hf" or (args.model == "decoder" and args.path):
                raise ConfigError(
                    flag, v, "not given with a model directory (its config sets the shape)"
                )
            dims[key] = positive_int(flag, v, maximum=MAX[flag])
    if args.model == "hf" and not args.path:
        raise InputError("--model hf needs --path, a transformers model directory")
    if args.model == "hf":
        _check_moe_config(args.path)
    if args.path and args.model == "demo":
        raise ConfigError("--path", args.path, "only with --model decoder or hf")
    if args.path and args.model == "decoder":  # checked here, not once per setting
        from moeflow.checkpoint.pretrained import check_pretrained

        check_pretrained(args.path)
    elif args.path:
        from moeflow.parallel.parallelize import check_hf_checkpoint

        check_hf_checkpoint(args.path, "--path")
    nproc = positive_int("--nproc", args.nproc)
    if nproc > 1:
        from moeflow.launch import check_nproc

        nproc = check_nproc(nproc)
        if shape.batch % nproc:
            raise ConfigError("--batch-size", shape.batch, f"a multiple of --nproc={nproc}")
        for flag, values, default in (
            ("--finetune", args.finetune, ["full"]),
            ("--zero3", args.zero3, ["off"]),
            ("--quant", args.quant, ["none"]),
            ("--sdpa", args.sdpa, ["default"]),
        ):
            if list(values) != default:
                raise ConfigError(flag, " ".join(values), f"{default[0]} with --nproc > 1")
    force = getattr(args, "force", False)
    inputs = [args.path, args.perf]
    for flag in ("--json", "--png", "--profile-out"):
        check_output(flag, getattr(args, flag[2:].replace("-", "_")), inputs=inputs, force=force)
    check_output("--trace-dir", args.trace_dir, inputs=inputs, force=force, directory=True)
    if args.threads:
        positive_int("--threads", args.threads)
    peak = None
    if args.peak_tflops is not None:
        t = positive_float("--peak-tflops", args.peak_tflops) * 1e12
        peak = {d: t for d in args.dtype}
    perf = None
    if args.perf:
        from moeflow.perf import PerfModel

        try:
            perf = PerfModel.load(args.perf)
        except (ConfigError, InputError):
            raise
        except (KeyError, ValueError) as e:  # not JSON, or a field missing
            raise InputError(f"--perf {args.perf!r} is not a moeflow perf model: {e}") from e
    return BenchJob(
        kind=args.model,
        mode=args.bench_mode,
        shape=shape,
        settings=settings_grid(
            args.kernel,
            args.dtype,
            rc,
            cp,
            finetune=args.finetune,
            zero3=z3,
            quant=args.quant,
            sdpa=args.sdpa,
            full=args.full_grid,
            mode=args.bench_mode,
        ),
        warmup=positive_int("--warmup", args.warmup, maximum=MAX["--warmup"]),
        steps=positive_int("--steps", args.steps, maximum=MAX["--steps"]),
        unprofiled=positive_int("--unprofiled", args.unprofiled, maximum=MAX["--unprofiled"]),
        seed=args.seed,
        path=args.path,
        dims=dims or None,
        peak_flops=peak,
        perf=perf,
        count=not args.no_count,
        nproc=nproc,
        r=positive_int("--r", args.r, maximum=MAX["--r"]),
        trace_dir=args.trace_dir,
        progress=not args.quiet,
    )


def run_bench(args) -> int:
    import torch

    job = build_job(args)
    if args.threads:
        torch.set_num_threads(args.threads)
    if job.perf is not None and "bench_costs" not in job.perf.meta:
        from moeflow.apps.bench.predict import with_op_costs

        job.perf = with_op_costs(
            job.perf,
            tuple(dict.fromkeys(s.dtype for s in job.settings)),
            nproc=job.nproc,
            compiled=any(s.compile for s in job.settings),
        )
    elif job.perf is not None and any(s.compile for s in job.settings):
        table = job.perf.meta["bench_costs"]
        if "compiled_call" not in table:  # a model profiled without compiled settings
            from dataclasses import replace

            from moeflow.apps.bench.predict import profile_compiled_call

            fwd, bwd = profile_compiled_call()
            table = {**table, "compiled_call": fwd.to_dict(), "compiled_call_bwd": bwd.to_dict()}
            job.perf = replace(job.perf, meta={**job.perf.meta, "bench_costs": table})
    if args.simulate and job.perf is None:
        from moeflow.apps.bench.predict import profile_machine

        job.perf = profile_machine(
            tuple(dict.fromkeys(s.dtype for s in job.settings)),
            nproc=job.nproc,
            progress=not args.quiet,
            compiled=any(s.compile for s in job.settings),
        )
        if args.profile_out:
            with atomic_path(args.profile_out, force=args.force) as tmp:
                job.perf.save(tmp)
    if job.perf is not None and any(s.matrix for s in job.settings):
        # LoRA, ZeRO-3, int8 and SDPA settings: their fits and unit costs, calibrated here
        from moeflow.apps.bench.predict_matrix import with_matrix_costs

        job.perf = with_matrix_costs(job.perf, job.settings, job.mode, job.kind)
    from moeflow.apps.bench.report import format_table, write_json, write_png
    from moeflow.apps.bench.run import bench

    report = bench(job)
    if report is None:  # a non-zero rank under torchrun
        return 0
    print(format_table(report))
    if args.json:
        with atomic_path(args.json, force=args.force) as tmp:
            write_json(report, tmp)
        print(f"report written to {args.json}")
    if args.png:
        with atomic_path(args.png, force=args.force) as tmp:
            write_png(report, tmp)
        print(f"chart written to {args.png}")
    return 0 if any(s["status"] == "ok" for s in report["settings"]) else 1


add_arguments = add_bench_arguments
run = run_bench


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="moeflow bench")
    add_bench_arguments(p)
    return run_bench(p.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
