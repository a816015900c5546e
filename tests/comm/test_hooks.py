"""The ZipCCL DDP communication hook: same gradients as plain DDP (fp32 rounding), the same
bits compressed or not, and counted savings."""

from __future__ import annotations

import pytest
import torch

from tests._dist import run_ranks

pytestmark = pytest.mark.dist


def _grads(rank, world, dtype_name):
    import torch.nn as nn
    from torch.nn.parallel import DistributedDataParallel as DDP

    from moeflow.comm.hooks import register_comm_hook

    dtype = getattr(torch, dtype_name)
    out = {}
    for mode in ("ddp", True, False):
        torch.manual_seed(0)
        net = nn.Sequential(nn.Linear(32, 64), nn.GELU(), nn.Linear(64, 8)).to(dtype)
        # bucket_cap_mb small: several buckets, so the hook runs more than once per step
        ddp = DDP(net, bucket_cap_mb=0.004)
        state = None if mode == "ddp" else register_comm_hook(ddp, mode, timeout_s=30)
        g = torch.Generator().manual_seed(100 + rank)
        for _ in range(2):
            ddp.zero_grad()
            x = torch.randn(16, 32, generator=g).to(dtype)
            ddp(x).float().pow(2).mean().backward()
        # numpy, not tensors: DDP imports torch.multiprocessing, whose tensor pickling
        # would hand the parent shared memory of a rank that has exited
        out[mode] = (
            [p.grad.float().numpy().copy() for p in net.parameters()],
            None if state is None else state.compression.stats.as_dict(),
        )
    return out


@pytest.mark.parametrize("dtype_name", ["float32", "bfloat16"])
def test_hook_gives_ddp_gradients_world2(dtype_name):
    for res in run_ranks(_grads, 2, dtype_name, timeout_s=90):
        ref, _ = res["ddp"]
        on, stats_on = res[True]
        off, stats_off = res[False]
        tol = {"float32": dict(rtol=1e-5, atol=1e-7), "bfloat16": dict(rtol=2e-2, atol=1e-4)}
        for r, a, b in zip(ref, on, off):
            assert (a == b).all()  # the switch never changes the bits
            torch.testing.assert_close(torch.from_numpy(a), torch.from_numpy(r), **tol[dtype_name])
        assert sum(v["compressed"] for v in stats_on.values()) >= 4
        assert sum(v["compressed"] for v in stats_off.values()) == 0
        assert sum(v["wire_bytes"] for v in stats_on.values()) < sum(
            v["raw_bytes"] for v in stats_on.values()
        )


def _fsdp_grads(rank, world):
    import torch.nn as nn
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    from moeflow.comm.hooks import compress_fsdp

    mesh = init_device_mesh("cpu", (world,))
    out = {}
    for mode in ("plain", True, False):
        torch.manual_seed(0)
        net = nn.Sequential(nn.Linear(32, 64), nn.GELU(), nn.Linear(64, 8))
        for layer in net:
            if isinstance(layer, nn.Linear):
                fully_shard(layer, mesh=mesh)
        fully_shard(net, mesh=mesh)
        policy = None if mode == "plain" else compress_fsdp(net, mode, timeout_s=30)
        g = torch.Generator().manual_seed(rank)
        for _ in range(2):
            net.zero_grad()
            net(torch.randn(16, 32, generator=g)).pow(2).mean().backward()
        out[mode] = (
            [p.grad.full_tensor().numpy().copy() for p in net.parameters()],
            None if policy is None else policy.stats.as_dict(),
        )
    return out


def test_fsdp2_custom_collectives_world2():
    """FSDP2's set_custom_all_gather / set_custom_reduce_scatter with ZipCCL: the gradients
    of plain FSDP2 (fp32 rounding), the same bits compressed or not."""
    for res in run_ranks(_fsdp_grads, 2, timeout_s=90):
        for ref, on, off in zip(res["plain"][0], res[True][0], res[False][0]):
            assert (on == off).all()
            torch.testing.assert_close(
                torch.from_numpy(on), torch.from_numpy(ref), rtol=1e-5, atol=1e-7
            )
        stats = res[True][1]
        assert stats["fsdp all-gather"]["compressed"] >= 4
        assert stats["fsdp reduce-scatter"]["compressed"] >= 2
        assert res[False][1]["fsdp all-gather"]["compressed"] == 0


class _Bucket:
    """The one method of DDP's ``GradBucket`` the hook uses."""

    def __init__(self, buf):
        self._buf = buf

    def buffer(self):
        return self._buf


def _hook_future(rank, world):
    import time

    from moeflow.comm.compressed import Compression
    from moeflow.comm.hooks import ZipCCLHookState, zipccl_hook

    state = ZipCCLHookState(Compression(True, timeout_s=30))
    g = torch.Generator().manual_seed(rank)
    bufs = [torch.randn(3000, generator=g) for _ in range(3)]
    want = [b.clone() for b in bufs]
    if rank == 1:
        time.sleep(1.0)  # rank 0's collective cannot finish before rank 1 joins
    futs = [zipccl_hook(state, _Bucket(b)) for b in bufs]  # three buckets in flight
    pending_at_return = [not f.done() for f in futs]
    got = [f.wait().numpy().copy() for f in futs]
    return pending_at_return, got, [w.numpy() for w in want]


def test_hook_returns_a_future_that_completes_later_world2():
    res = run_ranks(_hook_future, 2, timeout_s=60)
    assert all(res[0][0])  # rank 0 returned while its collectives were still in flight
    for _, got, _ in res:
        for j, g in enumerate(got):
            mean = (res[0][2][j].astype("float64") + res[1][2][j]) / 2
            torch.testing.assert_close(
                torch.from_numpy(g).double(), torch.from_numpy(mean), rtol=1e-6, atol=1e-7
            )
    for a, b in zip(res[0][1], res[1][1]):
        assert (a == b).all()  # every rank gets the same bits
