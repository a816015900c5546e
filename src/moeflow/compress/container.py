"""``CompressedTensor``: the self-describing, checksummed container of one compressed tensor.

Layout (little-endian)::

    b"MFZT" | u16 version | u8 codec | u8 dtype | u8 ndim | 3 x u8 0 | u64 payload_len
    | u64 payload_checksum | u64 original_checksum | u64 shape[ndim] | u32 crc32(header) | u32 0
    | payload

Checksums are moeflow's mfx64 (``_format.checksum``): one over the payload and one over the
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

from moeflow.errors import ConfigError, CorruptDataError, InputError
from moeflow.compress import entropy, tbe
from moeflow.compress._format import (ALL_DTYPES, DTYPE_CODES, DTYPE_ITEMSIZE, FLOAT_SPECS,
                                      checksum, combine_digests)

MAGIC = b"MFZT"
VERSION = 2  # written; the container version is also the checksum version (see _format)
READ_VERSIONS = (1, 2)
CODECS = {"raw": 0, "entropy": 1, "tbe": 2}
CODEC_NAMES = {v: k for k, v in CODECS.items()}
_ALIASES = {"huffman": "entropy", "zipserv": "tbe", "stored": "raw"}
_FIXED = struct.Struct("<4sHBBB3xQQQ")
MAX_NDIM = 32


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
    payload: np.ndarray          # uint8
    payload_checksum: int
    original_checksum: int
    version: int = VERSION  # container (and checksum) version

    # ------------------------------------------------------------------ properties
    @property
    def numel(self) -> int:
        return int(np.prod(self.shape)) if self.shape else 1

    @property
    def original_nbytes(self) -> int:
        return self.numel * DTYPE_ITEMSIZE[self.dtype]

    @property
    def nbytes(self) -> int:
        return _FIXED.size + 8 * len(self.shape) + 8 + self.payload.size

    @property
    def ratio(self) -> float:
        """Original bytes over container bytes (header included)."""
        return self.original_nbytes / self.nbytes

    # ------------------------------------------------------------------ encode
    @classmethod
    def from_bits(cls, bits: np.ndarray, dtype: str, shape, codec: str = "entropy",
                  threads: int | None = None) -> "CompressedTensor":
        """Compress raw value bits (flat, the unsigned int of the dtype's width)."""
        shape = tuple(int(s) for s in shape)
        codec = resolve_codec(codec, dtype)
        bits = np.ascontiguousarray(bits).reshape(-1)
        if len(shape) > MAX_NDIM:
            raise InputError(f"tensor has {len(shape)} dimensions; at most {MAX_NDIM} allowed")
        if bits.nbytes != (int(np.prod(shape)) if shape else 1) * DTYPE_ITEMSIZE[dtype]:
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
        head = _FIXED.pack(MAGIC, self.version, CODECS[self.codec], DTYPE_CODES[self.dtype],
                           len(self.shape), self.payload.size, self.payload_checksum,
                           self.original_checksum)
        head += struct.pack(f"<{len(self.shape)}Q", *self.shape)
        return head + struct.pack("<II", zlib.crc32(head), 0)

    def to_bytes(self) -> bytes:
        # one copy of the payload (bytes + bytes would make two)
        return b"".join([self.header_bytes(), memoryview(np.ascontiguousarray(self.payload))])

    @classmethod
    def from_bytes(cls, blob, verify: bool = True) -> "CompressedTensor":
        """Parse a blob (bytes-like or uint8 array, exactly one container; not copied)."""
        buf = blob if isinstance(blob, np.ndarray) else np.frombuffer(blob, np.uint8)
        if buf.dtype != np.uint8 or buf.ndim != 1:
            raise CorruptDataError("a compressed tensor is a 1-D byte buffer")
        hlen, ct = parse_header(buf)
        if buf.size != hlen + ct.payload.size:
            raise CorruptDataError(f"blob is {buf.size} bytes; header + payload say "
                                   f"{hlen + ct.payload.size}")
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
                bits = _into(bits, out)
            got = checksum(bits, threads, self.version)
        else:
            if self.payload.size != self.original_nbytes:
                raise CorruptDataError(f"raw payload is {self.payload.size} bytes, expected "
                                       f"{self.original_nbytes}")
            bits = (self.payload.copy() if out is None
                    else _into(self.payload.view(_UINT[DTYPE_ITEMSIZE[self.dtype]]), out))
            got = checksum(bits, threads, self.version)
        if got != self.original_checksum:
            raise CorruptDataError("decoded data does not match the original checksum: "
                                   "the compressed bytes are corrupt")
        return bits

    def to_tensor(self, threads: int | None = None, out=None):
        """The decoded tensor; with ``out`` (a contiguous CPU tensor of this dtype and shape)
        the data is decoded into it and ``out`` is returned, so a buffer can be reused
        without fresh allocations. On ``CorruptDataError`` its contents are undefined."""
        if out is None:
            return bits_to_tensor(self.to_bits(threads), self.dtype, self.shape)
        self.to_bits(threads, _out_bits(out, self.dtype, self.shape))
        return out


def parse_header(buf: np.ndarray) -> tuple[int, CompressedTensor]:
    """Header length and a CompressedTensor with an empty payload of the declared size."""
    if buf.size < _FIXED.size + 8:
        raise CorruptDataError(f"blob of {buf.size} bytes is shorter than a header")
    magic, version, codec, dcode, ndim, plen, pck, ock = _FIXED.unpack_from(buf, 0)
    if magic != MAGIC:
        raise CorruptDataError(f"bad magic {magic!r}: not a moeflow compressed tensor")
    if version not in READ_VERSIONS:
        raise CorruptDataError(f"container version {version}; this moeflow reads "
                               f"{READ_VERSIONS}")
    if codec not in CODEC_NAMES or dcode not in ALL_DTYPES or ndim > MAX_NDIM:
        raise CorruptDataError(f"header names codec {codec}, dtype {dcode}, ndim {ndim}")
    hlen = _FIXED.size + 8 * ndim + 8
    if buf.size < hlen:
        raise CorruptDataError("blob is truncated inside its header")
    shape = struct.unpack_from(f"<{ndim}Q", buf, _FIXED.size)
    crc, pad = struct.unpack_from("<II", buf, hlen - 8)
    if crc != zlib.crc32(buf[: hlen - 8].tobytes()) or pad != 0:
        raise CorruptDataError("header checksum mismatch")
    dtype = ALL_DTYPES[dcode][0]
    if any(s > (1 << 48) for s in shape):
        raise CorruptDataError(f"implausible shape {shape}")
    ct = CompressedTensor(CODEC_NAMES[codec], dtype, tuple(shape), np.empty(plen, np.uint8)
                          if plen <= buf.size else np.empty(0, np.uint8), pck, ock, version)
    if plen > buf.size:
        raise CorruptDataError(f"payload of {plen} bytes does not fit a {buf.size}-byte blob")
    return hlen, ct


# ----------------------------------------------------------------------------- torch glue
def tensor_to_bits(t):
    """(flat raw bits as numpy, dtype name, shape) of a tensor; never writes to ``t``."""
    import torch

    if isinstance(t, np.ndarray):
        t = torch.from_numpy(np.array(t, copy=True))
    if not isinstance(t, torch.Tensor):
        raise InputError(f"expected a torch.Tensor, got {type(t).__name__}")
    name = str(t.dtype).removeprefix("torch.")
    if name not in DTYPE_CODES:
        raise InputError(f"dtype {t.dtype} is not supported; allowed: {sorted(DTYPE_CODES)}")
    flat = t.detach().to("cpu").contiguous().reshape(-1)
    size = DTYPE_ITEMSIZE[name]
    uint = {1: np.uint8, 2: np.uint16, 4: np.uint32, 8: np.uint64}[size]
    bits = flat.view(torch.uint8).numpy().view(uint) if flat.numel() else np.empty(0, uint)
    return bits, name, tuple(t.shape)


_UINT = {1: np.uint8, 2: np.uint16, 4: np.uint32, 8: np.uint64}


def _into(bits: np.ndarray, out: np.ndarray) -> np.ndarray:
    """``bits`` copied into the caller's flat ``out`` array."""
    bits = bits.reshape(-1)
    if out.dtype != bits.dtype or out.shape != bits.shape or not out.flags.c_contiguous:
        raise InputError(f"out must be a contiguous {bits.dtype.name}[{bits.size}] array")
    out[:] = bits
    return out


def _out_bits(out, dtype: str, shape) -> np.ndarray:
    """The raw-bits numpy view of a caller's ``out`` tensor, after checking it fits."""
    import torch

    if not isinstance(out, torch.Tensor):
        raise InputError(f"out must be a torch.Tensor, got {type(out).__name__}")
    if (str(out.dtype).removeprefix("torch.") != dtype or tuple(out.shape) != tuple(shape)
            or out.device.type != "cpu" or not out.is_contiguous()):
        raise InputError(f"out must be a contiguous CPU {dtype} tensor of shape {tuple(shape)}, "
                         f"got {out.dtype} {tuple(out.shape)} on {out.device}")
    if out.requires_grad and torch.is_grad_enabled():
        raise InputError("out requires grad; decode into it under torch.no_grad()")
    flat = out.detach().reshape(-1)
    if flat.numel() == 0:
        return np.empty(0, _UINT[DTYPE_ITEMSIZE[dtype]])
    return flat.view(torch.uint8).numpy().view(_UINT[DTYPE_ITEMSIZE[dtype]])


def bits_to_tensor(bits: np.ndarray, dtype: str, shape):
    import torch

    u8 = np.ascontiguousarray(bits).reshape(-1).view(np.uint8)
    t = torch.from_numpy(u8.copy() if not u8.flags.writeable else u8)
    return t.view(getattr(torch, dtype)).reshape(shape)


# ----------------------------------------------------------------------------- top level
def compress(t, codec: str = "entropy", threads: int | None = None) -> bytes:
    """Losslessly compress a tensor into a self-describing blob (``CompressedTensor``)."""
    return CompressedTensor.from_tensor(t, codec, threads).to_bytes()


def decompress(blob, threads: int | None = None, out=None):
    """The tensor a blob from :func:`compress` holds (bit-exact), or CorruptDataError.

    ``out``: a contiguous CPU tensor of the blob's dtype and shape to decode into (it is
    returned); reusing one buffer avoids allocating, and first-touching, fresh memory."""
    ct = blob if isinstance(blob, CompressedTensor) else CompressedTensor.from_bytes(blob,
                                                                                verify=False)
    return ct.to_tensor(threads, out)
