"""Planning time of ``moeflow.plan.geo.partition`` (the search alone; building the graph is
timed apart), exact links and AdaTopK, on the cases users plan:

    PYTHONPATH=src python benchmarks/geo_plan_time.py [--repeats 3] [--ref bcbc32f]

* ``6dev-492``: six devices in three sites (``tests/geo/data/geo_3sites_6devices.json``:
  4-12 GB, 10-100 Mbit/s between sites) and the graph ``moeflow geo plan --model gpt2 --dim
  1024 --layers 24 --heads 16 --seq-len 512`` traces (492 fx nodes; needs torch and
  transformers), 4 micro-batches of 4 sequences (the command's defaults);
* ``48dev-50``: the 48 GPUs of ``benchmarks/geo_sim.py`` (link mix ``mixed``, seed 0) and
  its analytic GPT-2 medium (:func:`moeflow.plan.geo.gpt2_opgraph`, 50 nodes), 32
  micro-batches;
* ``48dev-492``: the same 48 GPUs and the 492-node traced graph, 4 micro-batches.

AdaTopK runs with the command's default minimum density (0.25). Each case is planned
``--repeats`` times (median and spread reported). ``--ref`` also times the planner of an
earlier commit (``git show <ref>:src/moeflow/plan/geo.py``, one run per case, stopped after
``--ref-limit`` seconds). Writes ``geo_plan_time_<host>_<date>.{md,json}``.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import json
import os
import platform
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import cpu_name  # noqa: E402
from geo_sim import device_file  # noqa: E402

from moeflow.plan import geo

ROOT = Path(__file__).resolve().parents[1]
SITES_6 = ROOT / "tests" / "geo" / "data" / "geo_3sites_6devices.json"
TRACED = dict(model="gpt2", dim=1024, layers=24, heads=16, seq_len=512)
MIN_DENSITY = 0.25
TARGETS = {"6dev-492": 10.0, "48dev-50": 30.0, "48dev-492": 30.0}


def cpu_flags() -> str:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return "unknown"
    flags = next((ln for ln in text.splitlines() if ln.startswith("flags")), "").split()
    have = [f for f in ("avx512_bf16", "avx512f", "avx2") if f in flags]
    return ", ".join(have) or "none of avx2 / avx512"


def traced_graph() -> tuple[geo.OpGraph, dict]:
    """The graph ``moeflow geo plan`` plans for :data:`TRACED`, built as the command builds it
    (on the meta device, measured on fake tensors), and how long that took; also how long
    building the module with initialised weights takes (what ``geo train`` needs)."""
    t0 = time.perf_counter()
    from moeflow.geo.pipeline import GeoJob, build_module, trace_job

    t1 = time.perf_counter()
    job = GeoJob(stages=6, **TRACED)
    _, traced = trace_job(job, device="meta")
    t2 = time.perf_counter()
    build_module(job)
    t3 = time.perf_counter()
    return traced.ops, {
        "import_s": t1 - t0,
        "meta_build_and_trace_s": t2 - t1,
        "build_with_weights_s": t3 - t2,
        "nodes": len(traced.ops.nodes),
        "microbatches": job.microbatches,
    }


def load_ref(ref: str):
    """``moeflow.plan.geo`` as of git ``ref``, imported under another name."""
    src = subprocess.run(
        ["git", "show", f"{ref}:src/moeflow/plan/geo.py"],
        cwd=ROOT,
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    path = Path(tempfile.mkdtemp()) / "geo_ref.py"
    path.write_text(src)
    spec = importlib.util.spec_from_file_location("geo_ref", path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules["geo_ref"] = mod  # dataclasses look their module up
    spec.loader.exec_module(mod)
    return mod


class _Late(Exception):
    pass


def _alarm(signum, frame):
    raise _Late


def plan_once(mod, ops, graph, m: int, adatopk: bool, limit: float | None = None):
    """(seconds, plan) or (None, None) when ``limit`` seconds passed first."""
    if limit:
        signal.signal(signal.SIGALRM, _alarm)
        signal.alarm(int(limit))
    t = time.perf_counter()
    try:
        p = mod.partition(ops, graph, microbatches=m, adatopk=adatopk, min_density=MIN_DENSITY)
    except _Late:
        return None, None
    finally:
        if limit:
            signal.alarm(0)
    return time.perf_counter() - t, p


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--ref", help="also time the planner of this git commit (one run a case)")
    ap.add_argument("--ref-limit", type=float, default=300.0)
    ap.add_argument("--out", default="benchmarks/results")
    ap.add_argument("--host", default=f"{os.cpu_count()}cpu-x86", help="machine label")
    args = ap.parse_args(argv)
    date = datetime.date.today().isoformat()

    ops492, build = traced_graph()
    print(f"traced graph: {build}", file=sys.stderr, flush=True)
    g6 = geo.DeviceGraph.load(SITES_6)
    g48 = geo.DeviceGraph.from_dict(device_file("mixed", 0))
    gpt2m = geo.gpt2_opgraph(layers=24, dim=1024, seq_len=1024, vocab=50257, batch=1, heads=16)
    cases = {
        "6dev-492": (ops492, g6, build["microbatches"]),
        "48dev-50": (gpt2m, g48, 32),
        "48dev-492": (ops492, g48, build["microbatches"]),
    }
    ref = load_ref(args.ref) if args.ref else None
    rows = []
    for name, (ops, graph, m) in cases.items():
        for adatopk in (False, True):
            times, plan = [], None
            for _ in range(args.repeats):
                s, plan = plan_once(geo, ops, graph, m, adatopk)
                times.append(s)
            row = {
                "case": name,
                "devices": len(graph),
                "nodes": len(ops.nodes),
                "microbatches": m,
                "adatopk": adatopk,
                "times_s": times,
                "median_s": statistics.median(times),
                "spread_s": max(times) - min(times),
                "target_s": TARGETS[name],
                "stages": plan.num_stages,
                "step_time_s": plan.step_time_s,
                "bottleneck_s": plan.bottleneck_s,
                "devices_used": list(plan.device_names),
                "densities": list(plan.densities),
            }
            if ref is not None:
                s, p = plan_once(ref, ops, graph, m, adatopk, args.ref_limit)
                row["ref_s"] = s
                row["ref_step_time_s"] = None if p is None else p.step_time_s
                row["ref_bottleneck_s"] = None if p is None else p.bottleneck_s
            rows.append(row)
            print(
                f"{name} {'AdaTopK' if adatopk else 'exact'}: median {row['median_s']:.2f} s "
                f"(spread {row['spread_s']:.2f}), ref {row.get('ref_s')}",
                file=sys.stderr,
                flush=True,
            )

    def fmt_ref(r: dict) -> str:
        if "ref_s" not in r:
            return "-"
        if r["ref_s"] is None:
            return f"> {args.ref_limit:.0f} s (stopped)"
        return f"{r['ref_s']:.2f} s (step {1e3 * r['ref_step_time_s']:.1f} ms)"

    lines = [
        f"# Geo planning time ({date}, {args.host})",
        "",
        f"`PYTHONPATH=src python benchmarks/geo_plan_time.py --repeats {args.repeats}"
        + (f" --ref {args.ref} --ref-limit {args.ref_limit:g}" if args.ref else "")
        + f"`; {cpu_name()} ({cpu_flags()}), {os.cpu_count()} CPUs shared with other work, "
        f"Python {platform.python_version()}, numpy {__import__('numpy').__version__}.",
        "",
        "What is timed: `moeflow.plan.geo.partition` alone (the search), exact links and "
        f"AdaTopK (min density {MIN_DENSITY}), {args.repeats} runs each; graph building is "
        "below. Cases in the script's docstring. Targets: <= 10 s for 6 devices and a "
        "~500-node graph, <= 30 s for 48 devices.",
        "",
        "| case | devices | nodes | micro-batches | links | median s | spread s | target s "
        "| plan: stages, step ms | "
        + (f"planner of {args.ref} (one run) |" if args.ref else "")
        + "",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |" + (" --- |" if args.ref else ""),
    ]
    for r in rows:
        lines.append(
            f"| {r['case']} | {r['devices']} | {r['nodes']} | {r['microbatches']} | "
            f"{'AdaTopK' if r['adatopk'] else 'exact'} | {r['median_s']:.2f} | "
            f"{r['spread_s']:.2f} | {r['target_s']:.0f} | {r['stages']}, "
            f"{1e3 * r['step_time_s']:.1f} |" + (f" {fmt_ref(r)} |" if args.ref else "")
        )
    lines += [
        "",
        f"Graph building for the 492-node case (once, not part of the times above): imports "
        f"{build['import_s']:.1f} s; as `geo plan` builds it (module on the meta device, "
        f"graph measured on fake tensors) {build['meta_build_and_trace_s']:.1f} s; building "
        f"the module with initialised weights (what `geo train` needs) would add "
        f"{build['build_with_weights_s']:.1f} s.",
        "",
    ]
    if args.ref:
        lines += [
            f"The planner of {args.ref} minimised the bottleneck first, then the step; its "
            "step can be longer than the current plan's (the objective changed).",
            "",
        ]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = f"geo_plan_time_{args.host}_{date}"
    (out / f"{stem}.md").write_text("\n".join(lines))
    record = {
        "cpu": cpu_name(),
        "cpu_flags": cpu_flags(),
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "repeats": args.repeats,
        "ref": args.ref,
        "min_density": MIN_DENSITY,
        "traced": TRACED,
        "build": build,
        "rows": rows,
    }
    (out / f"{stem}.json").write_text(json.dumps(record, indent=1) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
