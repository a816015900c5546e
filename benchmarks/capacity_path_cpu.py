"""The ``capacity`` dispatcher's padded-slot path against ``a2a`` on 2 gloo ranks (CPU).

Like-for-like setting of the expert-parallel peer comparison: 2 forked gloo ranks, one
thread each, T = 2048 tokens per rank, D = 256, F = 1024, E = 8, top-2, capacity factor
1.25, GELU experts, fp32; one step = forward + backward of one ``ExpertParallel`` layer.
Arms, interleaved (the order alternates every repeat; the machine is shared):

* ``capacity`` - ``dispatcher="capacity"`` (GShard fixed slots, padded on the wire; the
  experts compute only the filled slots);
* ``a2a``      - ``dispatcher="a2a"`` at the same capacity factor (the router drops the same
  rows; only real rows travel and are computed).

Each repeat times ``--steps`` steps per arm; a step's time is the max over the ranks. The
record gives median and spread (min-max) of the per-repeat mean step time, wall and process
CPU time (the latter less inflated by other jobs on a shared machine). The peers
(DeepSpeed-MoE, Tutel) live in their own environment and are measured side by side with
``capacity`` by ``peers_ep.py``.

    python benchmarks/capacity_path_cpu.py [--repeats 7 --steps 3]
writes benchmarks/results/capacity_path_cpu_<hardware>_<date>.md and .json.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import time

import torch
import torch.distributed as dist
from _common import cpu_name  # noqa: E402  (benchmarks/ is on sys.path)

ARMS = ("capacity", "a2a")


def _rank(rank, world, args):
    from moeflow import MoEConfig, MoELayer
    from moeflow.parallel import ExpertParallel

    cfg = MoEConfig(
        hidden_size=args.dim,
        ffn_hidden_size=args.ffn,
        num_experts=args.experts,
        top_k=args.top_k,
        router="softmax_topk",
        expert_type="gelu",
        capacity_factor=args.capacity_factor,
    )
    models = {}
    for arm in ARMS:
        torch.manual_seed(0)  # every rank and arm the same layer
        disp = "a2a" if arm == "a2a" else "capacity"
        models[arm] = ExpertParallel(
            MoELayer(cfg), dispatcher=disp, r_fwd=args.r, r_bwd=args.r, timeout_s=600
        )
    torch.manual_seed(1 + rank)
    x = torch.randn(args.tokens, args.dim)

    def step(arm):
        m = models[arm]
        m.zero_grad(set_to_none=True)
        xi = x.clone().requires_grad_(True)
        y = m(xi)
        y.square().mean().backward()
        return y.detach(), xi.grad

    for arm in ARMS:  # warm-up
        step(arm)
    times = {arm: [] for arm in ARMS}
    cpu = {arm: [] for arm in ARMS}
    for rep in range(args.repeats):
        order = ARMS if rep % 2 == 0 else ARMS[::-1]
        for arm in order:
            dist.barrier()
            t0, c0 = time.perf_counter(), time.process_time()
            for _ in range(args.steps):
                step(arm)
            dt = torch.tensor([time.perf_counter() - t0, time.process_time() - c0]) / args.steps
            dist.all_reduce(dt, op=dist.ReduceOp.MAX)
            times[arm].append(float(dt[0]))
            cpu[arm].append(float(dt[1]))
    return times, cpu


def _git(*a):
    try:
        return subprocess.check_output(["git", *a], text=True).strip()
    except (OSError, subprocess.CalledProcessError):
        return "?"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=2048)
    ap.add_argument("--dim", type=int, default=256)
    ap.add_argument("--ffn", type=int, default=1024)
    ap.add_argument("--experts", type=int, default=8)
    ap.add_argument("--top-k", type=int, default=2)
    ap.add_argument("--capacity-factor", type=float, default=1.25)
    ap.add_argument("--r", type=int, default=1, help="pipeline degree (forward and backward)")
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--hardware", default="2cpu-x86")
    ap.add_argument("--out", default="benchmarks/results")
    args = ap.parse_args(argv)
    from moeflow.launch import launch

    load = os.getloadavg()

    times, cpu = launch(_rank, 2, args, threads=1, stall_timeout_s=600, progress=False)[0]
    stats = {
        a: {
            "median_ms": 1e3 * statistics.median(t),
            "min_ms": 1e3 * min(t),
            "max_ms": 1e3 * max(t),
            "runs_ms": [1e3 * v for v in t],
            "cpu_median_ms": 1e3 * statistics.median(cpu[a]),
            "cpu_runs_ms": [1e3 * v for v in cpu[a]],
        }
        for a, t in times.items()
    }
    flags = subprocess.run(
        "lscpu | grep -o 'avx512_bf16\\|avx2' | sort -u",
        shell=True,
        capture_output=True,
        text=True,
    ).stdout.split()
    date = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d")
    cmd = "python " + " ".join(["benchmarks/capacity_path_cpu.py", *sys.argv[1:]])
    rec = {
        "date": date,
        "machine": f"{cpu_name()}, {os.cpu_count()} CPUs, CPU flags {flags}",
        "python": platform.python_version(),
        "torch": torch.__version__,
        "commit": _git("rev-parse", "--short", "HEAD"),
        "command": cmd,
        "setting": {k: v for k, v in vars(args).items() if k not in ("out", "hardware")},
        "arms": stats,
    }
    base = stats["a2a"]["median_ms"]
    lines = [
        f"# capacity_path_cpu ({args.hardware}, {date})",
        "",
        f"- machine: {rec['machine']}; Python {rec['python']}, torch {rec['torch']}",
        f"- commit: {rec['commit']}; command: `{cmd}`",
        f"- setting: 2 gloo ranks x 1 thread, T={args.tokens}, D={args.dim}, F={args.ffn}, "
        f"E={args.experts}, top-{args.top_k}, capacity factor {args.capacity_factor}, GELU, "
        f"fp32, r_fwd = r_bwd = {args.r}; step = fwd + bwd, max over ranks",
        f"- {args.repeats} interleaved repeats of {args.steps} steps per arm (order "
        "alternating); the peers are measured by `peers_ep.py`",
        "",
        "- CPU ms: process CPU time per step (all threads, max over the ranks), which a "
        "loaded machine inflates less than wall time; load average before "
        f"{load[0]:.2f}, after {os.getloadavg()[0]:.2f}",
        "",
        "| arm | median ms/step | min-max ms | a2a / arm | median CPU ms/step | a2a / arm (CPU) |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    cbase = stats["a2a"]["cpu_median_ms"]
    for a, s in stats.items():
        lines.append(
            f"| {a} | {s['median_ms']:.1f} | {s['min_ms']:.1f}-{s['max_ms']:.1f} | "
            f"{base / s['median_ms']:.3f} | {s['cpu_median_ms']:.1f} | "
            f"{cbase / s['cpu_median_ms']:.3f} |"
        )
    lines += ["", "Every repeat (ms/step, wall):", ""]
    for a, s in stats.items():
        lines.append(f"- {a}: " + ", ".join(f"{v:.1f}" for v in s["runs_ms"]))
    text = "\n".join(lines) + "\n"
    print(text)
    os.makedirs(args.out, exist_ok=True)
    tag = os.path.join(args.out, f"capacity_path_cpu_{args.hardware}_{date}")
    if args.r != 1:  # a second configuration of the same benchmark
        tag += f"_r{args.r}"
    with open(tag + ".md", "w") as f:
        f.write(text)
    with open(tag + ".json", "w") as f:
        json.dump(rec, f, indent=1)


if __name__ == "__main__":
    main()
