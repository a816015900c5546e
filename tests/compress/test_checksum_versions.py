"""Container/checksum versions: version-2 digests are written, version-1 blobs still read."""

import hashlib
import json
import pathlib

import numpy as np
import pytest
import torch

from moeflow.compress import CompressedTensor, compress, decompress
from moeflow.compress.bits import readonly, words_view
from moeflow.compress.checksum import CHECKSUM_VERSION, checksum, digest_range, digest_range_v1
from moeflow.errors import CorruptDataError, InputError

DATA = pathlib.Path(__file__).parent / "data"
V1 = np.load(DATA / "container_v1.npz")  # written by moeflow at commit 9cfc419 (version 1)
V1_META = json.loads((DATA / "container_v1.json").read_text())


def _sha(t: torch.Tensor) -> str:
    return hashlib.sha256(t.contiguous().view(torch.uint8).numpy().tobytes()).hexdigest()


@pytest.mark.parametrize("key", sorted(V1_META))
def test_version1_blobs_still_decode_bit_exactly(key):
    blob = V1[key].tobytes()
    meta = V1_META[key]
    ct = CompressedTensor.from_bytes(blob)  # payload checksum (version 1) verified
    assert ct.version == 1
    t = decompress(blob)
    assert str(t.dtype) == "torch." + meta["dtype"] and list(t.shape) == meta["shape"]
    assert _sha(t) == meta["sha256"]
    assert ct.to_bytes() == blob  # re-serialising keeps version and checksums


@pytest.mark.parametrize("key", sorted(V1_META))
def test_corrupt_version1_blobs_raise(key):
    blob = bytearray(V1[key].tobytes())
    blob[-3] ^= 0x40
    with pytest.raises(CorruptDataError):
        decompress(bytes(blob))
    with pytest.raises(CorruptDataError):
        CompressedTensor.from_bytes(bytes(blob))


def test_new_blobs_are_version_2_and_differ_from_version_1_checksums():
    x = V1_META["entropy_bf16"]
    t = decompress(V1["entropy_bf16"].tobytes())
    blob = compress(t)
    ct = CompressedTensor.from_bytes(blob)
    assert ct.version == CHECKSUM_VERSION == 2 and blob[4:6] == b"\x02\x00"
    assert _sha(decompress(blob)) == x["sha256"]
    old = CompressedTensor.from_bytes(V1["entropy_bf16"].tobytes())
    assert ct.original_checksum != old.original_checksum  # another digest, same bytes
    bits = t.view(torch.int16).numpy().reshape(-1)
    assert checksum(bits, version=1) == old.original_checksum
    assert checksum(bits, version=2) == ct.original_checksum
    with pytest.raises(InputError):
        checksum(bits, version=3)


def _d(buf: np.ndarray, start=0, end=None, seed=0, fn=digest_range) -> int:
    b = readonly(buf)
    return int(fn(b, words_view(b), start, buf.size if end is None else end, seed))


def test_version2_digest_sees_position_length_seed_and_every_bit():
    rng = np.random.default_rng(0)
    buf = rng.integers(0, 256, 4096 + 13, dtype=np.uint8)
    base = _d(buf)
    assert base == _d(buf.copy())
    assert _d(buf, seed=1) != base
    # every prefix length (whole stripes, tail words, tail bytes) gives its own digest
    lengths = list(range(0, 200)) + [4096, 4096 + 13]
    assert len({_d(buf, 0, n) for n in lengths}) == len(lengths)
    # swapping two words of the same lane in different stripes changes the digest
    w = buf[:4096].view(np.uint64).copy()
    w[[3, 3 + 8 * 5]] = w[[3 + 8 * 5, 3]]
    swapped = buf.copy()
    swapped[:4096] = w.view(np.uint8)
    assert not np.array_equal(swapped, buf) and _d(swapped) != base
    # single-bit flips anywhere are seen
    for pos in rng.choice(buf.size, 64, replace=False):
        for bit in (0, 7):
            flipped = buf.copy()
            flipped[pos] ^= 1 << bit
            assert _d(flipped) != base
    # the all-zero input is not a fixed point of the lanes
    z = np.zeros(1024, np.uint8)
    assert _d(z) != _d(z, 0, 1016)
    assert _d(buf) != _d(buf, fn=digest_range_v1)
