"""Dispatchers and collectives on real gloo ranks: rows reach the owner of their expert."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from tests._dist import run_ranks

pytestmark = pytest.mark.dist


def _collectives(rank, world):
    from moeflow.comm import Topology
    from moeflow.comm.collectives import all_gather_v, all_to_all_v, reduce_scatter_v

    # uneven all-to-all: rank i sends (i + j) rows of value 10*i + j to rank j
    sends = [rank + j for j in range(world)]
    x = torch.cat([torch.full((n, 2), 10.0 * rank + j) for j, n in enumerate(sends)])
    out = all_to_all_v(x, sends, [i + rank for i in range(world)], None, "t", 10).wait()
    expect = torch.cat([torch.full((i + rank, 2), 10.0 * i + rank) for i in range(world)])
    assert torch.equal(out, expect)
    sizes = [1, 0, 3, 2][:world]
    g = all_gather_v(torch.full((sizes[rank], 1), float(rank)), sizes, None, "ag", 10).wait()
    assert g.view(-1).tolist() == sum([[float(i)] * s for i, s in enumerate(sizes)], [])
    y = torch.arange(sum(sizes), dtype=torch.float32).unsqueeze(1) * (rank + 1)
    rs = reduce_scatter_v(y, sizes, None, "rs", 10).wait()
    start = sum(sizes[:rank])
    scale = sum(range(1, world + 1))
    assert torch.equal(rs.view(-1), torch.arange(start, start + sizes[rank]).float() * scale)
    groups = Topology.explicit(world, 2).build_groups()
    assert dist.get_world_size(groups.intra_node) == 2
    assert dist.get_world_size(groups.inter_node) == world // 2
    t = torch.tensor([float(rank)])
    dist.all_reduce(t, group=groups.intra_node)
    return t.item()


def test_collectives_uneven_world4():
    res = run_ranks(_collectives, 4, timeout_s=60)
    assert res == [1.0, 1.0, 5.0, 5.0]


def _roundtrip(rank, world):
    """dispatch -> (tag rows with owner) -> combine returns each row to its sender."""
    from moeflow.comm import Topology
    from moeflow.comm.groups import subgroup
    from moeflow.parallel import make_dispatcher

    E, E_l = 8, 8 // world
    torch.manual_seed(rank)
    results = []
    for name in ("a2a", "capacity", "2dh"):
        for r in (1, 3):
            counts = torch.randint(0, 4, (E,))
            if rank == 1:
                counts.zero_()  # a rank with nothing to send
            N = int(counts.sum())
            expert_of_row = torch.repeat_interleave(torch.arange(E), counts)
            x = torch.stack([expert_of_row.float(), torch.full((N,), float(rank))], 1)
            extra = {}
            if name == "2dh":
                topo = Topology.explicit(world, 2)
                a, j = divmod(rank, 2)
                extra = dict(
                    intra_group=subgroup(None, topo.node_ranks(a)),
                    inter_group=subgroup(None, topo.peer_ranks(j)),
                    ranks_per_node=2,
                )
            d = make_dispatcher(
                name,
                ep_group=None,
                ep_size=world,
                ep_rank=rank,
                esp_group=None,
                esp_size=1,
                esp_rank=0,
                num_local_experts=E_l,
                timeout_s=20,
                **extra,
            )
            ex = d.exchange(counts, capacity=3 if name == "capacity" else None)
            back = torch.zeros(N + 1, 2)
            ext = torch.cat([x, torch.full((1, 2), -1.0)])
            canon = []
            for c in range(r):
                rt = d.route(ex, r, c)
                buf = ext[rt.send_index]
                for step in rt.dispatch:
                    buf = step.issue(buf, 20).wait()
                real = buf[buf[:, 0] >= 0]
                # every received row belongs to one of my experts
                assert bool(((real[:, 0] // E_l) == rank).all()), (name, buf)
                assert int(rt.recv_SPE[0].sum()) == buf.shape[0]
                # the expert stage computes exactly the real rows, expert-major (capacity:
                # no padding slot reaches a GEMM)
                rt.to(torch.device("cpu"))
                em = rt.expert_major
                picked = buf if em is None else buf.index_select(0, em)
                assert picked.shape[0] == real.shape[0], (name, r, c)
                local_e = picked[:, 0].long() - rank * E_l
                assert torch.equal(rt.expert_counts, torch.bincount(local_e, minlength=E_l))
                assert bool((local_e.diff() >= 0).all()), (name, picked)
                canon.append(d.canonical_index(ex, r, c))
                y = buf.clone()
                y[:, 1] = y[:, 1] * 100 + rank  # owner stamps the row
                for step in rt.combine:
                    y = step.issue(y, 20).wait()
                back.index_copy_(0, rt.send_index, y)
            back = back[:N]
            # the chunks' canonical positions tile the call's computed rows exactly once
            assert torch.equal(torch.cat(canon).sort().values, torch.arange(ex.computed_rows))
            assert torch.equal(back[:, 0], x[:, 0]), name
            owners = x[:, 0] // E_l
            assert torch.equal(back[:, 1], rank * 100 + owners), name
            results.append((name, r, N))
    return results


def test_dispatchers_roundtrip_world4():
    res = run_ranks(_roundtrip, 4, timeout_s=90)
    assert len(res[0]) == 6 and res[1][0][2] == 0
