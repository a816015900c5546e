"""Decoder-only MoE models (no torch.distributed): the model, transformers checkpoint
adapters, and batched generation.

    model = moeflow.models.load_pretrained("path/to/qwen3-moe")      # or Mixtral
    results = moeflow.models.generate(model, [Request([1, 2, 3], SamplingParams(8))])
"""

from moeflow.models.adapters import (
    FAMILIES,
    config_from_hf,
    from_hf_state_dict,
    load_pretrained,
    to_hf_state_dict,
)
from moeflow.models.config import DecoderConfig
from moeflow.models.decoder import DecoderLayer, KVCache, MoEDecoder, RMSNorm
from moeflow.models.generate import (
    GenerationResult,
    Request,
    SamplingParams,
    generate,
    validate_request,
)

__all__ = [
    "FAMILIES",
    "config_from_hf",
    "from_hf_state_dict",
    "load_pretrained",
    "to_hf_state_dict",
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
