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
    for dispatcher, rf, rb in (("a2a", 2, 3), ("capacity", 2, 2), ("2dh", 2, 1)):
        for compress in (False, True):
            torch.manual_seed(0)
            cf = 1.5 if dispatcher == "capacity" else None
            cfg = MoEConfig(
                hidden_size=16, ffn_hidden_size=32, num_experts=4, top_k=2, capacity_factor=cf
            )
            ep = ExpertParallel(
                MoELayer(cfg),
                topology=Topology.explicit(world, 2),
                dispatcher=dispatcher,
                r_fwd=rf,
                r_bwd=rb,
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
                ep.w_out.grad.numpy().copy(),
                stats,
            )
    return res


def test_compressed_dispatch_is_bit_identical_world4():
    for res in run_ranks(_ep_step, 4, timeout_s=120):
        for dispatcher in ("a2a", "capacity", "2dh"):
            plain, zipped = res[(dispatcher, False)], res[(dispatcher, True)]
            for a, b in zip(plain[:4], zipped[:4]):
                assert (a == b).all()
            stats = zipped[4]
            assert any("dispatch" in op for op in stats) and any("combine" in op for op in stats)
            assert all(v["compressed"] == v["calls"] for v in stats.values())


def _pending_step(rank, world):
    import time

    from moeflow.comm.compressed import Compression
    from moeflow.parallel.contract import CommStep

    splits = [3, 5]
    step = CommStep("dispatch all-to-all (chunk 1/1)", None, splits, [splits[rank]] * 2)
    step.compression = Compression(True, timeout_s=30)
    x = torch.randn(8, 64, generator=torch.Generator().manual_seed(rank)).to(torch.bfloat16)
    if rank == 1:
        time.sleep(1.0)  # rank 0's exchange cannot finish before rank 1 joins
    t0 = time.perf_counter()
    p = step.issue(x, 30)
    issue_s = time.perf_counter() - t0
    got = p.wait()
    stats = step.compression.stats.as_dict()[step.label]
    # mode False: every rank knows nothing is encoded, the plain all-to-all goes out at once
    step.compression = Compression(False, timeout_s=30)
    plain = step.issue(x, 30)
    assert plain.work is not None  # a gloo Work, not a worker-thread job
    assert torch.equal(plain.wait().view(torch.int16), got.view(torch.int16))
    assert step.compression.stats.as_dict()[step.label]["compressed"] == 0
    bits = (got.view(torch.int16).numpy().copy(), x.view(torch.int16).numpy().copy())
    return issue_s, bits, stats


def test_compressed_step_is_a_pending_stage_world2():
    """The compressed all-to-all of a chunk returns a handle before the exchange finishes
    (the group's worker encodes and sends; the wait decodes), and the rows arrive bit-exact."""
    res = run_ranks(_pending_step, 2, timeout_s=60)
    assert res[0][0] < 0.5  # returned while rank 1 had not even joined
    (_, (got0, x0), stats0), (_, (got1, x1), _) = res
    # rank 0 gets the first 3 rows of every rank, rank 1 the last 5, in rank order
    assert got0.shape == (6, 64) and got1.shape == (10, 64)
    assert (got0[:3] == x0[:3]).all() and (got0[3:] == x1[:3]).all()
    assert (got1[:5] == x0[3:]).all() and (got1[5:] == x1[3:]).all()
    assert stats0["compressed"] == 1 and stats0["wire_bytes"] < stats0["raw_bytes"]


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
    # no rank leaves while another may still build its groups through rank 0's store
    # (an early exit broke the other rank's pipe now and then)
    import torch.distributed as dist

    dist.barrier()
    return out


def test_compress_on_a_cuda_input_is_refused_before_any_communication_world2():
    for res in run_ranks(_cuda_input_step, 2, timeout_s=60):
        assert res == {"a2a": ("compress", 0), "capacity": ("compress", 0)}
