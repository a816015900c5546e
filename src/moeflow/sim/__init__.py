"""Task-graph simulator: event-driven engine, Plan -> TaskGraph builders, trace and Gantt export.

Pure Python (matplotlib only when a PNG is written)::

    tl = moeflow.sim.simulate(plan)      # a Plan or a TaskGraph
    tl.makespan, tl.busy, tl.critical_path()
    tl.to_chrome_trace("t.json"); tl.to_png("t.png")
"""

from __future__ import annotations

from moeflow.sim.builders import (
    add_moe_pass,
    moe_pass_graph,
    pass_idle_inter,
    pass_time,
    plan_graph,
    simulate_plan,
)
from moeflow.sim.engine import Task, TaskGraph, Timeline, chain, makespan_of
from moeflow.sim.engine import simulate as simulate_graph


def simulate(obj) -> Timeline:
    """Simulate a :class:`TaskGraph` or a :class:`moeflow.plan.Plan`."""
    if isinstance(obj, TaskGraph):
        return simulate_graph(obj)
    return simulate_plan(obj)


__all__ = [
    "Task",
    "TaskGraph",
    "Timeline",
    "chain",
    "makespan_of",
    "simulate",
    "simulate_graph",
    "add_moe_pass",
    "moe_pass_graph",
    "pass_idle_inter",
    "pass_time",
    "plan_graph",
    "simulate_plan",
]
