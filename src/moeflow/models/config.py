"""``DecoderConfig``: the shape of a decoder-only MoE model (no torch import).

One frozen dataclass covers the families moeflow loads (Qwen3-MoE, Mixtral, DeepSeek-V2)
and the demo model: RMSNorm, rotary position embeddings, grouped-query attention (optionally
with per-head RMSNorm on queries and keys, as Qwen3 has) or DeepSeek-V2's multi-head latent
attention (``attention="mla"``), and a :class:`moeflow.MoELayer` FFN in every layer (``moe``,
shared experts included).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from moeflow.config import MoEConfig
from moeflow.errors import ConfigError
from moeflow.validate import positive_float, positive_int

ATTENTIONS = ("gqa", "mla")


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
    # multi-head latent attention (DeepSeek-V2, arXiv 2405.04434, section 2.1): queries
    # through an optional low-rank ``q_lora_rank``, keys and values from one compressed
    # latent of ``kv_lora_rank`` plus a shared rotary key of ``qk_rope_head_dim``; the cache
    # holds the latent and the rotary key. ``head_dim`` is then the rotary dimension.
    attention: str = "gqa"
    q_lora_rank: int | None = None
    kv_lora_rank: int = 0
    qk_nope_head_dim: int = 0
    v_head_dim: int = 0

    def __post_init__(self) -> None:
        for f in (
            "vocab_size",
            "num_layers",
            "num_heads",
            "num_kv_heads",
            "head_dim",
            "max_position_embeddings",
        ):
            object.__setattr__(self, f, positive_int(f, getattr(self, f)))
        positive_float("rope_theta", self.rope_theta)
        positive_float("rms_norm_eps", self.rms_norm_eps)
        if not isinstance(self.moe, MoEConfig):
            raise ConfigError("moe", type(self.moe).__name__, "a MoEConfig")
        if self.num_heads % self.num_kv_heads:
            raise ConfigError(
                "num_kv_heads", self.num_kv_heads, f"a divisor of num_heads={self.num_heads}"
            )
        if self.head_dim % 2:
            raise ConfigError("head_dim", self.head_dim, "an even int (rotary pairs)")
        if self.attention not in ATTENTIONS:
            raise ConfigError("attention", self.attention, f"one of {ATTENTIONS}")
        if self.attention == "mla":
            for f in ("kv_lora_rank", "qk_nope_head_dim", "v_head_dim"):
                positive_int(f, getattr(self, f))
            positive_int("q_lora_rank", self.q_lora_rank, allow_none=True)

    @property
    def hidden_size(self) -> int:
        return self.moe.hidden_size

    def replace(self, **changes) -> DecoderConfig:
        return dataclasses.replace(self, **changes)
