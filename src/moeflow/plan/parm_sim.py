"""Simulated MoE layer under Parm's schedules (plain = DeepSpeed-MoE's MP+EP+ESP, s1, s2).

The builder lays the schedule of :mod:`moeflow.plan.parm` out as a task graph: the gate
and the expert GEMMs on the GPU, the EP all-to-alls on the inter-node link, the ESP
all-gather / reduce-scatter and the MP-AllGather on the intra-node link, with r chunks
(chunk c's ESP collectives and GEMMs overlap chunk c+1's all-to-all, as the runtime's
wavefront does). With r = 1 the simulated time equals the α-β formula exactly (tested).

Presets: Parm's 8-GPU server (1 node x 8, the EP all-to-all on the same fabric as MP) and
32-GPU cluster (4 nodes x 8); the GPU counts are *published*, the link and GPU figures are
*derived* (PCIe 3.0-class 12 GB/s inside a node, 100 Gb/s network, 2080Ti-class 27 TFLOP/s
fp16 with 50% efficiency for the expert GEMMs). Pure Python.
"""

from __future__ import annotations

from dataclasses import dataclass

from moeflow.plan.parm import ParmCluster, ParmLayer, schedule_terms
from moeflow.sim.engine import TaskGraph, makespan_of


@dataclass(frozen=True)
class ParmPreset:
    name: str
    nodes: int
    gpus_per_node: int
    cluster: ParmCluster
    flops: float  # effective expert GEMM rate (FLOP/s)
    tag: str


_PCIE = (8e-6, 1 / 12e9)
_NET = (25e-6, 1 / 12.5e9)
PRESETS = {
    "parm-8gpu": ParmPreset(
        "parm-8gpu",
        1,
        8,
        ParmCluster(
            alpha_intra=_PCIE[0], beta_intra=_PCIE[1], alpha_inter=_PCIE[0], beta_inter=_PCIE[1]
        ),
        13.5e12,
        "GPU count published (Parm, 8-GPU server); links and rate derived",
    ),
    "parm-32gpu": ParmPreset(
        "parm-32gpu",
        4,
        8,
        ParmCluster(
            alpha_intra=_PCIE[0], beta_intra=_PCIE[1], alpha_inter=_NET[0], beta_inter=_NET[1]
        ),
        13.5e12,
        "GPU count published (Parm, 32-GPU cluster: 4 x 8); links and rate derived",
    ),
}


def layer_graph(layer: ParmLayer, cluster: ParmCluster, schedule: str, r: int = 1) -> TaskGraph:
    """Gate -> r chunks of [a2a, ESP AG, experts, ESP RS, a2a] -> MP-AllGather."""
    t = schedule_terms(layer, cluster, schedule)
    g = TaskGraph()
    gate = g.add("gate", "gpu", t["gate"] * 1e3, kind="compute")
    S = layer.mp
    # per-chunk costs: the bandwidth part splits r ways, every chunk pays the start-up α
    a_inter, a_intra = cluster.alpha_inter, cluster.alpha_intra

    def chunk(total: float, alpha: float, count: int) -> float:
        return ((total - count * alpha) / r + count * alpha) * 1e3 if total else 0.0

    a2a = chunk(t["a2a"], a_inter, 2) / 2
    esp = chunk(t["esp"], a_intra, 2) / 2 if S > 1 else 0.0
    exp = t["experts"] * 1e3 / r
    stages = [
        ("dispatch", "inter", a2a, "comm"),
        ("esp_ag", "intra", esp, "comm"),
        ("experts", "gpu", exp, "compute"),
        ("esp_rs", "intra", esp, "comm"),
        ("combine", "inter", a2a, "comm"),
    ]
    ids: dict[tuple[int, int], int] = {}
    # wavefront order (moeflow.parallel.pipeline): at step w chunk c runs stage w - c,
    # newest chunk first, so resources see the order the runtime issues in
    for w in range(r + len(stages) - 1):
        for c in range(min(w, r - 1), max(-1, w - len(stages)), -1):
            k = w - c
            name, res, ms, kind = stages[k]
            dep = [gate] if k == 0 else [ids[(c, k - 1)]]
            ids[(c, k)] = g.add(f"c{c}.{name}", res, ms, deps=dep, kind=kind)
    last = [ids[(c, len(stages) - 1)] for c in range(r)]
    if t["mp_allgather"]:
        g.add("mp_allgather", "intra", t["mp_allgather"] * 1e3, deps=last, kind="comm")
    return g


def layer_ms(layer: ParmLayer, cluster: ParmCluster, schedule: str, r: int = 1) -> float:
    return makespan_of(layer_graph(layer, cluster, schedule, r))


def expert_row_time(hidden: int, ffn: int, flops: float) -> float:
    """One row through a two-GEMM expert FFN (D -> F -> D), forward: 4·D·F FLOPs."""
    return 4.0 * hidden * ffn / flops
