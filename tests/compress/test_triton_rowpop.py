"""Row-mask popcount TBE kernels: interpreter checks and an sm_90 compile, each in a subprocess
(rowpop_check.py) so TRITON_INTERPRET never leaks into other tests."""

import os
import subprocess
import sys

import pytest

pytest.importorskip("triton")

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))


def _run(args, interpret, timeout=600):
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)
    if interpret:
        env["TRITON_INTERPRET"] = "1"
    env["PYTHONPATH"] = os.path.join(ROOT, "src") + os.pathsep + env.get("PYTHONPATH", "")
    return subprocess.run([sys.executable, "-W", "ignore", os.path.join(HERE, "rowpop_check.py"),
                           *args], env=env, capture_output=True, text=True, timeout=timeout)


def test_rowpop_bit_exact_decode_fused_gemm_and_errors_under_interpreter():
    r = _run(["interp"], interpret=True)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "ROWPOP-INTERP-OK" in r.stdout


def test_rowpop_kernels_compile_for_sm90_with_hardware_popcount():
    r = _run(["compile"], interpret=False)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "ROWPOP-COMPILE-OK" in r.stdout


@pytest.mark.slow
def test_rowpop_more_shapes_and_configs_under_interpreter():
    r = _run(["interp", "--big"], interpret=True, timeout=1800)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "ROWPOP-INTERP-OK" in r.stdout


def _bench(args, interpret, tmp_path):
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)
    if interpret:
        env["TRITON_INTERPRET"] = "1"
    env["PYTHONPATH"] = os.path.join(ROOT, "src") + os.pathsep + env.get("PYTHONPATH", "")
    script = os.path.join(ROOT, "benchmarks", "gpu", "tbe_rowpop_gpu.py")
    return subprocess.run([sys.executable, "-W", "ignore", script, *args, "--out", str(tmp_path)],
                          env=env, capture_output=True, text=True, timeout=600)


def test_gpu_benchmark_dry_run_lists_every_shape_and_token_count(tmp_path):
    r = _bench(["--dry-run"], False, tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    for shape in ("4096x4096", "14336x4096", "4096x14336", "28672x8192"):
        assert shape in r.stdout
    assert r.stdout.count("N=128") == 4


@pytest.mark.slow
def test_gpu_benchmark_smoke_under_interpreter(tmp_path):
    import json

    r = _bench(["--smoke"], True, tmp_path)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    info = json.loads((tmp_path / "tbe_rowpop_gpu_smoke.json").read_text())
    assert info["failures"] == [] and info["skipped"] == []
    row = info["rows"][0]
    assert len([k for k in row["decode"] if k.startswith("rowpop:")]) == 2
    assert all(len(g) == 5 for g in row["gemm"].values())  # matmul, slab, 3 rowpop configs
