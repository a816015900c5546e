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


def _cuda_input_step(rank, world):
    from moeflow import MoEConfig, MoELayer
    from moeflow.errors import ConfigError
    from moeflow.parallel import ExpertParallel
    from tests.comm.test_codec_device import fake_cuda

    out = {}
    for dispatcher in ("a2a", "capacity"):
        torch.manual_seed(0)
        cfg = MoEConfig(
            hidden_size=16,
            ffn_hidden_size=32,
            num_experts=4,
            top_k=2,
            capacity_factor=1.25 if dispatcher == "capacity" else None,
        )
        ep = ExpertParallel(MoELayer(cfg), dispatcher=dispatcher, timeout_s=30, compress=True)
        begun = []
        ep.dispatcher.begin = lambda *a, begun=begun, **kw: begun.append(a)  # first collective
        try:
            ep(fake_cuda(torch.randn(8, 16)))
            out[dispatcher] = ("no error", begun)
        except ConfigError as e:
            out[dispatcher] = (e.field, len(begun))
    return out


def test_compress_on_a_cuda_input_is_refused_before_any_communication_world2():
    for res in run_ranks(_cuda_input_step, 2, timeout_s=60):
        assert res == {"a2a": ("compress", 0), "capacity": ("compress", 0)}
