"""moeflow MoELayer vs the transformers MoE block holding the same weights, on CPU.

For each case (Qwen3-MoE-mini, Mixtral-mini), dtype (fp32, bf16) and mode (fwd, fwd+bwd) the
three contenders run interleaved in one loop (moeflow, transformers ``experts_implementation``
"grouped_mm", transformers "eager"), so machine noise hits all of them alike; each reports the
minimum over ``--repeats`` runs. Ratios are transformers time / moeflow time (>1: moeflow is
faster). fwd+bwd = forward, ``(y * g).sum().backward()`` with a fixed random ``g``, gradients
for the input and all weights (router included), then an in-place ``p.mul_(1.0)`` on every
parameter for all contenders (as an optimizer step would modify them; moeflow's cached fp32
copies of bf16 weights must then be refreshed, as in real training).

    PYTHONPATH=src python benchmarks/layer_cpu.py [--tokens 2048] [--repeats 3] \
        [--cases qwen3,mixtral] [--dtypes fp32,bf16] [--modes fwd,fwdbwd] [--warmup 1] \
        [--out FILE.md]
"""

from __future__ import annotations

import argparse
import datetime as _dt
import os
import platform
import sys
import time

import torch
from _common import cpu_name  # noqa: E402  (benchmarks/ is on sys.path)

CASES = {
    # name: (family, E, k, D, F)
    "qwen3": ("Qwen3-MoE-mini", 64, 8, 512, 256),
    "mixtral": ("Mixtral-mini", 8, 2, 512, 1792),
}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def build_hf_block(case: str, dtype: torch.dtype):
    import transformers

    _, E, k, D, F = CASES[case]
    if case == "qwen3":
        cfg = transformers.Qwen3MoeConfig(
            hidden_size=D,
            moe_intermediate_size=F,
            num_experts=E,
            num_experts_per_tok=k,
            norm_topk_prob=True,
        )
        from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeSparseMoeBlock

        block = Qwen3MoeSparseMoeBlock(cfg)
    else:
        cfg = transformers.MixtralConfig(
            hidden_size=D, intermediate_size=F, num_local_experts=E, num_experts_per_tok=k
        )
        from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock

        block = MixtralSparseMoeBlock(cfg)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in block.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * p.shape[-1] ** -0.5)
    return block.to(dtype).train(), cfg


def set_impl(cfg, impl: str) -> None:
    """transformers 5.x reads ``config._experts_implementation`` on every experts forward."""
    cfg._experts_implementation = impl


def time_once(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def make_step(module, x, g, mode: str):
    params = [p for p in module.parameters() if p.requires_grad]

    def step():
        for p in params:
            p.grad = None
        if mode == "fwd":
            with torch.no_grad():
                module(x)
        else:
            xi = x.detach().requires_grad_()
            y = module(xi)
            (y * g).sum().backward()
            # Stand-in for an optimizer step: bump every parameter's version, so nothing keyed
            # on unchanged weights (moeflow's cached fp32 copies of bf16 weights) is free.
            with torch.no_grad():
                for p in params:
                    p.mul_(1.0)

    return step


def run_case(
    case: str, dtype_name: str, mode: str, T: int, repeats: int, kernel: str, warmup: int = 1
):
    from moeflow.integrations.hf import from_hf_block

    dtype = DTYPES[dtype_name]
    block, cfg = build_hf_block(case, dtype)
    layer = from_hf_block(block, kernel=kernel)
    D = CASES[case][3]
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(1, T, D, generator=gen).to(dtype)
    g = torch.randn(1, T, D, generator=gen).to(dtype)
    steps = {"moeflow": make_step(layer, x, g, mode)}
    hf_step = make_step(block, x, g, mode)
    for impl in ("grouped_mm", "eager"):
        steps[f"hf_{impl}"] = lambda impl=impl: (set_impl(cfg, impl), hf_step())
    for _ in range(warmup):  # allocator, lazy init
        for fn in steps.values():
            fn()
    best = {k: float("inf") for k in steps}
    for _ in range(repeats):
        for name, fn in steps.items():  # interleaved
            best[name] = min(best[name], time_once(fn))
    return best


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=2048)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--cases", default="qwen3,mixtral")
    ap.add_argument("--dtypes", default="fp32,bf16")
    ap.add_argument("--modes", default="fwd,fwdbwd")
    ap.add_argument("--warmup", type=int, default=1, help="untimed interleaved rounds first")
    ap.add_argument("--kernel", default="auto", help="moeflow expert kernel (MoEConfig.kernel)")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch default)")
    ap.add_argument("--out", default="", help="markdown file to write the table to")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    rows = []
    header = (
        f"{'case':16s} {'dtype':5s} {'mode':7s} {'moeflow ms':>11s} {'hf grouped ms':>14s} "
        f"{'hf eager ms':>12s} {'vs grouped':>10s} {'vs eager':>9s}"
    )
    print(header)
    for case in args.cases.split(","):
        for dt in args.dtypes.split(","):
            for mode in args.modes.split(","):
                b = run_case(case, dt, mode, args.tokens, args.repeats, args.kernel, args.warmup)
                r_g = b["hf_grouped_mm"] / b["moeflow"]
                r_e = b["hf_eager"] / b["moeflow"]
                row = (
                    CASES[case][0],
                    dt,
                    mode,
                    b["moeflow"] * 1e3,
                    b["hf_grouped_mm"] * 1e3,
                    b["hf_eager"] * 1e3,
                    r_g,
                    r_e,
                )
                rows.append(row)
                print(
                    f"{row[0]:16s} {dt:5s} {mode:7s} {row[3]:11.1f} {row[4]:14.1f} "
                    f"{row[5]:12.1f} {r_g:9.2f}x {r_e:8.2f}x",
                    flush=True,
                )
    if args.out:
        import transformers

        cmd = "PYTHONPATH=src python " + " ".join([os.path.relpath(sys.argv[0])] + sys.argv[1:])
        lines = [
            "# moeflow MoELayer vs transformers MoE block (CPU)",
            "",
            f"- date: {_dt.date.today().isoformat()}",
            f"- machine: {os.cpu_count()} cores, {cpu_name()}, no GPU; "
            f"torch threads {torch.get_num_threads()}",
            f"- torch {torch.__version__}, transformers {transformers.__version__}, "
            f"python {platform.python_version()}",
            f"- command: `{cmd}`",
            f"- T={args.tokens} tokens, min of {args.repeats} interleaved runs after "
            f"{args.warmup} untimed warm-up round(s); "
            "ratio = transformers time / moeflow time (>1: moeflow faster)",
            "",
            "| case | dtype | mode | moeflow ms | hf grouped_mm ms | hf eager ms "
            "| vs grouped_mm | vs eager |",
            "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: |",
        ]
        for r in rows:
            lines.append(
                f"| {r[0]} | {r[1]} | {r[2]} | {r[3]:.1f} | {r[4]:.1f} | {r[5]:.1f} "
                f"| {r[6]:.2f}x | {r[7]:.2f}x |"
            )
        with open(args.out, "w") as f:
            f.write("\n".join(lines) + "\n")
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
