"""Compressed checkpoints (``.mfz``): a safetensors file, tensor by tensor.

Layout::

    b"MFZ1" | u32 version | u64 0
    | CompressedTensor blob, one per tensor, in the file order of the safetensors data
    | index (UTF-8 JSON): original safetensors header text, per-tensor name, blob offset and
      length, codec, dtype, shape, ratio, exponent entropy
    | u64 index_offset | u64 index_length | u32 crc32(index) | u32 0 | b"MFZEND\\0\\0"

The safetensors header is kept verbatim, and every tensor goes back to its original byte
range, so ``decompress`` rebuilds a byte-identical file (tensors and ``__metadata__``).
Tensors are read, compressed and written one at a time, so memory stays at one tensor.
Outputs are written to a temporary file in the target directory and renamed into place.
"""

from __future__ import annotations

import json
import os
import struct
import tempfile
import zlib
from contextlib import contextmanager

import numpy as np

from moeflow.compress.bits import DTYPE_ITEMSIZE, FLOAT_SPECS, SAFETENSORS_NAMES, UINT
from moeflow.compress.container import CompressedTensor, resolve_codec
from moeflow.compress.stats import stats_from_bits
from moeflow.errors import CorruptDataError, InputError
from moeflow.progress import Progress

MAGIC = b"MFZ1"
END = b"MFZEND\0\0"
VERSION = 1
_FOOT = struct.Struct("<QQII8s")


# ----------------------------------------------------------------------------- helpers
@contextmanager
def atomic_output(path: str):
    """Yield a binary file object whose content replaces ``path`` only on success."""
    d = os.path.dirname(os.path.abspath(path)) or "."
    fd, tmp = tempfile.mkstemp(prefix=".tmp-" + os.path.basename(path) + "-", dir=d)
    try:
        with os.fdopen(fd, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; give the usual file mode
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


def read_safetensors_header(f) -> tuple[int, str, dict]:
    """(data start offset, header text, parsed header) of an open safetensors file."""
    size = os.fstat(f.fileno()).st_size
    raw = f.read(8)
    if len(raw) != 8:
        raise InputError("not a safetensors file: shorter than 8 bytes")
    (hlen,) = struct.unpack("<Q", raw)
    if hlen > min(size - 8, 100 << 20):
        raise InputError(f"not a safetensors file: header length {hlen} exceeds the file")
    text = f.read(hlen).decode("utf-8")
    try:
        header = json.loads(text)
    except json.JSONDecodeError as e:
        raise InputError(f"not a safetensors file: header is not JSON ({e})") from None
    return 8 + hlen, text, header


def _tensor_entries(header: dict, data_len: int):
    out = []
    for name, info in header.items():
        if name == "__metadata__":
            continue
        dtype = SAFETENSORS_NAMES.get(info.get("dtype"))
        if dtype is None:
            raise InputError(f"tensor {name!r} has dtype {info.get('dtype')!r}; supported: "
                             f"{sorted(SAFETENSORS_NAMES)}")
        shape = tuple(int(s) for s in info["shape"])
        start, end = (int(x) for x in info["data_offsets"])
        numel = int(np.prod(shape)) if shape else 1
        if end - start != numel * DTYPE_ITEMSIZE[dtype] or end > data_len or start < 0:
            raise InputError(f"tensor {name!r}: data_offsets {start}..{end} do not match "
                             f"shape {shape} {dtype} within {data_len} data bytes")
        out.append((start, end, name, dtype, shape))
    return sorted(out)


# ----------------------------------------------------------------------------- compress
def compress_file(src: str, dst: str, codec: str = "auto", threads: int | None = None,
                  progress: bool = False) -> dict:
    """Compress a safetensors file into ``.mfz``; returns the index."""
    if not os.path.isfile(src):
        raise InputError(f"input file {src!r} does not exist")
    with open(src, "rb") as f:
        data_start, text, header = read_safetensors_header(f)
        data_len = os.fstat(f.fileno()).st_size - data_start
        entries = _tensor_entries(header, data_len)
        bar = Progress(sum(e[1] - e[0] for e in entries), "compress", enabled=progress)
        index = {"format": "moeflow-mfz", "version": VERSION, "safetensors_header": text,
                 "data_bytes": data_len, "tensors": []}
        with atomic_output(dst) as out:
            out.write(MAGIC + struct.pack("<IQ", VERSION, 0))
            pos = 16
            for start, end, name, dtype, shape in entries:
                f.seek(data_start + start)
                buf = np.frombuffer(f.read(end - start), np.uint8)
                if buf.size != end - start:
                    raise InputError(f"input file is truncated inside tensor {name!r}")
                bits = buf.view(UINT[DTYPE_ITEMSIZE[dtype]])
                # TBE only takes bf16/fp16; other dtypes fall back to the automatic choice
                try:
                    chosen = resolve_codec(codec, dtype)
                except InputError:
                    chosen = resolve_codec("auto", dtype)
                ct = CompressedTensor.from_bits(bits, dtype, shape, chosen, threads)
                blob = ct.to_bytes()
                out.write(blob)
                ent = {"name": name, "offset": pos, "length": len(blob), "codec": chosen,
                       "dtype": dtype, "shape": list(shape), "data_offsets": [start, end],
                       "ratio": (end - start) / len(blob) if blob else 1.0}
                if dtype in FLOAT_SPECS and bits.size:
                    ent["exp_entropy"] = abs(stats_from_bits(bits, dtype).exp_entropy)
                index["tensors"].append(ent)
                pos += len(blob)
                bar.update(end - start, tensor=name[-40:])
            idx = json.dumps(index).encode("utf-8")
            out.write(idx)
            out.write(_FOOT.pack(pos, len(idx), zlib.crc32(idx), 0, END))
        bar.close()
    index["file_bytes"] = pos + len(idx) + _FOOT.size
    return index


# ----------------------------------------------------------------------------- read
def read_index(f) -> dict:
    size = os.fstat(f.fileno()).st_size
    if size < 16 + _FOOT.size:
        raise CorruptDataError(f"{size}-byte file is too short to be .mfz")
    f.seek(0)
    head = f.read(16)
    if head[:4] != MAGIC or struct.unpack_from("<I", head, 4)[0] != VERSION:
        raise CorruptDataError("not a moeflow .mfz file (bad magic or version)")
    f.seek(size - _FOOT.size)
    ioff, ilen, crc, zero, end = _FOOT.unpack(f.read(_FOOT.size))
    if end != END or zero != 0 or ioff < 16 or ioff + ilen + _FOOT.size != size:
        raise CorruptDataError(".mfz footer is corrupt or the file is truncated")
    f.seek(ioff)
    idx = f.read(ilen)
    if zlib.crc32(idx) != crc:
        raise CorruptDataError(".mfz index checksum mismatch")
    try:
        index = json.loads(idx.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CorruptDataError(f".mfz index is not JSON ({e})") from None
    if index.get("format") != "moeflow-mfz":
        raise CorruptDataError(".mfz index has the wrong format tag")
    for t in index["tensors"]:
        if t["offset"] < 16 or t["offset"] + t["length"] > ioff:
            raise CorruptDataError(f"tensor {t['name']!r} lies outside the data region")
    return index


def decompress_file(src: str, dst: str, threads: int | None = None,
                    progress: bool = False) -> dict:
    """Rebuild the original safetensors file from ``.mfz`` (byte-identical)."""
    if not os.path.isfile(src):
        raise InputError(f"input file {src!r} does not exist")
    with open(src, "rb") as f:
        index = read_index(f)
        text = index["safetensors_header"].encode("utf-8")
        tensors = sorted(index["tensors"], key=lambda t: t["data_offsets"][0])
        bar = Progress(int(index["data_bytes"]), "decompress", enabled=progress)
        with atomic_output(dst) as out:
            out.write(struct.pack("<Q", len(text)) + text)
            written = 0
            for t in tensors:
                start, end = t["data_offsets"]
                f.seek(t["offset"])
                blob = np.frombuffer(f.read(t["length"]), np.uint8)
                ct = CompressedTensor.from_bytes(blob, verify=False)  # to_bits verifies
                if ct.dtype != t["dtype"] or list(ct.shape) != list(t["shape"]):
                    raise CorruptDataError(f"tensor {t['name']!r}: blob says {ct.dtype} "
                                           f"{ct.shape}, index says {t['dtype']} {t['shape']}")
                bits = ct.to_bits(threads)
                if bits.nbytes != end - start or start < written:
                    raise CorruptDataError(f"tensor {t['name']!r} does not fit its byte range")
                if start > written:  # safetensors has no holes, but keep offsets exact
                    out.write(b"\0" * (start - written))
                out.write(bits.view(np.uint8).data)
                written = end
                bar.update(end - start, tensor=t["name"][-40:])
            if written < int(index["data_bytes"]):
                out.write(b"\0" * (int(index["data_bytes"]) - written))
        bar.close()
    return index


def inspect_file(src: str, verify: bool = False, threads: int | None = None) -> dict:
    if not os.path.isfile(src):
        raise InputError(f"input file {src!r} does not exist")
    with open(src, "rb") as f:
        index = read_index(f)
        if verify:
            for t in index["tensors"]:
                f.seek(t["offset"])
                CompressedTensor.from_bytes(np.frombuffer(f.read(t["length"]), np.uint8)) \
                    .to_bits(threads)
        index["file_bytes"] = os.fstat(f.fileno()).st_size
    return index
