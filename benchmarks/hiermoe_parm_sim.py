"""HierMoE dedup + expert swap and Parm's schedules on the simulator, at the papers' scale.

    python benchmarks/hiermoe_parm_sim.py [--quick] [--out benchmarks/results]

1. HierMoE (32 GPUs, U = [1, 4, 8, 16, 32]): simulated dispatch all-to-all of flat a2a,
   Tutel-2DH, dedup at the best level d* (Eq. 6) and dedup + expert swap (smooth max
   γ = 10, a few swap steps searched on ``SEARCH`` earlier batches, the prefix kept that
   is best on one more earlier batch, never on the batch simulated) on DeepSeek-V3-half
   (128 experts, top-8, D = 7168, F = 2048) and Qwen3-30B-A3B (128 experts, top-8,
   D = 2048, F = 768) shapes, next to the published 1.55-3.32x (a2a over Megatron-LM /
   Tutel-2DH / SmartMoE-style baselines). The swap's
   own cost is the simulated point-to-point move of the experts whose owner changes
   (bf16 weights and fp32 Adam moments, ``moeflow.plan.hiermoe.swap_time``), with the
   number of all-to-alls it takes to pay back.
   The routing is synthetic (seeded): each token belongs to one of 8 topics (fixed across
   batches), draws 6 of its 8 experts from its topic's 16 and 2 uniformly, so experts
   co-occur as in trained models; the paper used the models' real routing, which is why
   the duplication here differs.
   An ablation table moves one factor at a time (routing locality, inter-node bandwidth per
   GPU, the node-level link, tokens per GPU) and reports dedup's speedup over flat a2a with
   its limit as the spine's beta grows (the ratio of the per-rank spine rows of flat and
   dedup).
2. Parm (8-GPU server and 32-GPU cluster): the simulated layer time of DeepSpeed-MoE's plain
   MP+EP+ESP schedule over the best of Parm's S1/S2 on a layer sweep (tokens, hidden, top-k,
   MP size), next to the published 1.13-5.77x over 1296 layers.

Writes ``hiermoe_parm_sim_<host>_<date>.md`` (and ``.json``) under ``--out``. Pure Python
(no torch); every figure is simulated from the α-β presets (tagged published / derived).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import itertools
import os
import platform
import random
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import cpu_isa, cpu_name, write_record  # noqa: E402

from moeflow.plan import hiermoe_sim as sh  # noqa: E402
from moeflow.plan import parm_sim as sp  # noqa: E402
from moeflow.plan.hiermoe import (  # noqa: E402
    contiguous_owner,
    dedup_hops,
    level_bytes,
    swap_step,
    swap_time,
)
from moeflow.plan.parm import ParmCluster, ParmLayer  # noqa: E402

SHAPES = {"deepseek-v3-half": (128, 8, 7168, 2048), "qwen3-30b-a3b": (128, 8, 2048, 768)}
PUBLISHED_A2A = (1.55, 3.32)  # HierMoE's a2a speedup over its baselines
SEARCH = 3  # earlier batches the swap search reads; one more checks it; then the simulated one


def topic_routing(
    P: int, T: int, E: int, k: int, seed: int, topic_seed: int = 0, from_topic: int | None = None
) -> list:
    """Tokens of batch ``seed``; the topics (seeded by ``topic_seed``) persist across
    batches, as a trained router's expert co-occurrence does. Each token draws
    ``from_topic`` (default ``k - 2``) of its ``k`` experts from its topic's 16, the rest
    uniformly."""
    n_topic = k - 2 if from_topic is None else from_topic
    topics = [random.Random(topic_seed).sample(range(E), 16) for _ in range(8)]
    rng = random.Random(seed)
    out = []
    for _ in range(P):
        toks = []
        for _ in range(T):
            pick = set(rng.sample(topics[rng.randrange(8)], n_topic))
            while len(pick) < k:
                pick.add(rng.randrange(E))
            toks.append(sorted(pick))
        out.append(toks)
    return out


def hiermoe_rows(quick: bool) -> list[dict]:
    cl = sh.PRESETS["hiermoe-32gpu"]
    U, P = list(cl.U), cl.U[-1]
    sample, tokens_per_gpu = (16, 4096) if quick else (32, 4096)
    swaps = 2 if quick else 6
    rows = []
    for name, (E, k, D, F) in SHAPES.items():
        routes = topic_routing(P, sample, E, k, seed=1)
        earlier = [topic_routing(P, sample, E, k, seed=2 + i) for i in range(SEARCH + 1)]
        pool = [[t for b in earlier[:-1] for t in b[s]] for s in range(P)]
        check = earlier[-1]
        row_bytes = D * 2 * tokens_per_gpu / sample  # bf16 rows, scaled to the batch
        owner = contiguous_owner(E, P)
        base = sh.schedules_ms(routes, owner, cl, row_bytes)
        d_star = min((v, d) for d, v in enumerate(base[f"dedup{d}"] for d in range(4)))[1]

        t0 = time.perf_counter()
        state, found = None, [owner]
        for _ in range(swaps):
            pair, cur, _, state = swap_step(
                pool,
                found[-1],
                U,
                row_bytes * sample / len(pool[0]),
                cl.links,
                state=state,
                level=d_star,
            )
            if pair is None:
                break
            found.append(cur)
        swap_s = (time.perf_counter() - t0) / max(swaps, 1)
        # as moeflow.plan.hiermoe.plan_dedup: keep the prefix of swaps that is best on the
        # check batch (an earlier batch the search did not read)
        on_check = [sh.schedules_ms(check, o, cl, row_bytes)[f"dedup{d_star}"] for o in found]
        steps = min(range(len(found)), key=lambda i: (on_check[i], i))
        owner = found[steps]
        swapped = sh.schedules_ms(routes, owner, cl, row_bytes)
        best_swapped = min(swapped[f"dedup{d}"] for d in range(4))
        expert_bytes = 3 * D * F * (2 + 2 * 4)  # bf16 weights, two fp32 Adam moments
        move_ms = 1e3 * swap_time(contiguous_owner(E, P), owner, U, expert_bytes, cl.links)
        gain = base[f"dedup{d_star}"] - best_swapped
        flat_spine = level_bytes(sh.flat_hops(routes, contiguous_owner(E, P), U), 1)[4]
        dedup_spine = level_bytes(dedup_hops(routes, contiguous_owner(E, P), U, 3), 1)[4]
        rows.append(
            {
                "shape": name,
                "experts": E,
                "top_k": k,
                "hidden": D,
                "d_star": d_star,
                "flat_ms": base["flat"],
                "2dh_ms": base["2dh"],
                "dedup_ms": base[f"dedup{d_star}"],
                "dedup_swap_ms": best_swapped,
                "swaps_applied": steps,
                "swap_step_s": swap_s,
                "swap_move_ms": move_ms,
                "payback_a2a": move_ms / gain if gain > 0 else None,
                "spine_rows_removed": 1 - dedup_spine / flat_spine,
                "speedup_vs_flat": base["flat"] / best_swapped,
                "speedup_vs_2dh": base["2dh"] / best_swapped,
                "speedup_vs_noswap": base[f"dedup{d_star}"] / best_swapped,
            }
        )
    return rows


def _links(cl, **scale) -> sh.HierCluster:
    """``cl`` with link level ``L<n>``'s beta multiplied by ``scale["L<n>"]``."""
    links = dict(cl.links)
    for key, f in scale.items():
        a, b = links[int(key[1:])]
        links[int(key[1:])] = (a, b * f)
    return dataclasses.replace(cl, links=links)


#: (label, factor, routing kwargs, link beta scales, tokens per GPU, one alpha per message):
#: the first row is the setting of the table above without the swap; each other row moves
#: one factor
HIER_ABLATIONS = (
    ("as above (no swap)", "none", {}, {}, 4096, False),
    ("uniform routing (no topics)", "routing", {"from_topic": 0}, {}, 4096, False),
    ("all 8 experts from the token's topic", "routing", {"from_topic": 8}, {}, 4096, False),
    ("spine 4:1 oversubscribed (3.1 GB/s per GPU)", "link bandwidth", {}, {"L4": 2.0}, 4096, False),
    (
        "spine: one 100 Gb/s NIC per 16 GPUs (0.78 GB/s)",
        "link bandwidth",
        {},
        {"L4": 8.0},
        4096,
        False,
    ),
    ("level 3 inside a node (socket link, 20 GB/s)", "topology", {}, {"L3": 0.625}, 4096, False),
    ("1024 tokens per GPU", "batch", {}, {}, 1024, False),
    ("one alpha per message (point-to-point sends)", "baseline strength", {}, {}, 4096, True),
    (
        "one alpha per message, 1024 tokens per GPU",
        "baseline strength + batch",
        {},
        {},
        1024,
        True,
    ),
)


def hiermoe_ablation(quick: bool) -> list[dict]:
    """Dedup (best level, no swap) over flat a2a as each factor of HIER_ABLATIONS moves."""
    base = sh.PRESETS["hiermoe-32gpu"]
    U, P = list(base.U), base.U[-1]
    sample = 16 if quick else 32
    out = []
    for label, factor, rkw, scale, tokens, per_message in HIER_ABLATIONS:
        cl = _links(base, **scale)
        for name, (E, k, D, _F) in SHAPES.items():
            routes = topic_routing(P, sample, E, k, seed=1, **rkw)
            owner = contiguous_owner(E, P)
            t = sh.schedules_ms(routes, owner, cl, D * 2 * tokens / sample, per_message)
            d_star = min(range(len(U) - 1), key=lambda d: (t[f"dedup{d}"], d))
            # the limit of the speedup as the spine's beta grows: the largest per-rank spine
            # message of flat over the sum of dedup's (a hop waits for its slowest rank)
            flat_spine = max(h.max_rank(4) for h in sh.flat_hops(routes, owner, U))
            dedup_spine = sum(h.max_rank(4) for h in dedup_hops(routes, owner, U, d_star))
            out.append(
                {
                    "label": label,
                    "factor": factor,
                    "shape": name,
                    "d_star": d_star,
                    "flat_ms": t["flat"],
                    "2dh_ms": t["2dh"],
                    "dedup_ms": t[f"dedup{d_star}"],
                    "speedup_vs_flat": t["flat"] / t[f"dedup{d_star}"],
                    "speedup_vs_2dh": t["2dh"] / t[f"dedup{d_star}"],
                    "spine_ceiling": flat_spine / dedup_spine if dedup_spine else None,
                }
            )
    return out


def _hier_why(abl: list[dict]) -> str:
    """The reading of the HierMoE ablation, with this run's figures."""

    def rng(label):
        v = [a["speedup_vs_flat"] for a in abl if a["label"] == label]
        return f"{min(v):.2f}-{max(v):.2f}x"

    labels = list(dict.fromkeys(a["label"] for a in abl))
    msg = next(a["label"] for a in abl if a["factor"] == "baseline strength")
    top = max(labels[1:], key=lambda lb: min(a["speedup_vs_flat"] for a in abl if a["label"] == lb))
    ceil = [a["spine_ceiling"] for a in abl if a["label"] == labels[0] and a["spine_ceiling"]]
    lo, hi = PUBLISHED_A2A
    inside = [
        lb
        for lb in labels
        if all(lo <= a["speedup_vs_flat"] <= hi for a in abl if a["label"] == lb)
    ]
    return (
        f"**Reading.** Our setting gives {rng(labels[0])} over flat a2a without the swap. "
        "Dedup removes rows only where a token's experts share a remote group, so as the "
        "spine (inter-node link) comes to dominate the all-to-all, the speedup tends to the "
        "ratio of the per-rank spine rows of flat and dedup (spine limit column: "
        f"{min(ceil):.2f}-{max(ceil):.2f}x in our setting). The factor that moves it most is "
        f"{top!r} ({rng(top)}). Rows inside the published {lo}-{hi}x: "
        + (", ".join(repr(lb) for lb in inside) if inside else "none")
        + ". The paper's link figures per level are not in what we could read; ours are "
        "assumed (see the preset), so the link rows bracket the published range rather "
        "than reproduce it. Routing locality: uniform routing gives "
        f"{rng(labels[1])}, all of a token's experts in its topic {rng(labels[2])}; a "
        "trained router's co-occurrence (what the paper measured) is not available here "
        "(no model weights), so our topics stand in for it. Charging one alpha per "
        f"message instead of per hop gives {rng(msg)}: the preset's alphas (3-30 us) are "
        "small against these messages, so the flat a2a's 31 peers cost it little more, and "
        "Tutel-2DH, whose point is to aggregate small messages, stays behind flat a2a "
        "(x 2DH column)."
    )


def parm_rows(quick: bool) -> list[dict]:
    out = []
    for pre_name, pre in sp.PRESETS.items():
        speedups, chosen = [], {}
        for T, D, k, S in _grid(quick):
            nodes = pre.gpus_per_node // S if pre.nodes == 1 else pre.nodes
            if nodes < 2:
                continue
            layer = ParmLayer(tokens=T, hidden=D, top_k=k, mp=S, nodes=nodes)
            c = pre.cluster
            cl = ParmCluster(
                alpha_intra=c.alpha_intra,
                beta_intra=c.beta_intra,
                alpha_inter=c.alpha_inter,
                beta_inter=c.beta_inter,
                row_time=sp.expert_row_time(D, 4 * D, pre.flops),
                gate_time=sp.expert_row_time(D, 8, pre.flops),
            )
            t = {s: sp.layer_ms(layer, cl, s) for s in ("plain", "s1", "s2")}
            best = min(("s1", "s2"), key=t.get)
            chosen[best] = chosen.get(best, 0) + 1
            speedups.append(t["plain"] / t[best])
        out.append(
            {
                "cluster": pre_name,
                "tag": pre.tag,
                "layers": len(speedups),
                "min": min(speedups),
                "median": statistics.median(speedups),
                "max": max(speedups),
                "chosen": chosen,
            }
        )
    return out


def _grid(quick: bool):
    """Tokens per MP group, hidden size, top-k, MP (= ESP) size."""
    return itertools.product(
        (1024, 4096) if quick else (1024, 2048, 4096, 8192),
        (1024, 4096) if quick else (512, 1024, 2048, 4096),
        (1, 2),
        (2, 4, 8),
    )


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--out", default="benchmarks/results")
    ap.add_argument("--host", default=f"{os.cpu_count()}cpu-x86", help="machine label")
    args = ap.parse_args(argv)
    date = datetime.date.today().isoformat()
    h, p = hiermoe_rows(args.quick), parm_rows(args.quick)
    ha = hiermoe_ablation(args.quick)
    lines = [
        f"# HierMoE and Parm on the simulator ({date}, {args.host})",
        "",
        f"Command: `python benchmarks/hiermoe_parm_sim.py{' --quick' if args.quick else ''}`"
        f"; machine: {cpu_name()} ({cpu_isa()}), Python {platform.python_version()}. "
        "Every figure is "
        "simulated (α-β presets; topology/GPU counts published, link figures derived); "
        "only the swap-step seconds depend on the machine.",
        "",
        "## HierMoE: dispatch all-to-all, 32 GPUs, U = [1, 4, 8, 16, 32]",
        "",
        "| shape | d* | flat (ms) | Tutel-2DH (ms) | dedup (ms) | dedup + swap (ms) | "
        "x flat | x 2DH | x no-swap | spine rows removed | swap step (s) | swap move (ms) | "
        "pays back after (all-to-alls) |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in h:
        payback = "never" if r["payback_a2a"] is None else f"{r['payback_a2a']:.0f}"
        payback = "no swap" if not r["swaps_applied"] else payback
        lines.append(
            f"| {r['shape']} | {r['d_star']} | {r['flat_ms']:.2f} | {r['2dh_ms']:.2f} | "
            f"{r['dedup_ms']:.2f} | {r['dedup_swap_ms']:.2f} | "
            f"{r['speedup_vs_flat']:.2f} | {r['speedup_vs_2dh']:.2f} | "
            f"{r['speedup_vs_noswap']:.3f} | {r['spine_rows_removed']:.0%} | "
            f"{r['swap_step_s']:.2f} | {r['swap_move_ms']:.2f} | {payback} |"
        )
    lines += [
        "",
        "Published (HierMoE, 32 GPUs, real routing of the trained models): a2a "
        "1.55-3.32x over the baselines, end to end 1.18-1.27x (not simulated here: no "
        "compute model of the whole step).",
        "",
        "Why ours differs: the routing is synthetic (topic-correlated, seeded), not a "
        "trained model's; the swap search scores hop 1 of the chosen level and runs a "
        f"few steps on {SEARCH} earlier batches and keeps only what also pays on a "
        "fourth (where the table says no swap, nothing the search found lowered that "
        "batch's all-to-all); Tutel-2DH pays its relay hop on the "
        "level-3 links and gains little from aggregating messages, because the preset's α "
        "are small against these messages (the ablation below charges one α per message: it "
        "still trails flat a2a).",
        "",
        "### Ablation: one factor at a time toward a setting where dedup pays more",
        "",
        "Dedup at its best level d* (no swap) over flat a2a and Tutel-2DH, simulated; "
        "*spine limit*: flat's largest per-rank spine (level 4) message over the sum of "
        "dedup's, the speedup's limit as the spine's beta grows.",
        "",
        "| setting | factor | shape | d* | flat (ms) | dedup (ms) | x flat | x 2DH | spine limit |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for a in ha:
        ceil = "-" if a["spine_ceiling"] is None else f"{a['spine_ceiling']:.2f}x"
        lines.append(
            f"| {a['label']} | {a['factor']} | {a['shape']} | {a['d_star']} | "
            f"{a['flat_ms']:.2f} | {a['dedup_ms']:.2f} | {a['speedup_vs_flat']:.2f} | "
            f"{a['speedup_vs_2dh']:.2f} | {ceil} |"
        )
    lines += [
        "",
        _hier_why(ha),
        "",
        "## Parm: plain (DeepSpeed-MoE MP+EP+ESP) over the best of S1/S2",
        "",
        "| cluster | layers | min | median | max | chosen | presets |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in p:
        lines.append(
            f"| {r['cluster']} | {r['layers']} | {r['min']:.2f}x | {r['median']:.2f}x | "
            f"{r['max']:.2f}x | {r['chosen']} | {r['tag']} |"
        )
    lines += [
        "",
        "Published (Parm): 1.13-5.77x over DeepSpeed-MoE on 1296 layers, about 3x on "
        "BERT- and GPT-2-based models. The sweep here is smaller (tokens, hidden, top-k, "
        "MP size) and the model charges no time to kernel launches or memory copies; plain's "
        "time grows with the MP size (S copies of every row and of the expert GEMMs), so "
        "the S = 8 layers exceed the published maximum. S2 is never the faster split "
        "here: it moves k times S1's MP rows (moeflow.plan.parm).",
    ]
    info = {
        "date": date,
        "host": args.host,
        "machine": cpu_name(),
        "python": platform.python_version(),
        "quick": args.quick,
        "hiermoe": h,
        "hiermoe_ablation": ha,
        "parm": p,
    }
    write_record(args.out, f"hiermoe_parm_sim_{args.host}_{date}", info, lines)
    return 0


if __name__ == "__main__":
    sys.exit(main())
