import struct

import numpy as np
import pytest
import torch

from moeflow.compress import CompressedTensor, compress, decompress
from moeflow.compress.container import MAGIC, VERSION
from moeflow.errors import CorruptDataError


def test_header_fields_and_bytes_round_trip():
    x = (torch.randn(33, 65) * 0.02).to(torch.bfloat16)
    ct = CompressedTensor.from_tensor(x, "tbe")
    blob = ct.to_bytes()
    assert blob[:4] == MAGIC and struct.unpack_from("<H", blob, 4)[0] == VERSION
    back = CompressedTensor.from_bytes(blob)
    assert (back.codec, back.dtype, back.shape) == ("tbe", "bfloat16", (33, 65))
    assert back.payload_checksum == ct.payload_checksum
    assert back.original_checksum == ct.original_checksum
    assert back.nbytes == len(blob) and abs(back.ratio - x.numel() * 2 / len(blob)) < 1e-12
    assert torch.equal(back.to_tensor(), x)
    assert torch.equal(decompress(back), x)  # a CompressedTensor is accepted too


def test_checksums_cover_payload_and_original():
    x = torch.randn(1000) * 0.02
    a = CompressedTensor.from_tensor(x, "entropy")
    y = x.clone()
    y[500] = 7.0
    b = CompressedTensor.from_tensor(y, "entropy")
    assert a.original_checksum != b.original_checksum
    assert a.payload_checksum != b.payload_checksum
    # swap in the other tensor's original checksum: decode must refuse
    a.original_checksum = b.original_checksum
    with pytest.raises(CorruptDataError):
        a.to_tensor()


def test_version_and_magic_checked():
    blob = bytearray(compress(torch.ones(8)))
    bad = bytearray(blob)
    bad[:4] = b"NOPE"
    with pytest.raises(CorruptDataError, match="magic"):
        decompress(bytes(bad))
    bad = bytearray(blob)
    bad[4] = 99
    with pytest.raises(CorruptDataError, match="version"):
        decompress(bytes(bad))


def test_from_bytes_does_not_copy_and_accepts_numpy():
    blob = compress((torch.randn(4096) * 0.02).to(torch.float16), "entropy")
    arr = np.frombuffer(blob, np.uint8)
    ct = CompressedTensor.from_bytes(arr)
    assert np.shares_memory(ct.payload, arr)
    assert ct.dtype == "float16" and ct.shape == (4096,)


def test_payload_is_exactly_sized():
    """The encoder writes chunks straight into a payload of their planned size: a kept
    CompressedTensor holds only its compressed bytes, not a work buffer."""
    x = (torch.randn(600, 500, generator=torch.Generator().manual_seed(3)) * 0.02).to(
        torch.bfloat16)
    kept = CompressedTensor.from_tensor(x)
    owner = kept.payload if kept.payload.base is None else kept.payload.base
    assert owner.nbytes == kept.payload.nbytes < x.numel() * 2 * 0.75
    assert kept.to_bytes() == compress(x)
