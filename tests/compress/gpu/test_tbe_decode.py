"""The block decode kernel (``tbe_decode``) under Triton's interpreter: bit-exact output."""

import pytest
import torch

pytest.importorskip("triton")

from moeflow.compress.gpu import TBEMatrix, tbe_decode, tbe_encode_torch  # noqa: E402
from moeflow.errors import InputError  # noqa: E402
from tests.compress.gpu._weights import all_patterns, bits, hard_weights, low_exponents  # noqa: E402

# partial blocks in both dimensions, a single tile, one row, 1-D and 3-D tensors, empty
SHAPES = [(70, 130), (8, 8), (1, 200), (200,), (5,), (3, 4, 9), (0,)]


def assert_decodes(w: torch.Tensor, m: TBEMatrix) -> None:
    d = tbe_decode(m)
    assert d.shape == w.shape and d.dtype == w.dtype
    assert torch.equal(bits(d), bits(w))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_fallback_heavy_weights_decode_bit_exact(dtype, shape):
    w = hard_weights(shape, dtype, seed=sum(shape))
    assert_decodes(w, tbe_encode_torch(w))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_gaussian_weights_decode_bit_exact(dtype):
    w = (torch.randn(64, 192, generator=torch.Generator().manual_seed(1)) * 0.02).to(dtype)
    m = tbe_encode_torch(w)
    assert int(m.fb_off[-1]) < w.numel() // 20  # over 95% covered: the common case
    assert_decodes(w, m)


def test_window_base_minus_one_decodes_bit_exact():
    w = low_exponents((40, 72))
    m = tbe_encode_torch(w)
    assert m.base == -1
    assert_decodes(w, m)


def test_set_bits_in_padding_positions_are_ignored():
    w = hard_weights((70, 130), torch.bfloat16)
    m = tbe_encode_torch(w)
    tile = 16  # tile row 0, tile column 16: columns 128..135, of which 130..135 are padding
    m.planes = m.planes.clone()
    m.planes[tile * 3 * 2] |= 1 << 5  # row 0, column 133 of plane 0
    assert_decodes(w, m)


def test_decode_takes_only_a_tbe_matrix():
    with pytest.raises(InputError, match="TBEMatrix"):
        tbe_decode(torch.ones(3))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_every_bit_pattern_decodes_bit_exact(dtype):
    # NaN payloads, infinities, subnormals; cheap here (16 blocks), so not marked slow
    w = all_patterns(dtype)
    assert_decodes(w, tbe_encode_torch(w))
