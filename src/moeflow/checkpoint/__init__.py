"""Checkpoints: the transformers key tables (both ways), sharded safetensors reading, and
loading a transformers MoE checkpoint into :class:`moeflow.models.MoEDecoder`.

    model = moeflow.checkpoint.load_pretrained("path/to/qwen3-moe")
"""

from moeflow.checkpoint.pretrained import (
    FAMILIES,
    config_from_hf,
    from_hf_state_dict,
    load_pretrained,
    to_hf_state_dict,
)

__all__ = [
    "FAMILIES",
    "config_from_hf",
    "from_hf_state_dict",
    "load_pretrained",
    "to_hf_state_dict",
]
