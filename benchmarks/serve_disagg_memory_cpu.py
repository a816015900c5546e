"""Peak memory per rank of ``moeflow serve --ag N --eg M`` (disaggregated memory), CPU, gloo.

A Qwen3-MoE-shaped checkpoint whose experts dominate its size is written by transformers'
``save_pretrained`` as sharded safetensors (``benchmarks/ep_memory_cpu.py --_make``, in a
separate process so no rank inherits it). Each repeat runs, in shuffled order:

* **disaggregated**: a :class:`moeflow.serving.disagg_server.DisaggregatedEngine` (the engine
  of ``moeflow serve MODEL_DIR --ag AG --eg EG``) forks its ranks; each loads its part of the
  checkpoint; it serves ``--requests`` requests (random prompts, greedy), then shuts down.
  Every rank reports its resident set before loading (``baseline``), its peak once loaded,
  its peak over its whole life (VmHWM, reset once at the baseline), the weight bytes it holds
  and the checkpoint bytes it read.
* **whole model**: a forked process loads the whole checkpoint
  (:func:`moeflow.checkpoint.load_pretrained`, what every rank of a non-disaggregated launch
  holds) and reports its peak over its baseline.

Target (issue 26): an expert rank's peak <= its experts' bytes x 1.3 + its baseline; an
attention rank holds no routed-expert byte. Both forked from this process after the code
is imported, so baselines hold the same code.

    python benchmarks/serve_disagg_memory_cpu.py [--experts 64 --ag 1 --eg 2 --repeat 5]
writes benchmarks/results/serve_disagg_memory_cpu_<host>_<date>.{json,md}.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
MB = 1 << 20


def _whole_model(path: str, q) -> None:
    from moeflow.checkpoint import load_pretrained
    from moeflow.serving.disagg_server import _memory, _reset_peak

    _reset_peak()
    base = _memory()
    model = load_pretrained(path)
    n = sum(p.numel() * p.element_size() for p in model.parameters())
    q.put({"memory_baseline": base, "memory_end": _memory(), "weight_bytes": n})


def whole_model(path: str) -> dict:
    import multiprocessing as mp

    ctx = mp.get_context("fork")
    q = ctx.Queue()
    p = ctx.Process(target=_whole_model, args=(path, q))
    p.start()
    out = q.get(timeout=600)
    p.join()
    return out


def disaggregated(path: str, args, seed: int) -> dict:
    import torch

    from moeflow.models import SamplingParams
    from moeflow.serving.disagg_server import DisaggregatedEngine
    from moeflow.serving.engine import EngineConfig

    eng = DisaggregatedEngine(
        path, EngineConfig(max_seqs=args.requests), ag=args.ag, eg=args.eg, timeout_s=120
    )
    g = torch.Generator().manual_seed(seed)
    try:
        handles = [
            eng.submit(
                torch.randint(0, args.vocab, (args.input_len,), generator=g).tolist(),
                SamplingParams(args.output_len, stop_token_ids=()),
            )
            for _ in range(args.requests)
        ]
        results = [h.wait(600) for h in handles]
    finally:
        eng.shutdown()
    assert all(r.error is None and len(r.tokens) == args.output_len for r in results)
    return {str(r): info for r, info in eng.rank_info.items()}


def isa() -> str:
    """The vector ISA the machine line names: AVX-512 BF16, AVX2 only, or neither."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line for line in f if line.startswith("flags")), "").split()
    except OSError:
        flags = []
    if "avx512_bf16" in flags:
        return "AVX-512 BF16"
    return "AVX2 only" if "avx2" in flags else "no AVX2"


def growth(r: dict) -> dict:
    """MB over the baseline: the loaded and life peaks, the file-backed growth, the life
    peak less it."""
    base, end = r["memory_baseline"], r["memory_end"]
    loaded = r.get("memory_loaded", end)
    file = (end["rss_file"] - base["rss_file"]) / MB
    life = (end["peak_rss"] - base["rss"]) / MB
    return {
        "baseline": base["rss"] / MB,
        "loaded": (loaded["peak_rss"] - base["rss"]) / MB,
        "life": life,
        "file": file,
        "life_less_file": life - file,
    }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--experts", type=int, default=64)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--ffn", type=int, default=512, help="expert FFN width")
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--vocab", type=int, default=1024)
    ap.add_argument("--ag", type=int, default=1)
    ap.add_argument("--eg", type=int, default=2)
    ap.add_argument("--requests", type=int, default=8)
    ap.add_argument("--input-len", type=int, default=64)
    ap.add_argument("--output-len", type=int, default=16)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--host", default=f"{os.cpu_count()}cpu-x86", help="machine label")
    ap.add_argument("--out", default=None, help="results path stem (default: results/...)")
    args = ap.parse_args(argv)

    import torch
    from _common import cpu_name

    import moeflow.checkpoint  # noqa: F401 - the code every forked process starts with
    import moeflow.serving.disagg_server  # noqa: F401
    import moeflow.serving.disagg_weights  # noqa: F401

    rng = random.Random(args.seed)
    runs = []
    passthrough = [
        f"--{k}={getattr(args, k)}" for k in ("experts", "hidden", "ffn", "layers", "vocab")
    ]
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "ckpt")
        subprocess.run(
            [
                sys.executable,
                os.path.join(HERE, "ep_memory_cpu.py"),
                *passthrough,
                f"--_make={path}",
            ],
            check=True,
        )
        for rep in range(args.repeat):
            arms = ["disaggregated", "whole model"]
            rng.shuffle(arms)
            for arm in arms:
                out = whole_model(path) if arm == "whole model" else disaggregated(path, args, rep)
                runs.append({"repeat": rep, "arm": arm, "order": arms, "result": out})
                print(json.dumps(runs[-1]), flush=True)

    expert_total = args.layers * args.experts * 3 * args.hidden * args.ffn * 4
    rows, ratios, anon_ratios, ag_expert = [], [], [], []
    for run in runs:
        if run["arm"] != "disaggregated":
            continue
        for rank, r in sorted(run["result"].items(), key=lambda kv: int(kv[0])):
            g = growth(r)
            experts = r["expert_bytes"] / MB
            if r["role"] == "expert":
                ratios.append(g["life"] / experts)
                anon_ratios.append(g["life_less_file"] / experts)
            else:
                ag_expert.append(r["expert_bytes"])
            rows.append(
                f"| {run['repeat']} | {rank} | {r['role']} | {g['baseline']:.0f} | "
                f"{g['loaded']:.1f} | {g['life']:.1f} | {g['file']:.1f} | "
                f"{g['life_less_file']:.1f} | {experts:.1f} | {r['weight_bytes'] / MB:.1f} | "
                f"{r['bytes_read'] / MB:.1f} | "
                + (
                    f"{g['life'] / experts:.2f} / {g['life_less_file'] / experts:.2f} |"
                    if r["role"] == "expert"
                    else "- |"
                )
            )
    whole = [
        (growth(r["result"]), r["result"]["weight_bytes"])
        for r in runs
        if r["arm"] == "whole model"
    ]
    date = datetime.date.today().isoformat()
    record = {
        "benchmark": "serve_disagg_memory_cpu",
        "date": date,
        "host": args.host,
        "cpu": cpu_name(),
        "isa": isa(),
        "torch": torch.__version__,
        "python": sys.version.split()[0],
        "args": vars(args),
        "expert_total_bytes": expert_total,
        "runs": runs,
    }
    stem = args.out or os.path.join(HERE, "results", f"serve_disagg_memory_cpu_{args.host}_{date}")
    with open(stem + ".json", "w") as f:
        json.dump(record, f, indent=1)
    med = statistics.median(ratios)
    cmd = (
        f"python benchmarks/serve_disagg_memory_cpu.py --experts {args.experts} --hidden "
        f"{args.hidden} --ffn {args.ffn} --layers {args.layers} --ag {args.ag} --eg {args.eg} "
        f"--requests {args.requests} --repeat {args.repeat}"
    )
    text = "\n".join(
        [
            f"# Disaggregated serving memory per rank (`moeflow serve --ag {args.ag} --eg "
            f"{args.eg}`, CPU, gloo), {date}",
            "",
            f"Machine: {args.host} ({cpu_name()}, {isa()}), torch {torch.__version__}, Python "
            f"{sys.version.split()[0]}. Resident-set figures depend on the machine only "
            "through allocator behaviour; held and read bytes do not. The machine was shared "
            "with other jobs; memory figures, unlike timings, are not sensitive to that.",
            "",
            f"Model: Qwen3-MoE shape, {args.layers} layers, {args.experts} experts, "
            f"D={args.hidden}, expert FFN {args.ffn}, vocab {args.vocab}, fp32 "
            f"(`save_pretrained`, 32 MB shards): {expert_total / MB:.1f} MB of expert weights. "
            f"Each disaggregated run serves {args.requests} requests of {args.input_len} "
            f"random prompt tokens and {args.output_len} greedy output tokens.",
            "",
            f"Command: `{cmd}`",
            "",
            "Target: expert-rank peak <= its experts' bytes x 1.3 + the process baseline; "
            "attention ranks hold no expert weight.",
            "",
            f"Result: expert-rank life peak increase / its expert bytes, median {med:.2f} "
            f"(range {min(ratios):.2f}-{max(ratios):.2f}) over {len(ratios)} rank-runs; less "
            "the file-backed pages (code) the rank faulted in, median "
            f"{statistics.median(anon_ratios):.2f} (range {min(anon_ratios):.2f}-"
            f"{max(anon_ratios):.2f}). Attention ranks' routed-expert bytes: "
            f"{sorted(set(ag_expert))}.",
            "",
            "| repeat | rank | role | baseline RSS MB | loaded peak +MB | life peak +MB | "
            "file-backed +MB | life peak less file-backed +MB | expert MB held | weights MB "
            "held | checkpoint MB read | life peak / experts (total / less file-backed) |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|",
            *rows,
            "",
            "Whole model in one forked process (`load_pretrained`, what each rank of a "
            "non-disaggregated launch holds), peak over its baseline: "
            + ", ".join(f"+{g['life']:.1f} MB" for g, _ in whole)
            + f" ({whole[0][1] / MB:.1f} MB of weights).",
            "",
            "Peaks are VmHWM, reset with /proc/self/clear_refs at the rank's baseline (after "
            "fork and the gloo rendezvous, before loading), minus that baseline; 'loaded' is "
            "the peak once the rank's weights are in, 'life' the peak from the baseline to the "
            "rank's exit, serving included. 'File-backed' is the growth of RssFile over the "
            "same span: library code (torch's GEMM kernels, the checkpoint reader) a forked "
            "process faults in on first use, which any process running that code holds; the "
            "life peak less it bounds the anonymous (data) peak from below, the life peak "
            "from above. Every process is forked from the benchmark after it imported torch "
            "and moeflow's loading and serving code. Arms run in shuffled order per repeat "
            "(listed in the json).",
            "",
        ]
    )
    with open(stem + ".md", "w") as f:
        f.write(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
