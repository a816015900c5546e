"""benchmarks/plan_validation.py: the FSMoE ablation rows run on the simulator and move as
the model says."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[2] / "benchmarks"
sys.path.insert(0, str(BENCH))

import plan_validation as pv  # noqa: E402

from moeflow.perf import perf_preset  # noqa: E402
from moeflow.plan import fsmoe_sweep  # noqa: E402
from moeflow.sim import pass_time  # noqa: E402


@pytest.fixture(scope="module")
def sw():
    return [pv.sweep(label, perf, ep, esp, step=97) for label, _, perf, ep, esp in pv.variants()]


def test_without_esp_the_whole_ag_rs_baseline_is_the_pipelined_pass():
    perf = perf_preset("fsmoe-testbed-a")
    for w in fsmoe_sweep(n_ep=48, n_esp=1)[::301]:
        for r in (1, 3):
            want = pass_time(w.pass_cost(perf), r) + pass_time(
                w.pass_cost(perf, True), r, 0.0, True
            )
            assert pv.esp_whole_time(w, perf, r) == pytest.approx(want, rel=1e-12)


def test_with_esp_the_whole_ag_rs_baseline_adds_them_in_series():
    perf = perf_preset("fsmoe-testbed-a")
    w = fsmoe_sweep(n_ep=6, n_esp=8)[500]
    pf, pb = w.pass_cost(perf), w.pass_cost(perf, True)
    assert pf.has_esp
    # at r = 1 the pipelined chain is the same tasks back to back: both forms agree
    assert pv.esp_whole_time(w, perf, 1) == pytest.approx(
        pass_time(pf, 1) + pass_time(pb, 1, 0.0, True), rel=1e-12
    )
    ag_rs = sum(p.alpha_ag + p.work_ag + p.alpha_rs + p.work_rs for p in (pf, pb))
    assert pv.esp_whole_time(w, perf, 4) >= ag_rs


def test_ablation_rows_run_and_move_as_the_model_says(sw):
    rows = pv.ablation_rows(sw)
    assert len(rows) == 5 * len(pv.TESTBEDS)
    by = {(r["testbed"], r["factor"]): r for r in rows}
    for tb in pv.TESTBEDS:
        none = by[(tb, "none")]
        assert none["mean"] == pytest.approx(
            next(s for s in sw if s["cluster"] == tb)["speedup"]["tutel+pipemoe"]["mean"]
        )
        # FSMoE searches every degree PipeMoE could pick, with the same simulator
        for r in rows:
            assert r["min"] >= 1.0 - 1e-9, r
        # without ESP the Tutel baseline has no ag/rs to leave outside its pipeline
        esp1 = next(s for s in sw if s["cluster"].startswith(f"{tb}, ESP=1"))
        assert esp1["speedup"][pv.WHOLE] == esp1["speedup"]["tutel+pipemoe"]
        assert by[(tb, "cost fits + baseline strength")]["mean"] > none["mean"]
    lines = "\n".join(pv.ablation_lines(sw))
    assert "published" in lines and f"{rows[0]['mean']:.3f}x" in lines
