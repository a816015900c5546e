"""Simulated all-to-all of HierMoE dedup (+ expert swap) against flat a2a and Tutel-2DH.

Each hop of a schedule becomes one task per link level it uses (the link levels run in
parallel inside a hop; the next hop waits for all of them), with the α-β time of the
largest per-rank message on that level (HierMoE, Eq. 1: one α per hop; ``per_message``
charges one α per point-to-point message instead, counted by :func:`peer_hops`). The row
counts come from :mod:`moeflow.plan.hiermoe` (Eq. 4-5 for dedup), so the simulator and the
planner agree on what crosses each link; the simulator adds the hop structure.

Presets (``PRESETS``): the paper's 32-GPU cluster with the 5-level hierarchy
U = [1, 4, 8, 16, 32] is *published*; the link figures per level are *derived* (assumed
vendor-class numbers: PCIe 4 switch, socket, a 100 Gb/s leaf switch and a 2:1
oversubscribed spine), not taken from the paper. Pure Python.
"""

from __future__ import annotations

from dataclasses import dataclass

from moeflow.plan.hiermoe import HopRows, check_group_sizes, dedup_hops, flat_hops, link_level
from moeflow.sim.engine import TaskGraph, makespan_of


@dataclass(frozen=True)
class HierCluster:
    """Group sizes U and (α s, β s/byte) of the link into each level's group."""

    name: str
    U: tuple
    links: dict
    tag: str  # "published" (topology) / "derived" (link figures)


PRESETS = {
    "hiermoe-32gpu": HierCluster(
        name="hiermoe-32gpu",
        U=(1, 4, 8, 16, 32),
        # assumed: 1 PCIe 4.0 switch (~25 GB/s), 2 socket (~20 GB/s), 3 a 100 Gb/s leaf
        # switch (12.5 GB/s), 4 the spine, 2:1 oversubscribed (6.25 GB/s)
        links={
            1: (3e-6, 1 / 25e9),
            2: (5e-6, 1 / 20e9),
            3: (20e-6, 1 / 12.5e9),
            4: (30e-6, 1 / 6.25e9),
        },
        tag="topology published (HierMoE, 32 GPUs, U=[1,4,8,16,32]); link figures derived",
    ),
}


def tutel_2dh_hops(assignments, owner, U) -> list[HopRows]:
    """Tutel 2DH at the outermost level: rows to another top-level group first move inside
    the sender's group to the rank at the destination's position, then cross once per row
    (no dedup: one row per assignment)."""
    U = check_group_sizes(U)
    P, u = U[-1], U[-2]
    hop1 = [dict() for _ in range(P)]
    hop2 = [dict() for _ in range(P)]
    for s, tokens in enumerate(assignments):
        for experts in tokens:
            for e in experts:
                r = owner[e]
                if s // u == r // u:  # same group: one direct hop
                    if r != s:
                        lk = link_level(s, r, U)
                        hop1[s][lk] = hop1[s].get(lk, 0) + 1
                    continue
                relay = (s // u) * u + r % u
                if relay != s:
                    lk = link_level(s, relay, U)
                    hop1[s][lk] = hop1[s].get(lk, 0) + 1
                lk = link_level(relay, r, U)
                hop2[relay][lk] = hop2[relay].get(lk, 0) + 1
    return [HopRows(tuple(hop1)), HopRows(tuple(hop2))]


def peer_hops(schedule: str, assignments, owner, U, level: int = 0) -> list[HopRows]:
    """Messages per hop, rank and link level of ``schedule`` ("flat", "2dh" or "dedup" at
    ``level``): the distinct peers a rank sends a non-empty message to, with the same relays
    as :func:`moeflow.plan.hiermoe.flat_hops` / :func:`tutel_2dh_hops` /
    :func:`moeflow.plan.hiermoe.dedup_hops`."""
    U = check_group_sizes(U)
    P = U[-1]
    u = {"flat": 1, "2dh": U[-2], "dedup": U[level]}[schedule]
    hop1: list[set] = [set() for _ in range(P)]
    hop2: list[set] = [set() for _ in range(P)]
    for s, tokens in enumerate(assignments):
        for experts in tokens:
            for r in {owner[e] for e in experts}:
                if schedule == "flat":
                    hop1[s].add(r)
                    continue
                if schedule == "2dh":
                    if s // u == r // u:  # same group: one direct hop
                        hop1[s].add(r)
                        continue
                    relay = (s // u) * u + r % u  # the sender's group, destination's position
                else:
                    relay = (r // u) * u + s % u  # the destination's group, sender's position
                hop1[s].add(relay)
                hop2[relay].add(r)

    def count(dests: list[set]) -> HopRows:
        rows = [dict() for _ in range(P)]
        for s, ds in enumerate(dests):
            for r in ds - {s}:
                lk = link_level(s, r, U)
                rows[s][lk] = rows[s].get(lk, 0) + 1
        return HopRows(tuple(rows))

    return [count(hop1)] if u == 1 and schedule != "2dh" else [count(hop1), count(hop2)]


def a2a_graph(hops, row_bytes: float, links, peers=None) -> TaskGraph:
    """One task per (hop, link level): parallel inside a hop, hops in sequence.

    Without ``peers`` a task costs one alpha and the largest per-rank message (Eq. 1: one
    alpha per hop). With ``peers`` (from :func:`peer_hops`, hop by hop) it costs the slowest
    rank's ``alpha * messages + rows * row_bytes * beta``: one alpha per message, as an
    all-to-all built of point-to-point sends pays."""
    g = TaskGraph()
    prev: list[int] = []
    for h, hop in enumerate(hops):
        cur = []
        for lk in hop.links():
            a, b = links[lk]
            if peers is None:
                s = a + hop.max_rank(lk) * row_bytes * b
            else:
                s = max(
                    a * m.get(lk, 0) + r.get(lk, 0) * row_bytes * b
                    for m, r in zip(peers[h].rows, hop.rows)
                )
            cur.append(g.add(f"hop{h}.L{lk}", f"link{lk}.hop{h}", s * 1e3, deps=prev, kind="comm"))
        prev = cur or prev
    return g


def a2a_ms(hops, row_bytes: float, links, peers=None) -> float:
    """Simulated time (ms) of one all-to-all (dispatch) with ``hops``."""
    return makespan_of(a2a_graph(hops, row_bytes, links, peers))


def schedules_ms(
    assignments, owner, cluster: HierCluster, row_bytes: float, per_message: bool = False
) -> dict:
    """Flat a2a, Tutel-2DH and dedup at every level, for one batch and placement;
    ``per_message``: one alpha per message (:func:`a2a_graph`) instead of per hop."""
    U = list(cluster.U)

    def ms(hops, schedule, level=0):
        peers = peer_hops(schedule, assignments, owner, U, level) if per_message else None
        return a2a_ms(hops, row_bytes, cluster.links, peers)

    out = {
        "flat": ms(flat_hops(assignments, owner, U), "flat"),
        "2dh": ms(tutel_2dh_hops(assignments, owner, U), "2dh"),
    }
    for d in range(len(U) - 1):
        out[f"dedup{d}"] = ms(dedup_hops(assignments, owner, U, d), "dedup", d)
    return out
