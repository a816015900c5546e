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


def test_findep_option_names():
    assert regret.findep_name(1, 1, "ASAS") == "naive"
    assert regret.findep_name(2, 1, "ASAS") == "pppipe 2"
    assert regret.findep_name(2, 1, "AASS") == "2,1,AASS"
    assert regret.findep_name(4, 8, "ASAS") == "4,8,ASAS"


def _record():
    ep = {"1,1": {"times_ms": [5.0], "predicted_ms": 5.0}, "auto": {"pick": "1,1"}}
    old_fd = {"naive": {"times_ms": [9.0], "predicted_ms": 9.0}, "auto": {"pick": "naive"}}
    return {
        "date": "2026-12-06",
        "host": "h",
        "command": "python benchmarks/regret.py --reps 15",
        "reps": 15,
        "cells": {
            "loopback": {
                "perf": {"name": "ep"},
                "profile_s": 10.0,
                "cases": {
                    "S/float32": {"degrees": ep, "picks": {}},
                    "prefill 8x64/float32": {"findep": old_fd, "picks": {}},
                },
            },
            "2x2@1gbit": {"perf": {"name": "ep4"}, "profile_s": 20.0, "cases": {}},
        },
        "skipped": {},
    }


def test_merge_replaces_only_the_decisions_run_and_keeps_the_rest():
    fd = {
        "naive": {"times_ms": [4.0, 5.0], "predicted_ms": 4.0},
        "pppipe 2": {"times_ms": [3.0, 3.0], "predicted_ms": 3.5},
        "auto": {"times_ms": [3.1], "pick": "pppipe 2", "predicted_ms": None},
    }
    new = {
        "loopback": {
            "perf": {"name": "pair"},
            "profile_s": 30.0,
            "cases": {"prefill 8x64/float32": {"findep": fd, "picks": {}}},
        },
        "2x1@1gbit": {"perf": {"name": "pair2"}, "profile_s": 31.0, "cases": {}},
    }
    run = {
        "command": "python benchmarks/regret.py --decisions findep,geo",
        "decisions": ["findep", "geo"],
        "reps": 5,
        "date": "2026-12-07",
        "cells": ["loopback", "2x1@1gbit"],
    }
    info = regret.merge_records(_record(), new, {"2x1@100mbit": "no root"}, run)
    lb = info["cells"]["loopback"]
    # the EP decision and the cell's own profile stay; the FinDEP case is this run's
    assert lb["cases"]["S/float32"]["degrees"]["1,1"]["times_ms"] == [5.0]
    assert lb["perf"] == {"name": "ep"}
    assert lb["cases"]["prefill 8x64/float32"]["findep"] is fd
    want = {"perf": {"name": "pair"}, "profile_s": 30.0, "load": None}
    assert lb["profiles"]["findep,geo"] == want
    assert info["cells"]["2x1@1gbit"]["perf"] == {"name": "pair2"}
    assert "2x2@1gbit" in info["cells"]
    assert [r["decisions"] for r in info["runs"]] == [list(regret.EP_DECISIONS), ["findep", "geo"]]
    assert info["skipped"] == {"2x1@100mbit (findep,geo)": "no root"}
    s = info["summary"]["loopback"]["prefill 8x64/float32/findep"]
    assert (s["pick"], s["best"], s["regret"]) == ("pppipe 2", "pppipe 2", 0.0)
    assert info["summary"]["loopback"]["S/float32/degrees"]["pick"] == "1,1"
    # the same run again replaces its run entry, not the EP one
    again = regret.merge_records(info, new, {}, run)
    assert [r["decisions"] for r in again["runs"]] == [list(regret.EP_DECISIONS), ["findep", "geo"]]


def test_geo_options_hold_the_exact_plan_the_even_split_and_the_pick():
    from moeflow.plan import geo

    n = 8
    ops = geo.OpGraph(
        tuple(geo.OpNode(f"n{i}", 1e6, 1e5, 1e4, (i - 1,) if i else ()) for i in range(n))
    )
    need = 4.0 * ops.param_bytes + 4 * sum(nd.saved_bytes for nd in ops.nodes)
    slow = geo.DeviceGraph(
        devices=(geo.Device("a", 1e9, 0.6 * need), geo.Device("b", 1e9, 0.6 * need)),
        bandwidth=((0, 1e6), (1e6, 0)),
    )
    opts, pick = regret.geo_options(ops, slow, 4)
    ada = geo.partition(ops, slow, microbatches=4, adatopk=True, min_density=0.05)
    exact = geo.partition(ops, slow, microbatches=4)
    assert opts[pick] == (ada.bounds, ada.densities)
    assert (exact.bounds, (1.0,)) in opts.values()
    assert ((0, n // 2, n), (1.0,)) in opts.values()
    # the pick's cut at the other densities the planner could have chosen
    assert {d for b, (d,) in opts.values() if b == ada.bounds} >= {1.0, 0.25, 0.1}
