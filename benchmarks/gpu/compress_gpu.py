"""TBE on the GPU: decode throughput, and the fused decompress-GEMM against bf16 torch.matmul.

Weights are Gaussian bf16 (sigma 0.02, like trained weights), TBE-encoded on the GPU with
``tbe_encode_torch`` (the same bytes as the CPU codec; numba is not needed). Every kernel is
checked before it is timed: decode must be bit-exact, and the fused GEMM must match
``torch.matmul(x, W.T)`` to bf16 rounding.

Times are ``triton.testing.do_bench`` medians on the GPU (the L2 cache is flushed between
runs, so a 32 MB weight is read from HBM as it would be in a model). Each row has the public
``tbe_decode`` / ``tbe_linear`` (the kernels measured so far) and, beside them, the tile-row
kernels of ``moeflow.compress.triton_tbe_unit`` ("unit"), the candidate default;
``benchmarks/gpu/tbe_unit_gpu.py`` compares all their configurations.

Targets (issue 5): decode >= 1.5 TB/s of bf16 output on the H200; fused GEMM faster than
bf16 torch.matmul for N <= 8 on 28672x8192.

    PYTHONPATH=src python benchmarks/gpu/compress_gpu.py --out DIR          # on a GPU
    TRITON_INTERPRET=1 PYTHONPATH=src python benchmarks/gpu/compress_gpu.py --smoke --out DIR
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

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "src"))

from moeflow.compress import triton_tbe_unit as unit  # noqa: E402
from moeflow.compress.triton_tbe import tbe_decode, tbe_encode_torch, tbe_linear  # noqa: E402

SHAPES = [(4096, 4096), (14336, 4096), (4096, 14336), (28672, 8192)]
TOKENS = [1, 8, 32, 128]
SMOKE_SHAPES = [(96, 200)]
SMOKE_TOKENS = [1, 8]


def timer(device, warmup):
    """Median milliseconds of ``fn`` over ``reps`` runs after ``warmup`` runs."""
    def run(fn, reps):
        for _ in range(warmup):
            fn()
        ts = []
        if device.type == "cuda":
            torch.cuda.synchronize()
            for _ in range(reps):
                a = torch.cuda.Event(enable_timing=True)
                b = torch.cuda.Event(enable_timing=True)
                a.record()
                fn()
                b.record()
                b.synchronize()
                ts.append(a.elapsed_time(b))
        else:
            for _ in range(reps):
                t = time.perf_counter()
                fn()
                ts.append(1e3 * (time.perf_counter() - t))
        ts.sort()
        return ts[len(ts) // 2]
    return run


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--smoke", action="store_true", help="tiny shapes; runs on CPU")
    ap.add_argument("--reps", type=int, default=None)
    ap.add_argument("--budget-s", type=float, default=150.0,
                    help="stop starting new shapes after this many seconds")
    args = ap.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    t_start = time.time()
    smoke = args.smoke
    device = torch.device("cuda" if torch.cuda.is_available() and not smoke else "cpu")
    if device.type != "cuda" and not smoke:
        print("no GPU: run with --smoke (under TRITON_INTERPRET=1) on CPU", file=sys.stderr)
        return 2
    shapes = SMOKE_SHAPES if smoke else SHAPES
    tokens = SMOKE_TOKENS if smoke else TOKENS
    reps = args.reps or (1 if smoke else 20)
    if device.type == "cuda":  # do_bench flushes the L2 cache between runs (60 MB on H200)
        import triton.testing

        def run(fn, reps):
            return triton.testing.do_bench(fn, warmup=10, rep=40, return_mode="median")
    else:
        run = timer(device, warmup=0)
    gen = torch.Generator(device=device).manual_seed(0)
    rows, failures = [], []
    for R, C in shapes:
        if time.time() - t_start > args.budget_s:
            print(f"budget reached; skipping {R}x{C}", file=sys.stderr)
            break
        w = (torch.randn(R, C, generator=gen, device=device) * 0.02).to(torch.bfloat16)
        m = tbe_encode_torch(w)
        dense_bytes = w.numel() * 2
        ratio = dense_bytes / m.nbytes
        # correctness first: bit-exact decode
        d = tbe_decode(m)
        exact = bool(torch.equal(d.view(torch.int16), w.view(torch.int16)))
        if not exact:
            failures.append(f"decode {R}x{C} not bit-exact")
        del d
        d = unit.tbe_decode(m)
        unit_exact = bool(torch.equal(d.view(torch.int16), w.view(torch.int16)))
        if not unit_exact:
            failures.append(f"unit decode {R}x{C} not bit-exact")
        del d
        t_dec = run(lambda: tbe_decode(m), reps)
        t_unit = run(lambda: unit.tbe_decode(m), reps)
        t_copy = run(lambda: w.clone(), reps)
        row = {"shape": [R, C], "ratio": ratio, "compressed_bytes": m.nbytes,
               "decode_exact": exact and unit_exact, "decode_ms": t_dec,
               "decode_TBps_out": dense_bytes / t_dec / 1e9, "unit_decode_ms": t_unit,
               "unit_decode_TBps_out": dense_bytes / t_unit / 1e9, "copy_ms": t_copy,
               "copy_TBps": 2 * dense_bytes / t_copy / 1e9, "gemm": []}
        for N in tokens:
            x = torch.randn(N, C, generator=gen, device=device).to(torch.bfloat16)
            y = tbe_linear(x, m)
            ref = torch.matmul(x, w.T)
            ref32 = x.float() @ w.float().T
            err = (y.float() - ref32).abs().max().item()
            scale = ref32.abs().max().item() + 1e-6
            ok = err <= 1e-2 * scale
            if not ok:
                failures.append(f"gemm {R}x{C} N={N}: max err {err:.3g} (scale {scale:.3g})")
            yu = unit.tbe_linear(x, m)
            err_u = (yu.float() - ref32).abs().max().item()
            if not err_u <= 1e-2 * scale:
                failures.append(f"unit gemm {R}x{C} N={N}: max err {err_u:.3g}")
                ok = False
            t_f = run(lambda: tbe_linear(x, m), reps)
            t_u = run(lambda: unit.tbe_linear(x, m), reps)
            t_m = run(lambda: torch.matmul(x, w.T), reps)
            row["gemm"].append({
                "N": N, "ok": ok, "max_abs_err": err, "ref_err_vs_fp32":
                (ref.float() - ref32).abs().max().item(), "fused_ms": t_f, "matmul_ms": t_m,
                "speedup": t_m / t_f, "unit_ms": t_u, "unit_speedup": t_m / t_u,
                "fused_weight_TBps": m.nbytes / t_f / 1e9,
                "matmul_weight_TBps": dense_bytes / t_m / 1e9})
        rows.append(row)
        print(f"{R}x{C}: ratio {ratio:.3f}, decode {row['decode_TBps_out']:.3f} TB/s, unit "
              f"{row['unit_decode_TBps_out']:.3f} (exact={row['decode_exact']}); " + ", ".join(
                  f"N={g['N']} {g['speedup']:.2f}x / unit {g['unit_speedup']:.2f}x"
                  for g in row["gemm"]), flush=True)
        del w, m
        if device.type == "cuda":
            torch.cuda.empty_cache()
    info = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": torch.cuda.get_device_name(0) if device.type == "cuda" else "cpu (smoke)",
        "torch": torch.__version__, "python": platform.python_version(),
        "triton_interpret": os.environ.get("TRITON_INTERPRET", "0"),
        "command": " ".join([os.path.basename(sys.executable)] + sys.argv),
        "smoke": smoke, "reps": reps, "failures": failures, "rows": rows,
        "wall_s": time.time() - t_start,
    }
    tag = "compress_gpu_smoke" if smoke else "compress_gpu"
    with open(os.path.join(args.out, f"{tag}.json"), "w") as f:
        json.dump(info, f, indent=1)
    lines = [f"# TBE decode and fused decompress-GEMM ({info['device']}, {info['date']})", "",
             f"Command: `{info['command']}`; "
             + ("triton do_bench medians (L2 flushed)" if not smoke else f"median of {reps} runs")
             + f"; torch {info['torch']}.", "",
             "| W (R x C) | ratio | decode exact | decode TB/s (bf16 out) | unit decode TB/s "
             "| copy TB/s |", "| --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        lines.append(f"| {r['shape'][0]}x{r['shape'][1]} | {r['ratio']:.3f} | "
                     f"{r['decode_exact']} | {r['decode_TBps_out']:.3f} | "
                     f"{r['unit_decode_TBps_out']:.3f} | {r['copy_TBps']:.3f} |")
    lines += ["", "| W (R x C) | N | ok | fused ms | unit ms | matmul ms | speedup | unit speedup "
              "| fused TB/s (compressed W) | matmul TB/s (W) |",
              "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        for g in r["gemm"]:
            lines.append(f"| {r['shape'][0]}x{r['shape'][1]} | {g['N']} | {g['ok']} | "
                         f"{g['fused_ms']:.4f} | {g['unit_ms']:.4f} | {g['matmul_ms']:.4f} | "
                         f"{g['speedup']:.2f} | {g['unit_speedup']:.2f} | "
                         f"{g['fused_weight_TBps']:.3f} | {g['matmul_weight_TBps']:.3f} |")
    if failures:
        lines += ["", "FAILURES: " + "; ".join(failures)]
    with open(os.path.join(args.out, f"{tag}.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
