"""``moeflow bench``: flags are checked before any work, with typed errors naming them;
a tiny run writes a valid report."""

import argparse
import json

import pytest

from moeflow.apps.bench.report import validate_report
from moeflow.cli.bench import add_bench_arguments, build_job, run_bench
from moeflow.errors import ConfigError, InputError

TINY = [
    "--dim",
    "32",
    "--layers",
    "1",
    "--experts",
    "4",
    "--ffn",
    "64",
    "--batch-size",
    "2",
    "--seq-len",
    "16",
]


def _args(*argv):
    p = argparse.ArgumentParser()
    add_bench_arguments(p)
    return p.parse_args(list(argv))


@pytest.mark.parametrize(
    "argv, err, flag",
    [
        (["train", "--kernel", "cutlass"], ConfigError, "--kernel"),
        (["train", "--dtype", "float64"], ConfigError, "--dtype"),
        (["train", "--recompute", "maybe"], ConfigError, "--recompute"),
        (["decode", "--compile", "yes"], ConfigError, "--compile"),
        (["train", "--batch-size", "0"], ConfigError, "--batch-size"),
        (["train", "--steps", "0"], ConfigError, "--steps"),
        (["train", "--batch-size", "100000"], ConfigError, "--batch-size"),
        (["train", "--dim", "10000000"], ConfigError, "--dim"),
        (["train", "--nproc", "0"], ConfigError, "--nproc"),
        (["train", "--peak-tflops", "-1"], ConfigError, "--peak-tflops"),
        (["train", "--model", "hf"], InputError, "--path"),
        (["train", "--path", "x"], ConfigError, "--path"),
        (["train", "--json", "/nonexistent-dir/x.json"], InputError, "--json"),
    ],
)
def test_bad_flags_fail_before_work(argv, err, flag):
    with pytest.raises(err, match=flag.lstrip("-").split("-")[0]):
        build_job(_args(*argv))


def test_mode_is_required():
    with pytest.raises(InputError, match="train or decode"):
        build_job(_args())


def test_settings_one_factor_at_a_time():
    job = build_job(
        _args(
            "train",
            "--kernel",
            "grouped_mm",
            "bmm",
            "loop",
            "--dtype",
            "float32",
            "bfloat16",
            "--recompute",
            "off",
            "on",
            "--compile",
            "off",
            "on",
        )
    )
    labels = [s.label for s in job.settings]
    assert labels[0] == "grouped_mm/fp32/rc-off/compile-off"
    assert len(labels) == 6 and len(set(labels)) == 6
    grid = build_job(
        _args("train", "--kernel", "grouped_mm", "bmm", "--recompute", "off", "on", "--full-grid")
    )
    assert len(grid.settings) == 4
    dec = build_job(_args("decode", "--recompute", "off", "on"))
    assert [s.recompute for s in dec.settings] == [False]  # no backward to recompute


def test_bad_perf_model_file(tmp_path):
    bad = tmp_path / "p.json"
    bad.write_text("{}")
    with pytest.raises(InputError, match="perf model"):
        build_job(_args("train", "--perf", str(bad)))


def test_tiny_run_writes_report(tmp_path, capsys):
    out = tmp_path / "r.json"
    rc = run_bench(
        _args(
            "train",
            *TINY,
            "--warmup",
            "1",
            "--steps",
            "1",
            "--unprofiled",
            "1",
            "--quiet",
            "--json",
            str(out),
            "--peak-tflops",
            "0.1",
        )
    )
    assert rc == 0
    rep = json.loads(out.read_text())
    validate_report(rep)
    assert rep["mode"] == "train" and rep["settings"][0]["status"] == "ok"
    assert "moe_experts" in capsys.readouterr().out
