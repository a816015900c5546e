"""FinDEP per step (pure Python): the step solver's plan is the brute-force best of its grid,
every schedule's grid nests in FinDEP's, plans are cached by step shape and fast to solve."""

import itertools
import time

import pytest

from moeflow.errors import ConfigError
from moeflow.perf.cost import LinearCost
from moeflow.plan import findep as fd


def planner(**kw) -> fd.StepPlanner:
    model = fd.FinDEPModel(
        name="tiny",
        hidden_size=256,
        expert_ffn=512,
        num_experts=8,
        top_k=2,
        num_shared=1,
        shared_ffn=512,
        attn_proj_params=4 * 256 * 256,
        attn_core_dim=8 * 64,
        kv_bytes_per_token=1024,
        num_layers=4,
        bytes_per_element=4,
    )
    tb = fd.Testbed(
        name="toy",
        gpu="cpu",
        ag=1,
        eg=kw.pop("eg", 1),
        mem_GB=64.0,
        gemm=LinearCost(0.05, 2e-8),
        link=kw.pop("link", LinearCost(0.3, 2e-7)),
        attention=LinearCost(0.0, 3e-8),
    )
    return fd.StepPlanner(model, tb, max_r2=8, **kw)


SHAPES = [(32, 48), (32, 1), (5, 1), (1, 1), (16, 200), (3, 7)]


@pytest.mark.parametrize("seqs, tokens", SHAPES)
def test_each_plan_is_the_best_of_its_grid(seqs, tokens):
    p = planner()
    for name in fd.SCHEDULES:
        plan = p.plan(name, seqs, tokens)
        brute = min(
            p.predict_ms(seqs, tokens, r1, r2, o)
            for r1, r2, o in itertools.product(range(1, min(seqs, 8) + 1), range(1, 9), fd.ORDERS)
            if (r1, r2, o) in set(p.grid(name, seqs, tokens))
        )
        assert plan.time_ms == pytest.approx(brute, rel=1e-12)
        assert plan.evaluated == len(list(p.grid(name, seqs, tokens)))


@pytest.mark.parametrize("seqs, tokens", SHAPES)
def test_schedules_nest(seqs, tokens):
    p = planner()
    naive, pp, fin = (p.plan(n, seqs, tokens) for n in ("naive", "pppipe", "findep"))
    assert (naive.r1, naive.r2, naive.order) == (1, 1, "ASAS")
    assert pp.r2 == 1 and pp.order == "ASAS"
    assert fin.time_ms <= pp.time_ms <= naive.time_ms
    # r2 never exceeds the rows of the smallest micro-batch; r1 never the sequences
    assert fin.r1 <= seqs and fin.r2 <= (seqs // fin.r1) * tokens


def test_a_slow_link_gets_pipelined_and_a_fast_one_need_not():
    slow = planner(link=LinearCost(0.05, 2e-5)).plan("findep", 32, 48)
    assert slow.r1 * slow.r2 > 1
    assert slow.time_ms < planner(link=LinearCost(0.05, 2e-5)).plan("naive", 32, 48).time_ms


def test_plans_are_cached_and_fast():
    p = planner()
    t0 = time.perf_counter()
    a = p.plan("findep", 32, 48)
    first = time.perf_counter() - t0
    assert p.plan("findep", 32, 48) is a
    assert a.solve_s == pytest.approx(first, abs=first)
    assert first < 0.5  # 2 * 8 * 8 closed-form evaluations (typically ~1 ms)


def test_bad_step_is_a_typed_error():
    p = planner()
    with pytest.raises(ConfigError, match="seqs"):
        p.plan("findep", 0, 4)
    with pytest.raises(ConfigError, match="schedule"):
        p.plan("greedy", 4, 4)


def test_experts_without_tokens_cost_nothing():
    # a decode step of one sequence reaches top_k experts, not all of them: the routed
    # experts' time is that of the experts that receive a row
    p = planner()
    one = p.workload(1, 1).costs(1, 1)
    many = p.workload(64, 1).costs(64, 1)
    gm = p.testbed.gemm
    busy = 8 * (1 - (7 / 8) ** 2)  # 2 (token, expert) pairs over 8 experts: 1.875 expected
    assert one.t_e == pytest.approx(3 * busy * gm(2.0 * (2 / busy) * 256 * 512), rel=1e-9)
    assert one.t_e < 3 * 8 * gm(0) / 3  # under a third of the all-experts intercept
    # 128 pairs: all 8 experts busy (to 1e-7), 16 rows each, as FinDEP's t_e has it
    assert many.t_e == pytest.approx(3 * 8 * gm(2.0 * 16 * 256 * 512), rel=1e-6)


def test_recost_replans_and_head_adds_to_every_prediction():
    p = planner()
    before = p.plan("findep", 32, 48)
    fast = LinearCost(0.001, 1e-9)
    p.recost(
        fd.Testbed(name="fast", gpu="cpu", ag=1, eg=1, mem_GB=64.0, gemm=p.testbed.gemm, link=fast),
        head=LinearCost(2.0, 0.01),
    )
    after = p.plan("findep", 32, 48)
    assert after is not before and p.plan("findep", 32, 48) is after
    bare = fd.StepPlanner(p.model, p.testbed, max_r2=8)
    for r1, r2, o in ((1, 1, "ASAS"), (4, 2, "AASS")):
        got = p.predict_ms(32, 48, r1, r2, o)
        assert got == pytest.approx(bare.predict_ms(32, 48, r1, r2, o) + 2.0 + 0.01 * 32 * 48)
