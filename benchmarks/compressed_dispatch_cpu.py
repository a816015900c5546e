"""ZipCCL-compressed vs raw bf16 dispatch through ExpertParallel, on loopback and emulated links.

    python benchmarks/compressed_dispatch_cpu.py [--cells loopback,1gbit,100mbit] [--reps 5]

World 2 as 2 nodes x 1 rank: on loopback (both ranks on 127.0.0.1) and as two network
namespaces joined by a link shaped with ``tc tbf`` (``emulated_cluster.py``; needs root; the
namespace prefix is ``MOEFLOW_EMU_PREFIX``). One bf16 MoE layer (hidden 1024, FFN 384,
8 experts top-2, GELU, dropless ``a2a`` dispatcher, r_fwd = r_bwd = ``--r``) runs forward +
backward on 1024 tokens per rank in three arms built from the same weights: ``raw`` (plain
all-to-alls), ``zipccl`` (``compress=True``: every row all-to-all encoded, exchanged and
decoded as a pending stage of the chunk pipeline) and ``auto`` (ZipCCL's switch: compress a
message only when the predicted encode + compressed transfer + decode beats the raw
transfer, under a PerfModel that ``moeflow.apps.profile.profile`` fits on this link and
codec before anything is timed). One process per rank, one torch thread, one codec thread;
the codec runs on the process group's worker thread.

Per repeat the arms run in an order drawn from the repeat's seed (the same on both
ranks), ``--steps`` timed steps each after the warm-up; a step is timed barrier to barrier
on rank 0. Bytes come from the dispatcher's counter (``moeflow.comm.bytes``: what each rank
handed to torch.distributed, size exchanges included), per step, summed over the two ranks.
Encode and decode time are the codec calls' wall time on the worker thread. Before timing,
one step of each arm checks that the compressed arms' outputs and gradients equal the raw
arm's bit for bit.

Inputs: Gaussian tokens of unit scale, and a Gaussian output gradient (``(y * g).sum()``).
Writes ``compressed_dispatch_cpu_<host>_<date>.md`` (and ``.json``) under ``--out``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import statistics
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import (  # noqa: E402
    collect_ranks,
    cpu_isa,
    cpu_name,
    cpu_record_info,
    free_port,
    write_record,
)

# F / D = 0.375, the fine-grained experts of Qwen3-30B-A3B (hidden 2048, expert FFN 768)
D, F, E, K, T = 1024, 384, 8, 2, 1024
ARMS = ("raw", "zipccl", "auto")
COMPRESSED = ("zipccl", "auto")


class _TimedCodec:
    """The collective codec with its encode and decode calls timed (worker-thread wall)."""

    def __init__(self, codec):
        self.codec, self.encode_s, self.decode_s = codec, 0.0, 0.0

    def encode(self, *a, **kw):
        t = time.perf_counter()
        try:
            return self.codec.encode(*a, **kw)
        finally:
            self.encode_s += time.perf_counter() - t

    def decode(self, *a, **kw):
        t = time.perf_counter()
        try:
            return self.codec.decode(*a, **kw)
        finally:
            self.decode_s += time.perf_counter() - t


def rank_main(rank: int, master: str, port: int, args) -> None:
    import torch
    import torch.distributed as dist

    from moeflow import MoEConfig, MoELayer
    from moeflow.comm import Topology
    from moeflow.parallel import ExpertParallel

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://{master}:{port}", rank=rank, world_size=2)
    cfg = MoEConfig(hidden_size=D, ffn_hidden_size=F, num_experts=E, top_k=K, expert_type="gelu")
    torch.manual_seed(0)
    layer = MoELayer(cfg).to(torch.bfloat16)
    topo = Topology.explicit(2, 1)  # 2 nodes x 1 rank: every row crosses the link
    # ZipCCL's switch needs the link's and the codec's costs: profiled here, on this link,
    # before anything is timed (Gaussian messages, not the timed batch)
    from moeflow.apps.profile import profile

    t_prof = time.perf_counter()
    perf = profile(
        None,
        sizes=(2**16, 2**18, 2**20, 2**22),
        gemm_sizes=(64, 128),
        reps=2,
        trials=3,
        progress=False,
        dtype="bfloat16",
    )
    t_prof = time.perf_counter() - t_prof
    eps = {
        arm: ExpertParallel(
            layer,
            topology=topo,
            dispatcher="a2a",
            r_fwd=args.r,
            r_bwd=args.r,
            timeout_s=600,
            compress={"raw": False, "zipccl": True, "auto": "auto"}[arm],
            perf=perf,
        )
        for arm in ARMS
    }
    codecs = {}
    for arm in COMPRESSED:
        cz = eps[arm].dispatcher.compression
        cz.codec = codecs[arm] = _TimedCodec(cz.codec)
    gen = torch.Generator().manual_seed(10 + rank)
    x = torch.randn(T, D, generator=gen).to(torch.bfloat16)
    g = torch.randn(T, D, generator=gen).to(torch.bfloat16)

    def step(arm):
        ep = eps[arm]
        ep.zero_grad(set_to_none=True)
        xi = x.clone().requires_grad_(True)
        y = ep(xi)
        (y * g).sum().backward()
        return y, xi.grad

    # oracle: the compressed arm is the raw arm, bit for bit (outputs and gradients)
    ref = [t.detach().clone() for t in step("raw")]
    ref += [eps["raw"].w_in.grad.clone(), eps["raw"].w_out.grad.clone()]
    for arm in COMPRESSED:
        got = [t.detach().clone() for t in step(arm)]
        got += [eps[arm].w_in.grad.clone(), eps[arm].w_out.grad.clone()]
        exact = all(torch.equal(a.view(torch.int16), b.view(torch.int16)) for a, b in zip(ref, got))
        if not exact:
            raise SystemExit(f"rank {rank}: the {arm} arm differs from the raw arm")

    runs = []
    for rep in range(args.reps):
        order = list(ARMS)
        random.Random(rep).shuffle(order)  # the same order on both ranks
        row = {"order": order}
        for arm in order:
            ep = eps[arm]
            ep.dispatcher.reset_bytes()
            cz = ep.dispatcher.compression
            if cz is not None:
                cz.stats = type(cz.stats)()
                codecs[arm].encode_s = codecs[arm].decode_s = 0.0
            dist.barrier()
            t0 = time.perf_counter()
            for _ in range(args.steps):
                step(arm)
            dist.barrier()
            ms = 1e3 * (time.perf_counter() - t0) / args.steps
            b = torch.tensor(
                [
                    float(ep.dispatcher.byte_counter.total),
                    float(ep.dispatcher.bytes_sent.get("inter_node", 0)),
                    float(sum(cz.stats.raw_bytes.values())) if cz else 0.0,
                    float(sum(cz.stats.wire_bytes.values())) if cz else 0.0,
                    codecs[arm].encode_s if cz else 0.0,
                    codecs[arm].decode_s if cz else 0.0,
                    float(sum(cz.stats.compressed.values())) if cz else 0.0,
                    float(sum(cz.stats.calls.values())) if cz else 0.0,
                ],
                dtype=torch.float64,
            )
            dist.all_reduce(b)  # both ranks' bytes; codec seconds summed over ranks
            row[arm] = {
                "step_ms": ms,
                "bytes_per_step": b[0].item() / args.steps,
                "inter_node_bytes_per_step": b[1].item() / args.steps,
            }
            if cz is not None:
                row[arm].update(
                    compressed_calls=int(b[6].item()),
                    calls=int(b[7].item()),
                    raw_payload_per_step=b[2].item() / args.steps,
                    wire_payload_per_step=b[3].item() / args.steps,
                    encode_ms_per_step_per_rank=1e3 * b[4].item() / 2 / args.steps,
                    decode_ms_per_step_per_rank=1e3 * b[5].item() / 2 / args.steps,
                )
        for arm in COMPRESSED:
            row[f"ratio_{arm}"] = row["raw"]["step_ms"] / row[arm]["step_ms"]
        runs.append(row)
    stats = eps["zipccl"].dispatcher.compression.stats
    raw_by, wire_by = {}, {}  # per role: the chunk suffix dropped
    for op, raw in stats.raw_bytes.items():
        role = op.split(" (chunk")[0]
        raw_by[role] = raw_by.get(role, 0) + raw
        wire_by[role] = wire_by.get(role, 0) + stats.wire_bytes.get(op, 0)
    by_label = {role: raw_by[role] / max(wire_by[role], 1) for role in raw_by}
    if rank == 0:
        out = {"bit_exact": True, "runs": runs, "ratio_by_op": by_label}
        out.update(profile_s=t_prof, perf=perf.to_dict())
        print(json.dumps(out), flush=True)
    dist.destroy_process_group()


def _rank_cmd(master: str, port: int, rank: int, args) -> list[str]:
    return [
        sys.executable,
        os.path.abspath(__file__),
        "--master",
        master,
        "--port",
        str(port),
        "--rank",
        str(rank),
        "--reps",
        str(args.reps),
        "--steps",
        str(args.steps),
        "--r",
        str(args.r),
    ]


def run_cell(cell: str, args):
    if cell == "loopback":
        port = free_port()
        procs = [
            subprocess.Popen(
                _rank_cmd("127.0.0.1", port, r, args), stdout=subprocess.PIPE, text=True
            )
            for r in range(2)
        ]
        return collect_ranks(procs, 3000)
    import emulated_cluster as ec

    reason = ec.unavailable()
    if reason:
        return None, reason
    ec.up(2, cell)
    try:
        port = 29000 + random.Random().randrange(1000)
        procs = [
            subprocess.Popen(
                ec.node_command(r, _rank_cmd(ec.addr(0), port, r, args)),
                stdout=subprocess.PIPE,
                text=True,
            )
            for r in range(2)
        ]
        return collect_ranks(procs, 3000)
    finally:
        ec.down()


def _summary(runs: list, arm: str, key: str) -> tuple[float, float, float]:
    v = [r[arm][key] for r in runs]
    return statistics.median(v), min(v), max(v)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cells", default="loopback,1gbit,100mbit")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--r", type=int, default=4, help="pipeline degree, both directions")
    ap.add_argument("--out", default="benchmarks/results")
    ap.add_argument("--host", default=f"{os.cpu_count()}cpu-x86")
    ap.add_argument("--rank", type=int, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--master", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--port", type=int, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.rank is not None:
        rank_main(args.rank, args.master, args.port, args)
        return 0
    import numba
    import torch

    cmd = (
        f"python benchmarks/compressed_dispatch_cpu.py --cells {args.cells} --reps {args.reps} "
        f"--steps {args.steps} --r {args.r}"
    )
    info = {
        **cpu_record_info(args.host, cmd),
        "numba": numba.__version__,
        "shape": dict(D=D, F=F, E=E, K=K, T=T, r=args.r, dtype="bfloat16"),
        "cells": {},
    }
    date, isa = info["date"], cpu_isa()
    lines = [
        f"# ZipCCL-compressed vs raw bf16 dispatch through ExpertParallel ({date}, {args.host})",
        "",
        f"Command: `{cmd}` (as root for the emulated cells). "
        f"Machine: {cpu_name()}, {os.cpu_count()} vCPUs ({isa}), shared with other work "
        "while it ran, so times are noisy: every repeat is listed. "
        f"Python {platform.python_version()}, torch {torch.__version__}, numba "
        f"{numba.__version__}, gloo.",
        "",
        f"World 2 as 2 nodes x 1 rank; one MoE layer, bf16, hidden {D}, FFN {F}, {E} experts "
        f"top-{K}, GELU, dropless `a2a`, r_fwd = r_bwd = {args.r}, {T} Gaussian tokens per "
        "rank; forward + backward. Arms `raw` (plain all-to-alls), `zipccl` "
        "(`compress=True`) and `auto` (ZipCCL's switch under a PerfModel profiled on the link "
        "and codec before timing), built from the same weights, interleaved in a per-repeat "
        "order; "
        f"{args.steps} steps per arm and repeat, timed barrier to barrier on rank 0. Bytes: "
        "measured by `moeflow.comm.bytes` where the rows are handed to torch.distributed, "
        "both ranks, per step. The compressed arms' outputs and gradients were checked equal "
        "to the raw arm's bit for bit before timing (both compressed arms).",
        "",
        "Target (issue 25): compressed vs raw >= 1.25x at 100 Mbit/s, >= 0.97x on loopback.",
        "",
    ]
    for cell in args.cells.split(","):
        res, why = run_cell(cell, args)
        lines += [f"## {cell}", ""]
        if res is None:
            lines += [f"skipped: {why}", ""]
            info["cells"][cell] = {"skipped": why}
            continue
        info["cells"][cell] = res
        runs = res["runs"]
        lines += [
            "| repeat | order | raw ms | zipccl ms | auto ms | raw / zipccl | raw / auto |",
            "| --- | --- | --- | --- | --- | --- | --- |",
        ]
        for i, r in enumerate(runs):
            lines.append(
                f"| {i + 1} | {', '.join(r['order'])} | {r['raw']['step_ms']:.1f} | "
                f"{r['zipccl']['step_ms']:.1f} | {r['auto']['step_ms']:.1f} | "
                f"{r['ratio_zipccl']:.3f} | {r['ratio_auto']:.3f} |"
            )
        lines.append("")
        for arm in ARMS:
            m, lo, hi = _summary(runs, arm, "step_ms")
            mb = statistics.median(r[arm]["bytes_per_step"] for r in runs) / 1e6
            text = f"- `{arm}`: step median {m:.1f} ms (min {lo:.1f}, max {hi:.1f}); {mb:.2f} MB"
            if arm in COMPRESSED:
                ratios = [r[f"ratio_{arm}"] for r in runs]
                enc = statistics.median(r[arm]["encode_ms_per_step_per_rank"] for r in runs)
                dec = statistics.median(r[arm]["decode_ms_per_step_per_rank"] for r in runs)
                calls = runs[-1][arm]
                text += (
                    f"; **raw / {arm}: median {statistics.median(ratios):.3f}** (min "
                    f"{min(ratios):.3f}, max {max(ratios):.3f}); codec per step and rank: "
                    f"encode {enc:.1f} ms, decode {dec:.1f} ms; all-to-alls compressed "
                    f"{calls['compressed_calls']} of {calls['calls']} (last repeat, both ranks)"
                )
            lines.append(text)
        z = [r["zipccl"] for r in runs]
        pay = statistics.median(
            x["raw_payload_per_step"] / max(x["wire_payload_per_step"], 1) for x in z
        )
        lines += [
            "",
            "MB: bytes handed to torch.distributed per step, both ranks (`moeflow.comm.bytes`). "
            f"Encoded payload: {pay:.3f}x smaller than raw; per all-to-all role "
            "(raw / encoded bytes): "
            + ", ".join(f"{k} {v:.3f}" for k, v in sorted(res["ratio_by_op"].items()))
            + f". Link and codec profile before timing: {res['profile_s']:.0f} s.",
            "",
        ]
    write_record(args.out, f"compressed_dispatch_cpu_{args.host}_{date}", info, lines)
    return 0


if __name__ == "__main__":
    sys.exit(main())
