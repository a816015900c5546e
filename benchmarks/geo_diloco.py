"""DiLoCo against plain data parallelism across slow links: bytes, tokens/s and loss.

Two replicas, one per "site" (network namespaces, ``emulated_cluster.up_sites([1, 1], ...)``,
the stated rate between the sites, HTB-shaped so a slow link costs wall time, not CPU), each
one ``torchrun`` node running ``moeflow geo train --mode dp|diloco``. Same model, same
per-replica batch; dp all-reduces the gradients every step, DiLoCo (Douillard et al., arXiv
2311.08105) the parameters' delta once every H steps. The convergence part runs on local
ranks (loopback): the numbers do not depend on the link's speed.

    python benchmarks/geo_diloco.py                      # record in benchmarks/results/
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _common import cpu_name, write_record  # noqa: E402
from geo_train import torchrun_on  # noqa: E402

#: the demo model and micro-batching of this record
MODEL = dict(dim=128, layers=4, heads=4, seq_len=64, experts=4, microbatch_size=4)
MICROBATCHES = 4


def flags(mode: str, steps: int, h: int | None) -> list[str]:
    out = ["--mode", mode, "--steps", str(steps), "--microbatches", str(MICROBATCHES)]
    out += [f"--{k.replace('_', '-')}={v}" for k, v in MODEL.items()]
    out += ["--timeout", "1800"]
    if h is not None:
        out += ["--inner-steps", str(h)]
    return out


def emulated(rate: str, runs: dict, tmp: str, port: int) -> dict:
    import emulated_cluster as ec

    ec.up_sites([1, 1], "1gbit", rate)
    out = {}
    try:
        for name, (mode, steps, h) in runs.items():
            path = os.path.join(tmp, f"{rate}_{name}.json")
            port += 1
            cmd = ["-m", "moeflow.cli.geo", "train", *flags(mode, steps, h), "--json", path]
            codes = torchrun_on(ec, [0, 1], cmd, port)
            if any(codes):
                out[name] = {"error": f"exit codes {codes}"}
                continue
            with open(path) as f:
                res = json.load(f)
            out[name] = {
                "tokens_per_s": res["tokens_per_s"],
                "bytes_per_inner_step": res["bytes_per_inner_step"],
                "param_bytes": res["param_bytes"],
                "allreduce_s_median": statistics.median(res["allreduce_s"]),
                "step_s_median": statistics.median(res["step_times_s"]),
                "steps": steps,
            }
    finally:
        ec.down()
    return out


def convergence(steps: int, hs: list[int]) -> dict:
    from moeflow.geo import diloco

    base = dict(MODEL, microbatches=MICROBATCHES, replicas=2, steps=steps, timeout_s=1800.0)
    out = {"dp": diloco.train(diloco.DilocoJob(mode="dp", **base), progress=False)}
    for h in hs:
        out[f"diloco_h{h}"] = diloco.train(diloco.DilocoJob(inner_steps=h, **base), progress=False)
    return {
        k: {
            "final": statistics.mean(r.losses[-20:]),
            "losses": r.losses,
            "tokens_per_s": r.tokens_per_s,
            "bytes_per_inner_step": r.bytes_per_inner_step,
        }
        for k, r in out.items()
    }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rates", default="100mbit,10mbit")
    ap.add_argument("--dp-steps", type=int, default=6)
    ap.add_argument("--diloco-steps", type=int, default=20)
    ap.add_argument("--inner-steps", default="10")
    ap.add_argument("--converge-steps", type=int, default=200)
    ap.add_argument("--converge-h", default="10,50")
    ap.add_argument("--out", default="benchmarks/results")
    ap.add_argument("--host", default=f"{os.cpu_count()}cpu-x86")
    args = ap.parse_args(argv)
    import emulated_cluster as ec
    import torch

    date = datetime.date.today().isoformat()
    hs = [int(x) for x in args.inner_steps.split(",")]
    runs = {"dp": ("dp", args.dp_steps, None)}
    runs.update({f"diloco_h{h}": ("diloco", args.diloco_steps, h) for h in hs})
    info = {"date": date, "host": args.host, "machine": cpu_name(), "model": MODEL, "rates": {}}
    lines = [
        f"# DiLoCo vs data parallel across emulated sites ({date}, {args.host})",
        "",
        f"Command: `python benchmarks/geo_diloco.py --rates {args.rates} --dp-steps "
        f"{args.dp_steps} --diloco-steps {args.diloco_steps} --inner-steps {args.inner_steps} "
        f"--converge-steps {args.converge_steps} --converge-h {args.converge_h}`; CPU: "
        f"{cpu_name()}; Python {platform.python_version()}, torch {torch.__version__}. Demo "
        f"MoE model {MODEL}, {MICROBATCHES} micro-batches per replica and step, fp32, AdamW "
        "inner (lr 3e-3), outer Nesterov SGD lr 0.7 momentum 0.9. Two replicas = two "
        "network namespaces, one per site, the stated rate between them (HTB). Bytes: handed "
        "to all-reduce by one replica (gloo's ring moves about that much each way). tokens/s: "
        "both replicas' training tokens per second of the timed loop.",
        "",
    ]
    reason = ec.unavailable()
    tmp = tempfile.mkdtemp(prefix="geo_diloco_")
    port = 29900
    for rate in args.rates.split(","):
        if reason:
            info["rates"][rate] = {"skipped": reason}
            lines += [f"## {rate}: skipped ({reason})", ""]
            continue
        cell = emulated(rate, runs, tmp, port)
        port += 10
        info["rates"][rate] = cell
        lines += [f"## {rate} between the sites", ""]
        lines += ["| run | steps | MB per replica and inner step | all-reduce s (median) "
                  "| step ms (median) | tokens/s |"]  # fmt: skip
        lines += ["| --- | ---: | ---: | ---: | ---: | ---: |"]
        for name, c in cell.items():
            if "error" in c:
                lines.append(f"| {name} | {c['error']} | | | | |")
                continue
            lines.append(
                f"| {name} | {c['steps']} | {c['bytes_per_inner_step'] / 1e6:.3f} | "
                f"{c['allreduce_s_median']:.2f} | {c['step_s_median'] * 1e3:.0f} | "
                f"{c['tokens_per_s']:.0f} |"
            )
        if "error" not in cell.get("dp", {"error": 1}):
            dp = cell["dp"]["tokens_per_s"]
            best = max(
                (c["tokens_per_s"], n) for n, c in cell.items() if n != "dp" and "error" not in c
            )
            lines += ["", f"{best[1]}: {best[0] / dp:.1f}x the tokens/s of dp.", ""]
    if args.converge_steps:
        conv = convergence(args.converge_steps, [int(x) for x in args.converge_h.split(",")])
        info["convergence"] = conv
        lines += [
            f"## Convergence ({args.converge_steps} steps, 2 local replicas)",
            "",
            "| run | mean loss, last 20 steps | vs dp | MB per replica and inner step |",
            "| --- | ---: | ---: | ---: |",
        ]
        dpf = conv["dp"]["final"]
        for name, c in conv.items():
            lines.append(
                f"| {name} | {c['final']:.4f} | {c['final'] / dpf - 1:+.2%} | "
                f"{c['bytes_per_inner_step'] / 1e6:.3f} |"
            )
        lines.append("")
    write_record(args.out, f"geo_diloco_{args.host}_{date}", info, lines)
    return 0


if __name__ == "__main__":
    sys.exit(main())
