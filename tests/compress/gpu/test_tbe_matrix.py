"""TBEMatrix, the torch encoder and the shared input checks (no kernel launches)."""

import importlib
import sys
from types import SimpleNamespace

import numpy as np
import pytest
import torch

pytest.importorskip("triton")

from moeflow.compress.gpu import (  # noqa: E402
    MAX_TOKENS,
    TBEMatrix,
    matrix,
    skinny_input,
    tbe_encode_torch,
)
from moeflow.errors import InputError  # noqa: E402
from tests.compress.gpu._weights import hard_weights  # noqa: E402

STREAMS = ("planes", "cov_off", "fb_off", "covered", "fallback")
SHAPES = [(70, 130), (64, 64), (5,), (3, 4, 9), (0,)]


def cpu_codec(w: torch.Tensor) -> TBEMatrix:
    """``w`` encoded by the CPU codec (numba) and uploaded as a TBEMatrix on the CPU."""
    from moeflow.compress import tbe

    name = str(w.dtype).removeprefix("torch.")
    raw = w.contiguous().view(-1).view(torch.int16).numpy().view(np.uint16)
    payload = tbe.encode(raw, name, tuple(w.shape))
    return TBEMatrix.from_parts(tbe.parse(payload, name, tuple(w.shape)), w.shape, "cpu")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_torch_encoder_writes_the_cpu_codec_streams(dtype, shape):
    w = hard_weights(shape, dtype, seed=len(shape))
    a = cpu_codec(w)
    b = tbe_encode_torch(w)
    assert (a.rows, a.cols, a.numel, a.base, a.planes_per_tile) == (
        b.rows,
        b.cols,
        b.numel,
        b.base,
        b.planes_per_tile,
    )
    for f in STREAMS:
        assert torch.equal(getattr(a, f), getattr(b, f)), f


def test_streams_carry_the_padding_the_unit_kernels_read_past_their_slots():
    m = tbe_encode_torch(hard_weights((70, 130), torch.bfloat16))
    n_cov, n_fb = int(m.cov_off[-1]), int(m.fb_off[-1])
    assert m.covered.numel() >= n_cov + matrix.COV_PAD and m.covered.numel() % 4 == 0
    assert m.fallback.numel() >= n_fb + matrix.FB_PAD and m.fallback.numel() % 2 == 0
    assert not m.covered[n_cov:].any() and not m.fallback[n_fb:].any()
    assert m.blocks == (2, 3)
    assert m.nbytes == sum(getattr(m, f).numel() * getattr(m, f).element_size() for f in STREAMS)


def test_from_tensor_uploads_the_container_codec_streams():
    w = hard_weights((20, 24), torch.float16)
    a = TBEMatrix.from_tensor(w, device="cpu")
    b = tbe_encode_torch(w)
    assert a.shape == (20, 24) and a.dtype == torch.float16
    for f in STREAMS:
        assert torch.equal(getattr(a, f), getattr(b, f)), f


def test_from_compressed_rejects_other_codecs():
    with pytest.raises(InputError, match="entropy"):
        TBEMatrix.from_compressed(SimpleNamespace(codec="entropy"), "cpu")


@pytest.mark.parametrize("bad", [torch.zeros(4, dtype=torch.float32), np.zeros(4, np.float16)])
def test_encoder_takes_only_bf16_and_fp16_tensors(bad):
    with pytest.raises(InputError, match="bfloat16/float16"):
        tbe_encode_torch(bad)


def test_default_split_k_covers_the_sms_without_empty_splits():
    cpu = torch.device("cpu")
    assert matrix.num_sms(cpu) == 4
    assert matrix.default_split_k(1, 100, cpu) == 16  # 4 waves x 4 SMs
    assert matrix.default_split_k(1, 100, cpu, waves=8) == 32
    assert matrix.default_split_k(1, 3, cpu) == 3  # no more splits than K blocks
    assert matrix.default_split_k(100, 100, cpu) == 1


def test_interpreted_follows_the_environment(monkeypatch):
    assert matrix.interpreted()  # conftest
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert not matrix.interpreted()


W = tbe_encode_torch(
    (torch.randn(24, 40, generator=torch.Generator().manual_seed(0)) * 0.02).to(torch.bfloat16)
)


def test_skinny_input_flattens_leading_dims_and_makes_rows_contiguous():
    lead, x2 = skinny_input(torch.zeros(2, 3, 40, dtype=torch.bfloat16), W)
    assert lead == (2, 3) and x2.shape == (6, 40) and x2.stride(-1) == 1
    xt = torch.zeros(40, 5, dtype=torch.bfloat16).t()  # non-contiguous rows
    assert skinny_input(xt, W)[1].is_contiguous()
    assert skinny_input(torch.zeros(MAX_TOKENS, 40, dtype=torch.bfloat16), W)[1].shape[0] == 128


def test_missing_triton_names_the_extra(monkeypatch):
    for name in [n for n in sys.modules if n.startswith("moeflow.compress.gpu")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "triton", None)  # import triton -> ImportError
    with pytest.raises(ImportError, match=r'pip install "moeflow\[triton\]"'):
        importlib.import_module("moeflow.compress.gpu")
