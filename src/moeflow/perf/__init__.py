"""Cost models: alpha-beta fits per primitive, hardware presets, and the profiler.

``LinearCost``, ``PerfModel`` and the presets are pure Python. ``profile`` (and
``moeflow.perf.profiler``) import torch only when called.
"""

from __future__ import annotations

from moeflow.perf.cost import PRIMITIVES, LinearCost, PerfModel
from moeflow.perf.presets import perf_preset, perf_preset_names


def profile(*args, **kwargs) -> PerfModel:
    """Time GEMMs and collectives on this machine and fit a :class:`PerfModel`.

    See :func:`moeflow.perf.profiler.profile` for the arguments (this wrapper keeps torch out
    of ``import moeflow.perf``).
    """
    from moeflow.perf.profiler import profile as _profile

    return _profile(*args, **kwargs)


__all__ = ["PRIMITIVES", "LinearCost", "PerfModel", "perf_preset", "perf_preset_names", "profile"]
