"""A dead or stalled rank makes the others raise CommTimeoutError naming the operation."""

from __future__ import annotations

import os
import time

import pytest
import torch

from tests._dist import run_ranks

pytestmark = pytest.mark.dist


def _ep(world, timeout_s, **kw):
    from moeflow import MoEConfig, MoELayer
    from moeflow.comm import Topology
    from moeflow.parallel import ExpertParallel

    torch.manual_seed(0)
    layer = MoELayer(MoEConfig(hidden_size=8, ffn_hidden_size=16, num_experts=4, top_k=2))
    return ExpertParallel(layer, topology=Topology.explicit(world, 2), timeout_s=timeout_s, **kw)


def _kill_one(rank, world):
    from moeflow.errors import CommTimeoutError

    ep = _ep(world, timeout_s=20, dispatcher="2dh", r_fwd=2, r_bwd=2)
    ep(torch.randn(6, 8)).sum().backward()  # one healthy step first
    if rank == 3:
        os._exit(1)  # the rank dies
    t0 = time.monotonic()
    try:
        ep(torch.randn(6, 8)).sum().backward()
    except CommTimeoutError as e:
        return ("CommTimeoutError", str(e), time.monotonic() - t0)
    return ("no error", "", time.monotonic() - t0)


def test_killed_rank_raises_comm_timeout_not_hang():
    res = run_ranks(_kill_one, 4, timeout_s=90, expect_exit={3})
    for kind, msg, elapsed in res[:3]:
        assert kind == "CommTimeoutError", msg
        assert "all-gather (hierarchical) failed after" in msg or "all-to-all" in msg, msg
        assert elapsed < 20.0
    assert res[3] is None


def _stall_one(rank, world):
    from moeflow.errors import CommTimeoutError

    ep = _ep(world, timeout_s=2, r_fwd=2, r_bwd=2)
    x = torch.randn(5, 8, requires_grad=True)
    y = ep(x)  # forward completes on both ranks
    if rank == 1:
        time.sleep(6)  # stalls instead of running backward
        return ("stalled", "", 0.0)
    t0 = time.monotonic()
    try:
        y.sum().backward()
    except CommTimeoutError as e:
        return ("CommTimeoutError", str(e), time.monotonic() - t0)
    return ("no error", "", time.monotonic() - t0)


def test_stalled_rank_times_out_in_backward_naming_the_chunk():
    res = run_ranks(_stall_one, 2, timeout_s=60)
    kind, msg, elapsed = res[0]
    assert kind == "CommTimeoutError", msg
    assert "dispatch all-to-all (chunk 1/2) did not finish within 2s" in msg, msg
    assert 1.5 < elapsed < 5.0
    assert res[1][0] == "stalled"
