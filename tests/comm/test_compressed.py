"""Compressed collectives on gloo: bit-identical to the same algorithm run uncompressed (and
to the plain torch collectives where they define the result), the adaptive switch, and
corruption in transit."""

from __future__ import annotations

import pytest
import torch

from moeflow.errors import ConfigError
from moeflow.perf.cost import LinearCost, PerfModel
from tests._dist import run_ranks

pytestmark = pytest.mark.dist

CODEC = {
    "zipccl_encode": LinearCost(0.02, 2e-6, source="assumed").to_dict(),
    "zipccl_decode": LinearCost(0.02, 2e-6, source="assumed").to_dict(),
}


def _model(beta_comm: float) -> PerfModel:
    c = LinearCost(0.05, beta_comm, source="assumed")
    return PerfModel(
        "test", {"gemm": c, "a2a": c, "ag": c, "rs": c, "ar": c}, meta={"codec_costs": CODEC}
    )


SLOW_LINK = _model(1e-4)  # 10 MB/s: compressing 2 bytes into 1.4 pays
FAST_LINK = _model(1e-8)  # 100 GB/s: it never pays


def _data(rank: int, n: int, dtype, scale=0.02):
    g = torch.Generator().manual_seed(1000 + rank)
    return (torch.randn(n, 6, generator=g) * scale * (rank + 1)).to(dtype)


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    return (
        a.shape == b.shape
        and a.dtype == b.dtype
        and torch.equal(
            a.view(torch.int16 if a.element_size() == 2 else torch.int32),
            b.view(torch.int16 if b.element_size() == 2 else torch.int32),
        )
    )


def _collectives(rank, world):
    import torch.distributed as dist

    from moeflow.comm import compressed as Z

    fails = []
    for dtype in (torch.bfloat16, torch.float32, torch.float16):
        # all-to-all, uneven: rank r sends (r + j + 1) * 37 rows to rank j (some empty)
        splits = [0 if (rank + j) % 3 == 2 else (rank + j + 1) * 37 for j in range(world)]
        recv = [0 if (j + rank) % 3 == 2 else (j + rank + 1) * 37 for j in range(world)]
        x = _data(rank, sum(splits), dtype)
        ref = torch.empty((sum(recv), 6), dtype=dtype)
        dist.all_to_all_single(ref, x, recv, splits)
        for mode in (True, False):
            got = Z.all_to_all(x, splits, recv, None, mode, timeout_s=30)
            if not _same(got, ref):
                fails.append(("a2a", dtype, mode))
        # all-gather: equal to all_gather_into_tensor
        y = _data(rank, 3000, dtype)
        ref = torch.empty((3000 * world, 6), dtype=dtype)
        dist.all_gather_into_tensor(ref, y)
        for mode in (True, False):
            if not _same(Z.all_gather(y, None, mode, timeout_s=30), ref):
                fails.append(("ag", dtype, mode))
        # reduce-scatter and all-reduce: fp32 sum in rank order, computed here from every
        # rank's (regenerated) input
        z_all = [_data(r, 501 * world, dtype, 0.5) for r in range(world)]
        acc = z_all[0].float()
        for r in range(1, world):
            acc = acc + z_all[r].float()
        want_rs = acc.to(dtype)[501 * rank : 501 * (rank + 1)]
        want_ar = acc.to(dtype)
        outs = {}
        for mode in (True, False):
            outs[("rs", mode)] = Z.reduce_scatter(z_all[rank], None, mode, timeout_s=30)
            outs[("ar", mode)] = Z.all_reduce(z_all[rank], None, mode, timeout_s=30)
        for mode in (True, False):
            if not _same(outs[("rs", mode)], want_rs):
                fails.append(("rs", dtype, mode))
            if not _same(outs[("ar", mode)], want_ar):
                fails.append(("ar", dtype, mode))
        # all-reduce of a length that does not divide by the world size
        odd = _data(rank, 7, dtype)[:, :1].reshape(-1)
        if not _same(
            Z.all_reduce(odd, None, True, timeout_s=30),
            Z.all_reduce(odd, None, False, timeout_s=30),
        ):
            fails.append(("ar-odd", dtype))
    # the adaptive switch: compresses on a slow link, not on a fast one, same results
    w = _data(rank, 20_000, torch.bfloat16)
    slow = Z.Compression("auto", SLOW_LINK, timeout_s=30)
    fast = Z.Compression("auto", FAST_LINK, timeout_s=30)
    a = Z.all_reduce(w, None, slow)
    b = Z.all_reduce(w, None, fast)
    sp = [2000 * (j + 1) for j in range(world)]
    rp = [2000 * (rank + 1)] * world
    c = Z.all_to_all(_data(rank, sum(sp), torch.bfloat16), sp, rp, None, slow)
    d = Z.all_to_all(_data(rank, sum(sp), torch.bfloat16), sp, rp, None, fast)
    return (
        fails,
        _same(a, b),
        _same(c, d),
        slow.stats.as_dict(),
        fast.stats.as_dict(),
        slow.stats.bytes_saved,
        fast.stats.bytes_saved,
    )


@pytest.mark.parametrize("world", [2, 4])
def test_compressed_collectives_match_uncompressed(world):
    for fails, ar_same, a2a_same, slow, fast, saved_slow, saved_fast in run_ranks(
        _collectives, world, timeout_s=120
    ):
        assert fails == []
        assert ar_same and a2a_same
        assert all(v["compressed"] == v["calls"] for v in slow.values()), slow
        assert all(v["compressed"] == 0 for v in fast.values()), fast
        assert saved_slow > 0 and saved_fast == 0


def _corrupt(rank, world):
    from moeflow.comm import compressed as Z
    from moeflow.errors import CommTimeoutError, CorruptDataError

    def flip(op, buf):
        if op == "all-to-all" and buf.size:
            buf[100] ^= 0x10  # inside rank 0's message (rank 1's own slice comes last)

    if rank == 1:
        Z.set_transit_hook(flip)
    x = _data(rank, 4000, torch.bfloat16)
    splits = [2000] * world
    try:
        Z.all_to_all(x, splits, splits, None, True, timeout_s=5)
        Z.all_gather(x, None, True, timeout_s=5)  # the corrupt rank never gets here
    except CorruptDataError as e:
        return ("CorruptDataError", str(e))
    except CommTimeoutError as e:
        return ("CommTimeoutError", str(e))
    return ("no error", "")


def test_corruption_in_transit_raises_on_the_receiver_and_times_out_the_others():
    res = run_ranks(_corrupt, 2, timeout_s=60)
    assert res[1][0] == "CorruptDataError" and "checksum" in res[1][1], res
    assert res[0][0] == "CommTimeoutError", res


def test_policy_arguments_and_break_even():
    from moeflow.comm.compressed import Compression, codec_costs
    from moeflow.errors import ConfigError

    with pytest.raises(ConfigError, match="compress"):
        Compression("sometimes")
    with pytest.raises(ConfigError, match="perf"):
        Compression("auto")
    slow = Compression("auto", SLOW_LINK)
    assert slow.decide("x", "a2a", 1 << 20, "bfloat16")
    assert not slow.decide("x", "a2a", 100, "bfloat16")  # alpha-dominated: does not pay
    assert Compression("auto", FAST_LINK).never_pays("a2a", "bfloat16")
    assert not slow.never_pays("a2a", "bfloat16")
    enc, dec = codec_costs(SLOW_LINK)
    assert enc.beta == 2e-6 and dec.beta == 2e-6
    # a model saved and loaded keeps its codec costs
    again = PerfModel.from_json(SLOW_LINK.to_json())
    assert codec_costs(again)[0].beta == 2e-6


def test_profile_codec_fits_costs_that_auto_uses():
    from moeflow.apps.profile import profile_codec
    from moeflow.comm.compressed import Compression, codec_costs

    costs = profile_codec(sizes=(1 << 14, 1 << 17, 1 << 19), reps=1, trials=1)
    for key in ("zipccl_encode", "zipccl_decode"):
        c = costs[key]
        assert c.beta > 0 and c.alpha >= 0 and c.source == "measured"
        assert 1e-8 < c.beta < 1e-3  # between 1 TB/s and 1 MB/s per byte of input
    # a model written before the codec existed: "auto" names the missing cost, never
    # profiling inside the constructor
    bare = PerfModel("old", dict(SLOW_LINK.costs))
    assert codec_costs(bare) is None
    with pytest.raises(ConfigError, match="zipccl_encode"):
        Compression("auto", bare)
    meta = {"codec_costs": {k: c.to_dict() for k, c in costs.items()}}
    auto = Compression("auto", PerfModel("new", dict(SLOW_LINK.costs), meta=meta))
    assert auto.costs[0].beta == costs["zipccl_encode"].beta
    assert auto.costs[1].alpha == costs["zipccl_decode"].alpha


def test_profiled_model_carries_codec_costs_through_json():
    from moeflow.apps.profile import _codec_costs
    from moeflow.comm.compressed import codec_costs

    model = PerfModel("profiled", {**FAST_LINK.costs, **_codec_costs((1 << 15, 1 << 18), 1, 1)})
    enc, dec = codec_costs(PerfModel.from_json(model.to_json()))
    assert enc.beta > 0 and dec.beta > 0


def test_a_forked_child_starts_its_own_worker_threads():
    """A child forked after a worker ran (the test harness forks ranks) must not queue jobs
    on its parent's thread, which does not exist in the child."""
    import os

    from moeflow.comm import compressed as cc

    assert cc.submit(None, lambda: 1).result(timeout=10) == 1
    pid = os.fork()
    if pid == 0:  # the child: a fresh worker answers
        ok = not cc._WORKERS and cc.submit(None, lambda: 2).result(timeout=10) == 2
        os._exit(0 if ok else 1)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
