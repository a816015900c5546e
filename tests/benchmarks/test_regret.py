"""benchmarks/regret.py: how a pick is resolved and its regret computed (pure parts)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[2] / "benchmarks"
sys.path.insert(0, str(BENCH))

import regret  # noqa: E402


def _case(picks, **decisions):
    return {"cases": {"S/float32": {**decisions, "picks": picks}}}


def test_planned_degrees_are_the_pick_and_regret_is_over_the_best_option():
    res = _case(
        {},
        degrees={
            "1,1": {"times_ms": [10.0, 11.0, 12.0], "predicted_ms": 11.0},
            "2,2": {"times_ms": [8.0, 8.0, 9.0], "predicted_ms": 12.0},
            "auto": {"pick": "1,1", "predicted_ms": None},
        },
    )
    s = regret.summarize(res)["S/float32/degrees"]
    assert (s["pick"], s["best"]) == ("1,1", "2,2")
    assert s["regret"] == pytest.approx(11.0 / 8.0 - 1)
    assert s["pred_over_meas"] == {"1,1": pytest.approx(1.0), "2,2": pytest.approx(1.5)}
    assert s["auto_arm_regret"] is None


def test_a_uniform_auto_choice_is_its_option_and_a_mixed_one_is_the_auto_arm():
    opts = {
        "off": {"times_ms": [10.0], "predicted_ms": 10.0},
        "on": {"times_ms": [20.0], "predicted_ms": 15.0},
        "auto": {"times_ms": [9.0], "predicted_ms": None},
    }
    never = {"dispatch": {"compressed": 0, "calls": 4}, "combine": {"compressed": 0, "calls": 4}}
    s = regret.summarize(_case({"zipccl": never}, zipccl=opts))["S/float32/zipccl"]
    # auto ran "off" every call: its own faster timing is noise, not a better option
    assert (s["pick"], s["best"], s["regret"]) == ("off", "off", 0.0)
    assert s["auto_arm_regret"] == pytest.approx(-0.1)
    mixed = {"dispatch": {"compressed": 4, "calls": 4}, "combine": {"compressed": 0, "calls": 4}}
    s = regret.summarize(_case({"zipccl": mixed}, zipccl=opts))["S/float32/zipccl"]
    assert (s["pick"], s["best"], s["regret"]) == ("auto", "auto", 0.0)
    assert regret.resolve_pick("parm", {"auto": {}}, ["split_rows", "split_rows"]) == "s2"
    assert regret.resolve_pick("dedup", {"auto": {}}, [0, 1]) == "auto"
    assert regret.resolve_pick("dedup", {"auto": {}}, [1, 1]) == "1"


def test_cells_parse():
    assert regret.parse_cell("loopback") == (1, 2, None)
    assert regret.parse_cell("2x2@100mbit") == (2, 2, "100mbit")
