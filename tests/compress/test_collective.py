"""The collective codec: exhaustive bit-exact round trips, ratio against the exponent entropy,
checksums on every message, table choice by scale."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from moeflow.compress import collective as C
from moeflow.compress import entropy
from moeflow.errors import CorruptDataError, InputError

UINT = {torch.bfloat16: torch.int16, torch.float16: torch.int16, torch.float32: torch.int32}


def _bits(t: torch.Tensor) -> np.ndarray:
    u = np.uint16 if t.element_size() == 2 else np.uint32
    return t.contiguous().view(UINT[t.dtype]).numpy().view(u).reshape(-1)


def _roundtrip(t: torch.Tensor, threads=1) -> np.ndarray:
    msg = C.encode(t, threads=threads)
    bits, dtype = C.decode(msg, threads=threads)
    assert dtype == str(t.dtype).removeprefix("torch.")
    np.testing.assert_array_equal(bits, _bits(t))
    return msg


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_every_16bit_pattern_round_trips(dtype):
    """All 65,536 patterns (NaN payloads, infinities, signed zeros, subnormals), alone in one
    message and scattered through Gaussian messages of several scales, so that they take the
    window, ZERO and escape paths of realistic tables."""
    pats = np.arange(1 << 16, dtype=np.uint16)
    every = torch.from_numpy(pats.view(np.int16).copy()).view(dtype)
    _roundtrip(every)
    g = torch.Generator().manual_seed(0)
    for i, part in enumerate(np.array_split(np.random.default_rng(1).permutation(pats), 16)):
        bg = (torch.randn(len(part) * 16, generator=g) * 10.0 ** (i % 8 - 4)).to(dtype)
        mix = _bits(bg).copy()
        mix[::16] = part
        t = torch.from_numpy(mix.view(np.int16).copy()).view(dtype)
        info = C.info(_roundtrip(t))
        assert not info.stored


def test_fp32_patterns_round_trip():
    rng = np.random.default_rng(2)
    special = np.array(
        [0, 0x80000000, 0x7F800000, 0xFF800000, 0x7FC00001, 0x00000001, 0x807FFFFF, 0x7F7FFFFF],
        np.uint32,
    )
    rand = rng.integers(0, 1 << 32, 50_000, dtype=np.uint64).astype(np.uint32)
    bg = _bits(torch.randn(150_000) * 1e-3).copy()
    bg[::3] = rand
    bg[: special.size] = special
    _roundtrip(torch.from_numpy(bg.view(np.int32).copy()).view(torch.float32))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_multi_block_threads_give_the_same_message(dtype):
    x = (torch.randn(3 * (1 << 17) + 123) * 0.05).to(dtype)
    one = _roundtrip(x, threads=1)
    two = _roundtrip(x, threads=2)
    np.testing.assert_array_equal(one, two)


def test_empty_and_tiny_messages():
    for n in (0, 1, 7):
        for dt in (torch.bfloat16, torch.float32):
            _roundtrip(torch.randn(n).to(dt))


@pytest.mark.parametrize(
    "dist,scale", [("gauss", 0.02), ("gauss", 3e-5), ("laplace", 1.0), ("student3", 0.1)]
)
def test_ratio_within_two_percent_of_the_exponent_entropy_bound(dist, scale):
    """ZipCCL's premise: a static table picked from the scale codes the exponents within 2%
    of the message's empirical exponent entropy (and matches per-message Huffman tables)."""
    g = torch.Generator().manual_seed(3)
    n = 1 << 18
    if dist == "gauss":
        x = torch.randn(n, generator=g)
    elif dist == "laplace":
        x = torch.distributions.Laplace(0.0, 1.0).sample((n,))
    else:
        x = torch.distributions.StudentT(3.0).sample((n,))
    x = (x * scale).bfloat16()
    msg = C.encode(x)
    ratio = C.info(msg).ratio
    _h, bound = C.exponent_entropy_bound(x)
    assert ratio >= 0.98 * bound, (ratio, bound)
    assert ratio <= bound * 1.001  # a lossless exponent code cannot beat the entropy
    payload, _ = entropy.encode(_bits(x), "bfloat16")
    assert ratio >= 0.98 * (2 * n / payload.size)


def test_incompressible_message_is_stored_and_checked():
    rng = np.random.default_rng(4)
    x = torch.from_numpy(rng.integers(-(2**15), 2**15, 5000, dtype=np.int16)).view(torch.bfloat16)
    msg = _roundtrip(x)
    assert C.info(msg).stored
    assert msg.size == 2 * 5000 + 40
    bad = msg.copy()
    bad[100] ^= 1
    with pytest.raises(CorruptDataError, match="checksum"):
        C.decode(bad)


def test_every_corrupted_or_truncated_message_is_refused():
    x = (torch.randn(70_000) * 0.1).bfloat16()
    msg = C.encode(x)
    rng = np.random.default_rng(5)
    for pos in list(range(0, 48)) + list(rng.integers(0, msg.size, 64)):
        bad = msg.copy()
        bad[pos] ^= 1 << int(rng.integers(0, 8))
        with pytest.raises(CorruptDataError):
            C.decode(bad)
    for cut in (0, 5, 39, msg.size // 2, msg.size - 1):
        with pytest.raises(CorruptDataError):
            C.decode(msg[:cut])
    with pytest.raises(CorruptDataError, match="expected"):
        C.decode(msg, expect=("bfloat16", 69_999))


def test_table_follows_the_scale():
    """Scaling a tensor by 2^k moves ``base`` by k and keeps the table and the code size."""
    x = torch.randn(20_000)
    c0 = C.choose(_bits(x.bfloat16()), "bfloat16")
    for k in (-9, -1, 3):
        xk = (x * 2.0**k).bfloat16()
        ck = C.choose(_bits(xk), "bfloat16")
        assert (ck.shape, ck.offset, ck.zero) == (c0.shape, c0.offset, c0.zero)
        assert ck.base == c0.base + k
        assert C.encode(xk).size == C.encode(x.bfloat16()).size
    assert c0.shape == C.SHAPES.index(2.0)  # the Gaussian sample picks the Gaussian table
    lap = torch.distributions.Laplace(0.0, 1.0).sample((20_000,)).bfloat16()
    assert C.choose(_bits(lap), "bfloat16").shape == C.SHAPES.index(1.0)


def test_zero_heavy_messages_pick_a_zero_class():
    x = torch.randn(40_000)
    x[:20_000] = 0
    ch = C.choose(_bits(x.bfloat16()), "bfloat16")
    assert C.ZERO_CLASSES[ch.zero] == 0.5
    ratio = C.info(_roundtrip(x.bfloat16())).ratio
    assert ratio >= 0.98 * C.exponent_entropy_bound(x.bfloat16())[1]
    _roundtrip(torch.zeros(1000, dtype=torch.bfloat16))


def test_gaussian_family_only():
    x = (torch.randn(1 << 16) * 0.3).bfloat16()
    ch = C.choose(_bits(x), "bfloat16", shapes=C.GAUSSIAN)
    assert ch.shape == 0
    msg = C.encode(x, shapes=C.GAUSSIAN)
    assert C.info(msg).choice.shape == 0
    np.testing.assert_array_equal(C.decode(msg)[0], _bits(x))


def test_expected_ratio_predicts_the_real_one():
    x = (torch.randn(1 << 17) * 0.01).bfloat16()
    assert abs(C.expected_ratio(x) - C.info(C.encode(x)).ratio) < 0.02


def test_tensor_helpers_and_bad_input():
    x = torch.randn(3, 5, 7).bfloat16()
    y = C.decode_tensor(C.encode_tensor(x), (3, 5, 7), "bfloat16")
    assert torch.equal(y.view(torch.int16), x.view(torch.int16))
    with pytest.raises(CorruptDataError):
        C.decode_tensor(C.encode_tensor(x), (3, 5, 7), "float16")
    with pytest.raises(InputError):
        C.encode(torch.arange(4))
    with pytest.raises(InputError):
        C.encode(np.zeros(4, np.uint16))


def test_crafted_messages_with_a_valid_checksum_fail_typed():
    """A message whose body was changed and re-checksummed (a crafted message, not transit
    noise) still cannot crash the decoder: it raises CorruptDataError or decodes to some
    bits (the entropy decoder bounds-checks every read)."""
    import struct

    from moeflow.compress.checksum import checksum

    x = (torch.randn(3000) * 0.1).bfloat16()
    msg = C.encode(x)
    rng = np.random.default_rng(6)
    for pos in list(range(32, 80)) + list(rng.integers(32, msg.size - 8, 40)):
        bad = msg.copy()
        bad[pos] ^= 0xFF
        bad[-8:] = np.frombuffer(struct.pack("<Q", checksum(bad[:-8])), np.uint8)
        try:
            bits, _ = C.decode(bad)
        except CorruptDataError:
            continue
        assert bits.size == 3000
