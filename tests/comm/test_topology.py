"""Topology and the block-index arithmetic the dispatchers are built on (no processes)."""

from __future__ import annotations

import pytest
import torch

from moeflow.comm import Topology
from moeflow.errors import DistributedConfigError
from moeflow.parallel.dispatch import split_offsets, split_sizes, sub_block_index


def test_explicit_layout_and_links():
    t = Topology.explicit(world_size=4, ranks_per_node=2)
    assert t.num_nodes == 2
    assert [t.node_of(r) for r in range(4)] == [0, 0, 1, 1]
    assert t.node_ranks(1) == [2, 3] and t.peer_ranks(1) == [1, 3]
    assert t.link_level(0, 1) == "intra_node"
    assert t.link_level(1, 2) == "inter_node"
    assert t.link_level(3, 3) == "self"
    sub = t.strided(2)
    assert (sub.world_size, sub.ranks_per_node) == (2, 1)


def test_from_env_reads_torchrun_variables():
    t = Topology.from_env(env={"WORLD_SIZE": "8", "LOCAL_WORLD_SIZE": "4"})
    assert (t.world_size, t.ranks_per_node, t.num_nodes) == (8, 4, 2)
    t = Topology.from_env(
        env={"WORLD_SIZE": "4", "LOCAL_WORLD_SIZE": "4", "MOEFLOW_RANKS_PER_NODE": "2"}
    )
    assert t.num_nodes == 2
    assert Topology.from_env(env={"WORLD_SIZE": "3"}).num_nodes == 1


@pytest.mark.parametrize("ws,rpn", [(4, 3), (0, 1), (4, 0)])
def test_bad_layouts_are_typed_errors(ws, rpn):
    with pytest.raises(DistributedConfigError):
        Topology.explicit(ws, rpn)


def test_rank_out_of_range():
    with pytest.raises(DistributedConfigError, match="rank=4"):
        Topology.explicit(4, 2).node_of(4)


def test_split_pieces_cover_each_block_exactly():
    n = torch.tensor([0, 1, 5, 7, 12])
    for r in (1, 2, 3, 4, 8):
        sizes = torch.stack([split_sizes(n, r, c) for c in range(r)])
        offs = torch.stack([split_offsets(n, r, c) for c in range(r)])
        assert torch.equal(sizes.sum(0), n)
        assert torch.equal(offs[1:], (offs + sizes)[:-1])  # contiguous pieces
        assert int((sizes.max(0).values - sizes.min(0).values).max()) <= 1  # balanced


def test_sub_block_index_reorders_blocks():
    sizes = torch.tensor([[2, 0, 1], [1, 3, 2]])  # blocks (a, b) stored a-major
    rows = torch.arange(int(sizes.sum()))
    # b-major order: (0,0)=[0,1] (1,0)=[3] (0,1)=[] (1,1)=[4,5,6] (0,2)=[2] (1,2)=[7,8]
    idx = sub_block_index(sizes, perm=(1, 0))
    assert rows[idx].tolist() == [0, 1, 3, 4, 5, 6, 2, 7, 8]
    # second piece of every block when cut in 2, a-major
    idx = sub_block_index(sizes, split_offsets(sizes, 2, 1), split_sizes(sizes, 2, 1))
    assert idx.tolist() == [1, 6, 8]  # pieces: (0,0)->[1], (1,1)->[6], (1,2)->[8]
