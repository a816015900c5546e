"""`moeflow geo plan --perf`: the planner's devices from a `moeflow profile` file."""

import json

from moeflow.perf.cost import LinearCost, PerfModel

MODEL = ["--dim", "32", "--layers", "2", "--heads", "2", "--seq-len", "16"]


def _perf(tmp_path, drop=None):
    costs = {
        "gemm": LinearCost(0.01, 1e-8),
        "gemm@float32": LinearCost(0.01, 1e-8),
        "elementwise@float32": LinearCost(0.005, 1e-6),
        "send": LinearCost(0.5, 8e-5),
    }
    costs.pop(drop, None)
    path = tmp_path / "perf.json"
    PerfModel("prof", costs, meta={"world_size": 2, "nodes": 2}).save(path)
    return path


def test_plan_from_a_profile(tmp_path, capsys):
    from moeflow.cli import main
    from moeflow.plan.geo import GeoPlan

    out = tmp_path / "plan.json"
    argv = ["geo", "plan", "--perf", str(_perf(tmp_path)), "--memory-gb", "4", "--out", str(out)]
    assert main(argv + MODEL) == 0
    doc = json.loads(out.read_text())
    assert set(doc["devices"]) == {"rank0", "rank1"}
    plan = GeoPlan.from_dict(doc["plan"])
    assert plan.step_time_s > 0 and set(plan.device_names) <= {"rank0", "rank1"}
    assert "stage 0 on" in capsys.readouterr().out


def test_a_profile_without_a_cost_the_planner_reads_is_refused_by_name(tmp_path, capsys):
    from moeflow.cli import main

    assert main(["geo", "plan", "--perf", str(_perf(tmp_path, drop="send"))] + MODEL) == 2
    assert "send" in capsys.readouterr().err


def test_devices_and_perf_exclude_each_other(tmp_path, capsys):
    from moeflow.cli import main

    p = str(_perf(tmp_path))
    assert main(["geo", "plan", "--perf", p, "--devices", p] + MODEL) == 2
    assert "--devices/--perf" in capsys.readouterr().err
    assert main(["geo", "plan"] + MODEL) == 2
    assert main(["geo", "plan", "--perf", p, "--memory-gb", "0"] + MODEL) == 2
    assert "--memory-gb" in capsys.readouterr().err
