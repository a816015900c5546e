"""``CompressedTensor``: the self-describing, checksummed container of one compressed tensor.

Layout (little-endian)::

    b"MFZT" | u16 version | u8 codec | u8 dtype | u8 ndim | 3 x u8 0 | u64 payload_len
    | u64 payload_checksum | u64 original_checksum | u64 shape[ndim] | u32 crc32(header) | u32 0
    | payload

Checksums are moeflow's mfx64 (``checksum.checksum``): one over the payload and one over the
original bytes, so a corrupt blob raises ``CorruptDataError`` instead of returning wrong data.
Version 2 (written now) uses the version-2 segment digest; version-1 blobs are still read and
verified with the version-1 digest.
``from_bytes`` checks the payload checksum by default (``moeflow inspect --verify`` checks
both). ``to_bits`` / ``decompress`` always check the original checksum of what they decoded;
``decompress`` skips the payload checksum, which would cost a second pass over the compressed
bytes and add no safety: both decoders bounds-check every read and validate their stream
structure (the corruption fuzz tests feed them corrupt payloads directly), and a payload that
still decodes to different bits fails the original checksum. The entropy decoder computes
that checksum in its decoding threads while the data is in cache.
"""

from __future__ import annotations

import struct
import zlib
from dataclasses import dataclass

import numpy as np

from moeflow.compress import entropy, tbe
from moeflow.compress.bits import (
    ALL_DTYPES,
    DTYPE_CODES,
    DTYPE_ITEMSIZE,
    FLOAT_SPECS,
    MAX_NDIM,
    UINT,
    bits_to_tensor,
    check_shape,
    copy_into,
    numel,
    out_bits,
    tensor_to_bits,
)
from moeflow.compress.checksum import checksum, combine_digests
from moeflow.errors import ConfigError, CorruptDataError, InputError

MAGIC = b"MFZT"
VERSION = 2  # written; the container version is also the checksum version (see checksum)
READ_VERSIONS = (1, 2)
CODECS = {"raw": 0, "entropy": 1, "tbe": 2}
CODEC_NAMES = {v: k for k, v in CODECS.items()}
_ALIASES = {"huffman": "entropy", "zipserv": "tbe", "stored": "raw"}
_FIXED = struct.Struct("<4sHBBB3xQQQ")
# Every codec stores at least one byte per two original bytes (raw: 1:1; entropy: the raw
# sign/mantissa byte(s) of every value; TBE: a byte per covered and two per fallback value),
# so a header claiming more is crafted, and is refused before anything is allocated.
MAX_EXPANSION = 2
_EMPTY_PAYLOAD = 64  # bound on a codec's payload for an empty tensor (headers only)

__all__ = [
    "CODECS",
    "CompressedTensor",
    "MAGIC",
    "MAX_NDIM",
    "VERSION",
    "compress",
    "decompress",
    "header_nbytes",
    "parse_header",
    "resolve_codec",
    "tensor_to_bits",
    "bits_to_tensor",
]


def resolve_codec(codec: str, dtype: str) -> str:
    """Canonical codec name; ``"auto"`` is entropy for floats and raw otherwise."""
    name = _ALIASES.get(codec, codec)
    if name == "auto":
        return "entropy" if dtype in FLOAT_SPECS else "raw"
    if name not in CODECS:
        raise ConfigError("codec", codec, f"one of {sorted(CODECS) + ['auto'] + sorted(_ALIASES)}")
    if name == "entropy" and dtype not in FLOAT_SPECS:
        raise InputError(f"entropy codec takes {sorted(FLOAT_SPECS)}, not {dtype!r}; use 'raw'")
    if name == "tbe" and dtype not in tbe.TBE_DTYPES:
        raise InputError(f"TBE codec takes {list(tbe.TBE_DTYPES)}, not {dtype!r}")
    return name


@dataclass
class CompressedTensor:
    codec: str
    dtype: str
    shape: tuple[int, ...]
    payload: np.ndarray  # uint8
    payload_checksum: int
    original_checksum: int
    version: int = VERSION  # container (and checksum) version

    # ------------------------------------------------------------------ properties
    @property
    def numel(self) -> int:
        return numel(self.shape)

    @property
    def original_nbytes(self) -> int:
        return self.numel * DTYPE_ITEMSIZE[self.dtype]

    @property
    def nbytes(self) -> int:
        return header_nbytes(len(self.shape)) + self.payload.size

    @property
    def ratio(self) -> float:
        """Original bytes over container bytes (header included)."""
        return self.original_nbytes / self.nbytes

    # ------------------------------------------------------------------ encode
    @classmethod
    def from_bits(
        cls, bits: np.ndarray, dtype: str, shape, codec: str = "entropy", threads: int | None = None
    ) -> CompressedTensor:
        """Compress raw value bits (flat, the unsigned int of the dtype's width)."""
        shape = check_shape(tuple(shape))  # the rule parse_header applies when reading
        codec = resolve_codec(codec, dtype)
        bits = np.ascontiguousarray(bits).reshape(-1)
        if bits.nbytes != numel(shape) * DTYPE_ITEMSIZE[dtype]:
            raise InputError(f"{bits.nbytes} bytes do not hold a {dtype} tensor of shape {shape}")
        if codec == "entropy":
            payload, seg = entropy.encode(bits, dtype, threads)
            original = combine_digests(seg, bits.nbytes)
        elif codec == "tbe":
            payload = tbe.encode(bits, dtype, shape, threads)
            original = checksum(bits, threads)
        else:
            payload = bits.view(np.uint8).copy()
            original = checksum(payload, threads)
        return cls(codec, dtype, shape, payload, checksum(payload, threads), original)

    @classmethod
    def from_tensor(cls, t, codec: str = "entropy", threads: int | None = None):
        bits, dtype, shape = tensor_to_bits(t)
        return cls.from_bits(bits, dtype, shape, codec, threads)

    # ------------------------------------------------------------------ bytes
    def header_bytes(self) -> bytes:
        head = _FIXED.pack(
            MAGIC,
            self.version,
            CODECS[self.codec],
            DTYPE_CODES[self.dtype],
            len(self.shape),
            self.payload.size,
            self.payload_checksum,
            self.original_checksum,
        )
        head += struct.pack(f"<{len(self.shape)}Q", *self.shape)
        return head + struct.pack("<II", zlib.crc32(head), 0)

    def to_bytes(self) -> bytes:
        # one copy of the payload (bytes + bytes would make two)
        return b"".join([self.header_bytes(), memoryview(np.ascontiguousarray(self.payload))])

    @classmethod
    def from_bytes(cls, blob, verify: bool = True) -> CompressedTensor:
        """Parse a blob (bytes-like or uint8 array, exactly one container; not copied)."""
        buf = blob if isinstance(blob, np.ndarray) else np.frombuffer(blob, np.uint8)
        if buf.dtype != np.uint8 or buf.ndim != 1:
            raise CorruptDataError("a compressed tensor is a 1-D byte buffer")
        hlen, plen, ct = parse_header(buf)
        if buf.size != hlen + plen:
            raise CorruptDataError(f"blob is {buf.size} bytes; header + payload say {hlen + plen}")
        ct.payload = buf[hlen:]
        if verify:
            ct.verify_payload()
        return ct

    def verify_payload(self, threads: int | None = None) -> None:
        """Check the payload checksum; raises ``CorruptDataError`` on a mismatch."""
        if checksum(self.payload, threads, self.version) != self.payload_checksum:
            raise CorruptDataError("payload checksum mismatch: the compressed bytes are corrupt")

    # ------------------------------------------------------------------ decode
    def to_bits(self, threads: int | None = None, out: np.ndarray | None = None) -> np.ndarray:
        """Decoded raw bits (flat), verified against the original checksum. ``out`` (flat,
        contiguous, the dtype's unsigned int) receives them if given; the entropy codec
        decodes straight into it."""
        n = self.numel
        if self.codec == "entropy":
            bits, seg = entropy.decode(self.payload, self.dtype, n, threads, self.version, out)
            got = combine_digests(seg, bits.nbytes, self.version)
        elif self.codec == "tbe":
            bits = tbe.decode(self.payload, self.dtype, self.shape, threads)
            if out is not None:
                bits = copy_into(bits, out)
            got = checksum(bits, threads, self.version)
        else:
            if self.payload.size != self.original_nbytes:
                raise CorruptDataError(
                    f"raw payload is {self.payload.size} bytes, expected {self.original_nbytes}"
                )
            bits = (
                self.payload.copy()
                if out is None
                else copy_into(self.payload.view(UINT[DTYPE_ITEMSIZE[self.dtype]]), out)
            )
            got = checksum(bits, threads, self.version)
        if got != self.original_checksum:
            raise CorruptDataError(
                "decoded data does not match the original checksum: "
                "the compressed bytes are corrupt"
            )
        return bits

    def to_tensor(self, threads: int | None = None, out=None):
        """The decoded tensor; with ``out`` (a contiguous CPU tensor of this dtype and shape)
        the data is decoded into it and ``out`` is returned, so a buffer can be reused
        without fresh allocations. On ``CorruptDataError`` its contents are undefined."""
        if out is None:
            return bits_to_tensor(self.to_bits(threads), self.dtype, self.shape)
        self.to_bits(threads, out_bits(out, self.dtype, self.shape))
        return out


def header_nbytes(ndim: int) -> int:
    """Bytes of the container header of a tensor with ``ndim`` dimensions."""
    return _FIXED.size + 8 * ndim + 8


def parse_header(buf: np.ndarray) -> tuple[int, int, CompressedTensor]:
    """(header length, payload length, CompressedTensor with an empty payload) of a blob.

    The one reader of the container header: every field is checked (magic, version, codec,
    dtype, ndim, shape, CRC) and the payload length against the blob's real size and the
    codecs' largest expansion, so nothing sized by the header is allocated before that."""
    if buf.size < _FIXED.size + 8:
        raise CorruptDataError(f"blob of {buf.size} bytes is shorter than a header")
    magic, version, codec, dcode, ndim, plen, pck, ock = _FIXED.unpack_from(buf, 0)
    if magic != MAGIC:
        raise CorruptDataError(f"bad magic {magic!r}: not a moeflow compressed tensor")
    if version not in READ_VERSIONS:
        raise CorruptDataError(f"container version {version}; this moeflow reads {READ_VERSIONS}")
    if codec not in CODEC_NAMES or dcode not in ALL_DTYPES or ndim > MAX_NDIM:
        raise CorruptDataError(f"header names codec {codec}, dtype {dcode}, ndim {ndim}")
    hlen = header_nbytes(ndim)
    if buf.size < hlen:
        raise CorruptDataError("blob is truncated inside its header")
    shape = struct.unpack_from(f"<{ndim}Q", buf, _FIXED.size)
    crc, pad = struct.unpack_from("<II", buf, hlen - 8)
    if crc != zlib.crc32(buf[: hlen - 8].tobytes()) or pad != 0:
        raise CorruptDataError("header checksum mismatch")
    dtype = ALL_DTYPES[dcode][0]
    shape = check_shape(shape, CorruptDataError, "header field shape")
    if plen > buf.size - hlen:
        raise CorruptDataError(
            f"header field payload_len={plen} does not fit a {buf.size}-byte blob"
        )
    nbytes = numel(shape) * ALL_DTYPES[dcode][1]
    if nbytes > MAX_EXPANSION * plen + _EMPTY_PAYLOAD:
        raise CorruptDataError(
            f"header says {nbytes} original bytes from a {plen}-byte "
            f"payload; no codec expands more than {MAX_EXPANSION}x"
        )
    # the payload is attached by the caller; an empty placeholder allocates nothing
    ct = CompressedTensor(
        CODEC_NAMES[codec], dtype, shape, np.empty(0, np.uint8), pck, ock, version
    )
    return hlen, plen, ct


# ----------------------------------------------------------------------------- top level
def compress(t, codec: str = "entropy", threads: int | None = None) -> bytes:
    """Losslessly compress a tensor into a self-describing blob (``CompressedTensor``)."""
    return CompressedTensor.from_tensor(t, codec, threads).to_bytes()


def decompress(blob, threads: int | None = None, out=None):
    """The tensor a blob from :func:`compress` holds (bit-exact), or CorruptDataError.

    ``out``: a contiguous CPU tensor of the blob's dtype and shape to decode into (it is
    returned); reusing one buffer avoids allocating, and first-touching, fresh memory."""
    ct = (
        blob
        if isinstance(blob, CompressedTensor)
        else CompressedTensor.from_bytes(blob, verify=False)
    )
    return ct.to_tensor(threads, out)
