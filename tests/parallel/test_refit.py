"""Online refinement: the runtime records its durations, refits the PerfModel after a
warm-up window and decides its ``auto`` choices again (moeflow.parallel.refit)."""

from __future__ import annotations

import pytest

from tests._dist import run_ranks

WINDOW = 6


def _wrong_model():
    """A model that is wrong for this host in a known direction: free chunks (alpha 0) and
    slow experts, so FSMoE's planner pipelines as deep as it may."""
    from moeflow.perf import LinearCost, PerfModel

    z = dict(source="assumed")
    return PerfModel(
        name="wrong",
        costs={
            "gemm": LinearCost(0.0, 1e-9, **z),
            "a2a": LinearCost(0.0, 1e-5, **z),
            "expert_fwd@float32": LinearCost(0.0, 1e-5, **z),
            "expert_bwd@float32": LinearCost(0.0, 2e-5, **z),
            # a codec that never pays: the switch sends raw, so the a2a is timed
            "zipccl_encode": LinearCost(0.0, 1.0, **z),
            "zipccl_decode": LinearCost(0.0, 1.0, **z),
        },
        meta={"world_size": 2, "nodes": 1},
    )


def _refit_rank(rank, world):
    import torch

    from moeflow import MoEConfig, MoELayer
    from moeflow.comm import Topology
    from moeflow.parallel import ExpertParallel

    cfg = MoEConfig(hidden_size=32, ffn_hidden_size=64, num_experts=4, top_k=2)
    torch.manual_seed(0)
    perf = _wrong_model()
    ep = ExpertParallel(
        MoELayer(cfg),
        topology=Topology.explicit(world, 1),
        plan="auto",
        perf=perf,
        compress="auto",
        refit_after=WINDOW,
    )
    gen = torch.Generator().manual_seed(rank)
    rec = ep.recorder
    recorded = {}
    degrees = []
    for _ in range(WINDOW + 3):
        x = torch.randn(64 + 16 * rank, 32, generator=gen).requires_grad_(True)
        ep(x).sum().backward()
        degrees.append((ep.r_fwd, ep.r_bwd))
        recorded = {k: len(v) for k, v in rec.samples().items()}
    samples = ep.perf.meta["refits"]
    return {
        "degrees": degrees,
        "perf": ep.perf.to_dict(),
        "refits": samples,
        "recorded": recorded,
        "passes": rec.passes(),
        "codec_perf_is_refit": ep.dispatcher.compression.perf is ep.perf,
        "compressed": ep.dispatcher.compression.stats.as_dict(),
    }


@pytest.mark.dist
def test_refit_moves_the_model_to_the_recorded_durations_and_redecides():
    from moeflow.parallel.refit import (
        PROBE_DEGREES,
        _log_err,
        _median,
        degree_times,
    )
    from moeflow.perf import PerfModel
    from moeflow.plan.fsmoe import shared_resources
    from moeflow.plan.workload import LayerWorkload
    from moeflow.sim.builders import pass_time

    a, b = run_ranks(_refit_rank, 2, timeout_s=120)
    # one model and one choice on every rank
    assert a["perf"] == b["perf"] and a["degrees"] == b["degrees"]
    assert a["codec_perf_is_refit"] and b["codec_perf_is_refit"]
    wrong, new = _wrong_model(), PerfModel.from_dict(a["perf"])
    # the wrong model pipelines as deep as allowed; the window probes 1, 2, 4 chunks
    probes = [(PROBE_DEGREES[i % 3],) * 2 for i in range(WINDOW)]
    assert a["degrees"][1 : WINDOW + 1] == probes
    assert all(r <= max(PROBE_DEGREES) for pair in a["degrees"] for r in pair)
    w = LayerWorkload(
        B=1, L=80, M=32, H=64, E=4, k=2, f=None, ffn="mixtral", n_ep=2, bytes_per_element=4
    )
    # the recorded all-to-alls hold the ranks' skew: the link keeps its profiled cost
    assert a["recorded"]["a2a"] > 0 and new.cost("a2a") == wrong.cost("a2a")
    # each expert task is calibrated on the whole passes of both ranks: its simulated
    # pass is closer to the measured ones than the wrong model's
    for key in ("expert_fwd@float32", "expert_bwd@float32"):
        bwd = key.startswith("expert_bwd")
        runs = [p for rank in (a, b) for p in rank["passes"][key]]
        assert {r for r, _ in runs} == set(PROBE_DEGREES)
        meas = {r: _median([t for q, t in runs if q == r]) for r in PROBE_DEGREES}

        def err(model, bwd=bwd, meas=meas):
            pc = w.pass_cost(model, bwd)
            kw = {**dict(shared_resources(model)), "order": "wavefront"}
            return _log_err({r: pass_time(pc, r, 0.0, bwd, **kw) for r in meas}, meas)

        assert "calibrated on whole passes" in new.cost(key).note
        assert err(new) < err(wrong), key
    # the re-decided degrees are the fastest predicted on the refitted model
    t_new, t_wrong = degree_times(new, w), degree_times(wrong, w)
    r_new = min(t_new, key=lambda k: (t_new[k], k))
    assert a["degrees"][-1] == (r_new, r_new)
    assert min(t_wrong, key=lambda k: (t_wrong[k], k)) == max(PROBE_DEGREES) != r_new


def test_redecide_gives_every_auto_choice_the_refitted_model():
    from types import SimpleNamespace

    from moeflow.comm.compressed import Compression
    from moeflow.config import MoEConfig
    from moeflow.parallel.refit import redecide
    from moeflow.plan.parm import cluster_from_perf

    perf = _wrong_model()
    cz = Compression("auto", perf)
    disp = SimpleNamespace(compression=cz, level="auto", links=perf.link_costs())
    cfg = MoEConfig(hidden_size=32, ffn_hidden_size=64, num_experts=4, top_k=2)
    ep = SimpleNamespace(
        perf=perf,
        auto_degrees=False,
        plan_tokens=None,
        dispatcher=disp,
        cfg=cfg,
        parm_schedule="auto",
        plan_dtype="float32",
        parm_cluster=None,
    )
    new = perf.update(
        {"a2a": [(1e3, 0.5), (1e4, 0.6)], "expert_fwd@float32": [(1e5, 0.2), (1e6, 0.9)]}
    )
    redecide(ep, new)
    assert ep.perf is new and cz.perf is new
    assert disp.links == new.link_costs() != perf.link_costs()
    kw = dict(hidden=32, ffn=64, num_experts=4, dtype="float32")
    assert ep.parm_cluster == cluster_from_perf(new, **kw) != cluster_from_perf(perf, **kw)
    assert cz.decide("a2a", "a2a", 1e4, "float32") is False  # the codec never pays here


def test_auto_degrees_and_refit_need_a_model():
    from moeflow import MoEConfig, MoELayer
    from moeflow.errors import ConfigError
    from moeflow.parallel import ExpertParallel

    layer = MoELayer(MoEConfig(hidden_size=16, ffn_hidden_size=32, num_experts=4, top_k=2))
    with pytest.raises(ConfigError, match="perf"):
        ExpertParallel(layer, plan="auto")
    with pytest.raises(ConfigError, match="perf"):
        ExpertParallel(layer, refit_after=4)
    with pytest.raises(ConfigError, match="refit_after"):
        ExpertParallel(layer, perf=_wrong_model(), refit_after=0)
