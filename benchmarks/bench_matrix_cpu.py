"""The dissection matrix's new settings measured and predicted: ``moeflow bench``'s workload
with LoRA fine-tuning (peft), ZeRO-3 (FSDP2 on a world of one process), weight-only int8
(torchao) and the SDPA back-ends this build runs on CPU, each against the plain setting.

One PerfModel is profiled first (``moeflow.apps.bench.predict.profile_machine``, the fits of
``moeflow bench --simulate``) and the matrix fits and unit costs are calibrated on their small
model (``moeflow.apps.bench.predict_matrix.with_matrix_costs``), all before any timed step.
Then every repeat builds each arm's workload afresh (same seed: same weights and batch) and
dissects it, the arms in a shuffled order per repeat; each repeat's plain step time (median of
``--unprofiled`` steps without the profiler) is the measurement, the simulator's prediction
of that repeat's inventory the prediction.

    PYTHONPATH=src python benchmarks/bench_matrix_cpu.py --repeats 5 --threads 1
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import random
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch
from _common import cpu_isa, cpu_name

from moeflow.apps.bench import Setting, Shape, build_workload, dissect
from moeflow.apps.bench.dissect import run_step
from moeflow.apps.bench.matrix import available_sdpa, release_group
from moeflow.apps.bench.predict import compare, profile_machine
from moeflow.apps.bench.predict_matrix import compare_matrix, with_matrix_costs


def arms() -> list[tuple[str, str, Setting]]:
    sdpa = [b for b in available_sdpa() if b != "default"]
    out = [("demo", "train", Setting()), ("demo", "train", Setting(finetune="lora"))]
    out.append(("demo", "train", Setting(zero3=True)))
    out += [("demo", "train", Setting(sdpa=b)) for b in sdpa]
    for kind in ("demo", "decoder"):
        out.append((kind, "decode", Setting()))
        out.append((kind, "decode", Setting(quant="int8")))
        out += [(kind, "decode", Setting(sdpa=b)) for b in sdpa]
    return out


def run_arm(kind, mode, s, shape, perf, args) -> dict:
    w = build_workload(kind, mode, s, shape, seed=0)
    try:
        d = dissect(w, warmup=args.warmup, steps=args.steps, unprofiled=args.unprofiled)
        # the same plain steps again, with the CPU time of this (the only compute) thread:
        # wall minus CPU is the time the step waited for a core on the shared machine
        wall, cpu = [], []
        for _ in range(args.unprofiled):
            w.before_step()
            t0, c0 = time.perf_counter(), time.thread_time()
            run_step(w)
            cpu.append((time.thread_time() - c0) * 1e3)
            wall.append((time.perf_counter() - t0) * 1e3)
    finally:
        if s.zero3:
            release_group()
    c = compare_matrix(d, perf, s, w.units, kind) if s.matrix else compare(d, perf, s.dtype)
    phases: dict = {}
    for r in c["rows"]:
        m, p = phases.setdefault(r["phase"], [0.0, 0.0]), r
        m[0] += p["measured_ms"]
        m[1] += p["predicted_ms"]
    return {
        "measured_ms": d.unprofiled_ms,
        "wall_again_ms": statistics.median(wall),
        "cpu_ms": statistics.median(cpu),
        "predicted_ms": c["predicted_ms"],
        "predicted_ms_operators_only": c.get("predicted_ms_operators_only", c["predicted_ms"]),
        "phases": phases,
        "rows": [
            {k: r[k] for k in ("phase", "row", "measured_ms", "predicted_ms")} for r in c["rows"]
        ],
    }


def _v(mod: str) -> str:
    try:
        return __import__(mod).__version__
    except ImportError:
        return "not installed"


def render_md(rec: dict) -> str:
    """The record's tables (the analysis is written under them by hand)."""
    m, sw = rec["machine"], rec["software"]
    out = [
        "# `moeflow bench` matrix: LoRA, ZeRO-3, weight-only int8, SDPA back-ends (CPU, 2 vCPU "
        "x86)",
        "",
        f"**Machine**: {m['cpu']} ({m['isa']}), {m['threads']} torch thread(s), no GPU; "
        f"torch {sw['torch']}, peft {sw['peft']}, torchao {sw['torchao']}, transformers "
        f"{sw['transformers']}, Python {sw['python']}. **Load caveat**: the 2 cores were shared "
        f"with other work during the run (load average {rec['load_avg_start'][0]:.1f}"
        f" at the start, {rec['load_avg_end'][0]:.1f} at the end), so every time is slowed and "
        "noisy by a varying factor; the arms take turns in a shuffled order per repeat and "
        "every repeat is listed.",
        "",
        f"**Command**: `{rec['command']}` (profiling {rec['profile_s']:.0f} s, calibration "
        f"{rec['calibrate_s']:.0f} s, both before the first timed step).",
        "",
        f"Workload: `moeflow bench`'s default, the demo model (D = 128, 2 layers, 4 heads, 8 "
        f"experts of F = 256, top-2) at batch {rec['shape']['batch']} x "
        f"{rec['shape']['seq_len']}; decode also on `MoEDecoder` at the same shape (one token "
        "per sequence on its KV cache). Measured: median of the plain steps of a repeat "
        "(no profiler). Predicted: the simulator on that repeat's operator inventory with the "
        "one PerfModel.",
        "",
        "## Predicted vs measured (target: within 15%)",
        "",
        "| setting | measured ms, median (min-max) | predicted ms | predicted / measured | "
        "within 15% | ratio / plain's ratio | measured / plain | predicted / plain | "
        "CPU ms of the step (share of wall) | predicted / CPU | CPU / plain's CPU |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for key, s in rec["summary"].items():
        kind, mode = key.split("/")[:2]
        plain = rec["summary"][f"{kind}/{mode}/{Setting().label}"]
        ok = "yes" if abs(s["ratio"] - 1) <= 0.15 else "no"
        out.append(
            f"| {key} | {s['measured_median_ms']:.2f} ({s['measured_min_ms']:.2f}-"
            f"{s['measured_max_ms']:.2f}) | {s['predicted_median_ms']:.2f} | {s['ratio']:.3f} "
            f"| {ok} | {s['ratio_over_base_ratio']:.3f} | {s['measured_over_base']:.3f} | "
            f"{s['predicted_over_base']:.3f} | {s['cpu_median_ms']:.2f} "
            f"({100 * s['cpu_share']:.0f}%) | {s['ratio_cpu']:.3f} | "
            f"{s['cpu_median_ms'] / plain['cpu_median_ms']:.3f} |"
        )
    n = max(len(v) for v in rec["runs"].values())
    out += [
        "",
        "## Every repeat (measured / predicted ms, and the CPU ms of the repeated plain steps)",
        "",
        "| setting | " + " | ".join(f"repeat {i}" for i in range(n)) + " |",
        "| --- |" + " --- |" * n,
    ]
    for key, rs in rec["runs"].items():
        cells = [
            f"{r['measured_ms']:.2f} / {r['predicted_ms']:.2f} (CPU {r['cpu_ms']:.2f})" for r in rs
        ]
        out.append(f"| {key} | " + " | ".join(cells) + " |")
    out += [
        "",
        "## Per phase (the repeat with the median measurement; profiled rows scaled to the "
        "plain step)",
        "",
        "| setting | phase | measured ms | predicted ms |",
        "| --- | --- | --- | --- |",
    ]
    for key, rs in rec["runs"].items():
        r = sorted(rs, key=lambda x: x["measured_ms"])[len(rs) // 2]
        for ph, (mm, pp) in r["phases"].items():
            out.append(f"| {key} | {ph} | {mm:.2f} | {pp:.2f} |")
    out += ["", "## Matrix fits and unit costs of the PerfModel", "", "| entry | value | note |"]
    out.append("| --- | --- | --- |")
    for k, v in rec["perf_model"]["meta"]["bench_costs"].items():
        if "unit@" in k:
            out.append(
                f"| `{k}` | {v['alpha']:.3f} ms x {v['units']} units (calibration) | {v['note']} |"
            )
        elif k.startswith(("attention_math@", "int8_dequant@")):
            r2 = v.get("r2")
            out.append(
                f"| `{k}` | alpha {v['alpha']:.4f} ms, beta {v['beta']:.3e}"
                f"{f', r2 {r2:.2f}' if r2 is not None else ''} | {v.get('note', '')} |"
            )
    return "\n".join(out) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--unprofiled", type=int, default=5)
    p.add_argument("--host", default="2cpu-x86")
    p.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results"))
    p.add_argument("--perf", default=None, help="reuse a saved PerfModel (skip profiling)")
    p.add_argument("--render", default=None, help="write the .md of an existing .json record")
    args = p.parse_args(argv)
    if args.render:
        with open(args.render) as f:
            rec = json.load(f)
        with open(args.render[: -len(".json")] + ".md", "w") as f:
            f.write(render_md(rec))
        return 0
    torch.set_num_threads(args.threads)
    shape = Shape()
    load0 = os.getloadavg()
    t0 = time.time()
    if args.perf:
        from moeflow.perf import PerfModel

        perf = PerfModel.load(args.perf)
    else:
        perf = profile_machine(("float32",))
    t_profile = time.time() - t0
    grid = arms()
    for kind, mode in dict.fromkeys((k, m) for k, m, _ in grid):
        perf = with_matrix_costs(
            perf, [s for k, m, s in grid if (k, m) == (kind, mode)], mode, kind
        )
    t_cal = time.time() - t0 - t_profile
    runs: dict = {f"{k}/{m}/{s.label}": [] for k, m, s in grid}
    for rep in range(args.repeats):
        order = list(grid)
        random.Random(rep).shuffle(order)
        for kind, mode, s in order:
            key = f"{kind}/{mode}/{s.label}"
            r = run_arm(kind, mode, s, shape, perf, args)
            r["repeat"] = rep
            runs[key].append(r)
            print(
                f"rep {rep} {key}: measured {r['measured_ms']:.2f} ms (CPU {r['cpu_ms']:.2f} of "
                f"{r['wall_again_ms']:.2f}), predicted {r['predicted_ms']:.2f} ms",
                flush=True,
            )
    load1 = os.getloadavg()
    summary = {}
    for key, rs in runs.items():
        m = [r["measured_ms"] for r in rs]
        pr = [r["predicted_ms"] for r in rs]
        po = [r["predicted_ms_operators_only"] for r in rs]
        c = [r["cpu_ms"] for r in rs]
        wa = [r["wall_again_ms"] for r in rs]
        summary[key] = {
            "cpu_median_ms": statistics.median(c),
            "cpu_share": statistics.median([a / b for a, b in zip(c, wa)]),
            "ratio_cpu": statistics.median(pr) / statistics.median(c),
            "measured_median_ms": statistics.median(m),
            "measured_min_ms": min(m),
            "measured_max_ms": max(m),
            "predicted_median_ms": statistics.median(pr),
            "predicted_operators_only_median_ms": statistics.median(po),
            "ratio": statistics.median(pr) / statistics.median(m),
            "ratio_each": [a / b for a, b in zip(pr, m)],
        }
    for key, s in summary.items():
        kind, mode = key.split("/")[:2]
        base = summary[f"{kind}/{mode}/{Setting().label}"]
        s["ratio_over_base_ratio"] = s["ratio"] / base["ratio"]
        s["measured_over_base"] = s["measured_median_ms"] / base["measured_median_ms"]
        s["predicted_over_base"] = s["predicted_median_ms"] / base["predicted_median_ms"]
    date = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d")
    tag = f"bench_matrix_cpu_{args.host}_{date}"
    cmd = "PYTHONPATH=src python benchmarks/bench_matrix_cpu.py " + " ".join(
        a for a in (argv if argv is not None else sys.argv[1:]) if not a.startswith("/")
    )
    record = {
        "machine": {"cpu": cpu_name(), "isa": cpu_isa(), "threads": args.threads},
        "software": {
            "torch": torch.__version__,
            "peft": _v("peft"),
            "torchao": _v("torchao"),
            "transformers": _v("transformers"),
            "python": sys.version.split()[0],
        },
        "command": cmd.strip(),
        "load_avg_start": load0,
        "load_avg_end": load1,
        "profile_s": t_profile,
        "calibrate_s": t_cal,
        "shape": {"batch": shape.batch, "seq_len": shape.seq_len},
        "args": vars(args) | {"out": None, "perf": None},
        "perf_model": perf.to_dict(),
        "summary": summary,
        "runs": runs,
    }
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, tag + ".json"), "w") as f:
        json.dump(record, f, indent=1)
    with open(os.path.join(args.out, tag + ".md"), "w") as f:
        f.write(render_md(record))
    print(json.dumps({k: round(v["ratio"], 3) for k, v in summary.items()}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
