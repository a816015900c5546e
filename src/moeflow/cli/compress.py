"""``moeflow compress | decompress | inspect``: lossless compressed safetensors checkpoints.

    moeflow compress model.safetensors model.mfz [--codec auto|entropy|tbe|raw] [--force]
    moeflow decompress model.mfz out.safetensors [--force]
    moeflow inspect model.mfz [--verify] [--json]

Errors are raised as moeflow's typed errors (``InputError`` for a bad safetensors file or
argument, ``CorruptDataError`` for a corrupt or crafted ``.mfz``) or ``OSError``; the
``moeflow`` error boundary turns them into one line and the exit code.
"""

from __future__ import annotations

import argparse
import json
import sys


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--threads", type=int, default=None, help="worker threads (default: all available cores)"
    )
    g = p.add_mutually_exclusive_group()
    g.add_argument(
        "--progress",
        dest="progress",
        action="store_true",
        default=None,
        help="always show the progress bar",
    )
    g.add_argument(
        "--no-progress", dest="progress", action="store_false", help="never show the progress bar"
    )


def _progress(args) -> bool:
    return sys.stderr.isatty() if args.progress is None else bool(args.progress)


def _force(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--force",
        action="store_true",
        help="replace the output file if it exists (never the input itself)",
    )


def add_compress_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("input", help="safetensors file")
    p.add_argument(
        "output", help=".mfz file to write (atomically; refused if it exists, unless --force)"
    )
    p.add_argument(
        "--codec",
        default="auto",
        choices=["auto", "entropy", "tbe", "raw"],
        help="auto = Huffman-coded exponents for float tensors, raw otherwise; "
        "tbe = ZipServ fixed-length format (bf16/fp16; others use auto)",
    )
    _force(p)
    _common(p)


def run_compress(args) -> int:
    from moeflow.compress.checkpoint import compress_file

    index = compress_file(
        args.input, args.output, args.codec, args.threads, _progress(args), overwrite=args.force
    )
    ratio = index["data_bytes"] / max(1, index["file_bytes"])
    print(
        f"{args.input} -> {args.output}: {len(index['tensors'])} tensors, "
        f"{index['data_bytes']} -> {index['file_bytes']} bytes (ratio {ratio:.3f})"
    )
    return 0


def add_decompress_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("input", help=".mfz file")
    p.add_argument(
        "output",
        help="safetensors file to write (atomically; refused if it exists, unless --force)",
    )
    _force(p)
    _common(p)


def run_decompress(args) -> int:
    from moeflow.compress.checkpoint import decompress_file

    index = decompress_file(
        args.input, args.output, args.threads, _progress(args), overwrite=args.force
    )
    print(f"{args.input} -> {args.output}: {len(index['tensors'])} tensors restored")
    return 0


def add_inspect_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("input", help=".mfz file")
    p.add_argument("--verify", action="store_true", help="decode every tensor and check it")
    p.add_argument("--json", action="store_true", help="print the index as JSON")
    p.add_argument("--threads", type=int, default=None)


def run_inspect(args) -> int:
    from moeflow.compress.checkpoint import inspect_file

    index = inspect_file(args.input, args.verify, args.threads)
    if args.json:
        index = dict(index)
        index.pop("safetensors_header", None)
        print(json.dumps(index, indent=1))
        return 0
    rows = index["tensors"]
    w = max([len("tensor")] + [len(t["name"]) for t in rows])
    print(f"{'tensor':<{w}}  {'dtype':<9} {'shape':<18} {'codec':<8} {'ratio':>6} {'H_exp':>6}")
    for t in rows:
        h = f"{t['exp_entropy']:.3f}" if "exp_entropy" in t else "-"
        shape = "x".join(str(s) for s in t["shape"]) or "scalar"
        ratio = f"{t['ratio']:.3f}" if "ratio" in t else "-"
        print(f"{t['name']:<{w}}  {t['dtype']:<9} {shape:<18} {t['codec']:<8} {ratio:>6} {h:>6}")
    total = index["data_bytes"] / max(1, index["file_bytes"])
    gaps = index.get("gaps", [])
    stored = (
        f", {sum(g['data_offsets'][1] - g['data_offsets'][0] for g in gaps)} bytes "
        f"outside tensors stored as is"
        if gaps
        else ""
    )
    print(
        f"total: {len(rows)} tensors, {index['data_bytes']} bytes -> {index['file_bytes']} "
        f"bytes, ratio {total:.3f}{stored}" + (", verified" if args.verify else "")
    )
    return 0
