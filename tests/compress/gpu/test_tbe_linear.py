"""The fused decompress-GEMM (``tbe_linear``) under Triton's interpreter, and its typed errors."""

import pytest
import torch

pytest.importorskip("triton")

from moeflow.compress.gpu import MAX_TOKENS, tbe_decode, tbe_encode_torch, tbe_linear  # noqa: E402
from moeflow.errors import ConfigError, InputError  # noqa: E402
from tests.compress.gpu._weights import assert_gemm_close, bits, finite, hard_weights  # noqa: E402


def weight(shape, dtype, seed=0):
    """A fallback-heavy weight with finite products, and its TBE form on the CPU."""
    w = finite(hard_weights(shape, dtype, seed))
    return w, tbe_encode_torch(w)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize(
    "shape,N,split_k",
    [
        ((96, 200), 1, None),  # default split-K: 4 K blocks over 2 block rows
        ((96, 200), 5, 2),  # ragged K split (2 + 2 blocks) and partial last block
        ((70, 130), 17, 1),  # more tokens than one 16-row MMA tile; partial row block
        ((8, 64), 3, 3),  # more splits asked than K blocks: clipped to 1
    ],
    ids=str,
)
def test_fused_gemm_matches_matmul_on_the_decoded_weight(dtype, shape, N, split_k):
    w, m = weight(shape, dtype, seed=N)
    w_dec = tbe_decode(m)
    assert torch.equal(bits(w_dec), bits(w))
    x = torch.randn(N, shape[1], generator=torch.Generator().manual_seed(N)).to(dtype)
    y = tbe_linear(x, m, split_k=split_k)
    assert y.shape == (N, shape[0]) and y.dtype == dtype
    assert_gemm_close(y, x, w_dec)


def test_leading_dims_non_contiguous_rows_and_no_tokens():
    w, m = weight((40, 72), torch.bfloat16)
    g = torch.Generator().manual_seed(3)
    x3 = torch.randn(2, 3, 72, generator=g).to(torch.bfloat16)
    y3 = tbe_linear(x3, m)
    assert y3.shape == (2, 3, 40)
    assert torch.equal(y3.reshape(6, 40), tbe_linear(x3.reshape(6, 72), m))
    xt = torch.randn(72, 4, generator=g).to(torch.bfloat16).t()  # rows with stride 1 apart
    assert_gemm_close(tbe_linear(xt, m), xt, w)
    y0 = tbe_linear(x3[:0], m)
    assert y0.shape == (0, 3, 40) and y0.dtype == torch.bfloat16


def test_num_warps_changes_nothing_but_the_launch():
    w, m = weight((64, 128), torch.float16)
    x = torch.randn(4, 128, generator=torch.Generator().manual_seed(4)).to(torch.float16)
    assert torch.equal(
        tbe_linear(x, m, split_k=1, num_warps=8), tbe_linear(x, m, split_k=1, num_warps=4)
    )


_W = tbe_encode_torch(
    (torch.randn(24, 40, generator=torch.Generator().manual_seed(0)) * 0.02).to(torch.bfloat16)
)


@pytest.mark.parametrize(
    "bad",
    [
        torch.zeros(3, 40, dtype=torch.float16),  # dtype
        torch.zeros(3, 41, dtype=torch.bfloat16),  # in_features
        torch.zeros(MAX_TOKENS + 1, 40, dtype=torch.bfloat16),  # not skinny
        torch.zeros(3, 40, dtype=torch.bfloat16, device="meta"),  # device
        torch.zeros((), dtype=torch.bfloat16),  # no feature dimension
        "not a tensor",
    ],
    ids=["dtype", "in_features", "tokens", "device", "0-d", "str"],
)
def test_bad_activations_raise_input_error(bad):
    with pytest.raises(InputError):
        tbe_linear(bad, _W)


def test_weights_that_are_not_matrices_raise_input_error():
    m3 = tbe_encode_torch(torch.zeros(2, 3, 8, dtype=torch.bfloat16))
    with pytest.raises(InputError, match="2-D"):
        tbe_linear(torch.zeros(1, 8, dtype=torch.bfloat16), m3)
    with pytest.raises(InputError, match="TBEMatrix"):
        tbe_linear(torch.zeros(1, 40, dtype=torch.bfloat16), torch.zeros(24, 40))


@pytest.mark.parametrize(
    "kw,field",
    [
        (dict(split_k=0), "split_k"),
        (dict(split_k=1.5), "split_k"),
        (dict(num_warps=3), "num_warps"),
    ],
)
def test_bad_launch_settings_raise_config_error(kw, field):
    with pytest.raises(ConfigError) as e:
        tbe_linear(torch.zeros(1, 40, dtype=torch.bfloat16), _W, **kw)
    assert e.value.field == field
