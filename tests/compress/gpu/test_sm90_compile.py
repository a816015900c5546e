"""Every TBE kernel compiles for sm_90 (Hopper) on this machine, with the instructions it was
written for: tensor-core MMAs in the fused GEMMs, hardware PRMT/POPC and 16-byte stores in the
experimental tile-row kernels (not their interpreter emulations)."""

import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("triton")

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(HERE)))

CASES = [
    "decode bf16",
    "decode fp16",
    "linear bf16 BN16",
    "unit decode rows bf16 b1",
    "unit decode rows fp16 b2",
    "unit decode units bf16 s64",
    "unit fma bf16 BN1 b1",
    "unit fma bf16 BN8 b2",
    "unit dot bf16 BN16 b1",
]


@pytest.fixture(scope="module")
def compiled(tmp_path_factory):
    """All cases, compiled once in a child process without TRITON_INTERPRET (this process
    decorated the kernels for the interpreter; see conftest)."""
    out = tmp_path_factory.mktemp("sm90") / "compiled.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join(
        [os.path.join(ROOT, "src"), ROOT, env.get("PYTHONPATH", "")]
    )
    r = subprocess.run(
        [sys.executable, "-W", "ignore", os.path.join(HERE, "_sm90.py"), str(out), *CASES],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(out.read_text())


@pytest.mark.parametrize("case", CASES)
def test_kernel_compiles_for_sm90_with_its_instructions(compiled, case):
    c = compiled[case]
    ptx = c["ptx"]
    assert ".target sm_90" in ptx and c["cubin_bytes"] > 0
    if "BN16" in case:  # fused GEMMs on tensor cores
        assert "mma" in ptx
    if case.startswith("unit"):  # named instructions, not the interpreter's integer emulation
        assert "prmt.b32" in ptx and "popc.b32" in ptx
    if case.startswith("unit decode"):  # one 16-byte store per tile row
        assert "st.global.v4.b32" in ptx
