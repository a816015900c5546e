"""Corrupt or truncated bytes raise CorruptDataError: never a crash, never wrong data."""

import os

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from moeflow.compress import CompressedTensor, compress, decompress
from moeflow.errors import CorruptDataError

_g = torch.Generator().manual_seed(0)
_X = {
    "entropy": (torch.randn(70, 53, generator=_g) * 0.02).to(torch.bfloat16),
    "tbe": (torch.randn(70, 53, generator=_g) * 0.02).to(torch.bfloat16),
    "raw": torch.arange(100, dtype=torch.int64),
}
_X["tbe"][3, 4] = 1e4  # a fallback value
_X["entropy16"] = (torch.randn(3000, generator=_g) * 0.02).to(torch.float16)
_X["entropy32"] = torch.randn(2000, generator=_g) * 0.02
_BLOBS = {k: compress(v, "entropy" if k.startswith("entropy") else k) for k, v in _X.items()}
FUZZ = settings(
    max_examples=int(os.environ.get("MOEFLOW_FUZZ_EXAMPLES", "60")),
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)


def _same(t, ref):
    return torch.equal(
        t.contiguous().view(-1).view(torch.uint8), ref.contiguous().view(-1).view(torch.uint8)
    )


@pytest.mark.parametrize("key", sorted(_BLOBS))
def test_clean_blobs_decode(key):
    assert _same(decompress(_BLOBS[key]), _X[key])


@FUZZ
@given(key=st.sampled_from(sorted(_BLOBS)), data=st.data())
def test_flipped_bytes_raise(key, data):
    blob = bytearray(_BLOBS[key])
    where = data.draw(st.sets(st.integers(0, len(blob) - 1), min_size=1, max_size=4))
    for i in where:  # distinct positions, so flips cannot cancel
        blob[i] ^= data.draw(st.integers(1, 255))
    with pytest.raises(CorruptDataError):
        decompress(bytes(blob))


@FUZZ
@given(key=st.sampled_from(sorted(_BLOBS)), cut=st.integers(0, 10_000))
def test_truncated_or_extended_blobs_raise(key, cut):
    blob = _BLOBS[key]
    cut = cut % len(blob)
    with pytest.raises(CorruptDataError):
        decompress(blob[:cut])
    with pytest.raises(CorruptDataError):
        decompress(blob + b"\0" * (1 + cut % 9))


@FUZZ
@given(key=st.sampled_from(sorted(_BLOBS)), data=st.data())
def test_decoders_survive_corrupt_payloads_behind_a_valid_checksum(key, data):
    """Skip the payload checksum (as a forged blob would): the decoders must still only
    raise CorruptDataError or return the exact original, and must not crash."""
    ct = CompressedTensor.from_bytes(_BLOBS[key])
    payload = ct.payload.copy()
    for i in data.draw(st.sets(st.integers(0, payload.size - 1), min_size=1, max_size=3)):
        payload[i] ^= data.draw(st.integers(1, 255))
    if data.draw(st.booleans()):
        payload = payload[: data.draw(st.integers(0, payload.size))]
    ct.payload = payload
    try:
        out = ct.to_tensor()
    except CorruptDataError:
        return
    assert _same(out, _X[key])


def test_garbage_and_wrong_types():
    for junk in (b"", b"MFZT", b"\0" * 64, np.random.default_rng(0).bytes(500)):
        with pytest.raises(CorruptDataError):
            decompress(junk)
    with pytest.raises(CorruptDataError):
        CompressedTensor.from_bytes(np.zeros((4, 4), np.uint8))
    with pytest.raises(CorruptDataError):  # CorruptDataError is a ValueError
        decompress(_BLOBS["tbe"][:-1])
    assert issubclass(CorruptDataError, ValueError)
