"""``DecoderConfig``: the shape of a decoder-only MoE model (no torch import).

One frozen dataclass covers the families moeflow loads (Qwen3-MoE, Mixtral) and the demo
model: RMSNorm, rotary position embeddings, grouped-query attention (optionally with
per-head RMSNorm on queries and keys, as Qwen3 has), and a :class:`moeflow.MoELayer` FFN in
every layer (``moe``, shared experts included).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from moeflow.config import MoEConfig
from moeflow.errors import ConfigError
from moeflow.validate import positive_float, positive_int


@dataclass(frozen=True, kw_only=True)
class DecoderConfig:
    """Shapes: V ``vocab_size``, D ``moe.hidden_size``, H ``num_heads``, Hkv
    ``num_kv_heads``, d ``head_dim``; ``max_position_embeddings`` is the context length
    (prompt plus generated tokens)."""

    vocab_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    moe: MoEConfig
    max_position_embeddings: int = 2048
    rope_theta: float = 10000.0
    rms_norm_eps: float = 1e-6
    qk_norm: bool = False
    tie_word_embeddings: bool = False
    family: str = "moeflow"

    def __post_init__(self) -> None:
        for f in ("vocab_size", "num_layers", "num_heads", "num_kv_heads", "head_dim",
                  "max_position_embeddings"):
            object.__setattr__(self, f, positive_int(f, getattr(self, f)))
        positive_float("rope_theta", self.rope_theta)
        positive_float("rms_norm_eps", self.rms_norm_eps)
        if not isinstance(self.moe, MoEConfig):
            raise ConfigError("moe", type(self.moe).__name__, "a MoEConfig")
        if self.num_heads % self.num_kv_heads:
            raise ConfigError("num_kv_heads", self.num_kv_heads,
                              f"a divisor of num_heads={self.num_heads}")
        if self.head_dim % 2:
            raise ConfigError("head_dim", self.head_dim, "an even int (rotary pairs)")

    @property
    def hidden_size(self) -> int:
        return self.moe.hidden_size

    def replace(self, **changes) -> DecoderConfig:
        return dataclasses.replace(self, **changes)
