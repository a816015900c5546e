"""The experimental tile-row ("unit") kernels under Triton's interpreter: bit-exact decode in
both layouts, the fused GEMM in its three modes, and typed errors."""

import pytest
import torch

pytest.importorskip("triton")

from moeflow.compress.gpu import TBEMatrix, tbe_encode_torch  # noqa: E402
from moeflow.compress.gpu import experimental_unit as U  # noqa: E402
from moeflow.errors import ConfigError, InputError  # noqa: E402
from tests.compress.gpu._weights import (  # noqa: E402
    all_patterns,
    assert_gemm_close,
    bits,
    finite,
    hard_weights,
    low_exponents,
)

# Lanes for rows past the matrix decode whatever in-bounds stream words sit at their slots and
# are masked at the store; numpy (the interpreter) warns when those values overflow a product
# or add up to NaN.
pytestmark = [
    pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning"),
    pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning"),
]


def most_fallbacks_in_a_unit(m: TBEMatrix) -> int:
    """Most fallback weights among the 8 of any tile row (the kernels' slow path is > 4)."""
    TR, TC = (m.rows + 7) // 8, (m.cols + 7) // 8
    planes = m.planes.view(torch.int64).reshape(TR, TC, m.planes_per_tile)
    cov = planes[..., 0] | planes[..., 1] | planes[..., 2]
    byte = (cov[..., None] >> (8 * torch.arange(8))) & 0xFF  # [TR, TC, row in tile]
    ncov = sum((byte >> b) & 1 for b in range(8))
    return int((8 - ncov).permute(0, 2, 1).reshape(TR * 8, TC)[: m.rows].max())


def assert_decodes(w, m, **kw):
    assert U.supported(m)
    d = U.tbe_decode(m, **kw)
    assert d.shape == w.shape and d.dtype == w.dtype
    assert torch.equal(bits(d), bits(w)), kw


ROWS = dict(layout="rows")
UNITS = dict(layout="units", rows_per_slab=64, num_warps=8)


@pytest.mark.parametrize(
    "dtype,shape,kw",
    [
        (torch.bfloat16, (72, 136), ROWS),
        (torch.bfloat16, (72, 136), UNITS),
        (torch.float16, (66, 80), dict(layout="rows", block_rows=4)),
        (torch.float16, (66, 80), dict(layout="units", rows_per_slab=16)),
    ],
    ids=str,
)
def test_fallback_heavy_weights_take_the_slow_path_and_decode_bit_exact(dtype, shape, kw):
    w = hard_weights(shape, dtype, seed=1)
    m = tbe_encode_torch(w)
    assert most_fallbacks_in_a_unit(m) > 4  # some tile row loads fallbacks one by one
    assert_decodes(w, m, **kw)


@pytest.mark.parametrize(
    "shape,kw", [((16, 64), ROWS), ((8, 72), dict(layout="units", rows_per_slab=16))], ids=str
)
def test_window_base_minus_one_decodes_bit_exact(shape, kw):
    w = low_exponents(shape)
    m = tbe_encode_torch(w)
    assert m.base == -1
    assert_decodes(w, m, **kw)


def test_partial_blocks_leading_dims_and_gaussian_weights_decode_bit_exact():
    w = hard_weights((3, 2, 24), torch.bfloat16, seed=2)  # 6 rows, 24 columns: one block
    assert_decodes(w, tbe_encode_torch(w), **ROWS)
    g = (torch.randn(64, 128, generator=torch.Generator().manual_seed(3)) * 0.02).to(torch.bfloat16)
    m = tbe_encode_torch(g)
    assert most_fallbacks_in_a_unit(m) <= 4  # the fast path only
    assert_decodes(g, m, **ROWS)


WF = finite(hard_weights((24, 136), torch.bfloat16, seed=4))
MF = tbe_encode_torch(WF)


@pytest.mark.parametrize(
    "N,kw",
    [
        (1, {}),  # auto: fma
        (3, dict(split_k=2, block_rows=2)),  # split-K, two block rows per program
        (9, dict(mode="fma")),  # two FMA passes (8 + 1 tokens)
        (5, dict(mode="decode")),  # decode, then matmul
        (17, dict(mode="dot", split_k=2)),  # 17 tiles: the last pair is half empty
    ],
    ids=str,
)
def test_fused_gemm_modes_match_matmul(N, kw):
    x = torch.randn(N, 136, generator=torch.Generator().manual_seed(N)).to(torch.bfloat16)
    y = U.tbe_linear(x, MF, out_dtype=torch.float32, **kw)
    assert y.shape == (N, 24) and y.dtype == torch.float32
    assert_gemm_close(y, x.float(), WF)


def test_fp16_fused_gemm_and_output_dtype():
    h = finite(hard_weights((20, 64), torch.float16, seed=5))
    m = tbe_encode_torch(h)
    x = torch.randn(8, 64, generator=torch.Generator().manual_seed(5)).to(torch.float16)
    y32 = U.tbe_linear(x, m, out_dtype=torch.float32)
    assert_gemm_close(y32, x.float(), h)
    y = U.tbe_linear(x, m)  # x.dtype: one rounding of the fp32 result
    assert y.dtype == torch.float16 and torch.equal(y, y32.to(torch.float16))


def test_leading_dims_and_no_tokens():
    x3 = torch.randn(2, 3, 136, generator=torch.Generator().manual_seed(6)).to(torch.bfloat16)
    assert U.tbe_linear(x3, MF).shape == (2, 3, 24)
    assert U.tbe_linear(x3[:0], MF).shape == (0, 3, 24)


ONE_D = tbe_encode_torch(torch.randn(100).to(torch.bfloat16))
ODD_C = tbe_encode_torch(torch.randn(4, 12).to(torch.bfloat16))
X = torch.zeros(2, 136, dtype=torch.bfloat16)


def test_supported_needs_2d_weights_with_whole_tile_rows():
    assert U.supported(MF)
    assert not U.supported(ONE_D) and not U.supported(ODD_C)


@pytest.mark.parametrize(
    "err,call",
    [
        (InputError, lambda: U.tbe_decode(ONE_D)),
        (InputError, lambda: U.tbe_decode(ODD_C)),
        (InputError, lambda: U.tbe_decode(WF)),
        (ConfigError, lambda: U.tbe_decode(MF, layout="cols")),
        (ConfigError, lambda: U.tbe_decode(MF, layout="units", rows_per_slab=8)),
        (ConfigError, lambda: U.tbe_decode(MF, block_rows=3)),
        (ConfigError, lambda: U.tbe_decode(MF, num_warps=3)),
        (ConfigError, lambda: U.tbe_linear(X, MF, mode="mma")),
        (ConfigError, lambda: U.tbe_linear(X, MF, split_k=0)),
        (InputError, lambda: U.tbe_linear(X.half(), MF)),
        (InputError, lambda: U.tbe_linear(torch.zeros(129, 136, dtype=torch.bfloat16), MF)),
        (InputError, lambda: U.tbe_linear(torch.zeros(2, 12, dtype=torch.bfloat16), ODD_C)),
    ],
    ids=[
        "1-d",
        "cols%8",
        "tensor",
        "layout",
        "slab",
        "block_rows",
        "warps",
        "mode",
        "split_k",
        "dtype",
        "tokens",
        "linear cols%8",
    ],
)
def test_bad_inputs_and_settings_raise_typed_errors(err, call):
    with pytest.raises(err):
        call()


@pytest.mark.slow
@pytest.mark.parametrize("kw", [ROWS, dict(layout="units", rows_per_slab=32)], ids=str)
def test_every_bf16_pattern_decodes_bit_exact(kw):
    w = all_patterns(torch.bfloat16)
    m = tbe_encode_torch(w)
    assert m.base == -1
    assert_decodes(w, m, **kw)


@pytest.mark.slow
@pytest.mark.parametrize(
    "dtype,shape,kw",
    [
        (torch.bfloat16, (72, 136), dict(layout="rows", block_rows=2)),
        (torch.float16, (130, 200), dict(layout="rows", block_rows=4)),
        (torch.float16, (130, 200), dict(layout="units", rows_per_slab=32)),
        (torch.bfloat16, (64, 128), dict(layout="units", rows_per_slab=32)),
    ],
    ids=str,
)
def test_more_shapes_and_configs_decode_bit_exact(dtype, shape, kw):
    w = hard_weights(shape, dtype, seed=7)
    assert_decodes(w, tbe_encode_torch(w), **kw)
