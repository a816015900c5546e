"""MoELayer vs transformers' own MoE blocks on one GPU, side by side in one run.

Same weights in both (copied with ``moeflow.integrations.hf.from_hf_block``), bf16, the MoE
layer shapes of Qwen3-30B-A3B, Mixtral-8x7B and DeepSeek-V3 (their published configs).

    PYTHONPATH=src python benchmarks/gpu/layer_gpu.py --out DIR      # on a GPU
    PYTHONPATH=src python benchmarks/gpu/layer_gpu.py --smoke --out DIR   # tiny shapes, CPU
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "..", "src"))

CASES = {
    # name: (hf family, E, k, D, F, shared)
    "Qwen3-30B-A3B": ("qwen3_moe", 128, 8, 2048, 768, 0),
    "Mixtral-8x7B": ("mixtral", 8, 2, 4096, 14336, 0),
    "DeepSeek-V3": ("deepseek_v3", 256, 8, 7168, 2048, 1),
}
SMOKE = {
    "Qwen3-tiny": ("qwen3_moe", 8, 2, 32, 16, 0),
    "Mixtral-tiny": ("mixtral", 4, 2, 32, 48, 0),
    "DeepSeek-tiny": ("deepseek_v3", 8, 2, 32, 16, 1),
}


def build_hf_block(family, E, k, D, F, shared, impl, device="cpu"):
    if family == "qwen3_moe":
        from transformers import Qwen3MoeConfig as C
        from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeSparseMoeBlock as B

        cfg = C(
            hidden_size=D,
            moe_intermediate_size=F,
            num_experts=E,
            num_experts_per_tok=k,
            norm_topk_prob=True,
        )
    elif family == "mixtral":
        from transformers import MixtralConfig as C
        from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock as B

        cfg = C(hidden_size=D, intermediate_size=F, num_local_experts=E, num_experts_per_tok=k)
    else:
        from transformers import DeepseekV3Config as C
        from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3MoE as B

        cfg = C(
            hidden_size=D,
            moe_intermediate_size=F,
            n_routed_experts=E,
            num_experts_per_tok=k,
            n_shared_experts=shared,
            n_group=8 if E >= 64 else 2,
            topk_group=4 if E >= 64 else 1,
        )
    cfg._experts_implementation = impl
    with torch.device(device):  # built and initialised where it runs (GBs of experts)
        block = B(cfg)
    with torch.no_grad():
        for p in block.parameters():
            p.normal_(0, 0.02)
    return block


def timeit(fn, warmup, iters, sync):
    for _ in range(warmup):
        fn()
    sync()
    times = []
    for _ in range(iters):
        t = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t)
    return min(times) * 1e3


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="out", help="folder for layer_gpu.md and .json")
    ap.add_argument("--smoke", action="store_true", help="tiny shapes on CPU")
    ap.add_argument("--cases", default="", help="comma-separated case names (default: all)")
    args = ap.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    from moeflow.integrations.hf import from_hf_block

    dev = "cuda" if torch.cuda.is_available() and not args.smoke else "cpu"
    dtype = torch.bfloat16
    sync = torch.cuda.synchronize if dev == "cuda" else (lambda: None)
    cases = SMOKE if args.smoke else CASES
    if args.cases:
        cases = {k: v for k, v in cases.items() if k in args.cases.split(",")}
    token_counts = (64, 8192) if not args.smoke else (4, 64)
    warmup, iters = (3, 10) if dev == "cuda" else (1, 2)
    rows, lines = [], []
    for name, spec in cases.items():
        family, E, k, D, F, shared = spec
        hf = build_hf_block(*spec, impl="grouped_mm", device=dev).to(dev, dtype)
        ours = from_hf_block(hf).to(dev, dtype)
        for T in token_counts:
            torch.manual_seed(0)
            x = torch.randn(1, T, D, device=dev, dtype=dtype) * 0.5
            with torch.no_grad():
                y_hf, y_mf = hf(x), ours(x)
            err = (y_hf.float() - y_mf.float()).abs().max().item()
            scale = y_hf.float().abs().max().item() + 1e-6
            row = dict(case=name, T=T, max_abs_err=err, rel_err=err / scale)
            for label, mod in (("hf_grouped_mm", hf), ("moeflow", ours)):
                with torch.no_grad():
                    row[f"{label}_fwd_ms"] = timeit(
                        lambda mod=mod, x=x: mod(x), warmup, iters, sync
                    )
                if T == max(token_counts):
                    xg = x.clone().requires_grad_(True)
                    gy = torch.randn_like(x)

                    def step(mod=mod, xg=xg, gy=gy):
                        mod.zero_grad(set_to_none=True)
                        mod(xg).backward(gy)

                    row[f"{label}_fwdbwd_ms"] = timeit(step, 1, max(3, iters // 2), sync)
            flops = 2 * T * k * D * F * 3 + (2 * T * D * F * 3 * shared)
            row["moeflow_fwd_tflops"] = flops / row["moeflow_fwd_ms"] / 1e9
            row["fwd_speedup"] = row["hf_grouped_mm_fwd_ms"] / row["moeflow_fwd_ms"]
            if "moeflow_fwdbwd_ms" in row:
                row["fwdbwd_speedup"] = row["hf_grouped_mm_fwdbwd_ms"] / row["moeflow_fwdbwd_ms"]
            rows.append(row)
            print(json.dumps(row), flush=True)
        del hf, ours
        if dev == "cuda":
            torch.cuda.empty_cache()
        lines = write_layer_record(args.out, dev, dtype, rows)
    print("\n".join(lines) if rows else "no cases run")
    return 0


def write_layer_record(out_dir, dev, dtype, rows):
    """layer_gpu.json and layer_gpu.md in ``out_dir`` (rewritten after every case, so that a
    run stopped by its time limit still leaves the cases it finished)."""
    meta = dict(
        date=datetime.date.today().isoformat(),
        device=(torch.cuda.get_device_name() if dev == "cuda" else platform.processor() or "cpu"),
        torch=torch.__version__,
        dtype=str(dtype),
    )
    with open(os.path.join(out_dir, "layer_gpu.json"), "w") as f:
        json.dump(dict(meta=meta, rows=rows), f, indent=1)
    lines = [
        f"# MoELayer vs transformers grouped_mm, {meta['device']}, {meta['date']}",
        "",
        f"torch {meta['torch']}, bf16, min over timed iterations (ms)",
        "",
        "| case | T | HF grouped_mm fwd | moeflow fwd | speedup | HF fwd+bwd | "
        "moeflow fwd+bwd | speedup | max rel err |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        lines.append(
            f"| {r['case']} | {r['T']} | {r['hf_grouped_mm_fwd_ms']:.3f} | "
            f"{r['moeflow_fwd_ms']:.3f} | {r['fwd_speedup']:.2f}x | "
            f"{r.get('hf_grouped_mm_fwdbwd_ms', float('nan')):.3f} | "
            f"{r.get('moeflow_fwdbwd_ms', float('nan')):.3f} | "
            f"{r.get('fwdbwd_speedup', float('nan')):.2f}x | {r['rel_err']:.2e} |"
        )
    with open(os.path.join(out_dir, "layer_gpu.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    return lines


if __name__ == "__main__":
    sys.exit(main())
