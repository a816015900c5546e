"""Measured bytes (moeflow.comm.bytes): what the collectives hand to torch.distributed, per
collective kind and link level, equals the byte formulas of the planners and schedules
(HierMoE's flat / 2DH / dedup hop rows, the capacity dispatcher's padded splits, Parm's
per-rank row counts) on gloo ranks (world 4 as 2 nodes x 2)."""

from __future__ import annotations

import pytest
import torch

from tests._dist import run_ranks
from tests.parallel.ep_cases import Case, build

pytestmark = pytest.mark.dist


def _collectives(rank, world):
    import torch.distributed as dist

    from moeflow.comm import Topology
    from moeflow.comm import bytes as cb
    from moeflow.comm.collectives import (
        all_gather_equal,
        all_gather_v,
        all_reduce,
        all_to_all_equal,
        all_to_all_v,
        reduce_scatter_v,
    )

    D = 3  # float32 rows of 12 bytes
    splits = [[(rank + j) % 3 for j in range(world)] for rank in range(world)]
    x = torch.randn(sum(splits[rank]), D)
    with cb.count(Topology.explicit(world, 2)) as c, cb.count() as blind:
        out_splits = [splits[j][rank] for j in range(world)]
        all_to_all_v(x, splits[rank], out_splits, None, "test a2a (chunk 1/2)", 10).wait()
        sizes = [1, 2, 0, 3]
        all_gather_v(torch.randn(sizes[rank], D), sizes, None, "test ag", 10).wait()
        reduce_scatter_v(torch.randn(6, D), sizes, None, "test rs", 10).wait()
        all_reduce(torch.ones(5), None, "test ar", 10)
        all_gather_equal(torch.ones(2, 2), None, "test age", 10)
        all_to_all_equal(torch.ones(world, 2), None, "test a2ae", 10)
    # nothing is recorded outside a scope
    all_to_all_v(x, splits[rank], out_splits, None, "outside", 10).wait()
    dist.barrier()
    return c.by_op, c.by_level, c.by_op_level, c.by_label, c.self_bytes, blind.by_level


def test_collectives_record_per_peer_bytes_by_kind_and_level():
    res = run_ranks(_collectives, 4, timeout_s=60)
    row = 12
    for rank, (by_op, by_level, by_op_level, by_label, self_b, blind) in enumerate(res):
        mine = [(rank + j) % 3 for j in range(4)]
        others = [j for j in range(4) if j != rank]
        intra = [j for j in others if j // 2 == rank // 2]
        sizes = [1, 2, 0, 3]
        assert by_op["all_to_all_v"] == sum(mine[j] for j in others) * row
        assert by_op_level[("all_to_all_v", "intra_node")] == sum(mine[j] for j in intra) * row
        assert by_op.get("all_gather_v", 0) == 3 * sizes[rank] * row
        assert by_op["reduce_scatter_v"] == sum(sizes[j] for j in others) * row
        assert by_op["all_reduce"] == 5 * 4  # the payload, on the widest level spanned
        assert by_op_level[("all_reduce", "inter_node")] == 20
        assert by_op["all_gather_equal"] == 3 * 16 and by_op["all_to_all_equal"] == 3 * 8
        assert self_b == (mine[rank] + sizes[rank] + sizes[rank]) * row + 16 + 8
        assert by_label["test a2a"] == by_op["all_to_all_v"]  # the chunk suffix is dropped
        assert sum(by_level.values()) == sum(by_op.values())
        assert set(blind) == {"unknown"} and blind["unknown"] == sum(by_level.values())


def _dispatcher_bytes(rank, world, dispatcher, rf, rb):
    import torch.distributed as dist

    from moeflow.comm import Topology
    from moeflow.comm import bytes as cb
    from moeflow.parallel import ExpertParallel

    case = Case(dispatcher=dispatcher, capacity_factor=1.0 if dispatcher == "capacity" else None)
    layer, cfg = build(case)
    T = (13, 6, 21, 10)[rank]
    torch.manual_seed(7 + rank)
    x = torch.randn(T, cfg.hidden_size, requires_grad=True)
    opts = {"level": 1} if dispatcher == "dedup" else None
    ep = ExpertParallel(
        layer,
        topology=Topology.explicit(world, 2),
        dispatcher=dispatcher,
        r_fwd=rf,
        r_bwd=rb,
        timeout_s=30,
        dispatcher_options=opts,
    )
    with cb.count(ep.topology) as c:
        y = ep(x)
    fwd = dict(ep.dispatcher.bytes_sent)
    y.square().sum().backward()
    both = dict(ep.dispatcher.bytes_sent)
    with torch.no_grad():
        routing = ep.layer.route(x)
    tokens = [[] for _ in range(T)]
    for t, e in zip(routing.token_idx_N.tolist(), routing.expert_idx_N.tolist()):
        tokens[t].append(e)
    gathered = [None] * world
    dist.all_gather_object(gathered, tokens)
    row_kinds = ("all_to_all_v", "compressed_all_to_all")
    scoped = {lv: n for (k, lv), n in c.by_op_level.items() if k in row_kinds}
    return fwd, both, scoped, gathered, cfg.top_k, cfg.num_experts


@pytest.mark.parametrize(
    "dispatcher,rf,rb",
    [("a2a", 2, 3), ("capacity", 3, 1), ("hierarchical", 2, 2), ("dedup", 1, 2)],
)
def test_dispatcher_bytes_are_measured_and_equal_the_formulas(dispatcher, rf, rb):
    from moeflow.layer.routers import capacity
    from moeflow.plan.hiermoe import contiguous_owner, dedup_hops, flat_hops, level_bytes
    from moeflow.plan.hiermoe_sim import tutel_2dh_hops

    res = run_ranks(_dispatcher_bytes, 4, dispatcher, rf, rb, timeout_s=120)
    routes, k, E = res[0][3], res[0][4], res[0][5]
    row, U, owner = 16 * 4, [1, 2, 4], contiguous_owner(E, 4)
    if dispatcher == "capacity":  # slots rows per (other rank, local expert), each way
        slots = max(capacity(T, k, E, 1.0) for T in (13, 6, 21, 10))
        per_rank = {"intra_node": 1, "inter_node": 2}
        want = {lv: 4 * n * 2 * slots * (E // 4) * row for lv, n in per_rank.items()}
    else:
        hops = {
            "a2a": flat_hops(routes, owner, U),
            "hierarchical": tutel_2dh_hops(routes, owner, U),
            "dedup": dedup_hops(routes, owner, U, 1),
        }[dispatcher]
        lb = level_bytes(hops, row)  # one direction; combine carries the same rows
        want = {"intra_node": 2 * lb.get(1, 0), "inter_node": 2 * lb.get(2, 0)}
    fwd = {lv: sum(r[0].get(lv, 0) for r in res) for lv in want}
    assert fwd == want, (dispatcher, fwd, want)
    assert want["inter_node"] > 0
    for r in res:
        # backward moves the same rows again (gradients travel like tokens)
        assert r[1] == {lv: 2 * n for lv, n in r[0].items()}
        # the caller's scope saw the same row all-to-alls as the dispatcher's own counter
        assert {lv: n for lv, n in r[2].items() if n} == {lv: n for lv, n in r[0].items() if n}


def _parm_bytes(rank, world, schedule):
    import copy

    import torch.distributed as dist

    from moeflow.comm import Topology
    from moeflow.comm.groups import subgroup
    from moeflow.parallel import ExpertParallel

    layer, cfg = build(Case())
    node = rank // 2
    torch.manual_seed(node)
    x = torch.randn(12, cfg.hidden_size)  # the same tokens on both ranks of an MP group
    ep = ExpertParallel(
        copy.deepcopy(layer),
        topology=Topology.explicit(world, 2),
        esp_size=2,
        mp_group=subgroup(None, [2 * node, 2 * node + 1]),
        schedule=schedule,
        r_fwd=2,
        r_bwd=2,
        timeout_s=30,
    )
    with torch.no_grad():
        ep(x)
    # the row-count formula: rows to each other EP shard, sent and received back (the
    # counts of this rank's routing; S=2 EP shards {esp_rank, esp_rank + 2} on two nodes)
    P, E_l = ep.ep_size, ep.num_local_experts
    rows_P = ep.last_counts_E.view(P, E_l).sum(1).tolist()
    sent = sum(n for p, n in enumerate(rows_P) if p != ep.ep_rank)
    got = torch.tensor([float(ep.parm_bytes.get("inter_node", 0)), 2.0 * sent * 16 * 4])
    dist.all_reduce(got)
    return got.tolist(), ep.parm_bytes.get("intra_node", 0)


@pytest.mark.parametrize("schedule", ["plain", "split_tokens"])
def test_parm_bytes_are_measured_and_equal_the_row_formula(schedule):
    res = run_ranks(_parm_bytes, 4, schedule, timeout_s=120)
    (measured, formula), intra = res[0]
    assert measured == formula and measured > 0
    assert all(r[1] == 0 for r in res)  # the EP shards of an MP group sit on two nodes


def _compressed(rank, world):
    import torch.distributed as dist

    import moeflow.comm.compressed as Z
    from moeflow.comm import Topology
    from moeflow.comm import bytes as cb

    # low-entropy rows: the codec shrinks them
    x = (torch.arange(6000 * 6) % 7).float().reshape(6000, 6).to(torch.bfloat16)
    splits = [1000 * (j + 1) for j in range(world)][: world - 1] + [0]
    splits[-1] = 6000 - sum(splits)
    recv = [None] * world
    dist.all_gather_object(recv, splits)
    out_splits = [recv[j][rank] for j in range(world)]
    cz = Z.as_compression(True, timeout_s=30)
    with cb.count(Topology.explicit(world, 2)) as c:
        Z.all_to_all(x, splits, out_splits, None, cz, op="zip a2a")
    raw = sum(n for j, n in enumerate(splits) if j != rank) * 6 * 2
    return c.by_op, c.by_op_level, cz.stats.as_dict()["zip a2a"]["wire_bytes"], raw


def test_compressed_all_to_all_records_its_wire_bytes():
    res = run_ranks(_compressed, 4, timeout_s=60)
    for by_op, by_op_level, wire, raw in res:
        # the encoded messages as handed over, self excluded: the codec's own wire figure
        assert by_op["compressed_all_to_all"] == wire
        assert 0 < wire < raw  # the rows did shrink: not the raw sizes
        assert by_op["compressed_all_to_all_sizes"] == 3 * 8  # one int64 size per peer
        assert by_op_level.get(("compressed_all_to_all", "inter_node"), 0) > 0
