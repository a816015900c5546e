"""Triton TBE kernels under TRITON_INTERPRET=1, each in a subprocess so the interpreter
setting never leaks into other tests."""

import os
import subprocess
import sys

import pytest

pytest.importorskip("triton")

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))


def _env():
    env = dict(os.environ, TRITON_INTERPRET="1")
    env["PYTHONPATH"] = os.path.join(ROOT, "src") + os.pathsep + env.get("PYTHONPATH", "")
    return env


def test_decode_and_fused_gemm_under_interpreter():
    r = subprocess.run([sys.executable, os.path.join(HERE, "triton_check.py")], env=_env(),
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "TRITON-CHECK-OK" in r.stdout


def test_gpu_benchmark_smoke(tmp_path):
    script = os.path.join(ROOT, "benchmarks", "gpu", "compress_gpu.py")
    r = subprocess.run([sys.executable, script, "--smoke", "--out", str(tmp_path)], env=_env(),
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    import json

    info = json.loads((tmp_path / "compress_gpu_smoke.json").read_text())
    assert info["failures"] == [] and info["rows"][0]["decode_exact"]
    assert all(g["ok"] for g in info["rows"][0]["gemm"])
    assert (tmp_path / "compress_gpu_smoke.md").read_text().startswith("# TBE decode")

