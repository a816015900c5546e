"""Row-mask popcount TBE kernels vs the slab kernels and torch, on one GPU.

    PYTHONPATH=src python benchmarks/gpu/tbe_rowpop_gpu.py --out DIR            # GPU, ~2 min
    PYTHONPATH=src python benchmarks/gpu/tbe_rowpop_gpu.py --dry-run            # print the plan
    TRITON_INTERPRET=1 PYTHONPATH=src python benchmarks/gpu/tbe_rowpop_gpu.py --smoke --out DIR

For W in 4096x4096, 14336x4096, 4096x14336, 28672x8192 (bf16, randn * 0.02): decode TB/s of
dense output (torch clone for reference, slab kernel, a few rowpop configs) and fused GEMM
``x @ W^T`` ms for N in 1, 8, 32, 128 (torch.matmul on dense bf16, slab ``tbe_linear``, a few
rowpop configs). Every kernel/config is checked before it is timed: decode bit-exact, GEMM in
fp32 against ``x.float() @ W.float().T``. A failed check is recorded (and not timed) instead of
stopping the run. A time budget (--budget-s) skips what is left rather than overrun; the JSON
is rewritten after every shape. --smoke runs one tiny shape under the Triton interpreter on CPU
(wall-clock figures there mean nothing; it only exercises the code paths).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import time

import torch

SHAPES = [(4096, 4096), (14336, 4096), (4096, 14336), (28672, 8192)]
TOKENS = [1, 8, 32, 128]
SMOKE_SHAPES = [(70, 130)]
SMOKE_TOKENS = [1, 8]
DECODE_CONFIGS = [dict(rows_per_slab=16, num_warps=4, layout="element"),
                  dict(rows_per_slab=16, num_warps=4, layout="tile"),
                  dict(rows_per_slab=32, num_warps=8, layout="element"),
                  dict(rows_per_slab=32, num_warps=4, layout="tile")]


def gemm_configs(N: int) -> list[dict]:
    """Three rowpop GEMM configs per token count. Mode "auto" is fma for N <= 4, else dot; the
    third config tries the other mode for few tokens. For N >= 32 the 8-warp configs avoid the
    register spills ptxas reports for 4 warps at N = 128 (sm_90 compile on CPU)."""
    if N <= 8:
        return [dict(rows_per_slab=16, num_warps=4, layout="element"),
                dict(rows_per_slab=16, num_warps=4, layout="tile"),
                dict(rows_per_slab=16, num_warps=4, layout="element",
                     mode="dot" if N <= 4 else "fma")]
    return [dict(rows_per_slab=16, num_warps=4, layout="element"),
            dict(rows_per_slab=16, num_warps=8, layout="element"),
            dict(rows_per_slab=16, num_warps=8, layout="tile")]


def cfg_name(kw: dict) -> str:
    return ",".join(f"{k}={v}" for k, v in kw.items()) or "default"


class Timer:
    def __init__(self, smoke: bool):
        self.smoke = smoke

    def __call__(self, fn) -> float:
        """Milliseconds per call: triton do_bench median on GPU, one call in smoke mode."""
        if self.smoke:
            t = time.perf_counter()
            fn()
            return (time.perf_counter() - t) * 1e3
        import triton.testing

        return triton.testing.do_bench(fn, warmup=10, rep=50, return_mode="median")


def run(args) -> dict:
    from moeflow.compress import triton_tbe_rowpop as rowpop
    from moeflow.compress import triton_tbe_slab as slab
    from moeflow.compress.triton_tbe import tbe_encode_torch

    dev = torch.device("cpu" if args.smoke else "cuda")
    shapes = SMOKE_SHAPES if args.smoke else SHAPES
    tokens = SMOKE_TOKENS if args.smoke else TOKENS
    decode_cfgs = DECODE_CONFIGS[:2] if args.smoke else DECODE_CONFIGS
    bench = Timer(args.smoke)
    t0 = time.perf_counter()
    rows, failures, skipped = [], [], []

    def over_budget(what: str) -> bool:
        if time.perf_counter() - t0 > args.budget_s:
            skipped.append(what)
            return True
        return False

    def report():
        now = datetime.datetime.now(datetime.timezone.utc)
        meta = dict(date=now.isoformat(timespec="seconds"),
                    device=(torch.cuda.get_device_name() if dev.type == "cuda"
                            else "cpu (interpreter)"),
                    torch=torch.__version__, smoke=args.smoke,
                    elapsed_s=round(time.perf_counter() - t0, 1))
        return dict(meta=meta, rows=rows, failures=failures, skipped=skipped)

    for R, C in shapes:
        if over_budget(f"{R}x{C}"):
            continue
        torch.manual_seed(0)
        w = (torch.randn(R, C, device=dev) * 0.02).to(torch.bfloat16)
        m = tbe_encode_torch(w)
        dense_bytes = w.numel() * 2
        row = dict(shape=f"{R}x{C}", ratio=dense_bytes / m.nbytes, decode={}, gemm={})
        row["copy_tbs"] = 2 * dense_bytes / bench(lambda: w.clone()) / 1e9
        dec = [("slab", cfg_name({}), lambda: slab.tbe_decode(m))]
        dec += [("rowpop", cfg_name(kw), lambda kw=kw: rowpop.tbe_decode(m, **kw))
                for kw in decode_cfgs]
        for kind, name, fn in dec:
            key = f"{kind}:{name}"
            if over_budget(f"{R}x{C} decode {key}"):
                continue
            try:
                ok = torch.equal(fn().view(torch.int16), w.view(torch.int16))
            except Exception as e:  # a config that fails to compile or run is a finding
                ok = False
                failures.append(f"{R}x{C} decode {key}: {type(e).__name__}: {str(e)[:300]}")
            if not ok:
                failures.append(f"{R}x{C} decode {key}: not bit-exact")
                continue
            row["decode"][key] = dense_bytes / bench(fn) / 1e9
        for N in tokens:
            x = torch.randn(N, C, device=dev).to(torch.bfloat16)
            ref = x.float() @ w.float().t()
            tol = 1e-3 * ref.abs().max().item() + 1e-3
            g = {"matmul": bench(lambda: x @ w.t())}
            cands = [("slab", cfg_name({}), lambda **o: slab.tbe_linear(x, m))]
            cands += [("rowpop", cfg_name(kw),
                       lambda kw=kw, **o: rowpop.tbe_linear(x, m, **kw, **o))
                      for kw in gemm_configs(N)]
            for kind, name, fn in cands:
                key = f"{kind}:{name}"
                if over_budget(f"{R}x{C} N={N} {key}"):
                    continue
                try:
                    y = fn(out_dtype=torch.float32) if kind == "rowpop" else fn()
                    err = (y.float() - ref).abs().max().item()
                except Exception as e:
                    err = float("nan")
                    failures.append(f"{R}x{C} N={N} {key}: {type(e).__name__}: {str(e)[:300]}")
                # the slab kernel rounds to bf16; rowpop is checked on its fp32 result
                lim = tol if kind == "rowpop" else 1e-2 * ref.abs().max().item() + 1e-2
                if not err <= lim:
                    failures.append(f"{R}x{C} N={N} {key}: max error {err:.3g} > {lim:.3g}")
                    continue
                g[key] = bench(fn)
            row["gemm"][str(N)] = g
        rows.append(row)
        print(json.dumps(row), flush=True)
        write(args, report())
    info = report()
    write(args, info)
    return info


def write(args, info: dict) -> None:
    os.makedirs(args.out, exist_ok=True)
    stem = "tbe_rowpop_gpu_smoke" if args.smoke else "tbe_rowpop_gpu"
    with open(os.path.join(args.out, stem + ".json"), "w") as f:
        json.dump(info, f, indent=1)
    with open(os.path.join(args.out, stem + ".md"), "w") as f:
        f.write(markdown(info, args) + "\n")


def markdown(info: dict, args) -> str:
    meta = info["meta"]
    cmd = ("TRITON_INTERPRET=1 PYTHONPATH=src python benchmarks/gpu/tbe_rowpop_gpu.py --smoke "
           "--out DIR" if args.smoke else
           "PYTHONPATH=src python benchmarks/gpu/tbe_rowpop_gpu.py --out DIR")
    lines = [f"# TBE kernels: row-mask popcount vs slab ({meta['device']}, {meta['date']})", "",
             f"Command: `{cmd}`; torch {meta['torch']}; "
             + ("single interpreted calls (meaningless times)" if args.smoke
                else "triton do_bench medians") + "; "
             f"run took {meta['elapsed_s']} s. Decode TB/s counts dense bf16 output bytes.", "",
             "| W | ratio | copy TB/s | slab decode TB/s | rowpop best TB/s | rowpop best config |",
             "| --- | --- | --- | --- | --- | --- |"]
    fmt = lambda v, p: "-" if v is None else f"{v:.{p}f}"  # noqa: E731
    for r in info["rows"]:
        hits = [(v, k[7:]) for k, v in r["decode"].items() if k.startswith("rowpop:")]
        best = max(hits) if hits else (None, "-")
        lines.append(f"| {r['shape']} | {r['ratio']:.3f} | {r['copy_tbs']:.2f} | "
                     f"{fmt(r['decode'].get('slab:default'), 3)} | {fmt(best[0], 3)} | "
                     f"{best[1]} |")
    lines += ["", "| W | N | matmul ms | slab ms | rowpop best ms | rowpop vs matmul | "
              "rowpop best config |", "| --- | --- | --- | --- | --- | --- | --- |"]
    for r in info["rows"]:
        for N, g in r["gemm"].items():
            hits = [(v, k[7:]) for k, v in g.items() if k.startswith("rowpop:")]
            best = min(hits) if hits else (None, "-")
            sp = "-" if best[0] is None else f"{g['matmul'] / best[0]:.2f}x"
            lines.append(f"| {r['shape']} | {N} | {g['matmul']:.4f} | "
                         f"{fmt(g.get('slab:default'), 4)} | {fmt(best[0], 4)} | {sp} | "
                         f"{best[1]} |")
    lines += ["", "All configs (decode TB/s; GEMM ms):", ""]
    for r in info["rows"]:
        lines.append(f"- {r['shape']} decode: " + "; ".join(
            f"{k} {v:.3f}" for k, v in r["decode"].items()))
        for N, g in r["gemm"].items():
            lines.append(f"- {r['shape']} N={N}: " + "; ".join(
                f"{k} {v:.4f}" for k, v in g.items()))
    lines += ["", f"Failures: {info['failures'] or 'none'}",
              f"Skipped (time budget): {info['skipped'] or 'none'}"]
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="out")
    ap.add_argument("--budget-s", type=float, default=140.0,
                    help="stop starting new measurements after this many seconds")
    ap.add_argument("--smoke", action="store_true",
                    help="one tiny shape on CPU (needs TRITON_INTERPRET=1)")
    ap.add_argument("--dry-run", action="store_true", help="print the plan and exit")
    args = ap.parse_args(argv)
    if args.dry_run:
        for R, C in SHAPES:
            print(f"{R}x{C}: decode slab + " + " | ".join(map(cfg_name, DECODE_CONFIGS)))
            for N in TOKENS:
                print(f"  N={N}: matmul, slab, " + " | ".join(map(cfg_name, gemm_configs(N))))
        return 0
    if args.smoke and os.environ.get("TRITON_INTERPRET") != "1":
        ap.error("--smoke runs on CPU and needs TRITON_INTERPRET=1")
    if not args.smoke and not torch.cuda.is_available():
        ap.error("no CUDA device (use --smoke under TRITON_INTERPRET=1, or --dry-run)")
    info = run(args)
    print(markdown(info, args))
    return 1 if info["failures"] else 0


if __name__ == "__main__":
    raise SystemExit(main())
