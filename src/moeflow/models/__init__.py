"""Decoder-only MoE models (no torch.distributed): the model, the demo model and batched
generation. Loading a transformers checkpoint is :mod:`moeflow.checkpoint`'s job.

    model = moeflow.checkpoint.load_pretrained("path/to/qwen3-moe")      # or Mixtral
    results = moeflow.models.generate(model, [Request([1, 2, 3], SamplingParams(8))])
"""

from moeflow._moved import moved_names
from moeflow.models.config import DecoderConfig
from moeflow.models.decoder import DecoderLayer, KVCache, MoEDecoder, RMSNorm
from moeflow.models.generate import (
    GenerationResult,
    Request,
    SamplingParams,
    generate,
    validate_request,
)

__getattr__ = moved_names(
    __name__,
    dict.fromkeys(
        ("FAMILIES", "config_from_hf", "from_hf_state_dict", "load_pretrained", "to_hf_state_dict"),
        "moeflow.checkpoint",
    ),
)

__all__ = [
    "DecoderConfig",
    "DecoderLayer",
    "KVCache",
    "MoEDecoder",
    "RMSNorm",
    "GenerationResult",
    "Request",
    "SamplingParams",
    "generate",
    "validate_request",
]
