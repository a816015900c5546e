"""A decoder-only MoE model: RMSNorm, RoPE, grouped-query attention with a batched KV cache,
and a :class:`moeflow.MoELayer` FFN (shared experts included) in every layer.

Shape legend: B sequences, T new tokens per sequence, L cache positions, D hidden, H query
heads, K key/value heads, d head dim, V vocabulary.

The math follows the transformers implementations it loads (Llama-style RMSNorm computed in
fp32, rotary embeddings with ``rotate_half``, ``repeat_kv`` for GQA, Qwen3's per-head q/k
RMSNorm before RoPE), so logits agree to rounding. Each layer also exposes its two halves
(:meth:`DecoderLayer.attend`, the attention side, and the MoE FFN through
:meth:`DecoderLayer.ffn_input` and ``layer.mlp``) so a disaggregated runtime can run them on
different ranks; this module knows nothing about distribution.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from moeflow.errors import InputError
from moeflow.layer.moe import MoELayer
from moeflow.models.config import DecoderConfig


class RMSNorm(nn.Module):
    """``w * x / sqrt(mean(x^2) + eps)``, statistics in fp32 (Zhang & Sennrich, 2019)."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(dtype)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    a, b = x.chunk(2, dim=-1)
    return torch.cat((-b, a), dim=-1)


class Rotary(nn.Module):
    """Rotary position embedding (RoFormer, Su et al. 2021, Eq. 34), halves layout."""

    def __init__(self, head_dim: int, theta: float):
        super().__init__()
        inv = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
        self.register_buffer("inv_freq", inv, persistent=False)

    def forward(self, pos_BT: torch.Tensor, dtype: torch.dtype):
        freqs = pos_BT.float().unsqueeze(-1) * self.inv_freq  # B T d/2
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos().to(dtype).unsqueeze(1), emb.sin().to(dtype).unsqueeze(1)  # B 1 T d


class KVCache:
    """Keys and values of ``slots`` sequences, ``max_len`` positions each, every layer.

    ``k[layer]`` is (slots, L, K, d). A forward call names the slots it works on (``rows_B``)
    and where each one's new tokens start (``start_B``); positions past a sequence's valid
    length hold stale values that causal masking never reads and later writes overwrite.
    """

    def __init__(
        self,
        cfg: DecoderConfig,
        slots: int,
        max_len: int | None = None,
        dtype: torch.dtype = torch.float32,
        device=None,
    ):
        L = max_len or cfg.max_position_embeddings
        if cfg.attention == "mla":  # the compressed latent and the shared rotary key
            k_shape, v_shape = (slots, L, 1, cfg.kv_lora_rank), (slots, L, 1, cfg.head_dim)
        else:
            k_shape = v_shape = (slots, L, cfg.num_kv_heads, cfg.head_dim)
        self.k = [torch.zeros(k_shape, dtype=dtype, device=device) for _ in range(cfg.num_layers)]
        self.v = [torch.zeros(v_shape, dtype=dtype, device=device) for _ in range(cfg.num_layers)]
        self.slots, self.max_len = slots, L

    def write_and_read(
        self,
        layer: int,
        rows_B: torch.Tensor,
        pos_BT: torch.Tensor,
        k_BTKd: torch.Tensor,
        v_BTKd: torch.Tensor,
        upto: int,
    ):
        """Store the new keys/values at ``pos_BT`` and return every slot's first ``upto``
        positions, (B, K, upto, d) each."""
        r = rows_B.unsqueeze(1).expand_as(pos_BT)
        self.k[layer][r, pos_BT] = k_BTKd.to(self.k[layer].dtype)
        self.v[layer][r, pos_BT] = v_BTKd.to(self.v[layer].dtype)
        k = self.k[layer][rows_B, :upto].transpose(1, 2)
        v = self.v[layer][rows_B, :upto].transpose(1, 2)
        return k, v


class Attention(nn.Module):
    """Grouped-query attention with rotary embeddings over a :class:`KVCache`."""

    def __init__(self, cfg: DecoderConfig):
        super().__init__()
        D, H, K, d = cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        self.H, self.K, self.d = H, K, d
        self.q_proj = nn.Linear(D, H * d, bias=False)
        self.k_proj = nn.Linear(D, K * d, bias=False)
        self.v_proj = nn.Linear(D, K * d, bias=False)
        self.o_proj = nn.Linear(H * d, D, bias=False)
        self.q_norm = RMSNorm(d, cfg.rms_norm_eps) if cfg.qk_norm else None
        self.k_norm = RMSNorm(d, cfg.rms_norm_eps) if cfg.qk_norm else None

    def forward(
        self,
        x_BTD: torch.Tensor,
        cos,
        sin,
        cache: KVCache,
        layer: int,
        rows_B: torch.Tensor,
        pos_BT: torch.Tensor,
    ) -> torch.Tensor:
        B, T, _ = x_BTD.shape
        q = self.q_proj(x_BTD).view(B, T, self.H, self.d)
        k = self.k_proj(x_BTD).view(B, T, self.K, self.d)
        v = self.v_proj(x_BTD).view(B, T, self.K, self.d)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = q.transpose(1, 2), k.transpose(1, 2)  # B H T d
        q = q * cos + _rotate_half(q) * sin
        k = k * cos + _rotate_half(k) * sin
        upto = int(pos_BT.max()) + 1
        k_all, v_all = cache.write_and_read(layer, rows_B, pos_BT, k.transpose(1, 2), v, upto)
        key_pos = torch.arange(upto, device=x_BTD.device)
        mask_BTL = key_pos.view(1, 1, -1) <= pos_BT.unsqueeze(-1)  # causal, per sequence
        # grouped-query attention without copying the K shared heads H/K times
        out = F.scaled_dot_product_attention(
            q,
            k_all.to(q.dtype),
            v_all.to(q.dtype),
            attn_mask=mask_BTL.unsqueeze(1),
            scale=self.d**-0.5,
            enable_gqa=self.H != self.K,
        )
        return self.o_proj(out.transpose(1, 2).reshape(B, T, self.H * self.d))


def _rope_interleaved(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary embedding on adjacent pairs ``(x0, x1), (x2, x3), ...`` (DeepSeek-V2's layout);
    ``cos``/``sin`` hold each frequency twice (halves layout), so the first half is used."""
    half = cos.shape[-1] // 2
    c, s = cos[..., :half], sin[..., :half]
    x0, x1 = x.float()[..., 0::2], x.float()[..., 1::2]
    out = torch.stack((x0 * c - x1 * s, x0 * s + x1 * c), dim=-1).flatten(-2)
    return out.to(x.dtype)


class LatentAttention(nn.Module):
    """Multi-head latent attention (DeepSeek-V2, arXiv 2405.04434, Eq. 9-19): the cache holds
    a normalised ``kv_lora_rank`` latent and one rotary key per token; keys and values are
    expanded from the latent per call (no weight absorption: the simple, exact form)."""

    def __init__(self, cfg: DecoderConfig):
        super().__init__()
        D, H = cfg.hidden_size, cfg.num_heads
        self.H, self.r = H, cfg.kv_lora_rank
        self.nope, self.rope, self.vd = cfg.qk_nope_head_dim, cfg.head_dim, cfg.v_head_dim
        qk = self.nope + self.rope
        self.qk = qk
        if cfg.q_lora_rank is None:
            self.q_proj = nn.Linear(D, H * qk, bias=False)
        else:
            self.q_a_proj = nn.Linear(D, cfg.q_lora_rank, bias=False)
            self.q_a_layernorm = RMSNorm(cfg.q_lora_rank, 1e-6)
            self.q_b_proj = nn.Linear(cfg.q_lora_rank, H * qk, bias=False)
        self.kv_a_proj_with_mqa = nn.Linear(D, self.r + self.rope, bias=False)
        self.kv_a_layernorm = RMSNorm(self.r, 1e-6)
        self.kv_b_proj = nn.Linear(self.r, H * (self.nope + self.vd), bias=False)
        self.o_proj = nn.Linear(H * self.vd, D, bias=False)

    def forward(self, x_BTD, cos, sin, cache, layer, rows_B, pos_BT) -> torch.Tensor:
        B, T, _ = x_BTD.shape
        if hasattr(self, "q_proj"):
            q = self.q_proj(x_BTD)
        else:
            q = self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x_BTD)))
        q = q.view(B, T, self.H, self.qk).transpose(1, 2)  # B H T qk
        q_nope, q_pe = q.split([self.nope, self.rope], dim=-1)
        kv_nope, k_pe = self.kv_a_proj_with_mqa(x_BTD).split([self.r, self.rope], dim=-1)
        kv_nope = self.kv_a_layernorm(kv_nope)
        q_pe = _rope_interleaved(q_pe, cos, sin)
        k_pe = _rope_interleaved(k_pe.unsqueeze(1), cos, sin).squeeze(1)  # B T rope
        upto = int(pos_BT.max()) + 1
        lat, kpe = cache.write_and_read(
            layer, rows_B, pos_BT, kv_nope.unsqueeze(2), k_pe.unsqueeze(2), upto
        )  # B 1 L r, B 1 L rope
        kv = self.kv_b_proj(lat.squeeze(1).to(x_BTD.dtype))  # B L H*(nope+v)
        kv = kv.view(B, upto, self.H, self.nope + self.vd).transpose(1, 2)
        k_nope, v = kv.split([self.nope, self.vd], dim=-1)
        k = torch.cat((k_nope, kpe.to(x_BTD.dtype).expand(-1, self.H, -1, -1)), dim=-1)
        qf = torch.cat((q_nope, q_pe), dim=-1)
        key_pos = torch.arange(upto, device=x_BTD.device)
        mask_BTL = key_pos.view(1, 1, -1) <= pos_BT.unsqueeze(-1)
        out = F.scaled_dot_product_attention(
            qf, k, v, attn_mask=mask_BTL.unsqueeze(1), scale=self.qk**-0.5
        )
        return self.o_proj(out.transpose(1, 2).reshape(B, T, self.H * self.vd))


class DecoderLayer(nn.Module):
    """Pre-norm block: ``h + attn(norm(h))`` then ``h + moe(norm(h))``."""

    def __init__(self, cfg: DecoderConfig):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = LatentAttention(cfg) if cfg.attention == "mla" else Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MoELayer(cfg.moe)

    def attend(self, h_BTD, cos, sin, cache, layer, rows_B, pos_BT) -> torch.Tensor:
        """The attention half, residual included (what an AG rank runs)."""
        return h_BTD + self.self_attn(
            self.input_layernorm(h_BTD), cos, sin, cache, layer, rows_B, pos_BT
        )

    def ffn_input(self, h_BTD: torch.Tensor) -> torch.Tensor:
        """The MoE FFN's input rows, ``x_TD`` (B*T rows)."""
        return self.post_attention_layernorm(h_BTD).reshape(-1, h_BTD.shape[-1])

    def forward(self, h_BTD, cos, sin, cache, layer, rows_B, pos_BT) -> torch.Tensor:
        h_BTD = self.attend(h_BTD, cos, sin, cache, layer, rows_B, pos_BT)
        return h_BTD + self.mlp(self.ffn_input(h_BTD)).view_as(h_BTD)


class MoEDecoder(nn.Module):
    """``logits_BTV = model(ids_BT, cache, rows_B, start_B)``.

    Without a cache the call is a plain forward over fresh sequences (positions from 0).
    With one, sequence ``b`` lives in slot ``rows_B[b]`` and its ``T`` new tokens sit at
    positions ``start_B[b] + t``.
    """

    def __init__(self, cfg: DecoderConfig):
        super().__init__()
        self.cfg = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg) for _ in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self.rotary = Rotary(cfg.head_dim, cfg.rope_theta)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight

    def new_cache(self, slots: int, max_len: int | None = None) -> KVCache:
        p = self.embed_tokens.weight
        return KVCache(self.cfg, slots, max_len, dtype=p.dtype, device=p.device)

    def positions(self, ids_BT, rows_B=None, start_B=None):
        """(rows_B, pos_BT) for a call (slots 0..B-1 and positions from 0 by default)."""
        B, T = ids_BT.shape
        dev = ids_BT.device
        rows_B = torch.arange(B, device=dev) if rows_B is None else rows_B
        start_B = torch.zeros(B, dtype=torch.long, device=dev) if start_B is None else start_B
        pos_BT = start_B.view(-1, 1) + torch.arange(T, device=dev).view(1, -1)
        if int(pos_BT.max()) >= self.cfg.max_position_embeddings:
            raise InputError(
                f"position {int(pos_BT.max())} is past the context: "
                f"max_position_embeddings={self.cfg.max_position_embeddings}"
            )
        return rows_B, pos_BT

    def embed(self, ids_BT: torch.Tensor, pos_BT: torch.Tensor):
        """(h_BTD, cos, sin): the embeddings and the rotary tables every layer uses."""
        if ids_BT.dtype not in (torch.long, torch.int32) or ids_BT.dim() != 2:
            raise InputError(
                f"ids must be a 2-D integer tensor, got {ids_BT.dtype} {tuple(ids_BT.shape)}"
            )
        if ids_BT.numel() and (int(ids_BT.min()) < 0 or int(ids_BT.max()) >= self.cfg.vocab_size):
            raise InputError(f"token ids must be in [0, vocab_size={self.cfg.vocab_size})")
        h = self.embed_tokens(ids_BT)
        cos, sin = self.rotary(pos_BT, h.dtype)
        return h, cos, sin

    def head(self, h_BTD: torch.Tensor) -> torch.Tensor:
        return self.lm_head(self.norm(h_BTD))

    def forward(
        self,
        ids_BT: torch.Tensor,
        cache: KVCache | None = None,
        rows_B: torch.Tensor | None = None,
        start_B: torch.Tensor | None = None,
    ) -> torch.Tensor:
        rows_B, pos_BT = self.positions(ids_BT, rows_B, start_B)
        if cache is None:
            cache = self.new_cache(ids_BT.shape[0], int(pos_BT.max()) + 1)
        h, cos, sin = self.embed(ids_BT, pos_BT)
        for i, layer in enumerate(self.layers):
            h = layer(h, cos, sin, cache, i, rows_B, pos_BT)
        return self.head(h)
