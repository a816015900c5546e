"""Experimental tile-row TBE kernels on the GPU: every configuration beside the public ones.

Measures ``moeflow.compress.gpu.experimental_unit`` (never run on a GPU yet) to decide whether
it replaces the public kernels or is deleted (see that module's docstring). For each weight
shape of issue 5 (Gaussian bf16, sigma 0.02, TBE-encoded on the GPU):

- decode: the unit layouts ("rows" with 1, 2 or 4 block rows per program; "units" slabs),
  the public ``tbe_decode`` (block kernel), and a device copy of the dense weight (read +
  write);
- fused GEMM ``x @ W^T`` for N in {1, 8, 32, 128}: ``torch.matmul`` on the dense bf16 weight
  (cuBLAS), the unit kernels on CUDA cores ("fma", 1 or 2 block rows per program, or twice the
  default split-K), on tensor cores ("dot"), unit decode + ``torch.matmul``, and the public
  ``tbe_linear`` (slab kernel).

Every kernel is checked before it is timed (decode bit-exact; GEMM within bf16 rounding of an
fp32 reference), first on "hard" weights with many fallbacks, +-0, inf, NaN payloads and
subnormals (bf16 and fp16), which exercise the paths Gaussian weights rarely take (the
hardware PRMT/POPC and the slow fallback branch). Times are ``triton.testing.do_bench``
medians, which flush the L2 cache between runs.

    PYTHONPATH=src python benchmarks/gpu/tbe_experimental_gpu.py --out DIR      # on a GPU
    python benchmarks/gpu/tbe_experimental_gpu.py --dry-run --out DIR           # the plan
    TRITON_INTERPRET=1 PYTHONPATH=src \
        python benchmarks/gpu/tbe_experimental_gpu.py --smoke --out DIR    # CPU check
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
DECODE = [
    ("rows", dict(layout="rows", block_rows=1)),
    ("rows:b2", dict(layout="rows", block_rows=2)),
    ("rows:b4", dict(layout="rows", block_rows=4)),
    ("units:s32w4", dict(layout="units", rows_per_slab=32, num_warps=4)),
    ("units:s64w8", dict(layout="units", rows_per_slab=64, num_warps=8)),
]
GEMM = [
    ("fma", dict(mode="fma", block_rows=1)),
    ("fma:b2", dict(mode="fma", block_rows=2)),
    ("fma:split2x", None),  # default split_k doubled, filled in at run time
    ("dot", dict(mode="dot", block_rows=1)),
    ("dot:b2", dict(mode="dot", block_rows=2)),
    ("decode+mm", dict(mode="decode")),
]
PUBLIC = "public"  # moeflow.compress.gpu.tbe_decode / tbe_linear, the kernels to beat


def plan_lines() -> list[str]:
    out = []
    for R, C in SHAPES:
        out.append(f"{R}x{C}: decode " + ", ".join(n for n, _ in DECODE) + f", {PUBLIC}, copy")
        for N in TOKENS:
            out.append(f"  {R}x{C} N={N}: matmul, " + ", ".join(n for n, _ in GEMM) + f", {PUBLIC}")
    return out


def hard(shape, dtype, gen, device):
    """Many fallbacks (every 5th value far out of the window) and special values."""
    import torch

    w = (torch.randn(shape, generator=gen, device=device) * 0.02).to(dtype)
    flat = w.view(-1)
    flat[::5] = (torch.randn(flat.numel(), generator=gen, device=device)[::5] * 3000).to(dtype)
    raw = flat.view(torch.int16)
    specials = [0x0000, 0x8000, 0x0001, 0x8001, 0x7FFF, -1]
    specials += [0x7F80, -128, 0x7FC1] if dtype == torch.bfloat16 else [0x7C00, -1024, 0x7E01]
    for i, v in enumerate(specials):
        raw[(7 * i + 3) % raw.numel() :: 11 * len(specials)] = v - 65536 if v >= 32768 else v
    return w


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True, help="folder for tbe_experimental_gpu.md and .json")
    ap.add_argument("--dry-run", action="store_true", help="print the plan; needs no GPU")
    ap.add_argument(
        "--smoke",
        action="store_true",
        help="tiny shapes on CPU (run under TRITON_INTERPRET=1): checks the script",
    )
    ap.add_argument(
        "--budget-s",
        type=float,
        default=200.0,
        help="stop starting new shapes after this many seconds",
    )
    args = ap.parse_args(argv)
    if args.dry_run:
        print("\n".join(plan_lines()))
        return 0

    import torch
    from _common import gpu_timer, run_info, write_record

    from moeflow.compress.gpu import experimental_unit as U
    from moeflow.compress.gpu import tbe_decode, tbe_encode_torch, tbe_linear

    smoke = args.smoke
    if not smoke and not torch.cuda.is_available():
        print("no GPU (use --dry-run, or --smoke under TRITON_INTERPRET=1)", file=sys.stderr)
        return 2
    t0 = time.time()
    dev = torch.device("cpu" if smoke else "cuda")
    shapes, tokens = ([(128, 192)], [1, 9]) if smoke else (SHAPES, TOKENS)
    hard_shapes = ((72, 136),) if smoke else ((200, 136), (130, 200), (512, 1024))
    gen = torch.Generator(device=dev).manual_seed(0)
    bench = gpu_timer(smoke)
    failures: list[str] = []

    def gemm_ok(y, x, w, what):
        ref = x.float() @ w.float().T
        scale = (x.float().abs() @ w.float().abs().T).max().item() + 1e-30
        err = (y.float() - ref).abs().max().item()
        if not err <= 1e-2 * scale:
            failures.append(f"{what}: max err {err:.3g} (scale {scale:.3g})")
            return False
        return True

    # 1. hard weights: the HW paths (inline PRMT/POPC, slow fallback branch), bf16 and fp16
    hard_checks = []
    for dtype in (torch.bfloat16, torch.float16):
        for shape in hard_shapes:
            w = hard(shape, dtype, gen, dev)
            m = tbe_encode_torch(w)
            decoders = [(n, (lambda m=m, kw=kw: U.tbe_decode(m, **kw))) for n, kw in DECODE]
            for name, fn in decoders + [(PUBLIC, lambda m=m: tbe_decode(m))]:
                ok = bool(torch.equal(fn().view(torch.int16), w.view(torch.int16)))
                hard_checks.append((str(dtype), shape, f"decode {name}", ok))
                if not ok:
                    failures.append(f"hard decode {dtype} {shape} {name} not bit-exact")
            wf = torch.where(w.float().abs() < 1e4, w, torch.zeros_like(w))  # finite products
            mf = tbe_encode_torch(wf)
            for N in (1, 13) if smoke else (1, 5, 8, 13):
                x = torch.randn(N, shape[1], generator=gen, device=dev).to(dtype)
                for mode in ("fma", "dot", "decode"):
                    ok = gemm_ok(
                        U.tbe_linear(x, mf, mode=mode),
                        x,
                        wf,
                        f"hard gemm {dtype} {shape} N={N} {mode}",
                    )
                    hard_checks.append((str(dtype), shape, f"gemm N={N} {mode}", ok))
    print(
        f"hard checks: {sum(c[3] for c in hard_checks)}/{len(hard_checks)} ok "
        f"({time.time() - t0:.0f} s)",
        flush=True,
    )

    # 2. the shapes
    rows = []
    for R, C in shapes:
        if time.time() - t0 > args.budget_s:
            print(f"budget reached; skipping {R}x{C}", file=sys.stderr)
            break
        w = (torch.randn(R, C, generator=gen, device=dev) * 0.02).to(torch.bfloat16)
        m = tbe_encode_torch(w)
        dense = w.numel() * 2
        row = {
            "shape": [R, C],
            "ratio": dense / m.nbytes,
            "compressed_bytes": m.nbytes,
            "decode_ms": {},
            "decode_exact": {},
            "gemm": {},
        }
        row["copy_ms"] = bench(lambda w=w: w.clone())
        dec = {n: (lambda m=m, kw=kw: U.tbe_decode(m, **kw)) for n, kw in DECODE}
        dec[PUBLIC] = lambda m=m: tbe_decode(m)
        for name, fn in dec.items():
            exact = bool(torch.equal(fn().view(torch.int16), w.view(torch.int16)))
            row["decode_exact"][name] = exact
            if not exact:
                failures.append(f"decode {R}x{C} {name} not bit-exact")
            row["decode_ms"][name] = bench(fn)
        best = min(row["decode_ms"], key=row["decode_ms"].get)
        print(
            f"{R}x{C}: ratio {row['ratio']:.3f}; decode TB/s "
            + ", ".join(f"{n} {dense / t / 1e9:.2f}" for n, t in row["decode_ms"].items())
            + f"; copy {2 * dense / row['copy_ms'] / 1e9:.2f} (best {best})",
            flush=True,
        )
        BR, BC = m.blocks
        for N in tokens:
            x = torch.randn(N, C, generator=gen, device=dev).to(torch.bfloat16)
            g = {"matmul": bench(lambda x=x, w=w: torch.matmul(x, w.T))}
            variants = {}
            for name, kw in GEMM:
                if kw is None:
                    kw = dict(mode="fma", block_rows=1, split_k=2 * U.default_split_k(BR, BC, dev))
                variants[name] = lambda x=x, m=m, kw=kw: U.tbe_linear(x, m, **kw)
            variants[PUBLIC] = lambda x=x, m=m: tbe_linear(x, m)
            for name, fn in variants.items():
                if gemm_ok(fn(), x, w, f"gemm {R}x{C} N={N} {name}"):
                    g[name] = bench(fn)
            row["gemm"][str(N)] = g
            print(
                f"  N={N}: matmul {g['matmul']:.4f} ms; "
                + ", ".join(f"{n} {g['matmul'] / t:.2f}x" for n, t in g.items() if n != "matmul"),
                flush=True,
            )
        rows.append(row)
        del w, m
        if dev.type == "cuda":
            torch.cuda.empty_cache()

    info = dict(
        run_info(smoke),
        failures=failures,
        hard_checks=hard_checks,
        rows=rows,
        wall_s=time.time() - t0,
    )
    names = [n for n, _ in DECODE] + [PUBLIC]
    lines = [
        f"# Experimental tile-row TBE kernels, all configurations ({info['device']}, "
        f"{info['date']})",
        "",
        f"Command: `{info['command']}`; torch {info['torch']}, triton {info['triton']}; "
        + (
            "one call each (smoke: figures mean nothing)"
            if smoke
            else "do_bench medians (L2 flushed)"
        )
        + ".",
        "",
        f"Hard-weight checks (fallback-heavy, specials; bf16 and fp16): "
        f"{sum(c[3] for c in hard_checks)}/{len(hard_checks)} passed.",
        "",
        f"Decode, TB/s of bf16 output (copy: read + write; {PUBLIC}: `tbe_decode`):",
        "",
        "| W | ratio | " + " | ".join(names) + " | copy |",
        "| --- | --- | " + " | ".join("---" for _ in names) + " | --- |",
    ]
    for r in rows:
        dense = r["shape"][0] * r["shape"][1] * 2
        lines.append(
            f"| {r['shape'][0]}x{r['shape'][1]} | {r['ratio']:.3f} | "
            + " | ".join(f"{dense / r['decode_ms'][n] / 1e9:.3f}" for n in names)
            + f" | {2 * dense / r['copy_ms'] / 1e9:.3f} |"
        )
    gnames = [n for n, _ in GEMM] + [PUBLIC]
    lines += [
        "",
        f"Fused GEMM, speedup over bf16 torch.matmul (matmul ms in its column; "
        f"{PUBLIC}: `tbe_linear`):",
        "",
        "| W | N | matmul ms | " + " | ".join(gnames) + " |",
        "| --- | --- | --- | " + " | ".join("---" for _ in gnames) + " |",
    ]
    for r in rows:
        for N, g in r["gemm"].items():
            lines.append(
                f"| {r['shape'][0]}x{r['shape'][1]} | {N} | {g['matmul']:.4f} | "
                + " | ".join(f"{g['matmul'] / g[n]:.2f}" if n in g else "-" for n in gnames)
                + " |"
            )
    if failures:
        lines += ["", "FAILURES: " + "; ".join(failures)]
    write_record(
        args.out, "tbe_experimental_gpu_smoke" if smoke else "tbe_experimental_gpu", info, lines
    )
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
