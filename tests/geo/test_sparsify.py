"""AdaTopK's codec: error feedback delivers everything eventually, k, exactness at density 1,
checkpointing, and typed errors on bad input."""

from __future__ import annotations

import math
from fractions import Fraction

import pytest
import torch

from moeflow.errors import ConfigError, InputError
from moeflow.geo.sparsify import TopKFeedback, topk_count


def _ints(shape, seed, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(-50, 51, shape, generator=g).to(dtype)


@pytest.mark.parametrize("density", [0.01, 0.1, 0.37, 1.0])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_error_feedback_delivers_the_sum_of_all_inputs(density, dtype):
    # integer-valued inputs make every addition exact, so the invariant holds bit for bit
    codec = TopKFeedback(density)
    shape = (4, 6, 5)
    total_in = torch.zeros(shape, dtype=torch.float64)
    total_out = torch.zeros(shape, dtype=torch.float64)
    for step in range(12):
        x = _ints(shape, step, dtype)
        values, indices = codec.compress(x)
        assert values.dtype == dtype and indices.dtype == torch.int64
        assert values.numel() == indices.numel() == codec.k(x.numel())
        assert torch.equal(indices, indices.sort().values)  # ascending, no repeats
        assert indices.unique().numel() == indices.numel()
        total_in += x.double()
        total_out += TopKFeedback.decompress(values, indices, shape, dtype).double()
    assert torch.equal(total_out + codec.residual.double(), total_in)
    if density < 1:
        assert codec.residual.abs().sum() > 0  # something is still waiting to be sent


def test_sent_entries_are_the_largest_of_input_plus_residual():
    codec = TopKFeedback(0.25)
    x0 = torch.tensor([5.0, -1.0, 0.5, 3.0, -7.0, 2.0, 0.0, 1.5])
    values, indices = codec.compress(x0)
    assert indices.tolist() == [0, 4]
    assert values.tolist() == [5.0, -7.0]
    assert codec.residual.tolist() == [0.0, -1.0, 0.5, 3.0, 0.0, 2.0, 0.0, 1.5]
    # next step: the residual's 3.0 plus 1.0 beats the new 3.5
    x1 = torch.tensor([0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 3.5, 0.0])
    values, indices = codec.compress(x1)
    assert indices.tolist() == [3, 6]
    assert values.tolist() == [4.0, 3.5]


def test_density_one_is_exact():
    codec = TopKFeedback(1.0)
    g = torch.Generator().manual_seed(0)
    for _ in range(3):
        x = torch.randn(3, 7, 11, generator=g)
        values, indices = codec.compress(x)
        assert torch.equal(TopKFeedback.decompress(values, indices, x.shape, x.dtype), x)
        assert torch.count_nonzero(codec.residual) == 0


@pytest.mark.parametrize("numel", [1, 2, 7, 30, 100, 1000, 4097])
@pytest.mark.parametrize("density", [1e-4, 0.01, 0.1, 0.3, 0.5, 0.7, 0.999, 1.0])
def test_k_is_ceil_of_density_times_numel_and_at_least_one(numel, density):
    expected = max(1, math.ceil(Fraction(repr(density)) * numel))
    assert topk_count(density, numel) == expected
    codec = TopKFeedback(density)
    values, _ = codec.compress(torch.arange(numel, dtype=torch.float32))
    assert values.numel() == expected


def test_state_round_trip_continues_the_stream_identically():
    a = TopKFeedback(0.2)
    g = torch.Generator().manual_seed(3)
    xs = [torch.randn(5, 9, generator=g) for _ in range(6)]
    for x in xs[:3]:
        a.compress(x)
    b = TopKFeedback(0.9)
    b.load_state_dict(a.state_dict())
    assert b.density == 0.2
    assert torch.equal(b.residual, a.residual) and b.residual is not a.residual
    for x in xs[3:]:
        va, ia = a.compress(x)
        vb, ib = b.compress(x)
        assert torch.equal(va, vb) and torch.equal(ia, ib)
    assert torch.equal(a.residual, b.residual)
    fresh = TopKFeedback(0.5)
    fresh.load_state_dict(TopKFeedback(0.5).state_dict())  # empty stream round-trips too
    assert fresh.residual is None


def test_density_change_keeps_the_residual():
    codec = TopKFeedback(0.1)
    codec.compress(_ints((10, 10), 0))
    before = codec.residual.clone()
    codec.density = 0.5
    values, _ = codec.compress(torch.zeros(10, 10))
    assert values.numel() == 50
    assert torch.equal(values.abs().sum() + codec.residual.abs().sum(), before.abs().sum())


@pytest.mark.parametrize("bad", [0, 0.0, -0.1, 1.0001, 2, float("nan"), float("inf"), "0.5", True])
def test_density_outside_zero_one_is_a_config_error(bad):
    with pytest.raises(ConfigError, match="density"):
        TopKFeedback(bad)
    codec = TopKFeedback(0.5)
    with pytest.raises(ConfigError, match="density"):
        codec.density = bad
    assert codec.density == 0.5


def test_wrong_inputs_raise_input_errors():
    codec = TopKFeedback(0.5)
    with pytest.raises(InputError, match="floating"):
        codec.compress(torch.arange(6))
    with pytest.raises(InputError, match="Tensor"):
        codec.compress([1.0, 2.0])
    with pytest.raises(InputError, match="no elements"):
        codec.compress(torch.zeros(0, 3))
    codec.compress(torch.ones(2, 3))
    with pytest.raises(InputError, match="shape"):
        codec.compress(torch.ones(3, 2))
    with pytest.raises(InputError, match="dtype"):
        codec.compress(torch.ones(2, 3, dtype=torch.float64))
    v, i = codec.compress(torch.ones(2, 3))  # the stream still works after the refusals
    with pytest.raises(InputError, match="outside"):
        TopKFeedback.decompress(v, i + 6, (2, 3), torch.float32)
    with pytest.raises(InputError, match="int64"):
        TopKFeedback.decompress(v, i.int(), (2, 3), torch.float32)
    with pytest.raises(InputError, match="same length"):
        TopKFeedback.decompress(v[:1], i, (2, 3), torch.float32)
    with pytest.raises(InputError, match="keys"):
        codec.load_state_dict({"density": 0.5})
    with pytest.raises(InputError, match="dtype"):
        codec.load_state_dict({"density": 0.5, "residual": torch.ones(2), "dtype": "int64"})
    with pytest.raises(ConfigError, match="density"):
        codec.load_state_dict({"density": 3.0, "residual": None, "dtype": None})
    assert codec.density == 0.5  # a refused state leaves the codec as it was


def test_without_feedback_is_plain_topk_every_time():
    import torch

    from moeflow.geo.sparsify import TopKFeedback

    fb = TopKFeedback(0.25, feedback=False)
    x = torch.tensor([4.0, -3.0, 2.0, 1.0, 0.5, -0.25, 0.1, 0.0])
    for _ in range(3):  # no residual carried over: the same input gives the same message
        values, indices = fb.compress(x)
        assert indices.tolist() == [0, 1]
        assert values.tolist() == [4.0, -3.0]
        assert fb.residual is None


def test_a_non_contiguous_tensor_is_compressed_in_row_major_order():
    """A tensor crossing a pipeline cut may be a transposed view; its positions are those of
    the row-major flattening, as the receiver and the backward index them."""
    x = torch.randn(6, 5).t()  # (5, 6), not contiguous
    assert not x.is_contiguous()
    for feedback in (False, True):
        fb = TopKFeedback(0.3, feedback=feedback)
        values, positions = fb.compress(x)
        assert torch.equal(values, x.reshape(-1)[positions])
        dense = TopKFeedback.decompress(values, positions, x.shape, x.dtype)
        kept = dense != 0
        assert torch.equal(dense[kept], x[kept])
        assert x[kept].abs().min() >= x[~kept].abs().max()  # the largest entries
        fb.compress(x)  # and again with the residual of the first call
