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
