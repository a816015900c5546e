"""Compute kernels behind one interface (see :func:`expert_ffn`)."""

from moeflow.kernels.grouped import (
    ACTIVATIONS,
    IMPLS,
    ExpertFFNFunction,
    expert_ffn,
    expert_ffn_reference,
    resolve_impl,
)

__all__ = [
    "ACTIVATIONS",
    "IMPLS",
    "ExpertFFNFunction",
    "expert_ffn",
    "expert_ffn_reference",
    "resolve_impl",
]
