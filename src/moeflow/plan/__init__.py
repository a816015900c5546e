"""Planners: workloads in, serializable :class:`Plan` out. Pure Python (no torch).

``moeflow.plan.fsmoe`` is the FSMoE planner; ``moeflow.plan.baselines`` the schedules it is
compared with. The expert-parallel runtime reads a plan through :func:`degrees_for_layer`.
"""

from __future__ import annotations

from moeflow.plan import baselines, fsmoe
from moeflow.plan.plan import LayerPlan, Plan, build_workload_table, degrees_for_layer
from moeflow.plan.workload import FFN_TYPES, LayerWorkload, fsmoe_sweep

__all__ = [
    "FFN_TYPES",
    "LayerWorkload",
    "fsmoe_sweep",
    "LayerPlan",
    "Plan",
    "build_workload_table",
    "degrees_for_layer",
    "fsmoe",
    "baselines",
]
