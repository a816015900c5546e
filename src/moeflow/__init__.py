"""moeflow: fast Mixture-of-Experts training and serving on PyTorch.

Heavy sub-packages (torch-based layer, runtime, compress) load lazily, so ``moeflow.plan``
and ``moeflow.sim`` stay importable without torch.
"""

from __future__ import annotations

import importlib

from moeflow import errors
from moeflow.config import ModelPreset, MoEConfig, model_preset, preset_names

__version__ = "0.1.0"

_LAZY = {
    "MoELayer": ("moeflow.layer.moe", "MoELayer"),
    "ExpertParallel": ("moeflow.parallel.expert_parallel", "ExpertParallel"),
    "parallelize": ("moeflow.parallel.parallelize", "parallelize"),
    "patch_model": ("moeflow.integrations.hf", "patch_model"),
    "from_hf_block": ("moeflow.integrations.hf", "from_hf_block"),
    "layer": ("moeflow.layer", None),
    "kernels": ("moeflow.kernels", None),
    "comm": ("moeflow.comm", None),
    "parallel": ("moeflow.parallel", None),
    "checkpoint": ("moeflow.checkpoint", None),
    "models": ("moeflow.models", None),
    "serving": ("moeflow.serving", None),
    "geo": ("moeflow.geo", None),
    "runtime": ("moeflow.runtime", None),
    "perf": ("moeflow.perf", None),
    "plan": ("moeflow.plan", None),
    "sim": ("moeflow.sim", None),
    "compress": ("moeflow.compress", None),
    "integrations": ("moeflow.integrations", None),
}


def __getattr__(name: str):
    if name in _LAZY:
        mod, attr = _LAZY[name]
        m = importlib.import_module(mod)
        value = getattr(m, attr) if attr else m
        globals()[name] = value  # later lookups skip __getattr__
        return value
    raise AttributeError(f"module 'moeflow' has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_LAZY))


__all__ = [
    "MoEConfig",
    "ModelPreset",
    "model_preset",
    "preset_names",
    "errors",
    "MoELayer",
    "ExpertParallel",
    "parallelize",
    "patch_model",
    "from_hf_block",
    "__version__",
]
