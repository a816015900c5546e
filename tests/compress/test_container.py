import struct

import numpy as np
import pytest
import torch

from moeflow.compress import CompressedTensor, compress, decompress
from moeflow.compress.container import MAGIC, VERSION
from moeflow.errors import CorruptDataError, InputError


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
        torch.bfloat16
    )
    kept = CompressedTensor.from_tensor(x)
    owner = kept.payload if kept.payload.base is None else kept.payload.base
    assert owner.nbytes == kept.payload.nbytes < x.numel() * 2 * 0.75
    assert kept.to_bytes() == compress(x)


@pytest.mark.parametrize(
    "codec,dtype",
    [
        ("entropy", torch.bfloat16),
        ("entropy", torch.float32),
        ("tbe", torch.float16),
        ("raw", torch.int32),
    ],
)
def test_decompress_into_a_reused_buffer(codec, dtype):
    g = torch.Generator().manual_seed(5)
    x = (torch.randn(33, 70, generator=g) * 100).to(dtype)
    blob = compress(x, codec)
    buf = torch.empty_like(x)
    got = decompress(blob, out=buf)
    assert got is buf and torch.equal(buf.view(-1).view(torch.uint8), x.view(-1).view(torch.uint8))
    y = (torch.randn(33, 70, generator=g) * 100).to(dtype)
    decompress(compress(y, codec), out=buf)  # the same buffer again, other data
    assert torch.equal(buf.view(-1).view(torch.uint8), y.view(-1).view(torch.uint8))


def test_decompress_out_must_fit():
    x = torch.randn(8, 9).to(torch.bfloat16)
    blob = compress(x)
    for bad in (
        torch.empty(9, 8, dtype=torch.bfloat16),
        torch.empty(8, 9),
        torch.empty(9, 8, dtype=torch.bfloat16).t(),
        "buffer",
        torch.empty(8, 9, dtype=torch.bfloat16, requires_grad=True),
    ):
        with pytest.raises(InputError):
            decompress(blob, out=bad)
    with torch.no_grad():  # a parameter-like tensor is fine without autograd
        p = torch.empty(8, 9, dtype=torch.bfloat16, requires_grad=True)
        decompress(blob, out=p)
    assert torch.equal(p.detach().view(torch.int16), x.view(torch.int16))
    empty = torch.empty(0, 4, dtype=torch.bfloat16)
    assert decompress(compress(empty), out=empty) is empty
