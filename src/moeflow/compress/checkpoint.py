"""Compressed checkpoints (``.mfz``): a safetensors file, tensor by tensor.

Layout::

    b"MFZ1" | u32 version | u64 0
    | CompressedTensor blob, one per tensor or stored byte range, in safetensors data order
    | index (UTF-8 JSON): original safetensors header text, per-tensor name, blob offset and
      length, codec, dtype, shape, data_offsets, ratio, exponent entropy; "gaps": the stored
      byte ranges
    | u64 index_offset | u64 index_length | u32 crc32(index) | u32 0 | b"MFZEND\\0\\0"

The safetensors header is kept verbatim and every tensor goes back to its original byte
range. Bytes of the data region that no tensor covers (holes between tensors, trailing
bytes) are stored exactly, as raw uint8 blobs listed under "gaps", so ``decompress``
rebuilds a byte-identical file whatever the input held. Files with gaps are written as
version 2, which older readers refuse instead of restoring zeros; files without are
version 1, as before. Tensors that share bytes are refused (safetensors refuses them too).

Both formats have one validated reader here: ``read_safetensors_header`` and
``read_index`` check every field's type and range, and every size against the real file
size, before anything sized by the file is allocated; a bad safetensors file raises
``InputError`` and a corrupt or crafted ``.mfz`` ``CorruptDataError``, naming the field.

Tensors are read, compressed and written one at a time, so memory stays at one tensor
(stored ranges go in pieces of at most ``GAP_PIECE`` bytes). Outputs are written to a
temporary file in the target directory, fsynced and renamed into place; the temporary file
is removed on any error, Ctrl-C or SIGTERM (a signal that arrives while numba compiles a
kernel is raised right after, between tensors, not inside the JIT's ctypes callbacks).
An output equal to the input is refused, and an existing output is replaced only with
``overwrite=True`` (the CLI's ``--force``).
"""

from __future__ import annotations

import json
import os
import signal
import struct
import threading
import zlib
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np

from moeflow.compress.bits import (
    DTYPE_ITEMSIZE,
    FLOAT_SPECS,
    SAFETENSORS_NAMES,
    UINT,
    check_shape,
    numel,
)
from moeflow.compress.container import CODECS, CompressedTensor, header_nbytes, resolve_codec
from moeflow.compress.stats import stats_from_bits
from moeflow.errors import CorruptDataError, InputError
from moeflow.files import atomic_file, check_output
from moeflow.progress import Progress

MAGIC = b"MFZ1"
END = b"MFZEND\0\0"
VERSION = 1  # written when every data byte belongs to a tensor
VERSION_GAPS = 2  # written when uncovered bytes are stored ("gaps")
READ_VERSIONS = (VERSION, VERSION_GAPS)
_HEAD = struct.Struct("<4sIQ")
_FOOT = struct.Struct("<QQII8s")
MAX_HEADER_BYTES = 100 << 20  # safetensors' own limit on its JSON header
# the index holds the header as a JSON string (escaping at most 6x) plus ~200 B per entry
MAX_INDEX_BYTES = 6 * MAX_HEADER_BYTES + (64 << 20)
GAP_PIECE = 64 << 20  # stored byte ranges are cut into blobs of at most this
_GAP_BLOB_OVERHEAD = header_nbytes(1)  # a stored range is a raw 1-D uint8 blob


@dataclass(frozen=True)
class TensorEntry:
    """One tensor of a safetensors header: its data byte range ``[start, end)``."""

    start: int
    end: int
    name: str
    dtype: str
    shape: tuple[int, ...]


# ----------------------------------------------------------------------------- file safety
_PENDING: list[int] = []  # signals that arrived during a write (main thread only)
_OLD_HANDLERS: dict[int, object] = {}


def _unwind(signum, frame):
    """Run the previous handler (the CLI's raises ``Terminated``, Python's SIGINT handler
    ``KeyboardInterrupt``; one that returns has handled the signal), or raise
    ``SystemExit(128 + signum)`` where the default action would have killed the process."""
    old = _OLD_HANDLERS.get(signum)
    if not callable(old):
        raise SystemExit(128 + signum)
    old(signum, frame)
    _PENDING[:] = [s for s in _PENDING if s != signum]


def _on_signal(signum, frame):
    _PENDING.append(signum)
    module = frame.f_globals.get("__name__", "") if frame is not None else ""
    if module.split(".")[0] in ("numba", "llvmlite"):
        # inside the JIT (often a ctypes callback, which would print and swallow the
        # exception): raised by the next raise_pending_signal instead
        return
    _unwind(signum, frame)


def raise_pending_signal() -> None:
    """Raise a SIGINT/SIGTERM that arrived while numba was compiling or loading a kernel
    (not raised there: inside a ctypes callback the exception would be printed and lost)."""
    if _PENDING:
        _unwind(_PENDING[0], None)


@contextmanager
def _signals_unwind():
    """While writing, SIGINT and SIGTERM raise (through ``_on_signal``) so cleanup code runs,
    and are remembered so ``raise_pending_signal`` can raise them again; the old handlers
    are restored after. Ignored signals stay ignored; off the main thread nothing changes."""
    if threading.current_thread() is not threading.main_thread() or _OLD_HANDLERS:
        yield
        return
    for sig in (signal.SIGINT, signal.SIGTERM):
        old = signal.getsignal(sig)
        if old is not signal.SIG_IGN and old is not None:
            _OLD_HANDLERS[sig] = old
            signal.signal(sig, _on_signal)
    try:
        yield
    finally:
        for sig, old in _OLD_HANDLERS.items():
            signal.signal(sig, old)
        _OLD_HANDLERS.clear()
        _PENDING.clear()


def check_paths(src: str, dst: str, overwrite: bool) -> None:
    """Refuse a missing input, an output that is the input (also through a symlink or a hard
    link), a directory as output, and an existing output unless ``overwrite``
    (:func:`moeflow.files.check_output`)."""
    if not os.path.isfile(src):
        raise InputError(f"input file {src!r} does not exist or is not a regular file")
    check_output("output", dst, inputs=[src], force=overwrite)


@contextmanager
def atomic_output(path: str, overwrite: bool = True):
    """Yield a binary file object whose content replaces ``path`` only on success.

    The data go to a temporary file in the same directory, are fsynced, and the file is
    renamed over ``path`` (:func:`moeflow.files.atomic_file`); on any exception, Ctrl-C or
    SIGTERM the temporary file is removed and ``path`` is left as it was. Without
    ``overwrite``, a ``path`` that appeared while writing is not replaced (``InputError``)."""
    with _signals_unwind():
        with atomic_file(path, "wb", force=overwrite, before_commit=raise_pending_signal) as f:
            yield f


# ----------------------------------------------------------------------------- safetensors
def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _no_duplicates(pairs):
    out = {}
    for k, v in pairs:
        if k in out:
            raise ValueError(f"key {k!r} appears twice")
        out[k] = v
    return out


def _load_json(raw: bytes, what: str, error):
    """Parse UTF-8 JSON text, turning every failure (bad UTF-8, syntax, duplicate keys,
    nesting too deep for the parser) into ``error`` naming ``what``."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise error(f"{what} is not UTF-8 (byte {e.start})") from None
    try:
        return text, json.loads(text, object_pairs_hook=_no_duplicates)
    except RecursionError:
        raise error(f"{what} nests JSON too deeply") from None
    except ValueError as e:  # JSONDecodeError and duplicate keys
        raise error(f"{what} is not valid JSON ({e})") from None


def parse_safetensors_header(raw: bytes, data_len: int, error=InputError):
    """(header text, tensor entries sorted by offset, uncovered ranges) of a safetensors
    header, validated against the safetensors format and a data region of ``data_len`` bytes.

    Checks: UTF-8 JSON object; ``__metadata__`` (optional) maps strings to strings; every
    tensor is an object with ``dtype`` (a safetensors dtype string), ``shape`` (list of ints,
    ``bits.check_shape``) and ``data_offsets`` (two ints, ``0 <= start <= end <= data_len``,
    ``end - start`` = the bytes of its shape and dtype); no two tensors share a byte.
    Uncovered bytes are returned as ``(start, end)`` ranges: they are stored, not refused."""
    text, header = _load_json(raw, "safetensors header", error)
    if not isinstance(header, dict):
        raise error(f"safetensors header is a JSON {type(header).__name__}; expected an object")
    entries = []
    for name, info in header.items():
        if name == "__metadata__":
            if not isinstance(info, dict) or not all(isinstance(v, str) for v in info.values()):
                raise error("safetensors __metadata__ must be an object of string values")
            continue
        if not isinstance(info, dict):
            raise error(
                f"tensor {name!r}: entry is a JSON {type(info).__name__}; expected an "
                "object with dtype, shape and data_offsets"
            )
        st_dtype = info.get("dtype")
        if not isinstance(st_dtype, str) or st_dtype not in SAFETENSORS_NAMES:
            raise error(
                f"tensor {name!r}: dtype {st_dtype!r}; allowed: {sorted(SAFETENSORS_NAMES)}"
            )
        dtype = SAFETENSORS_NAMES[st_dtype]
        shape = check_shape(info.get("shape"), error, f"tensor {name!r}: shape")
        offs = info.get("data_offsets")
        if (
            not isinstance(offs, list)
            or len(offs) != 2
            or not all(_is_int(x) for x in offs)
            or not 0 <= offs[0] <= offs[1] <= data_len
        ):
            raise error(
                f"tensor {name!r}: data_offsets {offs!r} must be two ints with "
                f"0 <= start <= end <= {data_len} (the data bytes)"
            )
        start, end = offs
        if end - start != numel(shape) * DTYPE_ITEMSIZE[dtype]:
            raise error(
                f"tensor {name!r}: data_offsets {start}..{end} hold {end - start} "
                f"bytes; shape {list(shape)} of {st_dtype} needs "
                f"{numel(shape) * DTYPE_ITEMSIZE[dtype]}"
            )
        entries.append(TensorEntry(start, end, name, dtype, shape))
    entries.sort(key=lambda e: (e.start, e.end))
    return text, entries, _gaps(entries, data_len, error)


def _gaps(entries, data_len: int, error) -> list[tuple[int, int]]:
    """Uncovered byte ranges of ``[0, data_len)``; ``error`` if two tensors share bytes."""
    gaps, cursor, last = [], 0, None
    for e in entries:
        if e.start == e.end:  # an empty tensor covers nothing and cannot overlap
            continue
        if e.start < cursor:
            raise error(
                f"tensors {last!r} and {e.name!r} overlap in the data bytes "
                f"(at {e.start}..{min(cursor, e.end)})"
            )
        if e.start > cursor:
            gaps.append((cursor, e.start))
        cursor, last = e.end, e.name
    if cursor < data_len:
        gaps.append((cursor, data_len))
    return gaps


def read_safetensors_header(f):
    """(data start offset, header text, entries, gaps) of an open safetensors file; reads
    only the 8-byte length and the header, after checking the length against the file."""
    size = os.fstat(f.fileno()).st_size
    f.seek(0)
    raw = f.read(8)
    if len(raw) != 8:
        raise InputError("not a safetensors file: shorter than 8 bytes")
    (hlen,) = struct.unpack("<Q", raw)
    if hlen > size - 8 or hlen > MAX_HEADER_BYTES:
        raise InputError(
            f"not a safetensors file: header length {hlen} exceeds the "
            f"{size}-byte file or the {MAX_HEADER_BYTES}-byte limit"
        )
    text, entries, gaps = parse_safetensors_header(f.read(hlen), size - 8 - hlen)
    return 8 + hlen, text, entries, gaps


# ----------------------------------------------------------------------------- compress
def _read_exact(f, n: int, what: str) -> np.ndarray:
    buf = np.frombuffer(f.read(n), np.uint8)
    if buf.size != n:
        raise InputError(f"input file changed while reading: {what} is truncated")
    return buf


def compress_file(
    src: str,
    dst: str,
    codec: str = "auto",
    threads: int | None = None,
    progress: bool = False,
    overwrite: bool = False,
) -> dict:
    """Compress a safetensors file into ``.mfz``; returns the index. Nothing is written
    unless the whole input validates; ``overwrite`` allows replacing an existing ``dst``."""
    check_paths(src, dst, overwrite)
    with open(src, "rb") as f:
        data_start, text, entries, gaps = read_safetensors_header(f)
        data_len = os.fstat(f.fileno()).st_size - data_start
        pieces = [
            (p, min(p + GAP_PIECE, stop))
            for start, stop in gaps
            for p in range(start, stop, GAP_PIECE)
        ]
        index = {
            "format": "moeflow-mfz",
            "version": VERSION_GAPS if pieces else VERSION,
            "safetensors_header": text,
            "data_bytes": data_len,
            "tensors": [],
        }
        if pieces:
            index["gaps"] = []
        bar = Progress(data_len, "compress", enabled=progress)
        # write in data order, tensors and stored ranges interleaved
        items = sorted(
            [(e.start, e.end, e) for e in entries] + [(a, b, None) for a, b in pieces],
            key=lambda t: (t[0], t[1]),
        )
        with atomic_output(dst, overwrite) as out:
            out.write(_HEAD.pack(MAGIC, index["version"], 0))
            pos = _HEAD.size
            for start, end, e in items:
                raise_pending_signal()
                f.seek(data_start + start)
                buf = _read_exact(f, end - start, f"data bytes {start}..{end}")
                if e is None:
                    blob = CompressedTensor.from_bits(
                        buf, "uint8", (end - start,), "raw", threads
                    ).to_bytes()
                    index["gaps"].append(
                        {"offset": pos, "length": len(blob), "data_offsets": [start, end]}
                    )
                else:
                    bits = buf.view(UINT[DTYPE_ITEMSIZE[e.dtype]])
                    # TBE only takes bf16/fp16; other dtypes fall back to the automatic choice
                    try:
                        chosen = resolve_codec(codec, e.dtype)
                    except InputError:
                        chosen = resolve_codec("auto", e.dtype)
                    blob = CompressedTensor.from_bits(
                        bits, e.dtype, e.shape, chosen, threads
                    ).to_bytes()
                    ent = {
                        "name": e.name,
                        "offset": pos,
                        "length": len(blob),
                        "codec": chosen,
                        "dtype": e.dtype,
                        "shape": list(e.shape),
                        "data_offsets": [start, end],
                        "ratio": (end - start) / len(blob),
                    }
                    if e.dtype in FLOAT_SPECS and bits.size:
                        ent["exp_entropy"] = abs(stats_from_bits(bits, e.dtype).exp_entropy)
                    index["tensors"].append(ent)
                out.write(blob)
                pos += len(blob)
                bar.update(end - start, tensor=(e.name if e else "(stored bytes)")[-40:])
            idx = json.dumps(index).encode("utf-8")
            if len(idx) > MAX_INDEX_BYTES:  # the reader's limit: never write what it refuses
                raise InputError(
                    f"the index would be {len(idx)} bytes; at most {MAX_INDEX_BYTES} are allowed"
                )
            out.write(idx)
            out.write(_FOOT.pack(pos, len(idx), zlib.crc32(idx), 0, END))
        bar.close()
    index["file_bytes"] = pos + len(idx) + _FOOT.size
    return index


# ----------------------------------------------------------------------------- read
def _field(obj: dict, key: str, kind, where: str):
    """``obj[key]`` when it has type ``kind`` (ints exclude bools), else CorruptDataError."""
    v = obj.get(key) if isinstance(obj, dict) else None
    ok = _is_int(v) if kind is int else isinstance(v, kind) and not isinstance(v, bool)
    if not ok:
        raise CorruptDataError(
            f".mfz index: {where} field {key!r} is {v!r}; expected "
            f"{getattr(kind, '__name__', 'a number')}"
        )
    return v


def _blob_range(ent: dict, where: str, data_end: int) -> tuple[int, int]:
    off = _field(ent, "offset", int, where)
    length = _field(ent, "length", int, where)
    if off < _HEAD.size or length < 0 or off + length > data_end:
        raise CorruptDataError(
            f".mfz index: {where} blob {off}+{length} lies outside the "
            f"blob region {_HEAD.size}..{data_end}"
        )
    return off, length


def _data_range(ent: dict, where: str) -> tuple[int, int]:
    offs = ent.get("data_offsets")
    if (
        not isinstance(offs, list)
        or len(offs) != 2
        or not all(_is_int(x) for x in offs)
        or not 0 <= offs[0] <= offs[1]
    ):
        raise CorruptDataError(
            f".mfz index: {where} field 'data_offsets' is {offs!r}; "
            "expected two ints 0 <= start <= end"
        )
    return offs[0], offs[1]


def read_index(f) -> dict:
    """The validated index of an open ``.mfz`` file.

    Reads the 16-byte head first (magic, version), then the footer, then the index, whose
    length is checked against the file size and ``MAX_INDEX_BYTES`` before it is read. Every
    entry's fields are type- and range-checked; the blobs must lie in the blob region; the
    tensors and stored ranges must tile the data region exactly; and the stored safetensors
    header, read with ``parse_safetensors_header``, must describe the same tensors."""
    size = os.fstat(f.fileno()).st_size
    if size < _HEAD.size + _FOOT.size:
        raise CorruptDataError(f"{size}-byte file is too short to be .mfz")
    f.seek(0)
    magic, version, zero = _HEAD.unpack(f.read(_HEAD.size))
    if magic != MAGIC:
        raise CorruptDataError(f"not a moeflow .mfz file (magic {magic!r})")
    if version not in READ_VERSIONS or zero != 0:
        raise CorruptDataError(f".mfz version {version}; this moeflow reads {READ_VERSIONS}")
    f.seek(size - _FOOT.size)
    ioff, ilen, crc, zero, end = _FOOT.unpack(f.read(_FOOT.size))
    if end != END or zero != 0 or ioff < _HEAD.size or ioff + ilen + _FOOT.size != size:
        raise CorruptDataError(".mfz footer is corrupt or the file is truncated")
    if ilen > MAX_INDEX_BYTES:
        raise CorruptDataError(
            f".mfz footer field index_length={ilen} exceeds the {MAX_INDEX_BYTES}-byte limit"
        )
    f.seek(ioff)
    raw = f.read(ilen)
    if zlib.crc32(raw) != crc:
        raise CorruptDataError(".mfz index checksum mismatch")
    _, index = _load_json(raw, ".mfz index", CorruptDataError)
    if not isinstance(index, dict) or index.get("format") != "moeflow-mfz":
        raise CorruptDataError(".mfz index has the wrong format tag")
    if _field(index, "version", int, "top-level") != version:
        raise CorruptDataError(
            f".mfz index field 'version'={index['version']} differs from "
            f"the file's version {version}"
        )
    text = _field(index, "safetensors_header", str, "top-level")
    data_bytes = _field(index, "data_bytes", int, "top-level")
    tensors = _field(index, "tensors", list, "top-level")
    gaps = index.get("gaps", []) if version == VERSION_GAPS else []
    if version == VERSION and "gaps" in index:
        raise CorruptDataError(".mfz index of version 1 lists stored byte ranges")
    if not isinstance(gaps, list):
        raise CorruptDataError(f".mfz index field 'gaps' is {type(gaps).__name__}; expected a list")
    spans = []
    for i, t in enumerate(tensors):
        where = f"tensor #{i}"
        name = _field(t, "name", str, where)
        where = f"tensor {name!r}"
        _blob_range(t, where, ioff)
        codec = _field(t, "codec", str, where)
        dtype = _field(t, "dtype", str, where)
        if codec not in CODECS or dtype not in DTYPE_ITEMSIZE:
            raise CorruptDataError(
                f".mfz index: {where} has codec {codec!r} and dtype "
                f"{dtype!r}; allowed: {sorted(CODECS)}, "
                f"{sorted(DTYPE_ITEMSIZE)}"
            )
        shape = check_shape(t.get("shape"), CorruptDataError, f".mfz index: {where} shape")
        start, stop = _data_range(t, where)
        if stop - start != numel(shape) * DTYPE_ITEMSIZE[dtype]:
            raise CorruptDataError(
                f".mfz index: {where} data_offsets {start}..{stop} do not "
                f"hold shape {list(shape)} of {dtype}"
            )
        for key in ("ratio", "exp_entropy"):
            if key in t:
                _field(t, key, (int, float), where)
        spans.append((start, stop, name))
    for i, g in enumerate(gaps):
        where = f"gap #{i}"
        _, length = _blob_range(g, where, ioff)
        start, stop = _data_range(g, where)
        if stop == start or stop - start > GAP_PIECE or length != _GAP_BLOB_OVERHEAD + stop - start:
            raise CorruptDataError(
                f".mfz index: {where} stores {stop - start} bytes in a {length}-byte blob"
            )
        spans.append((start, stop, None))
    # tensors and stored ranges must tile [0, data_bytes): nothing missing, nothing twice
    cursor = 0
    for start, stop, name in sorted(spans, key=lambda s: (s[0], s[1])):
        if start == stop and name is not None and start <= data_bytes:
            continue
        if start != cursor:
            how = "missing" if start > cursor else "claimed twice"
            raise CorruptDataError(
                f".mfz index: data bytes {min(start, cursor)}..{max(start, cursor)} are {how}"
            )
        cursor = stop
    if cursor != data_bytes:
        raise CorruptDataError(
            f".mfz index field 'data_bytes'={data_bytes}, but its tensors "
            f"and stored ranges cover {cursor} bytes"
        )
    head = text.encode("utf-8", "surrogatepass")
    _, entries, _ = parse_safetensors_header(head, data_bytes, CorruptDataError)
    want = sorted((e.name, e.dtype, list(e.shape), e.start, e.end) for e in entries)
    got = sorted((t["name"], t["dtype"], list(t["shape"]), *t["data_offsets"]) for t in tensors)
    if want != got:
        raise CorruptDataError(
            ".mfz index: its tensors differ from those its stored safetensors header lists"
        )
    return index


def _decode_blob(f, ent: dict, dtype: str, shape, codec: str | None, threads, verify=False):
    """Raw bits of one blob of the file, checked against what the index says it holds."""
    f.seek(ent["offset"])
    blob = np.frombuffer(f.read(ent["length"]), np.uint8)
    ct = CompressedTensor.from_bytes(blob, verify=verify)  # to_bits checks the original
    if ct.dtype != dtype or ct.shape != tuple(shape) or (codec and ct.codec != codec):
        raise CorruptDataError(
            f"blob at {ent['offset']}: it holds {ct.codec} {ct.dtype} "
            f"{list(ct.shape)}; the index says {codec} {dtype} {list(shape)}"
        )
    return ct.to_bits(threads)


def _blobs_in_data_order(index: dict):
    """(start, end, index entry, dtype, shape, codec) of every blob, by data offset."""
    out = [
        (t["data_offsets"][0], t["data_offsets"][1], t, t["dtype"], t["shape"], t["codec"])
        for t in index["tensors"]
    ]
    out += [
        (
            g["data_offsets"][0],
            g["data_offsets"][1],
            g,
            "uint8",
            [g["data_offsets"][1] - g["data_offsets"][0]],
            "raw",
        )
        for g in index.get("gaps", [])
    ]
    return sorted(out, key=lambda b: (b[0], b[1]))


def decompress_file(
    src: str, dst: str, threads: int | None = None, progress: bool = False, overwrite: bool = False
) -> dict:
    """Rebuild the original safetensors file from ``.mfz`` (byte-identical)."""
    check_paths(src, dst, overwrite)
    with open(src, "rb") as f:
        index = read_index(f)
        text = index["safetensors_header"].encode("utf-8", "surrogatepass")
        bar = Progress(index["data_bytes"], "decompress", enabled=progress)
        with atomic_output(dst, overwrite) as out:
            out.write(struct.pack("<Q", len(text)) + text)
            for start, end, ent, dtype, shape, codec in _blobs_in_data_order(index):
                raise_pending_signal()
                bits = _decode_blob(f, ent, dtype, shape, codec, threads)
                out.write(bits.view(np.uint8).data)
                bar.update(end - start, tensor=ent.get("name", "(stored bytes)")[-40:])
        bar.close()
    return index


def inspect_file(src: str, verify: bool = False, threads: int | None = None) -> dict:
    """The validated index of ``src``; with ``verify`` every blob is decoded and checked."""
    if not os.path.isfile(src):
        raise InputError(f"input file {src!r} does not exist or is not a regular file")
    with open(src, "rb") as f:
        index = read_index(f)
        if verify:
            for _, _, ent, dtype, shape, codec in _blobs_in_data_order(index):
                _decode_blob(f, ent, dtype, shape, codec, threads, verify=True)
        index["file_bytes"] = os.fstat(f.fileno()).st_size
    return index
