"""Measured naive DEP vs tuned PPPipe vs FinDEP per step (issue 26): loopback and emulated links.

    python benchmarks/serve_bench_cpu.py [--repeat 5] [--layouts 1x1,1x2]
        [--links loopback,1gbit,100mbit] [--out benchmarks/results]

For each layout (AG x EG gloo ranks, one thread each) and each link, one fixed request set
over the demo MoE model (4 layers, hidden 256, 8 experts top-2, one shared expert, fp32):
32 requests, prompts 16-48 tokens, outputs 16-32 tokens, all arriving at once. Every schedule
is solved per step by the same :class:`moeflow.plan.findep.StepPlanner` from costs measured
first on this host (``moeflow serve-bench --plan auto``): FinDEP over (r1, r2, order), PPPipe
its best r1, naive DEP r1 = r2 = 1. ``--repeat`` rounds, each running every schedule once in a
fresh random order after the same one-token warm-up; the record gives every run, the median and
the range. Goodput (vLLM's ``--goodput``) under one SLO for every schedule: TTFT <= 5 s and
TPOT <= 250 ms.

``loopback``: ``moeflow serve-bench`` forks the ranks on 127.0.0.1. A tc rate (``1gbit``,
``100mbit``): each rank in its own network namespace, every link shaped to that rate
(``emulated_cluster.py``, needs root; ``MOEFLOW_EMU_PREFIX`` names the namespaces), the link
cost measured across the shaped link itself. Writes ``serve_bench_cpu_<host>_<date>.md`` and
``.json`` under ``--out``.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import io
import json
import os
import platform
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import cpu_name  # noqa: E402

from moeflow.apps.serve_bench import (  # noqa: E402
    add_serve_bench_arguments,
    format_runs,
    format_table,
    metrics_from_dict,
    run_serve_bench,
)
from moeflow.serving import host_costs as hc  # noqa: E402

#: one SLO for every schedule, set for this shared host under load (steps 2-5x slower than
#: when it is quiet), so that it separates runs rather than failing all of them
SLO = ["--slo-ttft-ms", "5000", "--slo-tpot-ms", "250"]
FLAGS = ["--requests", "32", "--prompt-len", "16:48", "--output-len", "16:32", *SLO]
SMOKE_FLAGS = [
    "--requests",
    "3",
    "--prompt-len",
    "4:8",
    "--output-len",
    "2:3",
    "--demo-layers",
    "1",
    "--demo-hidden",
    "32",
    *SLO,
]
PORT = 29611
UNITS = {"gemm": "FLOP", "link": "B", "attention": "FLOP", "head": "token"}


def node_main(rank: int, world: int, master: str, port: int, flags, rate: str) -> int:
    """One rank of a shaped-link run (inside a namespace): rank 0 is the AG, the others the
    EG. Rank 0 measures the costs (the link across the shaped link, with ranks 0 and 1) and
    prints the run's record as one JSON line."""
    import datetime as dt

    import torch
    import torch.distributed as dist

    from moeflow.apps import serve_bench as sbm
    from moeflow.serving.disaggregated import ServeSchedule, serve_rank

    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo",
        init_method=f"tcp://{master}:{port}",
        rank=rank,
        world_size=world,
        timeout=dt.timedelta(seconds=600),
    )
    args = add_serve_bench_arguments(argparse.ArgumentParser()).parse_args(flags)
    args.ag, args.eg = 1, world - 1
    model = sbm._model(args)
    reqs = sbm.request_set(args, model.cfg.vocab_size, model.cfg.max_position_embeddings)
    costs: list = []

    def measure():
        ms = hc.pingpong(rank, world, list(hc.LINK_SIZES))  # across the shaped link
        if rank == 0:
            link = hc.fit_link(hc.LINK_SIZES, ms, note=f"gloo across a {rate} tc-shaped link")
            gemm, attn = hc.fit_gemm(model.cfg, args.eg), hc.fit_attention(model.cfg)
            costs.append((gemm, link, attn, hc.fit_head(model)))
        dist.barrier()

    measure()
    planner = None
    if rank == 0:
        gemm, link, attn, head = costs[0]
        planner = hc.step_planner(model.cfg, 1, args.eg, gemm, link, attn, name=rate, head=head)
    schedules = [ServeSchedule.per_step(n, planner) for n in sbm.SCHEDULE_CHOICES]

    def before_round(i):
        if i:
            measure()
            if rank == 0:
                g, lk, at, hd = costs[-1]
                planner.recost(hc.host_testbed(1, args.eg, g, lk, at, rate), hd)

    def serve_once(s):
        steps: list = []
        out = serve_rank(rank, world, model, reqs, 1, args.eg, s, 300.0, warmup=True, steps=steps)
        dist.barrier()
        return ([r for _, r in out] if rank == 0 else []), steps

    def summarize_run(res, s, steps):
        if rank:
            return None
        return sbm.summarize(
            res, s, args.slo_ttft_ms, args.slo_tpot_ms, steps=steps, predict=planner.predict_ms
        )

    order, runs = sbm.run_rounds(
        serve_once, schedules, args.repeat, args.seed, summarize_run, before_round=before_round
    )
    if rank == 0:
        print(json.dumps(sbm.bench_record(args, model.cfg, reqs, costs, order, runs)), flush=True)
    dist.destroy_process_group()
    return 0


def _busy(n: int, q) -> None:
    import time

    import torch

    torch.set_num_threads(1)
    a = torch.randn(256, 256)
    t0 = time.perf_counter()
    for _ in range(n):
        a = torch.tanh(a @ a)
    q.put(time.perf_counter() - t0)


def parallelism(n: int = 400) -> float:
    """How many of two single-thread processes this machine runs at once right now:
    ``2 t_alone / t_together`` for the same GEMM loop (2: two free cores, the overlap the
    pipelined schedules count on; 1: none). Medians of 3 tries each."""
    import multiprocessing as mp
    import time

    ctx = mp.get_context("fork")

    def run(k: int) -> float:
        q = ctx.Queue()
        ps = [ctx.Process(target=_busy, args=(n, q)) for _ in range(k)]
        t0 = time.perf_counter()
        for p in ps:
            p.start()
        for p in ps:
            p.join()
        return time.perf_counter() - t0 if k > 1 else q.get()

    alone = statistics.median(run(1) for _ in range(3))
    both = statistics.median(run(2) for _ in range(3))
    return 2 * alone / both


def shaped(rate: str, eg: int, flags) -> tuple[dict | None, str]:
    """(record, "") of a run with every link shaped to ``rate``, or (None, why not)."""
    import subprocess

    import emulated_cluster as ec

    reason = ec.unavailable()
    if reason:
        return None, reason
    if ec.namespaces():
        return None, f"namespaces with prefix {ec.PREFIX} are already up; not touched"
    world = 1 + eg
    ec.up(world, rate)
    try:
        me = [sys.executable, os.path.abspath(__file__), "--node-world", str(world)]
        procs = [
            subprocess.Popen(
                ec.node_command(
                    i,
                    me
                    + ["--node-rank", str(i), "--master", ec.addr(0), "--port", str(PORT)]
                    + ["--rate", rate, "--"]
                    + flags,
                ),
                stdout=subprocess.PIPE,
                text=True,
            )
            for i in range(world)
        ]
        outs = [p.communicate(timeout=3600)[0] for p in procs]
        if any(p.returncode for p in procs):
            return None, f"a node exited with {[p.returncode for p in procs]}"
        rec = [json.loads(ln) for ln in outs[0].splitlines() if ln.startswith("{")]
        return rec[-1], ""
    finally:
        ec.down()


def loopback(eg: int, flags) -> dict:
    """The record of ``moeflow serve-bench`` on 127.0.0.1 (AG = 1, EG = ``eg``)."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "rec.json"
        sb = add_serve_bench_arguments(argparse.ArgumentParser())
        args = sb.parse_args(
            flags + ["--eg", str(eg), "--json", str(path), "--no-progress", "--force-nproc"]
        )
        with contextlib.redirect_stdout(io.StringIO()):
            run_serve_bench(args)
        return json.loads(path.read_text())


def _costs_line(rec: dict) -> str:
    lines = ["Costs measured before each round (alpha ms + beta ms/unit, R^2):", ""]
    for i, c in enumerate(rec["costs"]):
        lines.append(
            f"- round {i + 1}: "
            + ", ".join(
                f"{k} {v['alpha_ms']:.3g} + {v['beta_ms']:.3g}/{UNITS[k]} ({v['r2']:.2f})"
                for k, v in c.items()
            )
        )
    return "\n".join(lines + ["", "Solver grid: r1 <= 8, r2 <= 8, ASAS and AASS."])


def section(title: str, rec: dict) -> list[str]:
    runs = {n: [metrics_from_dict(m) for m in ms] for n, ms in rec["runs"].items()}
    sp = rec["speedups"]
    par = rec.get("parallelism")
    return [
        f"## {title}",
        "",
        _costs_line(rec),
        "",
        "parallelism of two single-thread processes before / after: "
        + " / ".join(f"{p:.2f}" for p in par or ()),
        "",
        "Median [min-max] of the rounds; meas/pred: measured over predicted time of the prefill "
        "and of the decode steps.",
        "",
        format_table(runs),
        "",
        "FinDEP / best other (medians): " + ", ".join(f"{k} {v:.2f}x" for k, v in sp.items()),
        "",
        "Every run (in the order run):",
        "",
        format_runs(rec["order"], runs),
        "",
    ]


def wait_share(rec: dict) -> dict[str, dict[str, float]]:
    """Per schedule and step kind: the share of the AG's step time spent waiting for e2a."""
    out = {}
    for n, ms in rec["runs"].items():
        out[n] = {}
        for kind, pick in (("prefill", lambda t: t > 1), ("decode", lambda t: t == 1)):
            sts = [st for m in ms for st in m["steps"] if pick(st["tokens"])]
            tot = sum(st["ms"] for st in sts)
            out[n][kind] = sum(st["wait_ms"] for st in sts) / tot if tot else float("nan")
    return out


def summary(records: dict) -> list[str]:
    lines = [
        "| layout | link | FinDEP / best other, goodput | output tok/s | naive meas/pred "
        "prefill, decode | pppipe | findep | AG waiting (prefill, decode) naive / pppipe / "
        "findep |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for key, rec in records.items():
        if "skipped" in rec:
            lines.append(f"| {key} | skipped: {rec['skipped']} | | | | | | |")
            continue
        layout, link = key.split(" ", 1)
        runs = {n: [metrics_from_dict(m) for m in ms] for n, ms in rec["runs"].items()}

        def rat(n, runs=runs):
            p = statistics.median(m.prefill_ratio for m in runs[n])
            d = statistics.median(m.decode_ratio for m in runs[n])
            return f"{p:.2f}, {d:.2f}"

        ws = wait_share(rec)
        wait = " / ".join(f"{ws[n]['prefill']:.0%}, {ws[n]['decode']:.0%}" for n in runs)
        sp = rec["speedups"]
        lines.append(
            f"| {layout} | {link} | {sp.get('goodput', float('nan')):.2f}x | "
            f"{sp.get('output_tok_s', float('nan')):.2f}x | {rat('naive')} | {rat('pppipe')} | "
            f"{rat('findep')} | {wait} |"
        )
    return lines


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--out", default="benchmarks/results")
    ap.add_argument("--host", default=f"{os.cpu_count()}cpu-x86")
    ap.add_argument("--layouts", default="1x1,1x2", help="AGxEG, comma-separated")
    ap.add_argument("--links", default="loopback,1gbit,100mbit", help="loopback or tc rates")
    ap.add_argument("--smoke", action="store_true", help="tiny request set (code path check)")
    ap.add_argument("--node-rank", type=int, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--node-world", type=int, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--master", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--port", type=int, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--rate", default=None, help=argparse.SUPPRESS)
    ap.add_argument("rest", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.node_rank is not None:
        flags = args.rest[1:] if args.rest[:1] == ["--"] else args.rest
        return node_main(args.node_rank, args.node_world, args.master, args.port, flags, args.rate)
    import torch

    flags = (SMOKE_FLAGS if args.smoke else FLAGS) + ["--repeat", str(args.repeat)]
    date = datetime.date.today().isoformat()
    records: dict = {}
    sections: list[str] = []
    for layout in [x for x in args.layouts.split(",") if x]:
        ag, eg = (int(v) for v in layout.split("x"))
        if ag != 1:
            raise SystemExit(f"--layouts {layout}: this benchmark runs AG = 1")
        for link in [x for x in args.links.split(",") if x]:
            key = f"AG{ag}xEG{eg} {link}"
            print(f"serve_bench_cpu: {key} ...", flush=True)
            before = parallelism()
            if link == "loopback":
                rec = loopback(eg, flags)
            else:
                rec, why = shaped(link, eg, flags)
                if rec is None:
                    records[key] = {"skipped": why}
                    sections += [f"## {key}", "", f"skipped: {why}", ""]
                    continue
            rec["parallelism"] = [before, parallelism()]
            records[key] = rec
            sections += section(key, rec)
            print("\n".join(section(key, rec)[:9]), flush=True)
    flags_txt = " ".join(flags)
    lines = [
        f"# serve-bench: naive DEP vs tuned PPPipe vs FinDEP per step ({date}, {args.host})",
        "",
        f"CPU: {cpu_name()}; Python {platform.python_version()}, torch {torch.__version__}; "
        "gloo ranks with one thread each; demo model (4 layers, hidden 256, 8 experts top-2, "
        "1 shared expert, fp32).",
        "",
        f"`python benchmarks/serve_bench_cpu.py --repeat {args.repeat} --layouts {args.layouts} "
        f"--links {args.links}`; each configuration is `moeflow serve-bench {flags_txt}` "
        "(loopback) or the same flags on ranks in network namespaces (shaped links).",
        "",
        "## Summary",
        "",
        *summary(records),
        "",
        *sections,
    ]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = f"serve_bench_cpu_{args.host}_{date}"
    (out / f"{stem}.md").write_text("\n".join(lines) + "\n")
    (out / f"{stem}.json").write_text(json.dumps(records, indent=1) + "\n")
    print("\n".join(lines[:12]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
