"""Measured naive DEP vs PPPipe vs FinDEP on this host's loopback (issue 15), two workloads.

    python benchmarks/serve_bench_cpu.py [--repeat 3] [--out benchmarks/results]

AG = 1 and EG = 1 gloo ranks with one thread each, so on a 2-core machine the two groups run
in parallel. Two fixed request sets over the demo MoE model (4 layers, hidden 256, 8 experts
top-2, one shared expert):

* ``prefill-heavy``: 16 requests, prompts 128-256 tokens, 2-4 output tokens;
* ``decode-heavy``: 32 requests, prompts 16-48 tokens, 32-64 output tokens.

Each schedule runs ``--repeat`` times, interleaved with the others, and keeps its best
output throughput (``moeflow serve-bench``). Writes ``serve_bench_cpu_<host>_<date>.md``
and ``.json`` under ``--out``.

``--shaped 1gbit,100mbit`` also runs the decode-heavy set with the AG rank and the EG rank in
two network namespaces joined by a link shaped to each rate (``emulated_cluster.py``; needs
root), so a2e/e2a time is real link time. There the FinDEP plan comes from the solver with
the link profiled across the shaped link itself.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import io
import json
import os
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import cpu_name  # noqa: E402

from moeflow.apps.serve_bench import add_serve_bench_arguments, run_serve_bench  # noqa: E402

WORKLOADS = {
    "prefill-heavy": ["--requests", "16", "--prompt-len", "128:256", "--output-len", "2:4"],
    "decode-heavy": ["--requests", "32", "--prompt-len", "16:48", "--output-len", "32:64"],
}


SHAPED_FLAGS = WORKLOADS["decode-heavy"]
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
]


def node_main(rank: int, master: str, port: int, repeat: int, flags) -> int:
    """One rank of the shaped-link run (inside a namespace): rank 0 is the AG, rank 1 the EG.
    Rank 0 prints one JSON line per measured schedule."""
    import datetime as dt

    import torch
    import torch.distributed as dist

    from moeflow.apps import serve_bench as sbm
    from moeflow.plan import findep as fd
    from moeflow.serving.disaggregated import ServeSchedule, serve_rank

    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo",
        init_method=f"tcp://{master}:{port}",
        rank=rank,
        world_size=2,
        timeout=dt.timedelta(seconds=600),
    )
    args = add_serve_bench_arguments(argparse.ArgumentParser()).parse_args(flags)
    model = sbm._model(args)
    reqs = sbm.request_set(args, model.cfg.vocab_size, model.cfg.max_position_embeddings)
    sizes = [4096, 65536, 1 << 20, 4 << 20]
    ms = sbm._pingpong(rank, 2, sizes)  # across the shaped link
    plan_t = torch.zeros(6, dtype=torch.long)
    if rank == 0:
        from moeflow.perf.cost import LinearCost

        link = LinearCost.fit(sizes, ms, source="measured", nonneg_alpha=True)
        gemm = sbm._fit_gemm(model.cfg, 1)
        width, seqs = max(len(r.prompt) for r in reqs), len(reqs)
        w = sbm.findep_workload(model.cfg, 1, 1, width, seqs, gemm, link)
        p = fd.solve(w)
        d = fd.solve(sbm.findep_workload(model.cfg, 1, 1, 1, seqs, gemm, link))
        plan_t = torch.tensor(
            [p.r1, p.r2, fd.ORDERS.index(p.order), d.r1, d.r2, fd.ORDERS.index(d.order)]
        )
        print(
            json.dumps(
                {"link_alpha_ms": link.alpha, "link_beta_ms_per_B": link.beta, "link_r2": link.r2}
            ),
            flush=True,
        )
    dist.broadcast(plan_t, 0)
    v = plan_t.tolist()
    schedules = [
        ServeSchedule.naive(),
        ServeSchedule.pppipe(),
        ServeSchedule("findep", v[0], v[1], fd.ORDERS[v[2]], (v[3], v[4], fd.ORDERS[v[5]])),
    ]
    best = {}
    for _ in range(repeat):
        for s in schedules:
            out = serve_rank(rank, 2, model, reqs, 1, 1, s, timeout_s=300, warmup=True)
            if rank == 0:
                m = sbm.summarize([r for _, r in out], s)
                if s.name not in best or m.output_tok_s > best[s.name].output_tok_s:
                    best[s.name] = m
            dist.barrier()
    if rank == 0:
        for s in schedules:
            print(json.dumps(best[s.name].to_dict()), flush=True)
    dist.destroy_process_group()
    return 0


def shaped(rate: str, repeat: int, smoke: bool):
    """(metrics list, link fit) of the decode-heavy set over a link shaped to ``rate``, or
    (None, reason) when no emulated cluster can be built here."""
    import subprocess

    import emulated_cluster as ec

    # our own namespace names: another benchmark's cluster (default prefix) is never rebuilt
    # or removed by this run, nor ours by it
    ec.PREFIX = "mfsb"
    reason = ec.unavailable()
    if reason:
        return None, reason
    if ec.namespaces():
        return None, "an emulated cluster of this benchmark is already up; not touched"
    ec.up(2, rate)
    try:
        me = [sys.executable, os.path.abspath(__file__), "--repeat", str(repeat)]
        me += ["--smoke"] if smoke else []
        port = 29611
        procs = [
            subprocess.Popen(
                ec.node_command(
                    i, me + ["--node-rank", str(i), "--master", ec.addr(0), "--port", str(port)]
                ),
                stdout=subprocess.PIPE,
                text=True,
            )
            for i in (0, 1)
        ]
        outs = [p.communicate(timeout=1800)[0] for p in procs]
        if any(p.returncode for p in procs):
            return None, f"a node exited with {[p.returncode for p in procs]}"
        lines = [json.loads(ln) for ln in outs[0].splitlines() if ln.startswith("{")]
        return lines[1:], lines[0]
    finally:
        ec.down()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--out", default="benchmarks/results")
    ap.add_argument("--host", default=f"{os.cpu_count()}cpu-x86")
    ap.add_argument("--shaped", default="", help="comma-separated tc rates, e.g. 1gbit,100mbit")
    ap.add_argument("--skip-loopback", action="store_true")
    ap.add_argument("--smoke", action="store_true", help="tiny request sets (code path check)")
    ap.add_argument("--node-rank", type=int, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--master", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--port", type=int, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.node_rank is not None:
        return node_main(
            args.node_rank,
            args.master,
            args.port,
            args.repeat,
            SMOKE_FLAGS if args.smoke else SHAPED_FLAGS,
        )
    date = datetime.date.today().isoformat()
    import platform

    import torch

    lines = [
        f"# serve-bench: naive DEP vs PPPipe vs FinDEP, loopback and shaped link ({date}, "
        f"{args.host})",
        "",
        f"CPU: {cpu_name()}; Python {platform.python_version()}, torch {torch.__version__}; "
        "AG = 1, EG = 1 gloo ranks, one thread each; best of "
        f"{args.repeat} interleaved runs per schedule; demo model (4 layers, hidden 256, "
        "8 experts top-2, 1 shared expert, fp32).",
        "",
        "`python benchmarks/serve_bench_cpu.py` (each workload is one `moeflow "
        "serve-bench` run; flags below).",
        "",
    ]
    records = {}
    loads = {"smoke": SMOKE_FLAGS} if args.smoke else WORKLOADS
    for name, flags in ({} if args.skip_loopback else loads).items():
        with tempfile.TemporaryDirectory() as tmp:
            rec_path = Path(tmp) / "rec.json"
            sb = add_serve_bench_arguments(argparse.ArgumentParser())
            sb_args = sb.parse_args(flags + ["--repeat", str(args.repeat), "--json", str(rec_path)])
            buf = io.StringIO()
            with contextlib.redirect_stdout(buf):
                run_serve_bench(sb_args)
            out = buf.getvalue()
            print(out, end="")
            records[name] = json.loads(rec_path.read_text())
        lines += [
            f"## {name}",
            "",
            f"flags: `{' '.join(flags)} --repeat {args.repeat}`",
            "",
            *[ln for ln in out.splitlines() if ln.startswith(("|", "serve-bench:"))],
            "",
        ]
    for rate in [r for r in args.shaped.split(",") if r]:
        from moeflow.apps.serve_bench import Metrics, format_table

        ms, info = shaped(rate, args.repeat, args.smoke)
        lines += [
            f"## decode-heavy over a {rate} shaped link (AG and EG in two namespaces)",
            "",
            f"flags: `{' '.join(SMOKE_FLAGS if args.smoke else SHAPED_FLAGS)} "
            f"--repeat {args.repeat}`",
            "",
        ]
        if ms is None:
            lines += [f"skipped: {info}", ""]
            records[f"shaped-{rate}"] = {"skipped": info}
            continue
        lines += [
            f"link across the shaped link: {info['link_alpha_ms']:.3g} ms + "
            f"{info['link_beta_ms_per_B']:.3g} ms/B (R^2 {info['link_r2']:.3f})",
            "",
            format_table(
                [
                    Metrics(
                        **{
                            **m,
                            "ttft_ms": tuple(m["ttft_ms"]),
                            "tpot_ms": tuple(m["tpot_ms"]),
                            "decode": None if m["decode"] is None else tuple(m["decode"]),
                        }
                    )
                    for m in ms
                ]
            ),
            "",
        ]
        records[f"shaped-{rate}"] = {"link": info, "results": ms}
        print("\n".join(lines[-2:]))
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = f"serve_bench_cpu_{args.host}_{date}"
    (out_dir / f"{stem}.md").write_text("\n".join(lines) + "\n")
    (out_dir / f"{stem}.json").write_text(json.dumps(records, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
