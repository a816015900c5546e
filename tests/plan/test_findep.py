"""FinDEP closed form and solver (pure Python): hand-computed Eq. 13, memory bounds, solve
time, brute-force agreement with the closed form and (a slice of) the simulator."""

import dataclasses
import subprocess
import sys

import pytest

from moeflow.errors import ConfigError, PlanError
from moeflow.perf.cost import LinearCost
from moeflow.plan import findep as fd


def tiny_workload(**kw) -> fd.Workload:
    model = fd.FinDEPModel(
        name="tiny",
        hidden_size=64,
        expert_ffn=128,
        num_experts=8,
        top_k=2,
        num_shared=1,
        shared_ffn=128,
        attn_proj_params=4 * 64 * 64,
        attn_core_dim=4 * 32,
        kv_bytes_per_token=256,
        num_layers=4,
    )
    tb = fd.Testbed(
        name="toy",
        gpu="toy",
        ag=2,
        eg=2,
        mem_GB=0.05,
        gemm=LinearCost(0.05, 1e-8),
        link=LinearCost(0.02, 1e-6),
    )
    args = dict(model=model, testbed=tb, seq_len=256, max_r2=8)
    args.update(kw)
    return fd.Workload(**args)


def test_eq13_hand_computed():
    c = fd.StageCosts(t_a=2.0, t_s=1.0, t_e=1.5, t_a2e=0.5)
    # X = 3, Y = 1.5, F = max(3, 2*1.5) = 3, G = 2 + 1 + 1.5 + 1.5 = 6
    assert fd.asas_terms(c, 2, 2) == {"X": 3.0, "Y": 1.5, "F": 3.0, "G": 6.0}
    # (T-1) max(G, r1 F) + max(X, G) + (r2-1) Y + (r1-1) F with T = 3
    assert fd.published_asas_time(c, 2, 2, 3) == pytest.approx(2 * 6 + 6 + 1.5 + 3)
    # the solver's form counts the chunk fill once
    assert fd.asas_time(c, 2, 2, 3) == pytest.approx(2 * 6 + 6 + 3)
    # r2 = 1: the two forms agree
    assert fd.published_asas_time(c, 3, 1, 5) == fd.asas_time(c, 3, 1, 5)


def test_aass_equals_asas_without_shared_experts_or_micro_batches():
    c = fd.StageCosts(t_a=2.0, t_s=0.0, t_e=1.5, t_a2e=0.5)
    for r1, r2 in [(1, 1), (2, 3), (4, 2)]:
        assert fd.aass_time(c, r1, r2, 4) == pytest.approx(fd.asas_time(c, r1, r2, 4))
    c = fd.StageCosts(t_a=2.0, t_s=1.0, t_e=1.5, t_a2e=0.5)
    assert fd.aass_time(c, 1, 3, 4) == pytest.approx(fd.asas_time(c, 1, 3, 4))


def test_token_conservation_in_costs():
    w = tiny_workload()
    c1, c4 = w.costs(4, 1), w.costs(4, 4)
    gm, link = w.testbed.gemm, w.testbed.link
    m = w.model
    m_e = 4 * 2 * 2 * 256 / (1 * 8)  # m_a * ag * k * S = m_e * r2 * E
    assert c1.t_e == pytest.approx(3 * 4 * gm(2 * m_e * 64 * 128))
    assert c1.t_a2e == pytest.approx(link(m_e * 4 * 64 * 2))
    assert c4.t_e == pytest.approx(3 * 4 * gm(2 * m_e / 4 * 64 * 128))
    assert c1.t_a == c4.t_a and c1.t_s == c4.t_s > 0
    assert c1.t_s == pytest.approx(3 * gm(2 * 4 * 256 * 64 * 128))
    assert m.top_k == 2


def test_memory_bounds_are_consistent():
    w = tiny_workload()
    top = w.max_m_a()
    assert top >= 1
    assert w.max_r1_for(top) >= 1
    assert w.max_r1_for(top + 50) == 0 or w.min_r2_for(top + 50) > w.max_r2
    # r1 never rises with m_a; a larger m_a never needs fewer chunks
    r1s = [w.max_r1_for(m) for m in range(1, top + 1)]
    assert all(a >= b for a, b in zip(r1s, r1s[1:]))
    r2s = [w.min_r2_for(m) for m in range(1, top + 1)]
    assert all(a <= b for a, b in zip(r2s, r2s[1:]))
    capped = tiny_workload(max_seqs=6)
    assert all(m * capped.max_r1_for(m) <= 6 for m in range(1, capped.max_m_a() + 1))


def test_solver_matches_exhaustive_closed_form():
    for kw in [{}, {"max_seqs": 8}, {"seq_len": 512}, {"max_r1": 3}]:
        w = tiny_workload(**kw)
        p, e = fd.solve(w), fd.exhaustive(w)
        assert p.time_ms / (p.r1 * p.m_a) <= e.time_ms / (e.r1 * e.m_a) * 1.01, kw


def test_solver_slice_matches_simulated_exhaustive_within_1pct():
    from moeflow.sim.findep import sim_time

    ws = fd.optimality_sweep(layers=(2, 4), seq_lens=(1024, 8192), max_seqs=(4, 8))
    assert len(ws) == 4 * 2 * 2 * 2 * 2
    for w in ws[::4]:
        p = fd.solve(w)
        got = sim_time(w, p.m_a, p.r1, p.r2, p.order) / (p.r1 * p.m_a)
        e = fd.exhaustive(w, sim_time)
        assert got <= e.time_ms / (e.r1 * e.m_a) * 1.01, w.name


def test_paper_presets_solve_fast_and_beat_baselines():
    ws = fd.paper_workloads()
    assert {w.testbed.name for w in ws} == {"a6000", "a10", "h20", "h20x32"}
    assert {w.model.name for w in ws} == {"deepseek-v2", "qwen3-235b-a22b"}
    assert {w.model.num_layers for w in ws} >= {4, 48}
    assert {w.seq_len for w in ws} == {1024, 2048, 4096, 8192}
    for w in ws[::9]:
        p = fd.solve(w)
        assert p.solve_s < 1.0
        for base in (fd.pppipe_plan(w), fd.naive_plan(w)):
            assert p.time_ms / (p.r1 * p.m_a) <= base.time_ms / (base.r1 * base.m_a) + 1e-9
        assert p.evaluated <= 2 * 2 * w.max_r2 * w.max_r1 * 70  # independent of memory
        assert p.tokens_per_s == pytest.approx(
            w.testbed.ag * p.r1 * p.m_a * w.seq_len / (p.time_ms * 1e-3)
        )


def test_walk_visits_far_fewer_schedules_than_brute_force():
    w = max(fd.paper_workloads()[:40], key=lambda w: w.max_m_a())
    assert fd.solve(w).evaluated * 5 < sum(1 for _ in fd.search_space(w))


def test_presets_are_tagged():
    for name in fd.testbed_names():
        tb = fd.testbed_preset(name)
        assert tb.source in ("published", "derived") and tb.note
        assert tb.gemm.source in ("published", "derived")
    assert fd.testbed_preset("a6000").gemm.source == "published"
    for name in fd.model_names():
        assert fd.model_preset(name).source == "published"
    assert fd.model_preset("deepseek-v2", 4).num_layers == 4
    with pytest.raises(ConfigError, match="testbed"):
        fd.testbed_preset("tpu")
    with pytest.raises(ConfigError, match="model"):
        fd.model_preset("llama")


def test_bad_inputs_raise_typed_errors():
    with pytest.raises(ConfigError, match="eg"):
        tiny_workload(testbed=dataclasses.replace(tiny_workload().testbed, eg=3))
    with pytest.raises(ConfigError, match="seq_len"):
        tiny_workload(seq_len=0)
    with pytest.raises(ConfigError, match="order"):
        fd.predicted_time(tiny_workload(), 1, 1, 1, "SSAA")
    with pytest.raises(ConfigError, match="schedule"):
        fd.plan_for(tiny_workload(), "greedy")
    huge = tiny_workload(testbed=dataclasses.replace(tiny_workload().testbed, mem_GB=1e-4))
    with pytest.raises(PlanError):
        fd.solve(huge)


def test_planner_imports_no_torch():
    code = "import sys, moeflow.plan.findep, moeflow.sim.findep; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_profiled_attention_replaces_the_two_gemms():
    w = tiny_workload()
    att = LinearCost(0.5, 2e-9)
    w2 = tiny_workload(testbed=dataclasses.replace(w.testbed, attention=att))
    m = w.model
    proj = 2.0 * 3 * 256 * m.attn_proj_params
    core = 3.0 * m.attn_core_dim * 256 * 256
    assert w2.costs(3, 2).t_a == pytest.approx(att(proj + core))
    assert w.costs(3, 2).t_a == pytest.approx(w.testbed.gemm(proj) + w.testbed.gemm(core))
    assert w2.costs(3, 2).t_e == w.costs(3, 2).t_e
