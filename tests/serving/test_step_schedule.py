"""FinDEP per step in the disaggregated runtime: a per-step schedule asks its planner at every
forward call, reproduces single-process generation, and the AG logs each step's shape, plan
and time."""

import pytest

from moeflow.perf.cost import LinearCost
from moeflow.plan import findep as fd
from moeflow.serving.disaggregated import DisaggregatedForward, ServeSchedule, serve
from tests.serving.test_serving import check_same, reference, requests, tiny_model


def step_planner(model, eg: int) -> fd.StepPlanner:
    cfg = model.cfg
    m = fd.FinDEPModel(
        name="tiny",
        hidden_size=cfg.hidden_size,
        expert_ffn=cfg.moe.ffn_hidden_size,
        num_experts=cfg.moe.num_experts,
        top_k=cfg.moe.top_k,
        num_shared=cfg.moe.num_shared_experts,
        shared_ffn=cfg.moe.ffn_hidden_size,
        attn_proj_params=4 * cfg.hidden_size * cfg.hidden_size,
        attn_core_dim=cfg.num_heads * 2 * cfg.head_dim,
        kv_bytes_per_token=64,
        num_layers=cfg.num_layers,
        bytes_per_element=4,
    )
    # a slow link, so that FinDEP splits prefill steps (r1, r2 > 1) and not decode steps
    tb = fd.Testbed(
        name="toy",
        gpu="cpu",
        ag=1,
        eg=eg,
        mem_GB=1.0,
        gemm=LinearCost(0.01, 1e-7),
        link=LinearCost(0.5, 1e-3),
    )
    return fd.StepPlanner(m, tb, max_r2=4)


def test_for_step_asks_the_planner():
    p = step_planner(tiny_model(), 1)
    s = ServeSchedule.per_step("findep", p)
    got = s.for_step(5, 11)
    want = p.plan("findep", 5, 11)
    assert (got.r1, got.r2, got.order) == (want.r1, want.r2, want.order)
    assert (want.r1, want.r2) != (1, 1)
    pp = ServeSchedule.per_step("pppipe", p).for_step(5, 11)
    assert pp.name == "pppipe" and pp.r2 == 1
    assert ServeSchedule.per_step("naive", p).for_step(5, 11) == ServeSchedule.naive()
    # without a planner a schedule is what it says (decode override aside)
    fixed = ServeSchedule("findep", 2, 3, "AASS", (1, 1, "ASAS"))
    assert fixed.for_step(5, 11) is fixed and fixed.for_step(5, 1).r2 == 1


def test_a_server_forward_keeps_no_step_log():
    model = tiny_model()
    fwd = DisaggregatedForward(model, model.new_cache(1), ServeSchedule.naive(), 1, 1)
    assert fwd.steps is None  # a long-running server must not grow a list per step


@pytest.mark.parametrize("name", ["pppipe", "findep"])
def test_per_step_schedule_matches_single_process(name):
    model, reqs = tiny_model(), requests()
    ref = reference(model, reqs)
    planner = step_planner(model, 2)
    steps: list = []
    got = serve(
        model,
        reqs,
        ag=1,
        eg=2,
        schedule=ServeSchedule.per_step(name, planner),
        return_logits=True,
        warmup=True,
        steps=steps,
    )
    check_same(ref, got)
    # one prefill step of the 5 valid prompts (padded to 11), then one decode step per token
    assert steps[0]["seqs"] == 5 and steps[0]["tokens"] == 11
    assert len(steps) == 1 + max(len(r.tokens) for r in ref) - 1
    for st in steps:
        p = planner.plan(name, st["seqs"], st["tokens"])
        assert (st["r1"], st["r2"], st["order"]) == (p.r1, p.r2, p.order)
        assert st["ms"] > 0 and st["rank"] == 0
    decode = [st["seqs"] for st in steps[1:]]
    assert decode == sorted(decode, reverse=True)  # requests leave as they finish
    if name == "findep":
        assert (steps[0]["r1"], steps[0]["r2"]) != (1, 1)
