"""Integrations with other libraries: transformers MoE blocks (:mod:`moeflow.integrations.hf`).

``patch_model``, ``from_hf_block``, ``supported_classes``, ``state_dict_adapter`` and
``moeflow_state_dict_keys`` are re-exported here and load on
first use, so ``import moeflow.integrations`` costs nothing. They need transformers (the
``hf`` extra); without it the first use raises ImportError naming
``pip install "moeflow[hf]"``.
"""

from __future__ import annotations

import importlib

from moeflow._deps import require

_HF_NAMES = (
    "patch_model",
    "from_hf_block",
    "supported_classes",
    "state_dict_adapter",
    "moeflow_state_dict_keys",
)


def __getattr__(name: str):
    if name in _HF_NAMES:
        require("transformers", f"moeflow.integrations.{name}")
        value = getattr(importlib.import_module("moeflow.integrations.hf"), name)
        globals()[name] = value  # later lookups skip __getattr__
        return value
    raise AttributeError(f"module 'moeflow.integrations' has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_HF_NAMES))


__all__ = list(_HF_NAMES)
