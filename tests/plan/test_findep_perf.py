"""FinDEP's costs from the one PerfModel (pure Python): every cost the testbed reads comes
from ``moeflow profile``'s file, a missing one is refused by name, and the derived t_gm /
t_a / t_c reproduce the profiled kernels' times at the shapes FinDEP prices."""

import pytest

from moeflow.errors import ConfigError
from moeflow.perf.cost import LinearCost, PerfModel
from moeflow.plan import findep as fd

MODEL = fd.FinDEPModel(
    name="tiny",
    hidden_size=128,
    expert_ffn=256,
    num_experts=8,
    top_k=2,
    num_shared=0,
    shared_ffn=256,
    attn_proj_params=4 * 128 * 128,
    attn_core_dim=4 * 64,
    kv_bytes_per_token=1024,
    num_layers=2,
    bytes_per_element=4,
)


def perf(drop: str | None = None, experts: int | None = 4) -> PerfModel:
    costs = {
        "gemm": LinearCost(0.01, 1e-8),
        "gemm@float32": LinearCost(0.02, 2e-8),
        "expert_fwd@float32": LinearCost(0.12, 3e-8),
        "attention@float32": LinearCost(0.05, 4e-8),
        "send": LinearCost(0.3, 1e-5),
    }
    costs.pop(drop, None)
    meta = {} if experts is None else {"expert_experts": experts}
    return PerfModel("prof", costs, meta=meta)


def test_testbed_reads_every_cost_from_the_perf_model():
    tb = fd.testbed_from_perf(perf(), ag=1, eg=2)
    assert (tb.ag, tb.eg) == (1, 2)
    # t_gm: the kernel's start-up shared by its 3 GEMMs x 4 experts, its per-FLOP rate
    assert tb.gemm.alpha == pytest.approx(0.12 / 12) and tb.gemm.beta == 3e-8
    assert tb.link == perf().cost("send")
    w = fd.Workload(model=MODEL, testbed=tb, seq_len=64, max_seqs=4)
    c = w.costs(4, 2)
    tokens = 4 * 64
    proj = 2.0 * tokens * MODEL.attn_proj_params
    core = 4.0 * MODEL.attn_core_dim * 64 * 64
    # projections at the square-GEMM rate, the core at SDPA's (its n is twice FinDEP's)
    assert c.t_a == pytest.approx(0.02 + 2e-8 * proj + 0.05 + 4e-8 * 2 * core)
    # a chunk of 4*64*2/2 = 256 pairs: every expert busy; t_e = the kernel at 6 N D F over
    # this rank's rows, with the start-up of the busy experts
    rows = 256 / 2
    busy = 4 * (1 - (1 - 1 / 8) ** 256)
    want = busy / 4 * 0.12 + 3e-8 * 6 * rows * 128 * 256
    assert c.t_e == pytest.approx(want)
    assert c.t_a2e == pytest.approx(0.3 + 1e-5 * rows * 128 * 4)


def test_without_the_expert_count_the_whole_start_up_is_per_gemm():
    tb = fd.testbed_from_perf(perf(experts=None), ag=1, eg=1)
    assert tb.gemm.alpha == pytest.approx(0.12 / 3)


@pytest.mark.parametrize(
    "drop, named",
    [("expert_fwd@float32", "expert_fwd"), ("send", "send"), ("attention@float32", "attention")],
)
def test_a_missing_cost_is_refused_by_name(drop, named):
    with pytest.raises(ConfigError, match=named):
        fd.testbed_from_perf(perf(drop), ag=1, eg=1)
    with pytest.raises(ConfigError, match=named):
        fd.StepPlanner.from_perf(MODEL, perf(drop), ag=1, eg=1)


def test_a_dtype_the_profile_did_not_measure_is_refused():
    with pytest.raises(ConfigError, match="expert_fwd@bfloat16"):
        fd.testbed_from_perf(perf(), ag=1, eg=1, dtype="bfloat16")


def test_step_planner_from_perf_prices_the_head_and_plans():
    p = fd.StepPlanner.from_perf(MODEL, perf(), ag=1, eg=1, vocab_size=1000, max_r2=4)
    assert p.head(10) == pytest.approx(0.02 + 2e-8 * 2 * 128 * 1000 * 10)
    bare = fd.StepPlanner.from_perf(MODEL, perf(), ag=1, eg=1, max_r2=4)
    plan = p.plan("findep", 8, 64)
    assert plan.time_ms == pytest.approx(
        bare.predict_ms(8, 64, plan.r1, plan.r2, plan.order) + p.head(8 * 64)
    )
    # the head changes no plan
    assert (plan.r1, plan.r2, plan.order) == (
        bare.plan("findep", 8, 64).r1,
        bare.plan("findep", 8, 64).r2,
        bare.plan("findep", 8, 64).order,
    )


def test_a_profile_without_overlap_plans_every_task_on_one_resource():
    shared = PerfModel("prof", perf().costs, meta={"expert_experts": 4, "overlap": 0.1})
    p = fd.StepPlanner.from_perf(MODEL, shared, ag=1, eg=1, max_r2=4)
    assert p.serial
    assert not fd.StepPlanner.from_perf(MODEL, perf(), ag=1, eg=1).serial  # no overlap measured
    apart = PerfModel("prof", perf().costs, meta={"expert_experts": 4, "overlap": 0.9})
    assert not fd.StepPlanner.from_perf(MODEL, apart, ag=1, eg=1).serial
    for seqs, tokens in ((8, 64), (8, 1)):
        w = p.workload(seqs, tokens)
        for r1, r2 in ((1, 1), (2, 2), (4, 1)):
            c = w.costs(-(-seqs // r1), r2)
            want = MODEL.num_layers * (r1 * (c.t_a + c.t_s) + r1 * r2 * (c.t_e + 2 * c.t_a2e))
            assert p.predict_ms(seqs, tokens, r1, r2, "AASS") == pytest.approx(want)
        # nothing overlaps, so every split only adds start-ups: the plan is one micro-batch,
        # one chunk, for every schedule
        for name in fd.SCHEDULES:
            plan = p.plan(name, seqs, tokens)
            assert (plan.r1, plan.r2) == (1, 1)
