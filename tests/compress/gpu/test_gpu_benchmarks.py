"""The GPU benchmark scripts run on CPU: ``--help``, the plan, and smoke runs on tiny shapes
under Triton's interpreter (their figures mean nothing; the checks inside them must pass)."""

import importlib.util
import json
import os
import re
import subprocess

import pytest

pytest.importorskip("triton")

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
GPU = os.path.join(ROOT, "benchmarks", "gpu")
SCRIPTS = sorted(f[:-3] for f in os.listdir(GPU) if f.endswith(".py"))


def load(name: str):
    """A benchmark script as a module (its ``main(argv)`` is the command line)."""
    spec = importlib.util.spec_from_file_location(f"bench_{name}", os.path.join(GPU, f"{name}.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_the_scripts_are_the_three_kept():
    assert SCRIPTS == ["compress_gpu", "layer_gpu", "tbe_experimental_gpu"]


@pytest.mark.parametrize("name", SCRIPTS)
def test_script_imports_and_prints_help(name, capsys):
    with pytest.raises(SystemExit) as e:
        load(name).main(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage:") and "--out" in out


def test_run_all_runs_every_script_within_eight_minutes():
    path = os.path.join(GPU, "run_all.sh")
    assert subprocess.run(["bash", "-n", path]).returncode == 0
    runs = re.findall(r"^run (\w+) (\d+)", open(path).read(), re.M)
    assert sorted(n for n, _ in runs) == SCRIPTS
    assert sum(int(t) for _, t in runs) <= 480


def test_experimental_dry_run_lists_every_shape_and_token_count(tmp_path, capsys):
    assert load("tbe_experimental_gpu").main(["--dry-run", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    for shape in ("4096x4096", "14336x4096", "4096x14336", "28672x8192"):
        assert f"{shape}: decode rows" in out and "public, copy" in out
    assert out.count("N=128: matmul") == 4


def test_compress_gpu_smoke_checks_pass(tmp_path):
    assert load("compress_gpu").main(["--smoke", "--out", str(tmp_path)]) == 0
    info = json.loads((tmp_path / "compress_gpu_smoke.json").read_text())
    assert info["failures"] == [] and all(c["ok"] for c in info["hard_checks"])
    row = info["rows"][0]
    assert row["decode_exact"] and [g["N"] for g in row["gemm"]] == [1, 8]
    assert all(g["ok"] and g["fused_warps"] in (4, 8) for g in row["gemm"])
    assert (tmp_path / "compress_gpu_smoke.md").read_text().startswith("# TBE decode")


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")
@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")
def test_experimental_smoke_checks_pass(tmp_path):
    assert load("tbe_experimental_gpu").main(["--smoke", "--out", str(tmp_path)]) == 0
    info = json.loads((tmp_path / "tbe_experimental_gpu_smoke.json").read_text())
    assert info["failures"] == [] and all(c[3] for c in info["hard_checks"])
    row = info["rows"][0]
    assert all(row["decode_exact"].values()) and len(row["decode_exact"]) == 6
    assert all(len(g) == 8 for g in row["gemm"].values())  # matmul, 6 unit configs, public


@pytest.mark.slow
def test_layer_gpu_smoke_writes_every_case(tmp_path):
    pytest.importorskip("transformers")
    assert load("layer_gpu").main(["--smoke", "--out", str(tmp_path)]) == 0
    rows = json.loads((tmp_path / "layer_gpu.json").read_text())["rows"]
    assert {r["case"] for r in rows} == {"Qwen3-tiny", "Mixtral-tiny", "DeepSeek-tiny"}
    assert all(r["rel_err"] < 5e-2 for r in rows)
