"""Validate the FinDEP solver (issue 15) on the simulator: optimality, speedup, solve time.

    python benchmarks/findep_sim.py [--quick] [--out benchmarks/results]

1. Optimality: over the small-batch sweep (every testbed and model preset, 2-8 layers,
   sequence lengths 1024-8192, 4-16 sequences per AG GPU, r2 <= 8; 512 workloads), is the
   solver's (m_a, r1, r2, order) within 1% of the best one found by simulating every option
   memory allows?  Target: every workload.
2. Speedup: on the paper's grid (A6000, A10, H20, 32xH20; DeepSeek-V2 and Qwen3-235B-A22B cut
   to 4-48 layers; sequence lengths 1024-8192), the simulated throughput of the FinDEP plan
   over the tuned ping-pong pipeline (PPPipe) and naive DEP, next to the published
   1.02-1.61x (over PPPipe).
3. Solve time: the largest per workload, target < 1 s.
4. Ablation: why the simulated speedup over PPPipe sits below the published one. One factor
   at a time (baseline strength, micro-batches in flight, batch cap, link bandwidth, GEMM
   fixed cost) is moved on the same grid and the FinDEP plan and PPPipe are re-solved and
   re-simulated; next to each, how many workloads have PPPipe's pipeline saturated
   (``r1 F >= G`` in Eq. 13: the AG or the EG is busy every layer, so chunking can only
   shorten the last layer's drain, a gain of order ``1 / T``).

Writes ``findep_sim_<host>_<date>.md`` (and ``.json``) under ``--out``. Pure Python (no
torch); the figures are simulated, only the solve times depend on the machine.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import cpu_isa, cpu_name  # noqa: E402

from moeflow.perf.cost import LinearCost
from moeflow.plan import findep as fd
from moeflow.sim.findep import sim_time


def per_seq(w, p) -> float:
    """Simulated ms per sequence of plan ``p``."""
    return sim_time(w, p.m_a, p.r1, p.r2, p.order) / (p.r1 * p.m_a)


def optimality(quick: bool) -> dict:
    ws = fd.optimality_sweep()
    if quick:
        ws = ws[::16]
    gaps, worst, n_space = [], None, 0
    t0 = time.perf_counter()
    for i, w in enumerate(ws):
        p = fd.solve(w)
        e = fd.exhaustive(w, sim_time)
        n_space += e.evaluated
        gap = per_seq(w, p) / (e.time_ms / (e.r1 * e.m_a)) - 1.0
        gaps.append(gap)
        if worst is None or gap > worst[0]:
            worst = (gap, w.name, (p.m_a, p.r1, p.r2, p.order), (e.m_a, e.r1, e.r2, e.order))
        if (i + 1) % 64 == 0:
            print(
                f"optimality: {i + 1}/{len(ws)} workloads, worst gap {100 * worst[0]:.3f}%",
                file=sys.stderr,
                flush=True,
            )
    return {
        "workloads": len(ws),
        "schedules_simulated": n_space,
        "within_1pct": sum(g <= 0.01 for g in gaps),
        "max_gap": max(gaps),
        "mean_gap": statistics.fmean(gaps),
        "worst": worst,
        "seconds": time.perf_counter() - t0,
    }


def speedups(quick: bool) -> dict:
    ws = fd.paper_workloads()
    if quick:
        ws = ws[::8]
    rows, solve_max = [], 0.0
    for w in ws:
        p = fd.solve(w)
        solve_max = max(solve_max, p.solve_s)
        f = per_seq(w, p)
        row = {
            "workload": w.name,
            "testbed": w.testbed.name,
            "model": w.model.name,
            "plan": (p.m_a, p.r1, p.r2, p.order),
            "solve_s": p.solve_s,
            "pred_vs_sim": p.time_ms / sim_time(w, p.m_a, p.r1, p.r2, p.order) - 1.0,
        }
        for name, fn in (("pppipe", fd.pppipe_plan), ("naive", fd.naive_plan)):
            try:
                b = fn(w)
            except fd.PlanError:  # nothing fits unchunked: the baseline cannot run at all
                row[name] = None
                continue
            row[name] = per_seq(w, b) / f
        rows.append(row)
    return {"rows": rows, "solve_max_s": solve_max}


def _scaled(w, part: str, alpha: float = 1.0, beta: float = 1.0, what: str = ""):
    """``w`` with its testbed's ``part`` cost ("gemm" or "link") scaled."""
    c = getattr(w.testbed, part)
    new = LinearCost(c.alpha * alpha, c.beta * beta, source="derived", note=f"ablation: {what}")
    return dataclasses.replace(w, testbed=dataclasses.replace(w.testbed, **{part: new}))


#: (label, factor, workload transform, PPPipe's micro-batch cap or None): each moves one
#: factor of our setting; the first row is the setting of the table above
ABLATIONS = (
    ("as above", "none", lambda w: w, None),
    (
        "PPPipe held to 2 micro-batches (the least a ping-pong needs), FinDEP free",
        "baseline strength",
        lambda w: w,
        2,
    ),
    (
        "both at most 2 micro-batches in flight",
        "micro-batches",
        lambda w: dataclasses.replace(w, max_r1=2),
        None,
    ),
    (
        "half of each GPU's memory reserved (framework, workspace; ours 10%)",
        "memory",
        lambda w: dataclasses.replace(w, testbed=dataclasses.replace(w.testbed, reserve_frac=0.5)),
        None,
    ),
    (
        "at most 8 sequences per AG GPU (serving batch cap)",
        "batch",
        lambda w: dataclasses.replace(w, max_seqs=8),
        None,
    ),
    (
        "AG<->EG link 4x slower (beta x4)",
        "link bandwidth",
        lambda w: _scaled(w, "link", beta=4.0, what="link beta x4"),
        None,
    ),
    (
        "AG<->EG link 4x faster (beta / 4)",
        "link bandwidth",
        lambda w: _scaled(w, "link", beta=0.25, what="link beta / 4"),
        None,
    ),
    (
        "GEMM fixed cost x10 (alpha 0.426 ms)",
        "cost fits",
        lambda w: _scaled(w, "gemm", alpha=10.0, what="gemm alpha x10"),
        None,
    ),
)


def ablation(quick: bool) -> list[dict]:
    """Each row of :data:`ABLATIONS` on the paper grid: FinDEP over PPPipe, both simulated."""
    base = fd.paper_workloads()
    if quick:
        base = base[::8]
    out = []
    for label, factor, fn, pp_r1 in ABLATIONS:
        sp, saturated, skipped = [], 0, 0
        for w0 in base:
            w = fn(w0)
            try:
                p = fd.solve(w)
                b = fd.pppipe_plan(w if pp_r1 is None else dataclasses.replace(w, max_r1=pp_r1))
            except fd.PlanError:  # nothing fits unchunked
                skipped += 1
                continue
            t = fd.asas_terms(w.costs(b.m_a, 1), b.r1, 1)
            saturated += b.r1 * t["F"] >= t["G"]
            sp.append(per_seq(w, b) / per_seq(w, p))
        out.append(
            {
                "label": label,
                "factor": factor,
                "n": len(sp),
                "skipped": skipped,
                "min": min(sp),
                "median": statistics.median(sp),
                "max": max(sp),
                "at_least_published_min": sum(v >= fd.PUBLISHED_SPEEDUP[0] for v in sp),
                "pppipe_saturated": saturated,
                "speedups": sp,
            }
        )
    return out


def _why(abl: list[dict]) -> str:
    """The reading of the ablation table, with this run's figures."""
    row = {a["factor"]: a for a in abl if a["factor"] != "link bandwidth"}
    ours, pp2, mb2 = row["none"], row["baseline strength"], row["micro-batches"]
    rng = lambda a: f"{a['min']:.2f}-{a['max']:.2f}x"  # noqa: E731
    top = max(abl[1:], key=lambda a: a["median"])
    return (
        f"**Why ours is {rng(ours)}.** Our PPPipe is tuned under the same memory limit as "
        f"FinDEP and may keep up to {fd.MAX_R1} micro-batches in flight; then its pipeline is "
        f"saturated in {ours['pppipe_saturated']} of {ours['n']} workloads and FinDEP's "
        "chunking has only the drain of one layer to win. The published figure is "
        'over the paper\'s "tuned" PPPipe, whose tuning space we could not read; held '
        f"to two micro-batches it gives {rng(pp2)} (median {pp2['median']:.3f}x, "
        f"{pp2['at_least_published_min']} of {pp2['n']} at >= 1.02x) against the published "
        f"{fd.PUBLISHED_SPEEDUP[0]}-{fd.PUBLISHED_SPEEDUP[1]}x; the factor that moves our "
        f"median most is {top['factor']} ({top['label']}). A server that keeps at most two "
        f"micro-batches in flight for both gives {rng(mb2)}: in the "
        f"{mb2['n'] - mb2['pppipe_saturated']} workloads where the round trip G then binds, "
        "chunking overlaps the "
        "transfers with the experts. The other factors move the median little (median, "
        "max): "
        + "; ".join(
            f"{a['label']}: {a['median']:.3f}x, {a['max']:.2f}x"
            for a in abl
            if a["factor"] in ("link bandwidth", "memory", "batch", "cost fits")
        )
        + ". Not modelled: contention between a transfer and a kernel on the same GPU and "
        "framework overheads, which the "
        "ideal simulator charges to neither schedule."
    )


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="a sixteenth of the sweep")
    ap.add_argument("--out", default="benchmarks/results")
    ap.add_argument("--host", default=f"{os.cpu_count()}cpu-x86", help="machine label")
    args = ap.parse_args(argv)
    date = datetime.date.today().isoformat()
    opt = optimality(args.quick)
    sp = speedups(args.quick)
    abl = ablation(args.quick)
    rows = sp["rows"]
    lines = [
        f"# FinDEP solver on the simulator ({date}, {args.host})",
        "",
        "`python benchmarks/findep_sim.py`"
        + (" --quick" if args.quick else "")
        + "; pure Python, simulated figures (only solve times depend on the machine: "
        f"{cpu_name()} ({cpu_isa()}), Python {platform.python_version()}).",
        "",
        "## Optimality (target: within 1% of the simulated exhaustive search)",
        "",
        f"- workloads: {opt['workloads']} (small-batch sweep; "
        f"{opt['schedules_simulated']} schedules simulated in {opt['seconds']:.0f} s)",
        f"- within 1%: {opt['within_1pct']} / {opt['workloads']}",
        f"- max gap {100 * opt['max_gap']:.3f}%, mean {100 * opt['mean_gap']:.4f}%",
        f"- worst: {opt['worst'][1]}: solver {opt['worst'][2]}, exhaustive {opt['worst'][3]}",
        "",
        "## Simulated speedup of FinDEP (paper grid; published 1.02-1.61x over PPPipe)",
        "",
        f"{len(rows)} workloads; largest solve time {1e3 * sp['solve_max_s']:.1f} ms "
        "(target < 1 s).",
        "",
        "| testbed | model | over PPPipe min / median / max | over naive DEP min / "
        "median / max | n |",
        "| --- | --- | --- | --- | --- |",
    ]
    pp = {}
    for r in rows:
        pp.setdefault((r["testbed"], r["model"]), []).append(r)

    def fmt(rs, key):
        v = [x[key] for x in rs if x[key] is not None]
        return f"{min(v):.3f} / {statistics.median(v):.3f} / {max(v):.3f}" if v else "does not fit"

    for (tb, mn), rs in sorted(pp.items()):
        lines.append(f"| {tb} | {mn} | {fmt(rs, 'pppipe')} | {fmt(rs, 'naive')} | {len(rs)} |")
    allp = [r["pppipe"] for r in rows if r["pppipe"] is not None]
    alln = [r["naive"] for r in rows if r["naive"] is not None]
    nofit = sum(r["pppipe"] is None for r in rows)
    lines += [
        "",
        f"Overall: {min(allp):.3f}-{max(allp):.3f}x over PPPipe, "
        f"{min(alln):.3f}-{max(alln):.3f}x over naive DEP; {nofit} workloads fit only "
        "with chunking (r2 > 1), where the baselines cannot run.",
        f"Closed form vs simulator on the chosen plans: max "
        f"{100 * max(abs(r['pred_vs_sim']) for r in rows):.3f}%.",
        "",
        "Testbed costs are derived except the A6000 GEMM fit (FSMoE's published fit); see "
        "`moeflow.plan.findep` presets for each figure's source.",
        "",
        "## Ablation: what separates this figure from the published 1.02-1.61x",
        "",
        "One factor moved at a time on the same grid; FinDEP and PPPipe re-solved, both "
        "simulated. *Saturated*: PPPipe's plan has `r1 F >= G` (Eq. 13), i.e. with its "
        "micro-batches in flight the AG or the EG is busy every layer; there FinDEP's "
        "chunks (r2) and order can only shorten the last layer's drain.",
        "",
        "| setting | factor | over PPPipe min / median / max | >= 1.02x | PPPipe saturated | n |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for a in abl:
        lines.append(
            f"| {a['label']} | {a['factor']} | {a['min']:.3f} / {a['median']:.3f} / "
            f"{a['max']:.3f} | {a['at_least_published_min']} | {a['pppipe_saturated']} | "
            f"{a['n']} |"
        )
    lines += ["", _why(abl)]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = f"findep_sim_{args.host}_{date}"
    (out / f"{stem}.md").write_text("\n".join(lines) + "\n")
    (out / f"{stem}.json").write_text(
        json.dumps({"optimality": opt, "speedups": sp, "ablation": abl}, indent=1, default=str)
        + "\n"
    )
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
