"""Bad inputs to the fused TBE GEMMs raise InputError before any kernel launches."""

import pytest
import torch

from moeflow.compress.triton_tbe import MAX_TOKENS, TBEMatrix, skinny_input
from moeflow.compress import triton_tbe_rowpop as rowpop, triton_tbe_slab as slab
from moeflow.errors import InputError

W = (torch.randn(24, 40, generator=torch.Generator().manual_seed(0)) * 0.02).to(torch.bfloat16)
M = TBEMatrix.from_tensor(W, device="cpu")


def test_shapes_and_views():
    lead, x2 = skinny_input(torch.zeros(2, 3, 40, dtype=torch.bfloat16), M)
    assert lead == (2, 3) and x2.shape == (6, 40) and x2.stride(-1) == 1
    xt = torch.zeros(40, 5, dtype=torch.bfloat16).t()  # non-contiguous rows
    assert skinny_input(xt, M)[1].is_contiguous()


@pytest.mark.parametrize("fn", [slab.tbe_linear, rowpop.tbe_linear])
@pytest.mark.parametrize("bad", [
    torch.zeros(3, 40, dtype=torch.float16),              # dtype
    torch.zeros(3, 41, dtype=torch.bfloat16),             # in_features
    torch.zeros(MAX_TOKENS + 1, 40, dtype=torch.bfloat16),  # not skinny
    "not a tensor",
])
def test_bad_activations_raise(fn, bad):
    with pytest.raises(InputError):
        fn(bad, M)


def test_non_matrix_weight_raises():
    m3 = TBEMatrix.from_tensor(torch.zeros(2, 3, 8, dtype=torch.bfloat16), device="cpu")
    with pytest.raises(InputError):
        slab.tbe_linear(torch.zeros(1, 8, dtype=torch.bfloat16), m3)
