"""TBE on the GPU: decode throughput, and the fused decompress-GEMM against bf16 torch.matmul.

The public kernels of ``moeflow.compress.gpu``: ``tbe_decode`` (one program per 64x64 block)
and ``tbe_linear`` (slab-wise fused GEMM, ZipServ's ZipGEMM idea), each the faster of two
variants measured on an H200 on 2026-11-28. Weights are Gaussian bf16 (sigma 0.02, like
trained weights), TBE-encoded on the GPU with ``tbe_encode_torch`` (the same bytes as the CPU
codec). Every kernel is checked before it is timed: first on fallback-heavy bf16 and fp16
weights with special values, then on each shape; decode must be bit-exact, the fused GEMM
within bf16 rounding of an fp32 reference. ``tbe_linear`` is timed with 4 and 8 warps and the
faster is kept. ``benchmarks/gpu/tbe_experimental_gpu.py`` times the experimental kernels.

Targets (issue 5): decode >= 1.5 TB/s of bf16 output on the H200; fused GEMM faster than
bf16 torch.matmul for N <= 8 on 28672x8192.

    PYTHONPATH=src python benchmarks/gpu/compress_gpu.py --out DIR          # on a GPU
    TRITON_INTERPRET=1 PYTHONPATH=src python benchmarks/gpu/compress_gpu.py --smoke --out DIR
"""

from __future__ import annotations

import argparse
import os
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [os.path.join(HERE, ".."), os.path.join(HERE, "..", "..", "src")]

SHAPES = [(4096, 4096), (14336, 4096), (4096, 14336), (28672, 8192)]
TOKENS = [1, 8, 32, 128]
SMOKE_SHAPES = [(96, 200)]
SMOKE_TOKENS = [1, 8]
WARPS = (4, 8)


def hard(shape, dtype, gen, device):
    """Many fallbacks (every 5th value far out of the window, up to 60 in magnitude so that
    fp16 sums stay finite) and +-0 and the smallest subnormals."""
    import torch

    w = (torch.randn(shape, generator=gen, device=device) * 0.02).to(dtype)
    flat = w.view(-1)
    big = torch.randn(flat.numel(), generator=gen, device=device)[::5] * 3000
    flat[::5] = big.clamp(-60, 60).to(dtype)
    raw = flat.view(torch.int16)
    specials = [0x0000, -32768, 0x0001, -32767]  # +-0 and the smallest subnormals
    for i, v in enumerate(specials):
        raw[(7 * i + 3) % raw.numel() :: 11 * len(specials)] = v
    return w


def gemm_error(y, x, w):
    """Max |y - x @ w.T| (fp32 reference) and the bound it must stay under: one rounding of
    the result to ``y.dtype`` plus fp32 accumulation in another order."""
    import torch

    ref = x.float() @ w.float().T
    scale = (x.float().abs() @ w.float().abs().T).max().item()
    eps = {torch.bfloat16: 2.0**-8, torch.float16: 2.0**-10}.get(y.dtype, 0.0)
    err = (y.float() - ref).abs().max().item()
    return err, eps * ref.abs().max().item() + 1e-5 * scale + 1e-6


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True, help="folder for compress_gpu.md and .json")
    ap.add_argument(
        "--smoke",
        action="store_true",
        help="tiny shapes on CPU (run under TRITON_INTERPRET=1): checks the script",
    )
    ap.add_argument(
        "--budget-s",
        type=float,
        default=150.0,
        help="stop starting new shapes after this many seconds",
    )
    args = ap.parse_args(argv)

    import torch
    from _common import gpu_timer, run_info, write_record

    from moeflow.compress.gpu import tbe_decode, tbe_encode_torch, tbe_linear

    smoke = args.smoke
    if not smoke and not torch.cuda.is_available():
        print("no GPU: run with --smoke (under TRITON_INTERPRET=1) on CPU", file=sys.stderr)
        return 2
    t_start = time.time()
    device = torch.device("cpu" if smoke else "cuda")
    shapes, tokens = (SMOKE_SHAPES, SMOKE_TOKENS) if smoke else (SHAPES, TOKENS)
    ms = gpu_timer(smoke)
    gen = torch.Generator(device=device).manual_seed(0)
    failures: list[str] = []

    # 1. fallback-heavy weights exercise the paths Gaussian weights rarely take
    hard_checks = []
    for dtype in (torch.bfloat16, torch.float16):
        for shape in ((72, 136),) if smoke else ((200, 136), (130, 200), (512, 1024)):
            w = hard(shape, dtype, gen, device)
            m = tbe_encode_torch(w)
            ok = bool(torch.equal(tbe_decode(m).view(torch.int16), w.view(torch.int16)))
            for N in (1, 13):
                x = torch.randn(N, shape[1], generator=gen, device=device).to(dtype)
                err, bound = gemm_error(tbe_linear(x, m), x, w)
                ok = ok and err <= bound
            hard_checks.append({"dtype": str(dtype), "shape": list(shape), "ok": ok})
            if not ok:
                failures.append(f"hard weights {dtype} {shape}: decode or GEMM check failed")

    # 2. the shapes
    rows = []
    for R, C in shapes:
        if time.time() - t_start > args.budget_s:
            print(f"budget reached; skipping {R}x{C}", file=sys.stderr)
            break
        w = (torch.randn(R, C, generator=gen, device=device) * 0.02).to(torch.bfloat16)
        m = tbe_encode_torch(w)
        dense_bytes = w.numel() * 2
        exact = bool(torch.equal(tbe_decode(m).view(torch.int16), w.view(torch.int16)))
        if not exact:
            failures.append(f"decode {R}x{C} not bit-exact")
        t_dec = ms(lambda m=m: tbe_decode(m))
        t_copy = ms(lambda w=w: w.clone())
        row = {
            "shape": [R, C],
            "ratio": dense_bytes / m.nbytes,
            "compressed_bytes": m.nbytes,
            "decode_exact": exact,
            "decode_ms": t_dec,
            "decode_TBps_out": dense_bytes / t_dec / 1e9,
            "copy_ms": t_copy,
            "copy_TBps": 2 * dense_bytes / t_copy / 1e9,
            "gemm": [],
        }
        for N in tokens:
            x = torch.randn(N, C, generator=gen, device=device).to(torch.bfloat16)
            ok, best = True, None
            for nw in WARPS:
                err, bound = gemm_error(tbe_linear(x, m, num_warps=nw), x, w)
                if err > bound:
                    ok = False
                    failures.append(
                        f"gemm {R}x{C} N={N} warps={nw}: max err {err:.3g} (bound {bound:.3g})"
                    )
                    continue
                t = ms(lambda x=x, m=m, nw=nw: tbe_linear(x, m, num_warps=nw))
                if best is None or t < best[0]:
                    best = (t, nw)
            t_m = ms(lambda x=x, w=w: torch.matmul(x, w.T))
            g = {"N": N, "ok": ok, "matmul_ms": t_m, "matmul_weight_TBps": dense_bytes / t_m / 1e9}
            if best is not None:
                g.update(
                    fused_ms=best[0],
                    fused_warps=best[1],
                    speedup=t_m / best[0],
                    fused_weight_TBps=m.nbytes / best[0] / 1e9,
                )
            row["gemm"].append(g)
        rows.append(row)
        print(
            f"{R}x{C}: ratio {row['ratio']:.3f}, decode {row['decode_TBps_out']:.3f} TB/s "
            f"(exact={exact}); "
            + ", ".join(f"N={g['N']} {g.get('speedup', float('nan')):.2f}x" for g in row["gemm"]),
            flush=True,
        )
        del w, m
        if device.type == "cuda":
            torch.cuda.empty_cache()

    info = dict(
        run_info(smoke),
        failures=failures,
        hard_checks=hard_checks,
        rows=rows,
        wall_s=time.time() - t_start,
    )
    lines = [
        f"# TBE decode and fused decompress-GEMM ({info['device']}, {info['date']})",
        "",
        f"Command: `{info['command']}`; torch {info['torch']}, triton {info['triton']}; "
        + (
            "one call each (smoke: figures mean nothing)"
            if smoke
            else "do_bench medians (L2 flushed)"
        )
        + ".",
        "",
        f"Fallback-heavy weights (bf16 and fp16; decode and GEMM checked): "
        f"{sum(c['ok'] for c in hard_checks)}/{len(hard_checks)} passed.",
        "",
        "| W (R x C) | ratio | decode exact | decode TB/s (bf16 out) | copy TB/s |",
        "| --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        lines.append(
            f"| {r['shape'][0]}x{r['shape'][1]} | {r['ratio']:.3f} | "
            f"{r['decode_exact']} | {r['decode_TBps_out']:.3f} | "
            f"{r['copy_TBps']:.3f} |"
        )
    lines += [
        "",
        "| W (R x C) | N | ok | fused ms (warps) | matmul ms | speedup "
        "| fused TB/s (compressed W) | matmul TB/s (W) |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        for g in r["gemm"]:
            fused = (
                f"{g['fused_ms']:.4f} ({g['fused_warps']}) | {g['matmul_ms']:.4f} | "
                f"{g['speedup']:.2f} | {g['fused_weight_TBps']:.3f}"
                if "fused_ms" in g
                else f"- | {g['matmul_ms']:.4f} | - | -"
            )
            lines.append(
                f"| {r['shape'][0]}x{r['shape'][1]} | {g['N']} | {g['ok']} | "
                f"{fused} | {g['matmul_weight_TBps']:.3f} |"
            )
    if failures:
        lines += ["", "FAILURES: " + "; ".join(failures)]
    write_record(args.out, "compress_gpu_smoke" if smoke else "compress_gpu", info, lines)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
