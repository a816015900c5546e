"""``moeflow demo``: train a small byte-level MoE language model on CPU.

The corpus is the Python standard library's own source code, which every Python install has,
so nothing is downloaded. The model is a pre-norm transformer whose FFNs are all
:class:`moeflow.MoELayer` (top-2 of 8 SwiGLU experts by default). The same pieces
(``build_demo_model``, ``load_corpus``, ``BatchSampler``) are used by ``moeflow train``.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import sysconfig
import time
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from moeflow.config import MoEConfig
from moeflow.layer.moe import MoELayer
from moeflow.progress import Progress

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


def add_demo_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--steps", type=int, default=600, help="optimizer steps (default 600)")
    p.add_argument(
        "--max-seconds",
        type=float,
        default=150.0,
        help="stop early after this many seconds (default 150)",
    )
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--dim", type=int, default=128)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--experts", type=int, default=8)
    p.add_argument("--top-k", type=int, default=2)
    p.add_argument(
        "--router",
        default="softmax_topk",
        choices=["softmax_topk", "switch", "sigmoid", "xmoe", "deepseek"],
    )
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: leave as is)")


def run_demo(args: argparse.Namespace) -> int:
    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = DemoModelConfig(
        dim=args.dim,
        num_layers=args.layers,
        seq_len=args.seq_len,
        num_experts=args.experts,
        top_k=args.top_k,
        router=args.router,
    )
    corpus = load_corpus()
    model = build_demo_model(cfg, seed=args.seed)
    n_params = sum(p.numel() for p in model.parameters())
    print(
        f"moeflow demo: byte-level MoE LM, {cfg.num_layers} layers x {cfg.num_experts} "
        f"experts (top-{cfg.top_k}, router {cfg.router}), {n_params / 1e6:.2f} M params, "
        f"corpus {len(corpus) / 1e6:.1f} MB of Python stdlib source, "
        f"{torch.get_num_threads()} threads"
    )
    sample = BatchSampler(corpus, cfg.seq_len, args.batch_size, seed=args.seed)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.01)
    tokens_per_step = args.batch_size * cfg.seq_len
    first, ema, tokens = None, None, 0
    start = time.perf_counter()
    step = 0
    with Progress(args.steps, "train") as bar:
        for step in range(1, args.steps + 1):
            lr = args.lr * min(1.0, step / 20) * (0.5 + 0.5 * math.cos(math.pi * step / args.steps))
            for g in opt.param_groups:
                g["lr"] = lr
            x, y = sample()
            _, loss, aux = model(x, y)
            opt.zero_grad(set_to_none=True)
            (loss + aux).backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            value = float(loss.detach())
            first = value if first is None else first
            ema = value if ema is None else 0.9 * ema + 0.1 * value
            tokens += tokens_per_step
            elapsed = time.perf_counter() - start
            bar.update(1, loss=ema, **{"tok/s": f"{tokens / elapsed:,.0f}"})
            if elapsed > args.max_seconds:
                break
    elapsed = time.perf_counter() - start
    model.eval()
    text = model.generate(b"    def ", 80).decode("utf-8", "replace")
    print(
        f"\nsummary: {step} steps, {tokens:,} tokens in {elapsed:.1f} s "
        f"({tokens / elapsed:,.0f} tokens/s)"
    )
    print(f"  loss {first:.3f} -> {ema:.3f} (uniform over bytes would be {math.log(VOCAB):.3f})")
    print(f"  sample: {text!r}")
    return 0 if ema < first else 1


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="moeflow demo")
    add_demo_arguments(p)
    return run_demo(p.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
