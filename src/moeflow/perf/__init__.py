"""Cost models: alpha-beta fits per primitive, hardware presets, and the one measuring
harness (:mod:`moeflow.perf.measure`) that every profiler uses.

``LinearCost``, ``PerfModel`` and the presets are pure Python; ``moeflow.perf.measure``
imports torch and is not loaded here. The ``moeflow profile`` job is
:mod:`moeflow.apps.profile`.
"""

from __future__ import annotations

from moeflow._moved import moved_names
from moeflow.perf.cost import PLANNER_PRIMITIVES, PRIMITIVES, LinearCost, PerfModel
from moeflow.perf.presets import perf_preset, perf_preset_names

__getattr__ = moved_names(__name__, {"profile": "moeflow.apps.profile"})


__all__ = [
    "PLANNER_PRIMITIVES",
    "PRIMITIVES",
    "LinearCost",
    "PerfModel",
    "perf_preset",
    "perf_preset_names",
]
