"""ZipCCL's GPU codec (Triton): bit-exact round trips, escapes, checksums. Without a GPU the
kernels run in Triton's interpreter on small shapes."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

if not torch.cuda.is_available():  # read when the kernels are decorated (module import)
    os.environ.setdefault("TRITON_INTERPRET", "1")

pytest.importorskip("triton")

from moeflow.compress import collective_gpu as G  # noqa: E402
from moeflow.errors import CorruptDataError, InputError  # noqa: E402

DEV = "cuda" if torch.cuda.is_available() else "cpu"


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    w = torch.int16 if a.element_size() == 2 else torch.int32
    return a.dtype == b.dtype and torch.equal(
        a.reshape(-1).view(w).cpu(), b.reshape(-1).view(w).cpu()
    )


def test_every_bf16_pattern_round_trips():
    pats = torch.from_numpy(np.arange(1 << 16, dtype=np.uint16).view(np.int16).copy())
    x = pats.view(torch.bfloat16).to(DEV)
    assert _same(G.gpu_decode(G.gpu_encode(x)), x)
    # the same patterns inside a Gaussian message: window codes and escapes both taken
    g = (torch.randn(1 << 16) * 0.02).bfloat16()
    mix = g.view(torch.int16).clone()
    mix[::8] = pats[::8]
    y = mix.view(torch.bfloat16).to(DEV)
    msg = G.gpu_encode(y)
    assert _same(G.gpu_decode(msg), y)
    n_esc = int(msg[:64].clone().view(torch.int64)[5])
    assert 0 < n_esc < 1 << 13


@pytest.mark.parametrize("n", [1, 5, 1023, 1024, 3001])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_round_trip_shapes_and_ratio(n, dtype):
    x = (torch.randn(n) * 0.1).to(dtype)
    x[::7] = 0
    msg = G.gpu_encode(x.to(DEV))
    assert _same(G.gpu_decode(msg), x)
    if n >= 3000 and dtype == torch.bfloat16:
        assert x.numel() * 2 / msg.numel() > 1.25  # 12 bits a value, few escapes


def test_fp32_special_values():
    x = torch.tensor(
        [0.0, -0.0, float("inf"), -float("inf"), float("nan"), 1e-45, 3e38, -1.5, 1e-3]
    )
    assert _same(G.gpu_decode(G.gpu_encode(x.to(DEV))), x)


def test_corruption_and_bad_input():
    x = (torch.randn(2000) * 0.05).bfloat16().to(DEV)
    msg = G.gpu_encode(x)
    for pos in (0, 70, 700, msg.numel() - 20, msg.numel() - 1):
        bad = msg.clone()
        bad[pos] ^= 4
        with pytest.raises(CorruptDataError):
            G.gpu_decode(bad)
    with pytest.raises(CorruptDataError):
        G.gpu_decode(msg[:40])
    with pytest.raises(InputError):
        G.gpu_encode(torch.zeros(4, dtype=torch.float16))


def test_window_follows_the_gaussian_model():
    # the window's 14 binades sit around the scale: start a few binades below log2 RMS
    assert -14 <= G.window_start() <= -6
