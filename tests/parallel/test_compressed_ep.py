"""ExpertParallel(compress=...): ZipCCL on the dispatcher's all-to-alls is lossless, so the
outputs and gradients are bit-identical to the uncompressed layer."""

from __future__ import annotations

import pytest
import torch

from tests._dist import run_ranks

pytestmark = pytest.mark.dist


def _ep_step(rank, world):
    from moeflow import MoEConfig, MoELayer
    from moeflow.comm import Topology
    from moeflow.parallel import ExpertParallel

    res = {}
    for dispatcher, rf in (("a2a", 2), ("2dh", 1)):
        for compress in (False, True):
            torch.manual_seed(0)
            layer = MoELayer(MoEConfig(hidden_size=16, ffn_hidden_size=32, num_experts=4, top_k=2))
            ep = ExpertParallel(
                layer,
                topology=Topology.explicit(world, 2),
                dispatcher=dispatcher,
                r_fwd=rf,
                r_bwd=rf,
                timeout_s=30,
                compress=compress,
            )
            g = torch.Generator().manual_seed(rank)
            x = torch.randn(40, 16, generator=g, requires_grad=True)
            y = ep(x)
            y.square().sum().backward()
            stats = ep.dispatcher.compression.stats.as_dict() if compress else {}
            res[(dispatcher, compress)] = (
                y.detach().numpy().copy(),
                x.grad.numpy().copy(),
                ep.w_in.grad.numpy().copy(),
                stats,
            )
    return res


def test_compressed_dispatch_is_bit_identical_world4():
    for res in run_ranks(_ep_step, 4, timeout_s=120):
        for dispatcher in ("a2a", "2dh"):
            plain, zipped = res[(dispatcher, False)], res[(dispatcher, True)]
            for a, b in zip(plain[:3], zipped[:3]):
                assert (a == b).all()
            stats = zipped[3]
            assert any("dispatch" in op for op in stats) and any("combine" in op for op in stats)
            assert all(v["compressed"] == v["calls"] for v in stats.values())
