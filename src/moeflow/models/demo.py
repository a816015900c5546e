"""The demo model and its corpus: a small byte-level MoE language model.

The corpus is the Python standard library's own source code, which every Python install has,
so nothing is downloaded. The model is a pre-norm transformer whose FFNs are all
:class:`moeflow.MoELayer` (top-2 of 8 SwiGLU experts by default). ``moeflow demo``,
``moeflow train`` and ``moeflow geo train`` all train it (:mod:`moeflow.apps`).
"""

from __future__ import annotations

import os
import sysconfig
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from moeflow.config import MoEConfig
from moeflow.layer.moe import MoELayer

VOCAB = 256  # bytes


def load_corpus(max_bytes: int = 4_000_000) -> bytes:
    """Concatenate standard-library ``.py`` files (sorted, so the corpus is reproducible)."""
    root = sysconfig.get_paths()["stdlib"]
    chunks, total = [], 0
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(
            d
            for d in dirnames
            if d not in ("site-packages", "test", "tests", "idlelib", "__pycache__", "lib2to3")
        )
        for name in sorted(filenames):
            if not name.endswith(".py"):
                continue
            try:
                with open(os.path.join(dirpath, name), "rb") as f:
                    data = f.read()
            except OSError:
                continue
            chunks.append(data)
            total += len(data)
            if total >= max_bytes:
                return b"".join(chunks)[:max_bytes]
    if total < 10_000:
        raise RuntimeError(f"found only {total} bytes of Python source under {root}")
    return b"".join(chunks)


class BatchSampler:
    """Random contiguous windows of the corpus: (inputs, next-byte targets)."""

    def __init__(self, data: bytes, seq_len: int, batch_size: int, seed: int = 0):
        self.data = torch.frombuffer(bytearray(data), dtype=torch.uint8).long()
        self.seq_len = seq_len
        self.batch_size = batch_size
        self.gen = torch.Generator().manual_seed(seed)

    def __call__(self):
        starts = torch.randint(
            0, self.data.numel() - self.seq_len - 1, (self.batch_size,), generator=self.gen
        )
        idx = starts[:, None] + torch.arange(self.seq_len + 1)
        window = self.data[idx]
        return window[:, :-1], window[:, 1:]


@dataclass(frozen=True, kw_only=True)
class DemoModelConfig:
    dim: int = 128
    num_layers: int = 2
    num_heads: int = 4
    seq_len: int = 128
    num_experts: int = 8
    top_k: int = 2
    ffn_hidden_size: int = 256
    router: str = "softmax_topk"
    aux_loss_coef: float = 0.01

    def moe_config(self) -> MoEConfig:
        kw = dict(top_k=1) if self.router == "switch" else dict(top_k=self.top_k)
        return MoEConfig(
            hidden_size=self.dim,
            ffn_hidden_size=self.ffn_hidden_size,
            num_experts=self.num_experts,
            router=self.router,
            aux_loss_coef=self.aux_loss_coef,
            **kw,
        )


class Block(nn.Module):
    def __init__(self, cfg: DemoModelConfig):
        super().__init__()
        self.num_heads = cfg.num_heads
        self.norm1 = nn.RMSNorm(cfg.dim)
        self.qkv = nn.Linear(cfg.dim, 3 * cfg.dim, bias=False)
        self.proj = nn.Linear(cfg.dim, cfg.dim, bias=False)
        self.norm2 = nn.RMSNorm(cfg.dim)
        self.moe = MoELayer(cfg.moe_config())

    def forward(self, x_BLD: torch.Tensor) -> torch.Tensor:
        B, L, D = x_BLD.shape
        q, k, v = self.qkv(self.norm1(x_BLD)).view(B, L, 3, self.num_heads, -1).unbind(2)
        a = F.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True
        )
        x_BLD = x_BLD + self.proj(a.transpose(1, 2).reshape(B, L, D))
        return x_BLD + self.moe(self.norm2(x_BLD))


class DemoLM(nn.Module):
    """Byte-level transformer LM whose every FFN is an MoE layer."""

    def __init__(self, cfg: DemoModelConfig):
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Embedding(VOCAB, cfg.dim)
        self.pos = nn.Parameter(torch.zeros(cfg.seq_len, cfg.dim))
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.num_layers))
        self.norm = nn.RMSNorm(cfg.dim)
        self.head = nn.Linear(cfg.dim, VOCAB, bias=False)
        nn.init.normal_(self.pos, std=0.02)

    def moe_layers(self) -> list[MoELayer]:
        return [b.moe for b in self.blocks]

    def forward(self, idx_BL: torch.Tensor, targets_BL: torch.Tensor | None = None):
        L = idx_BL.shape[1]
        x = self.embed(idx_BL) + self.pos[:L]
        for block in self.blocks:
            x = block(x)
        logits = self.head(self.norm(x))
        if targets_BL is None:
            return logits
        lm_loss = F.cross_entropy(logits.reshape(-1, VOCAB), targets_BL.reshape(-1))
        aux = sum(layer.aux_loss for layer in self.moe_layers())
        return logits, lm_loss, aux

    @torch.no_grad()
    def generate(self, prompt: bytes, n: int, temperature: float = 0.7, seed: int = 0) -> bytes:
        """Sample ``n`` bytes after ``prompt`` (temperature sampling, seeded, reproducible)."""
        gen = torch.Generator().manual_seed(seed)
        idx = torch.tensor(list(prompt), dtype=torch.long)[None]
        for _ in range(n):
            logits = self(idx[:, -self.cfg.seq_len :])[:, -1]
            probs = torch.softmax(logits / temperature, dim=-1)
            idx = torch.cat([idx, torch.multinomial(probs, 1, generator=gen)], dim=1)
        return bytes(idx[0].tolist())


def build_demo_model(cfg: DemoModelConfig | None = None, seed: int = 0) -> DemoLM:
    torch.manual_seed(seed)
    return DemoLM(cfg or DemoModelConfig())
