"""``moeflow simulate``: simulate a plan; write a Chrome/Perfetto trace and a Gantt PNG.

    moeflow simulate --model mixtral-8x7b --cluster fsmoe-testbed-a --tokens 8192 \\
        --trace t.json --png t.png [--method fsmoe|deepspeed-moe|tutel|tutel+pipemoe|lina]
    moeflow simulate --plan plan.json --trace t.json
"""

from __future__ import annotations

import argparse
import sys

from moeflow.errors import MoeflowError

METHODS = ("fsmoe", "deepspeed-moe", "tutel", "tutel+pipemoe", "lina")


def add_simulate_arguments(p: argparse.ArgumentParser) -> None:
    from moeflow.plan.cli import add_common_arguments

    add_common_arguments(p)
    p.add_argument("--method", default="fsmoe", choices=METHODS)
    p.add_argument("--plan", default=None, help="simulate this Plan JSON instead of planning")
    p.add_argument("--tutel-r", type=int, default=2)
    p.add_argument("--trace", default=None, help="write a Chrome/Perfetto trace JSON here")
    p.add_argument("--png", default=None, help="write a Gantt chart PNG here")


def _make_plan(args):
    from moeflow.plan import Plan, baselines, fsmoe
    from moeflow.plan.cli import setup

    if args.plan:
        return Plan.load(args.plan)
    workloads, perf, cluster, mp = setup(args)
    if args.method == "fsmoe":
        return fsmoe.plan(workloads, perf, cluster, r_max=args.r_max, model=mp.name)
    if args.method == "tutel":
        return baselines.tutel(workloads, perf, cluster, r=args.tutel_r, model=mp.name)
    return baselines.BASELINES[args.method](workloads, perf, cluster, model=mp.name)


def run_simulate(args) -> int:
    from moeflow.sim.builders import simulate_plan

    try:
        plan = _make_plan(args)
    except MoeflowError as e:
        print(f"moeflow simulate: error: {e}", file=sys.stderr)
        return 2
    tl = simulate_plan(plan)
    print(f"plan {plan.method} ({plan.model or 'custom'} on {plan.cluster or 'custom'}): "
          f"{len(plan.layers)} layers, {len(tl.graph)} tasks")
    print(f"makespan {tl.makespan:.3f} ms")
    for r, b in tl.busy.items():
        print(f"  {r:<6} busy {b:12.3f} ms  ({100 * b / tl.makespan:5.1f}%)")
    cp = tl.critical_path()
    shown = cp if len(cp) <= 12 else cp[:6] + ["..."] + cp[-5:]
    print(f"critical path ({len(cp)} tasks): {' -> '.join(shown)}")
    if args.trace:
        tl.to_chrome_trace(args.trace)
        print(f"trace written to {args.trace} (open in https://ui.perfetto.dev)")
    if args.png:
        tl.to_png(args.png, title=f"{plan.method}: {plan.model} on {plan.cluster}, "
                                  f"{tl.makespan:.1f} ms")
        print(f"Gantt chart written to {args.png}")
    return 0


add_arguments = add_simulate_arguments
run = run_simulate
