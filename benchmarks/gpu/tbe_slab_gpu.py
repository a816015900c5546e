"""Slab-wise vs block-wise TBE decode, and the fused GEMM vs torch, side by side on one GPU.

(Run 3 on 2026-11-28 also timed a block-wise fused GEMM; it was 3.4x slower than the slab one
and has been removed, so ``tbe_linear`` is the slab kernel.)

    PYTHONPATH=src python benchmarks/gpu/tbe_slab_gpu.py --out DIR

Every kernel is checked bit-exact (decode) or against ``torch.matmul`` on the decoded weight
(fused GEMM) before it is timed.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os

import torch
import triton.testing

from moeflow.compress import triton_tbe as block_kernels
from moeflow.compress import triton_tbe_slab as slab_kernels
from moeflow.compress.triton_tbe import tbe_encode_torch

SHAPES = [(4096, 4096), (14336, 4096), (4096, 14336), (28672, 8192)]
TOKENS = [1, 8, 32, 128]


def bench(fn):
    return triton.testing.do_bench(fn, warmup=10, rep=60, return_mode="median")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="out")
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)
    dev = torch.device("cuda")
    rows = []
    for R, C in SHAPES:
        torch.manual_seed(0)
        w = (torch.randn(R, C, device=dev) * 0.02).to(torch.bfloat16)
        m = tbe_encode_torch(w)
        dense_bytes = w.numel() * 2
        row = dict(shape=f"{R}x{C}", ratio=dense_bytes / m.nbytes)
        row["copy_tbs"] = 2 * dense_bytes / bench(lambda: w.clone()) / 1e9
        for name, mod in (("block", block_kernels), ("slab", slab_kernels)):
            variants = [dict()] if name == "block" else [dict(num_warps=4), dict(num_warps=8)]
            best = None
            for kw in variants:
                d = mod.tbe_decode(m, **kw)
                assert torch.equal(d.view(torch.int16), w.view(torch.int16)), (name, kw)
                ms = bench(lambda: mod.tbe_decode(m, **kw))
                if best is None or ms < best[0]:
                    best = (ms, kw)
            row[f"{name}_decode_tbs"] = dense_bytes / best[0] / 1e9
            row[f"{name}_decode_cfg"] = str(best[1])
        for N in TOKENS:
            x = torch.randn(N, C, device=dev, dtype=torch.bfloat16)
            ref = x @ w.t()
            t_mm = bench(lambda: x @ w.t())
            row[f"N{N}_matmul_ms"] = t_mm
            for name, mod in (("slab", slab_kernels),):
                variants = [dict(num_warps=4), dict(num_warps=8)]
                best = None
                for kw in variants:
                    y = mod.tbe_linear(x, m, **kw)
                    err = (y.float() - ref.float()).abs().max().item()
                    tol = 2e-2 * ref.float().abs().max().item() + 1e-2
                    assert err <= tol, (name, kw, N, err, tol)
                    ms = bench(lambda: mod.tbe_linear(x, m, **kw))
                    if best is None or ms < best[0]:
                        best = (ms, kw)
                row[f"N{N}_{name}_ms"] = best[0]
                row[f"N{N}_{name}_speedup"] = t_mm / best[0]
        rows.append(row)
        print(json.dumps(row), flush=True)
    meta = dict(date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                device=torch.cuda.get_device_name(), torch=torch.__version__)
    with open(os.path.join(args.out, "tbe_slab_gpu.json"), "w") as f:
        json.dump(dict(meta=meta, rows=rows), f, indent=1)
    lines = [f"# TBE kernels: slab-wise vs block-wise ({meta['device']}, {meta['date']})", "",
             "Command: `PYTHONPATH=src python benchmarks/gpu/tbe_slab_gpu.py --out DIR`; "
             f"torch {meta['torch']}; triton do_bench medians.", "",
             "| W | ratio | copy TB/s | block decode TB/s | slab decode TB/s |",
             "| --- | --- | --- | --- | --- |"]
    for r in rows:
        lines.append(f"| {r['shape']} | {r['ratio']:.3f} | {r['copy_tbs']:.2f} | "
                     f"{r['block_decode_tbs']:.3f} | {r['slab_decode_tbs']:.3f} |")
    lines += ["", "| W | N | matmul ms | slab fused ms | slab vs matmul |",
              "| --- | --- | --- | --- | --- |"]
    for r in rows:
        for N in TOKENS:
            lines.append(f"| {r['shape']} | {N} | {r[f'N{N}_matmul_ms']:.4f} | "
                         f"{r[f'N{N}_slab_ms']:.4f} | "
                         f"{r[f'N{N}_slab_speedup']:.2f}x |")
    with open(os.path.join(args.out, "tbe_slab_gpu.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
