"""Tile-row TBE kernels: interpreter checks and an sm_90 compile, each in a subprocess
(unit_check.py) so TRITON_INTERPRET never leaks into other tests."""

import os
import subprocess
import sys

import pytest

pytest.importorskip("triton")

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))


def _env(interpret):
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)
    if interpret:
        env["TRITON_INTERPRET"] = "1"
    env["PYTHONPATH"] = os.path.join(ROOT, "src") + os.pathsep + env.get("PYTHONPATH", "")
    return env


def _run(args, interpret, timeout=900):
    return subprocess.run([sys.executable, "-W", "ignore", os.path.join(HERE, "unit_check.py"),
                           *args], env=_env(interpret), capture_output=True, text=True,
                          timeout=timeout)


def test_unit_kernels_bit_exact_decode_fused_gemm_and_errors_under_interpreter():
    r = _run(["interp"], interpret=True)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "UNIT-INTERP-OK" in r.stdout


@pytest.mark.slow
def test_unit_kernels_every_bf16_pattern_and_more_configs_under_interpreter():
    r = _run(["interp", "--big"], interpret=True, timeout=1800)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "UNIT-INTERP-OK" in r.stdout


def test_unit_kernels_compile_for_sm90_with_prmt_popc_and_vector_stores():
    r = _run(["compile"], interpret=False)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "UNIT-COMPILE-OK" in r.stdout


def test_unit_gpu_benchmark_dry_run_lists_every_shape_and_token_count(tmp_path):
    script = os.path.join(ROOT, "benchmarks", "gpu", "tbe_unit_gpu.py")
    r = subprocess.run([sys.executable, script, "--dry-run", "--out", str(tmp_path)],
                       env=_env(False), capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-3000:]
    for shape in ("4096x4096", "14336x4096", "4096x14336", "28672x8192"):
        assert f"{shape}: decode rows" in r.stdout
    assert r.stdout.count("N=128: matmul") == 4


@pytest.mark.slow
def test_unit_gpu_benchmark_smoke_under_interpreter(tmp_path):
    import json

    script = os.path.join(ROOT, "benchmarks", "gpu", "tbe_unit_gpu.py")
    r = subprocess.run([sys.executable, "-W", "ignore", script, "--smoke", "--out",
                        str(tmp_path)], env=_env(True), capture_output=True, text=True,
                       timeout=1800)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    info = json.loads((tmp_path / "tbe_unit_gpu_smoke.json").read_text())
    assert info["failures"] == [] and all(c[3] for c in info["hard_checks"])
    row = info["rows"][0]
    assert all(row["decode_exact"].values()) and len(row["decode_exact"]) == 6
