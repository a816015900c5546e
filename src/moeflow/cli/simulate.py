"""``moeflow simulate``: simulate a plan; write a Chrome/Perfetto trace and a Gantt PNG.

    moeflow simulate --model mixtral-8x7b --cluster fsmoe-testbed-a --tokens 8192 \\
        --trace t.json --png t.png [--method fsmoe|deepspeed-moe|tutel|tutel+pipemoe|lina]
    moeflow simulate --plan plan.json --trace t.json

Flags are checked before anything runs (:func:`validate_simulate_args`): bad values raise
ConfigError naming the flag, a missing or malformed ``--plan`` InputError naming the file,
and the directories of ``--trace`` / ``--png`` must exist and be writable before the
simulation starts.
"""

from __future__ import annotations

import argparse

METHODS = ("fsmoe", "deepspeed-moe", "tutel", "tutel+pipemoe", "lina")


def add_simulate_arguments(p: argparse.ArgumentParser) -> None:
    from moeflow.cli.plan import add_common_arguments

    add_common_arguments(p)
    p.add_argument("--method", default="fsmoe", choices=METHODS)
    p.add_argument("--plan", default=None, help="simulate this Plan JSON instead of planning")
    p.add_argument("--tutel-r", type=int, default=2, help="Tutel-style fixed degree")
    p.add_argument("--trace", default=None, help="write a Chrome/Perfetto trace JSON here")
    p.add_argument("--png", default=None, help="write a Gantt chart PNG here")
    p.add_argument(
        "--force",
        action="store_true",
        help="replace existing --trace/--png files (never an input); both are written "
        "atomically and refused if they exist without it",
    )


def validate_simulate_args(args) -> None:
    """Check every ``moeflow simulate`` flag and output path before simulating."""
    from moeflow.cli.plan import validate_common_args
    from moeflow.files import check_output

    validate_common_args(args)
    force = getattr(args, "force", False)
    check_output("--trace", args.trace, inputs=[args.perf, args.plan], force=force)
    check_output("--png", args.png, inputs=[args.perf, args.plan], force=force)


def _make_plan(args):
    from moeflow.cli.plan import setup
    from moeflow.plan import baselines, fsmoe
    from moeflow.plan.io import load_plan_file

    if args.plan:
        return load_plan_file(args.plan, "--plan")
    workloads, perf, cluster, mp = setup(args)
    if args.method == "fsmoe":
        return fsmoe.plan(workloads, perf, cluster, r_max=args.r_max, model=mp.name)
    if args.method == "tutel":
        return baselines.tutel(workloads, perf, cluster, r=args.tutel_r, model=mp.name)
    return baselines.BASELINES[args.method](workloads, perf, cluster, model=mp.name)


def run_simulate(args) -> int:
    from moeflow.files import atomic_path
    from moeflow.sim.builders import simulate_plan

    validate_simulate_args(args)
    plan = _make_plan(args)
    tl = simulate_plan(plan)
    print(
        f"plan {plan.method} ({plan.model or 'custom'} on {plan.cluster or 'custom'}): "
        f"{len(plan.layers)} layers, {len(tl.graph)} tasks"
    )
    print(f"makespan {tl.makespan:.3f} ms")
    for r, b in tl.busy.items():
        print(f"  {r:<6} busy {b:12.3f} ms  ({100 * b / tl.makespan:5.1f}%)")
    cp = tl.critical_path()
    shown = cp if len(cp) <= 12 else cp[:6] + ["..."] + cp[-5:]
    print(f"critical path ({len(cp)} tasks): {' -> '.join(shown)}")
    force = getattr(args, "force", False)
    if args.trace:
        with atomic_path(args.trace, force=force) as tmp:
            tl.to_chrome_trace(tmp)
        print(f"trace written to {args.trace} (open in https://ui.perfetto.dev)")
    if args.png:
        title = f"{plan.method}: {plan.model} on {plan.cluster}, {tl.makespan:.1f} ms"
        with atomic_path(args.png, force=force) as tmp:
            tl.to_png(tmp, title=title)
        print(f"Gantt chart written to {args.png}")
    return 0


add_arguments = add_simulate_arguments
run = run_simulate
