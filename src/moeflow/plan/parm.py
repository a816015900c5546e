"""Parm schedule choice: α-β cost of the plain MP+EP+ESP schedule and of Parm's MP-Split.

Parm (INFOCOM'24, dedicated schedules for MP+EP+ESP): the model-parallel group (MP) of S
ranks inside a node is also the expert-sharding group (ESP), so after attention every MP
rank holds the same T tokens.

* ``plain``: every MP rank routes and dispatches all T tokens (S copies cross the network),
  the ESP all-gather collects S duplicate copies, and each F-slice computes all of them.
* ``s1``: MP-Split before the gate (each MP rank takes T/S tokens), the MoE layer runs on
  the split with the ESP collectives pipelined against the inter-node all-to-all (the
  chunk wavefront), and an MP-AllGather after combine rebuilds the T outputs.
* ``s2``: MP-Split after the gate (each MP rank dispatches 1/S of the k·T assignment rows),
  and an MP-AllGather of the expert-output rows before the replicated combine. In this
  model s2 is never cheaper than s1 (the same network bytes, k× the MP rows, the gate on
  all T tokens), so ``auto`` picks plain or s1; s2 is the schedule to ask for when routing
  and capacity (drop mode) must act on the MP group's whole batch, as in plain.

The paper gives no closed formulas; these are derived from the schedules with the α-β
model (``t = α + bytes·β`` per collective, HierMoE Eq. 1 / FSMoE's cost model), per MoE
layer, forward, uniform routing:

* rows a rank dispatches: ``R = k·T_r`` with ``T_r = T`` (plain) or ``T/S`` (s1, s2);
* EP all-to-all (twice: dispatch and combine): ``α_inter + β_inter·R·D·v·(n-1)/n`` with n
  nodes (the share of rows that leave the node);
* ESP all-gather and reduce-scatter (intra): ``α_intra + β_intra·(S-1)·R·D·v`` each;
* expert GEMMs on the F/S slice of ``S·R`` rows: ``S·R·c_row/S`` with ``c_row`` the time of
  one row through a whole expert FFN;
* MP-AllGather (intra): s1 ``α_intra + β_intra·(S-1)·(T/S)·D·v`` (tokens), s2
  ``α_intra + β_intra·(S-1)·(k·T/S)·D·v`` (expert-output rows);
* the gate on the tokens a rank routes: ``T_g·gate_time`` with T_g = T/S for s1, T else.

With r chunks the ESP collectives of one chunk overlap the all-to-all of the next
(:mod:`moeflow.parallel.pipeline`); the model takes the busiest resource (inter link, intra
link, GPU; each chunk pays the start-ups again) plus one chunk of the others (fill and
drain). For r = 1 it is the plain sum and equals the simulator (:mod:`moeflow.plan.parm_sim`)
exactly; for r > 1 it is an estimate the simulator checks. Pure Python, no torch.
"""

from __future__ import annotations

from dataclasses import dataclass

from moeflow.errors import ConfigError
from moeflow.validate import positive_int

SCHEDULES = ("plain", "s1", "s2")


@dataclass(frozen=True)
class ParmCluster:
    """Links of one cluster: α (s) and β (s/byte) inside a node and across nodes."""

    alpha_intra: float = 5e-6
    beta_intra: float = 1 / 150e9
    alpha_inter: float = 20e-6
    beta_inter: float = 1 / 12.5e9
    row_time: float = 0.0  # one row through a whole expert FFN (s); 0 = comm only
    gate_time: float = 0.0  # one token through the router (s)


@dataclass(frozen=True)
class ParmLayer:
    """One MoE layer: T tokens per MP group, hidden D, top-k, v bytes per element."""

    tokens: int
    hidden: int
    top_k: int
    mp: int  # S = MP = ESP group size
    nodes: int  # n nodes in the EP dimension
    bytes_per_elem: int = 2

    def __post_init__(self):
        for f in ("tokens", "hidden", "top_k", "mp", "nodes", "bytes_per_elem"):
            positive_int(f"ParmLayer.{f}", getattr(self, f))


def schedule_terms(layer: ParmLayer, cluster: ParmCluster, schedule: str) -> dict[str, float]:
    """Time of each collective and of the expert GEMMs for one forward of ``schedule``."""
    if schedule not in SCHEDULES:
        raise ConfigError("schedule", schedule, f"one of {SCHEDULES}")
    S, n, D, v = layer.mp, layer.nodes, layer.hidden, layer.bytes_per_elem
    R = layer.top_k * (layer.tokens if schedule == "plain" else layer.tokens / S)
    terms = {
        "gate": cluster.gate_time * (layer.tokens / S if schedule == "s1" else layer.tokens),
        "a2a": 2 * (cluster.alpha_inter + cluster.beta_inter * R * D * v * (n - 1) / n),
        "esp": 2 * (cluster.alpha_intra + cluster.beta_intra * (S - 1) * R * D * v)
        if S > 1
        else 0.0,
        "experts": R * cluster.row_time,  # S·R rows on an F/S slice
        "mp_allgather": 0.0,
    }
    if schedule != "plain" and S > 1:
        rows = layer.tokens / S * (layer.top_k if schedule == "s2" else 1)
        terms["mp_allgather"] = cluster.alpha_intra + cluster.beta_intra * (S - 1) * rows * D * v
    return terms


def schedule_time(layer: ParmLayer, cluster: ParmCluster, schedule: str, r: int = 1) -> float:
    """Forward time of ``schedule`` with r pipeline chunks (see the module docstring)."""
    r = positive_int("r", r)
    t = schedule_terms(layer, cluster, schedule)
    if r == 1:
        body = t["a2a"] + t["esp"] + t["experts"]
    else:
        # per resource: its bandwidth work plus r start-ups per collective; the busiest
        # resource sets the pace, the others add one chunk's worth (fill and drain)
        esp_a = 2 * cluster.alpha_intra if layer.mp > 1 else 0.0
        inter = t["a2a"] + (r - 1) * 2 * cluster.alpha_inter
        intra = t["esp"] + (r - 1) * esp_a
        res = (inter, intra, t["experts"])
        body = max(res) + (sum(res) - max(res)) / r
    return t["gate"] + body + t["mp_allgather"]


def choose_schedule(layer: ParmLayer, cluster: ParmCluster, r: int = 1) -> tuple[str, dict]:
    """Parm's automatic choice: the schedule with the smaller predicted time."""
    times = {s: schedule_time(layer, cluster, s, r) for s in SCHEDULES}
    return min(SCHEDULES, key=lambda s: (times[s], SCHEDULES.index(s))), times


def inter_node_bytes(layer: ParmLayer, schedule: str) -> float:
    """Bytes one MP group puts on inter-node links per forward (dispatch + combine)."""
    if schedule not in SCHEDULES:
        raise ConfigError("schedule", schedule, f"one of {SCHEDULES}")
    S, n = layer.mp, layer.nodes
    T_r = layer.tokens if schedule == "plain" else layer.tokens / S
    return 2 * S * layer.top_k * T_r * layer.hidden * layer.bytes_per_elem * (n - 1) / n


__all__ = [
    "SCHEDULES",
    "ParmCluster",
    "ParmLayer",
    "schedule_terms",
    "schedule_time",
    "choose_schedule",
    "inter_node_bytes",
    "cluster_from_perf",
]


def cluster_of(spec, row_time: float = 0.0) -> ParmCluster:
    """The α-β links of a :class:`moeflow.clusters.ClusterSpec` (intra, inter)."""
    intra, inter = spec.links[0], spec.links[-1]
    return ParmCluster(
        alpha_intra=intra.latency_us * 1e-6,
        beta_intra=1 / (intra.bandwidth_GBps * 1e9),
        alpha_inter=inter.latency_us * 1e-6,
        beta_inter=1 / (inter.bandwidth_GBps * 1e9),
        row_time=row_time,
    )


def cluster_from_perf(perf, *, hidden: int, ffn: int, num_experts: int, dtype: str):
    """A :class:`ParmCluster` from a profiled :class:`moeflow.perf.PerfModel`: links from
    :meth:`~moeflow.perf.PerfModel.link_costs`, ``row_time`` from ``expert_fwd@<dtype>``
    (a row through a SwiGLU expert is ``6 D F`` FLOPs) and ``gate_time`` from
    ``gemm@<dtype>`` (``2 D E`` FLOPs per token); ConfigError naming a missing cost."""
    perf.require(f"expert_fwd@{dtype}", f"gemm@{dtype}", "a2a", who="Parm's schedule choice")
    links = perf.link_costs()
    return ParmCluster(
        alpha_intra=links[1][0],
        beta_intra=links[1][1],
        alpha_inter=links[2][0],
        beta_inter=links[2][1],
        row_time=perf.cost(f"expert_fwd@{dtype}").beta * 6 * hidden * ffn * 1e-3,
        gate_time=perf.cost(f"gemm@{dtype}").beta * 2 * hidden * num_experts * 1e-3,
    )


def plan_schedules(layer: ParmLayer, cluster: ParmCluster, layers: int, r: int = 1) -> list:
    """The schedule of each MoE layer (all layers share one shape here)."""
    name, times = choose_schedule(layer, cluster, r)
    return [
        {"layer": i, "schedule": name, "t_ms": {k: v * 1e3 for k, v in times.items()}}
        for i in range(layers)
    ]
