"""``moeflow demo``: train the demo MoE language model (:mod:`moeflow.models.demo`) on CPU."""

from __future__ import annotations

import argparse
import math
import sys
import time

import torch

from moeflow.models.demo import (
    VOCAB,
    BatchSampler,
    DemoModelConfig,
    build_demo_model,
    load_corpus,
)
from moeflow.progress import Progress


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
