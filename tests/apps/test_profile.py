"""Real gloo profiling on 127.0.0.1, with a tiny sweep to stay inside the test budget."""

import argparse

import pytest

from moeflow.perf import PerfModel


@pytest.mark.dist
def test_profile_two_nodes_of_one_rank_fits_every_primitive(tmp_path, capsys):
    from moeflow.apps import profile as profiler

    p = argparse.ArgumentParser()
    profiler.add_profile_arguments(p)
    out = tmp_path / "perf.json"
    args = p.parse_args(
        [
            "--nproc",
            "2",
            "--nodes",
            "2",
            "--out",
            str(out),
            "--min-kb",
            "4",
            "--max-kb",
            "256",
            "--points",
            "3",
            "--gemm",
            "32",
            "96",
            "160",
            "--reps",
            "2",
            "--trials",
            "1",
            "--quiet",
        ]
    )
    assert profiler.run_profile(args) == 0
    m = PerfModel.load(out)
    # every cost a planner or the simulator reads, each with its fit quality and points
    keys = ["gemm", "a2a", "ag", "rs", "ar", "send", "zipccl_encode", "zipccl_decode"]
    for dt in ("float32", "bfloat16"):
        for kind in ("gemm", "expert_fwd", "expert_bwd", "attention", "elementwise", "norm"):
            keys.append(f"{kind}@{dt}")
        keys.append(f"index@{dt}")
    m.require(*keys)
    for k in keys:
        c = m.costs[k]
        assert c.r2 is not None and c.source in ("fitted", "measured")
        assert c.max_rel_err is not None and len(c.points) >= 2
        assert c.max_rel_err == pytest.approx(max(abs(c(n) - t) / t for n, t in c.points if t > 0))
    assert m.meta["world_size"] == 2 and m.meta["backend"] == "gloo"
    # what FinDEP's testbed reads besides the costs: the experts of one timed expert call
    assert m.meta["expert_experts"] == profiler.EXPERTS_PER_RANK
    assert m.meta["expert_rows"] == list(profiler.EXPERT_ROWS)
    import torch

    assert m.meta["torch"] == torch.__version__ and m.meta["threads_per_rank"] >= 1
    assert m.meta["date"].endswith("UTC") and m.meta["host"]
    assert 0.0 <= m.meta["overlap"] <= 1.0 and m.meta["overlap_probe"]["a2a_ms"] > 0
    # bigger GEMMs take longer: the fitted slope is positive
    assert m.cost("gemm").beta > 0
    printed = capsys.readouterr().out
    assert "alpha" in printed and "R^2" in printed and "a2a" in printed


def test_log_sizes_and_table():
    from moeflow.apps.profile import format_table, log_sizes
    from moeflow.perf import perf_preset

    s = log_sizes(1024, 1024 * 1024, 4)
    assert s[0] == 1024 and s[-1] == pytest.approx(1024 * 1024, rel=1e-6) and len(s) == 4
    assert "ar" in format_table(perf_preset("fsmoe-testbed-a"))


@pytest.mark.slow
@pytest.mark.dist
def test_profile_four_ranks_two_nodes_adds_level_a2a():
    from moeflow.apps.profile import profile

    m = profile(
        nproc=4,
        nodes=2,
        sizes=(4096, 65536, 262144),
        gemm_sizes=(32, 96),
        reps=2,
        trials=1,
        progress=False,
    )
    assert "a2a@intra" in m.costs and "a2a@inter" in m.costs


@pytest.mark.slow
@pytest.mark.dist
def test_profile_cli_under_torchrun(tmp_path):
    import os
    import subprocess
    import sys

    from moeflow.comm.ports import free_port

    out = tmp_path / "perf.json"
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc_per_node",
            "2",
            "--master_port",
            str(free_port()),
            "-m",
            "moeflow.cli",
            "profile",
            "--out",
            str(out),
            "--points",
            "2",
            "--max-kb",
            "64",
            "--gemm",
            "32",
            "64",
            "--reps",
            "1",
            "--trials",
            "1",
            "--quiet",
        ],
        capture_output=True,
        text=True,
        timeout=180,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert r.returncode == 0, r.stderr[-2000:]
    assert PerfModel.load(out).meta["world_size"] == 2


@pytest.mark.parametrize(
    "argv, flag",
    [
        (["--nproc", "0"], "--nproc"),
        (["--nproc", "-1"], "--nproc"),
        (["--nproc", "100000"], "--nproc"),
        (["--nproc", "2", "--nodes", "0"], "--nodes"),
        (["--points", "1"], "--points"),
        (["--max-kb", "1e12"], "--max-kb"),
        (["--min-kb", "nan"], "--min-kb"),
        (["--min-kb", "64", "--max-kb", "16"], "--min-kb"),
        (["--gemm", "0"], "--gemm"),
        (["--reps", "0"], "--reps"),
    ],
)
def test_profile_flags_refused_before_forking(monkeypatch, argv, flag):
    import os

    from moeflow.apps import profile as profiler
    from moeflow.errors import ConfigError

    def refuse():
        raise AssertionError("forked before validating")

    monkeypatch.setattr(os, "fork", refuse)
    p = argparse.ArgumentParser()
    profiler.add_profile_arguments(p)
    with pytest.raises(ConfigError) as ei:
        profiler.run_profile(p.parse_args(argv))
    assert flag in str(ei.value) and "\n" not in str(ei.value)


def test_profile_layout_and_output_checked_before_forking(monkeypatch, tmp_path):
    import os

    from moeflow.apps import profile as profiler
    from moeflow.errors import DistributedConfigError, InputError

    def refuse():
        raise AssertionError("forked before validating")

    monkeypatch.setattr(os, "fork", refuse)
    p = argparse.ArgumentParser()
    profiler.add_profile_arguments(p)
    with pytest.raises(DistributedConfigError, match="--nodes 2 must divide --nproc 3"):
        profiler.run_profile(p.parse_args(["--nproc", "3", "--nodes", "2"]))
    with pytest.raises(InputError, match="--out"):
        profiler.run_profile(p.parse_args(["--out", str(tmp_path / "no" / "perf.json")]))


def test_profile_refit_updates_a_model_from_samples(tmp_path, capsys):
    import json

    from moeflow.apps import profile as profiler
    from moeflow.errors import ConfigError, InputError
    from moeflow.perf import LinearCost

    base = {k: LinearCost(1.0, 1e-6) for k in ("gemm", "a2a", "ag", "rs", "ar")}
    PerfModel("m", base).save(tmp_path / "perf.json")
    true = LinearCost(0.25, 3e-6)
    (tmp_path / "s.json").write_text(json.dumps({"a2a": [[n, true(n)] for n in (1e4, 1e5, 1e6)]}))
    p = argparse.ArgumentParser()
    profiler.add_profile_arguments(p)
    out = tmp_path / "refit.json"
    argv = ["--refit", str(tmp_path / "s.json"), "--perf", str(tmp_path / "perf.json")]
    assert profiler.run_profile(p.parse_args([*argv, "--out", str(out)])) == 0
    m = PerfModel.load(out)
    assert m.cost("a2a").alpha == pytest.approx(0.25) and m.cost("a2a").beta == pytest.approx(3e-6)
    assert m.cost("ar") == base["ar"] and m.meta["refits"] == {"a2a": 3}
    (tmp_path / "bad.json").write_text('{"a2a": [1, 2]}')
    with pytest.raises(InputError, match="--refit"):
        profiler.run_profile(
            p.parse_args(
                [
                    "--refit",
                    str(tmp_path / "bad.json"),
                    "--perf",
                    str(tmp_path / "perf.json"),
                    "--out",
                    str(tmp_path / "x.json"),
                ]
            )
        )
    with pytest.raises(ConfigError, match="--perf"):
        profiler.run_profile(
            p.parse_args(["--refit", str(tmp_path / "s.json"), "--out", str(tmp_path / "y.json")])
        )


@pytest.mark.slow
@pytest.mark.dist
def test_profile_op_costs_stores_every_bench_cost_with_its_fit(tmp_path, capsys):
    """``moeflow profile --op-costs`` writes the costs ``moeflow bench --simulate`` prices a
    step with into the same file, each fitted one with its fit quality."""
    from moeflow.apps.bench.predict import OP_CLASSES
    from moeflow.cli import profile as cli
    from moeflow.perf import LinearCost

    p = argparse.ArgumentParser()
    cli.add_arguments(p)
    out = tmp_path / "perf.json"
    argv = ["--nproc", "2", "--out", str(out), "--min-kb", "4", "--max-kb", "64"]
    argv += ["--points", "2", "--gemm", "32", "96", "--reps", "1", "--trials", "1"]
    assert cli.run(p.parse_args([*argv, "--quiet", "--op-costs"])) == 0
    table = PerfModel.load(out).meta["bench_costs"]
    fitted = ("gemm", "grouped_gemm", "grouped_gemm_wgrad", "attention", "attention_bwd")
    for dt in ("float32", "bfloat16"):
        for kind in (*fitted, "elementwise", *OP_CLASSES):
            c = LinearCost.from_dict(table[f"{kind}@{dt}"])
            assert c.r2 is not None and c.max_rel_err is not None and len(c.points) >= 2
            assert c.beta > 0
    for fixed in ("python_op", "module_call", "autograd_node", "optimizer_op", "compiled_call"):
        assert LinearCost.from_dict(table[fixed]).alpha > 0
    assert "attention_bwd@bfloat16" in capsys.readouterr().out


@pytest.mark.slow
def test_expert_rows_add_points_to_the_expert_sweep():
    from moeflow.apps import profile as profiler

    costs = profiler.profile_compute(("float32",), reps=1, trials=1, expert_rows=(16,))
    pts = [n for n, _ in costs["expert_fwd@float32"].points]
    per_shape = len(profiler.EXPERT_ROWS) + 1
    assert len(pts) == len(profiler.EXPERT_SHAPES) * per_shape
    for D, F in profiler.EXPERT_SHAPES:
        assert 6.0 * 16 * D * F in pts


def test_send_is_fitted_as_hockney_where_the_sweep_allows():
    from moeflow.apps.profile import _send_cost

    xs = [4096, 16384, 65536, 262144, 1048576]
    ys = [0.1, 0.15, 0.8, 3.0, 11.0]
    c = _send_cost(xs, ys, "gloo")
    # the slope of the two large messages, the latency of the small ones under it
    beta = (11.0 - 3.0) / (1048576 - 262144)
    assert c.beta == pytest.approx(beta)
    assert c.alpha == pytest.approx((0.1 + 0.15) / 2)  # the small messages' median
    # a small message inside a shaped link's burst is faster than the drained rate: the
    # latency is still its time, not a negative remainder clamped to 0
    burst = _send_cost(xs, [2.0, 0.25, 4.0, 21.9, 142.0], "gloo")
    assert burst.alpha == pytest.approx(1.125) and burst.beta == pytest.approx(120.1 / 786432)
    assert c.max_rel_err is not None and len(c.points) == 5
    # without two messages of 256 KiB or more: the relative line of the other collectives
    small = _send_cost(xs[:3], ys[:3], "gloo")
    assert small.beta > 0 and len(small.points) == 3
