"""moeflow.plan.hiermoe_sim: messages per hop (peer_hops) and one alpha per message."""

from __future__ import annotations

import random

import pytest

from moeflow.plan.hiermoe import contiguous_owner, dedup_hops, flat_hops
from moeflow.plan.hiermoe_sim import PRESETS, a2a_ms, peer_hops, schedules_ms, tutel_2dh_hops

U = [1, 2, 4, 8]


def _routing(P=8, T=40, E=16, k=4, seed=0):
    rng = random.Random(seed)
    return [[rng.sample(range(E), k) for _ in range(T)] for _ in range(P)]


def _schedules(routes, owner):
    yield "flat", 0, flat_hops(routes, owner, U)
    yield "2dh", 0, tutel_2dh_hops(routes, owner, U)
    for d in range(len(U) - 1):
        yield "dedup", d, dedup_hops(routes, owner, U, d)


def test_messages_use_the_rows_hops_and_levels_and_never_outnumber_them():
    routes, owner = _routing(), contiguous_owner(16, 8)
    for name, level, hops in _schedules(routes, owner):
        peers = peer_hops(name, routes, owner, U, level)
        assert len(peers) == len(hops), (name, level)
        for p, h in zip(peers, hops):
            for m, r in zip(p.rows, h.rows):
                assert {k for k, v in m.items() if v} == {k for k, v in r.items() if v}
                assert all(m[k] <= r[k] for k in m)


def test_flat_a2a_with_every_pair_busy_messages_every_peer_once():
    # every token goes to every expert: each rank messages each of the 7 others once
    owner = contiguous_owner(8, 8)
    routes = [[list(range(8))] for _ in range(8)]
    (p,) = peer_hops("flat", routes, owner, U)
    for m in p.rows:
        assert m == {1: 1, 2: 2, 3: 4}


def test_one_alpha_per_message_never_undercuts_one_per_hop():
    cl = PRESETS["hiermoe-32gpu"]
    U32 = list(cl.U)
    rng = random.Random(1)
    routes = [[rng.sample(range(64), 4) for _ in range(16)] for _ in range(32)]
    owner = contiguous_owner(64, 32)
    a = schedules_ms(routes, owner, cl, 1024.0)
    b = schedules_ms(routes, owner, cl, 1024.0, per_message=True)
    assert a.keys() == b.keys()
    for key in a:
        assert b[key] >= a[key] - 1e-12
    # with rows of no bytes, time is alphas only: one per message (slowest rank per task)
    hops = flat_hops(routes, owner, U32)
    peers = peer_hops("flat", routes, owner, U32)
    per_task = [
        max(cl.links[lk][0] * m.get(lk, 0) for m in peers[0].rows) * 1e3 for lk in hops[0].links()
    ]
    assert a2a_ms(hops, 0.0, cl.links, peers) == pytest.approx(max(per_task))
