"""ZipCCL's collective codec: static exponent codes picked per message from the tensor's scale.

ZipCCL (lossless compression inside collectives) observes that activations, gradients and
parameters in training are close to Gaussian, so the distribution of their exponents follows
from their scale alone: a code needs no per-message histogram. Its exact construction is not
published; this one is ours:

- **Tables, built ahead of time.** For a zero-mean generalized Gaussian ``GG(beta)`` of unit
  RMS (``beta = 2``: the Gaussian), the probability that ``|x|`` falls in the binade
  ``[2^(k+f), 2^(k+f+1))`` is integrated numerically, for the scale offsets
  ``f in {0, 1/4, 1/2, 3/4}`` and ``WINDOW`` binades around the scale. With the probability
  of the exponent field 0 (zeros) taken from a few zero-fraction classes, each (shape,
  offset, zero class) is a model of the exponent distribution up to a shift ``base``; its
  length-limited Huffman code (``entropy.huffman_lengths``, <= 12 bits) is built once per
  shift and cached.
- **One cheap statistic.** Per message, and per 256 KiB chunk of a message (a gradient bucket
  concatenates tensors of different scales), a strided sample of at most ``SAMPLE``
  (``CHUNK_SAMPLE``) values gives the mean of the exponents ``floor(log2|x|)`` (the scale:
  mean minus the model's offset estimates ``log2 RMS``, and one huge outlier cannot move
  it, as it would move an RMS) and the zero fraction. The model then proposes a dozen
  tables around that scale (each shape, the quarter-binade offset and its neighbours) and
  the sample's symbol histogram picks the cheapest: integer work on a few thousand values
  per chunk, however large the message; no code is ever built from data.
- **Escape.** The static code covers the window and exponent 0. Exponents outside it share
  the escape probability ``ESC_PROB`` in the model; a chunk that holds one gets a code built
  from the model's weights restricted to the symbols it holds (which covers them all), so
  every bit pattern round-trips and an outlier costs a chunk a slightly worse code, not a
  stored message.
- **The body** is the entropy codec's chunked payload (``collective_kernels``): each chunk
  keeps the static lengths of the symbols it contains, so the entropy codec's fast decoder
  reads it and encoding needs no histogram-driven code construction.
- **Checksum on every message.** mfx64 (``checksum.checksum``) over all bytes before it;
  ``decode`` verifies it first and raises ``CorruptDataError`` on a mismatch.

Message layout (little-endian)::

    b"ZC" | u8 version | u8 dtype code | u8 mode (0 coded, 1 stored) | u8 shape | u8 offset
    | u8 zero class | i32 base | u32 0 | u64 n_values | u64 0
    | entropy payload (coded) or raw value bits (stored) | u64 checksum

The ratio is measured against the message's empirical exponent entropy, the bound of any
code that stores the other bits raw (``16 / (8 + H_exp)`` for bf16; DFloat11, ZipNN).
"""

from __future__ import annotations

import math
import struct
from dataclasses import dataclass
from functools import cache

import numpy as np

from moeflow.compress import collective_kernels as K
from moeflow.compress import entropy
from moeflow.compress.bits import FLOAT_SPECS, float_spec, readonly, tensor_to_bits
from moeflow.compress.checksum import SEGMENT_BYTES, checksum
from moeflow.compress.parallel import run_shared
from moeflow.errors import CorruptDataError, InputError

MAGIC = b"ZC"
VERSION = 1
SAMPLE = 1 << 16  # values read by the scale statistic of a message
CHUNK_SAMPLE = 1 << 12  # ... and of each chunk
WINDOW = 32  # binades modelled around the scale
SHAPES = (2.0, 1.0, 0.5, 16.0)  # GG beta: Gaussian first, then heavier / flatter tails
OFFSETS = 4  # scale resolution: a quarter binade
ZERO_CLASSES = (0.0, 2.0**-10, 2.0**-6, 2.0**-3, 0.5, 0.9, 0.999)
ESC_PROB = 2.0**-12
WINDOW_BELOW = 24  # relative exponents [-24, 7] around floor(log2 RMS)
MAX_LEN = entropy.MAX_LEN
_HEAD = struct.Struct("<2sBBBBBBiIQQ")
_KIND = {"bfloat16": 1, "float16": 2, "float32": 3}  # the entropy codec's kinds
_NAMES = {s.code: s.name for s in FLOAT_SPECS.values()}
DTYPES = tuple(_KIND)
#: the Gaussian-only family (``shapes=(2.0,)``): ZipCCL's model, kept for comparisons
GAUSSIAN = (2.0,)


@cache
def binade_probs(beta: float, offset: float) -> np.ndarray:
    """``P(floor(log2|x|) - k = d)`` for ``d in [-WINDOW_BELOW, WINDOW - WINDOW_BELOW)`` of
    ``x ~ GG(beta)`` with RMS ``2^(k + offset)`` (independent of the integer ``k``).

    Numerical integration of the density of ``u = log2|x|``: ``f(2^u) 2^u ln 2 * 2``, by the
    midpoint rule with 256 points per binade (the integrand is smooth in ``u``)."""
    g = math.gamma
    alpha = math.sqrt(g(1 / beta) / g(3 / beta)) * 2.0**offset  # RMS -> GG scale
    lo = -WINDOW_BELOW
    pts = 256
    u = lo + (np.arange(WINDOW * pts) + 0.5) / pts
    x = np.exp2(u)
    dens = 2 * beta / (2 * alpha * g(1 / beta)) * np.exp(-((x / alpha) ** beta)) * x * math.log(2)
    return readonly(dens.reshape(WINDOW, pts).sum(1) / pts)


@dataclass(frozen=True)
class Table:
    """One static code: Huffman ``lengths`` of the 256 symbols (bf16/fp32: the exponent
    field; fp16: the high byte ``sign | exponent | m[9:8]``, as in the entropy codec; 0 for
    symbols outside the window, which escape), the model ``weights`` of every symbol (for
    the escape code) and the model's mean code bits per value."""

    lengths: np.ndarray
    weights: np.ndarray
    model_bits: float


def _exponent_probs(shape: int, offset: int, zero: int, base: int, exp_bits: int):
    """Model probability of every exponent field value under (shape, offset, zero class)
    with relative binade 0 at field ``base + WINDOW_BELOW``, and which fields are in the
    window (exponent 0 always is: zeros)."""
    p = binade_probs(SHAPES[shape], offset / OFFSETS)
    z = ZERO_CLASSES[zero]
    probs = np.zeros(1 << exp_bits)
    e = base + np.arange(WINDOW)
    ok = (e >= 1) & (e < (1 << exp_bits))
    probs[e[ok]] = p[ok] / max(p.sum(), 1e-300) * (1 - z - ESC_PROB)
    probs[0] = max(z, ESC_PROB / 16)
    inside = probs > 0
    if (~inside).any():
        probs[~inside] = ESC_PROB / (~inside).sum()  # the escape share, spread over the rest
    return probs / probs.sum(), inside


@cache
def table(dtype: str, shape: int, offset: int, zero: int, base: int) -> Table:
    """The static code of a model and shift, built on first use and cached: it depends on
    the model only, never on a message's data."""
    spec = float_spec(dtype)
    pe, inside = _exponent_probs(shape, offset, zero, base, spec.exp_bits)
    if dtype == "float16":  # symbol = sign | e5 | m[9:8]: the three other bits are uniform
        idx = (np.arange(256) >> 2) & 0x1F
        sym, inside = pe[idx] / 8, inside[idx]
    else:
        sym = pe
    weights = np.floor(sym * 2.0**40).astype(np.int64) + 1  # every symbol has a weight
    lengths = entropy.huffman_lengths(np.where(inside, weights, 0), MAX_LEN)
    return Table(readonly(lengths), readonly(weights), float((sym * lengths).sum()))


def build_tables(dtype: str = "bfloat16") -> int:
    """Build every table of ``dtype`` a message of normal values can pick now (they are
    otherwise built on first use); returns how many."""
    spec = float_spec(dtype)
    bias = (1 << (spec.exp_bits - 1)) - 1
    n = 0
    for k in range(-bias - 8, bias + 2):
        for s in range(len(SHAPES)):
            for f in range(OFFSETS):
                for z in range(len(ZERO_CLASSES)):
                    table(dtype, s, f, z, k + bias - WINDOW_BELOW)
                    n += 1
    return n


@dataclass(frozen=True)
class Choice:
    """A message's pick: model indices and ``base`` (the exponent field of relative binade
    ``-WINDOW_BELOW``)."""

    shape: int
    offset: int
    zero: int
    base: int

    def table(self, dtype: str) -> Table:
        return table(dtype, self.shape, self.offset, self.zero, self.base)


@cache
def exponent_moments(shape: int) -> tuple[float, float]:
    """Mean and standard deviation of ``floor(log2|x|) - log2 RMS`` under ``GG(SHAPES[shape])``
    (from the model's binade probabilities): the statistic's expected values."""
    p = binade_probs(SHAPES[shape], 0.0)
    p = p / p.sum()
    d = np.arange(WINDOW) - WINDOW_BELOW
    mu = float((p * d).sum())
    return mu, float(math.sqrt((p * (d - mu) ** 2).sum()))


ESCAPE_BITS = MAX_LEN  # what a sampled symbol without a static code is charged


def choose(vals: np.ndarray, dtype: str, shapes=SHAPES, sample: int = SAMPLE) -> Choice:
    """Pick the table of a message (or chunk) from a strided sample of at most ``sample``
    values: the mean of their exponents ``floor(log2|x|)`` minus the model's offset estimates
    ``log2 RMS`` (the scale; one huge outlier cannot move it, as it would move an RMS) and
    the zero fraction picks the zero class. Around that scale, the candidates (every allowed
    shape, the estimated quarter-binade offset and its two neighbours) are priced on the
    sample's symbol histogram, and the cheapest wins: the model proposes, the sample
    decides between a dozen static tables. ``shapes``: the GG betas allowed (``GAUSSIAN``
    for the plain Gaussian model)."""
    spec = float_spec(dtype)
    kind = _KIND[dtype]
    bias = (1 << (spec.exp_bits - 1)) - 1
    allowed = [SHAPES.index(b) for b in shapes]
    if not vals.size:
        return Choice(allowed[0], 0, 0, bias - WINDOW_BELOW)
    step = max(1, vals.size // sample)
    cnt, zeros, fin, s1, _s2 = K.sample_stats(vals, kind, step)
    zf = zeros / cnt if cnt else 0.0
    zero = int(
        np.argmin([abs(math.log2(zf + 2**-14) - math.log2(c + 2**-14)) for c in ZERO_CLASSES])
    )
    if not fin:
        return Choice(allowed[0], 0, zero, bias - WINDOW_BELOW)
    hist = K.sample_symbols(vals, kind, step)
    mean = s1 / fin
    best, best_bits = None, None
    for shape in allowed:
        q0 = round((mean - exponent_moments(shape)[0]) * OFFSETS)
        for q in (q0 - 1, q0, q0 + 1):
            k, offset = divmod(q, OFFSETS)
            ch = Choice(shape, offset, zero, base=k + bias - WINDOW_BELOW)
            lens = ch.table(dtype).lengths
            bits = int((hist * np.where(lens > 0, lens, ESCAPE_BITS)).sum())
            if best_bits is None or bits < best_bits:
                best, best_bits = ch, bits
    return best


def _as_bits(x, dtype: str | None):
    """(flat raw bits, dtype name) of a tensor or of a numpy raw-bits array with ``dtype``."""
    if isinstance(x, np.ndarray) and x.dtype.kind == "u":
        if dtype is None:
            raise InputError("raw bits need dtype=")
        spec = float_spec(dtype)
        if x.dtype != spec.uint:
            raise InputError(
                f"raw bits of {dtype} must be {np.dtype(spec.uint).name}, got {x.dtype}"
            )
        return readonly(np.ascontiguousarray(x).reshape(-1)), dtype
    bits, name, _ = tensor_to_bits(x)
    if name not in _KIND:
        raise InputError(f"collective codec takes {list(DTYPES)}, not {name!r}")
    return readonly(bits), name


def encode(
    x,
    dtype: str | None = None,
    threads: int | None = 1,
    shapes=SHAPES,
    choice: Choice | None = None,
) -> np.ndarray:
    """One message (uint8) holding tensor ``x`` (bf16/fp16/fp32; or raw bits + ``dtype``).

    ``threads`` encode chunks in parallel (``None``: every core). A message that would not
    be smaller than the raw bits is stored raw, still checksummed."""
    vals, dtype = _as_bits(x, dtype)
    spec = float_spec(dtype)
    kind = _KIND[dtype]
    n = vals.size
    ch = choice or choose(vals, dtype, shapes)
    chunk_values = SEGMENT_BYTES // spec.itemsize
    n_chunks = (n + chunk_values - 1) // chunk_values
    # one table per chunk, from the chunk's own statistic: a gradient bucket or a flat
    # parameter buffer concatenates tensors of different scales
    picks = (
        [ch] * n_chunks
        if choice is not None or n_chunks <= 1
        else [
            choose(vals[c * chunk_values : (c + 1) * chunk_values], dtype, shapes, CHUNK_SAMPLE)
            for c in range(n_chunks)
        ]
    )
    tabs = [p.table(dtype) for p in picks]
    static_len = np.stack([t.lengths for t in tabs]) if tabs else np.zeros((0, 256), np.int64)
    model_w = np.stack([t.weights for t in tabs]) if tabs else np.zeros((0, 256), np.int64)
    lengths = np.zeros((n_chunks, 256), np.int64)
    sbytes = np.zeros((n_chunks, 4), np.int64)
    sizes = np.zeros(n_chunks, np.int64)
    if n_chunks:
        run_shared(
            lambda c: K.plan_static(
                vals,
                c,
                n_chunks,
                chunk_values,
                kind,
                spec.itemsize,
                static_len,
                model_w,
                lengths,
                sbytes,
                sizes,
            ),
            n_chunks,
            threads,
        )
    ends = np.cumsum(sizes)
    base = entropy.HEADER.size + 8 * n_chunks
    body = base + (int(ends[-1]) if n_chunks else 0)
    payload = body + (-body) % 8 + 8  # the entropy payload's zero tail
    stored = payload >= n * spec.itemsize
    total = _HEAD.size + (n * spec.itemsize if stored else payload) + 8
    out = np.empty(total, np.uint8)
    out[: _HEAD.size] = np.frombuffer(
        _HEAD.pack(
            MAGIC, VERSION, spec.code, int(stored), ch.shape, ch.offset, ch.zero, ch.base, 0, n, 0
        ),
        np.uint8,
    )
    if stored:
        out[_HEAD.size : -8] = vals.view(np.uint8)
    else:
        p = out[_HEAD.size : -8]
        p[:base] = np.frombuffer(
            entropy.HEADER.pack(spec.code, MAX_LEN, 0, chunk_values, n, n_chunks)
            + ends.astype(np.uint64).tobytes(),
            np.uint8,
        )
        p[body:] = 0
        offsets = base + ends - sizes
        if n_chunks:
            errs = run_shared(
                lambda c: entropy.write_range(
                    vals,
                    c,
                    n_chunks,
                    chunk_values,
                    kind,
                    spec.itemsize,
                    p,
                    offsets,
                    lengths,
                    sbytes,
                ),
                n_chunks,
                threads,
            )
            if any(errs):  # an encoder bug, not bad input: never ship a wrong message
                raise RuntimeError("collective encoder wrote streams of another size")
    out[-8:] = np.frombuffer(struct.pack("<Q", checksum(out[:-8], threads)), np.uint8)
    return out


@dataclass(frozen=True)
class MessageInfo:
    dtype: str
    n_values: int
    stored: bool
    choice: Choice
    nbytes: int

    @property
    def ratio(self) -> float:
        """Original bytes over message bytes (header and checksum included)."""
        return self.n_values * FLOAT_SPECS[self.dtype].itemsize / self.nbytes


def _parse(buf: np.ndarray) -> MessageInfo:
    if buf.size < _HEAD.size + 8:
        raise CorruptDataError(
            f"collective message of {buf.size} bytes is shorter than its header ({_HEAD.size + 8})"
        )
    magic, ver, code, mode, shape, offset, zero, base, _, n, _ = _HEAD.unpack_from(buf, 0)
    if magic != MAGIC or ver != VERSION:
        raise CorruptDataError(f"not a collective message (magic {magic!r}, version {ver})")
    if code not in _NAMES or _NAMES[code] not in _KIND:
        raise CorruptDataError(f"collective message has dtype code {code}")
    if (
        mode not in (0, 1)
        or shape >= len(SHAPES)
        or offset >= OFFSETS
        or zero >= len(ZERO_CLASSES)
        or abs(base) > 1 << 20
    ):
        raise CorruptDataError(
            f"collective message header is inconsistent (mode {mode}, "
            f"table {shape}/{offset}/{zero}/{base})"
        )
    dtype = _NAMES[code]
    if mode == 1 and buf.size != _HEAD.size + n * FLOAT_SPECS[dtype].itemsize + 8:
        raise CorruptDataError(
            f"stored collective message of {n} {dtype} values has {buf.size} bytes"
        )
    return MessageInfo(dtype, n, mode == 1, Choice(shape, offset, zero, base), buf.size)


def _as_u8(msg) -> np.ndarray:
    if isinstance(msg, np.ndarray):
        return readonly(np.ascontiguousarray(msg).reshape(-1).view(np.uint8))
    try:
        import torch

        if isinstance(msg, torch.Tensor):
            return readonly(msg.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy())
    except ImportError:  # pragma: no cover
        pass
    return readonly(np.frombuffer(msg, np.uint8))


def info(msg) -> MessageInfo:
    """Header facts of a message (after its checksum is verified)."""
    buf = _as_u8(msg)
    _verify(buf)
    return _parse(buf)


def _verify(buf: np.ndarray, threads: int | None = 1) -> None:
    if buf.size < 8:
        raise CorruptDataError(f"collective message of {buf.size} bytes has no checksum")
    want = int(buf[-8:].copy().view(np.uint64)[0])
    got = checksum(buf[:-8], threads)
    if want != got:
        raise CorruptDataError(
            f"collective message checksum mismatch ({got:#018x} computed, "
            f"{want:#018x} stored): the bytes were corrupted in transit"
        )


def decode(
    msg,
    threads: int | None = 1,
    out: np.ndarray | None = None,
    expect: tuple[str, int] | None = None,
) -> tuple[np.ndarray, str]:
    """(flat raw bits, dtype) of a message; ``CorruptDataError`` if its checksum or structure
    is wrong. ``expect=(dtype, n)`` refuses a message of another dtype or length; ``out``
    (flat, contiguous, the dtype's uint) receives the bits."""
    buf = _as_u8(msg)
    if buf.ctypes.data % 8:  # the decoder reads 64-bit words: align the message
        buf = readonly(buf.copy())
    _verify(buf, threads)
    inf = _parse(buf)
    dtype, n = inf.dtype, inf.n_values
    if expect is not None and (expect[0] != dtype or expect[1] != n):
        raise CorruptDataError(
            f"collective message holds {n} {dtype} values; expected {expect[1]} {expect[0]}"
        )
    spec = FLOAT_SPECS[dtype]
    if out is None:
        out = np.empty(n, spec.uint)
    elif out.dtype != spec.uint or out.shape != (n,) or not out.flags.c_contiguous:
        raise InputError(f"out must be a contiguous {np.dtype(spec.uint).name}[{n}] array")
    body = buf[_HEAD.size : -8]
    if inf.stored:
        out[:] = body.view(spec.uint)
        return out, dtype
    entropy.decode(body, dtype, n, threads, out=out)
    return out, dtype


def encode_tensor(t, threads: int | None = 1, shapes=SHAPES) -> np.ndarray:
    """``encode`` of a torch tensor (any shape; the receiver knows the shape)."""
    return encode(t, None, threads, shapes)


def decode_tensor(msg, shape, dtype: str | None = None, threads: int | None = 1):
    """The torch tensor of ``shape`` held by a message (``dtype`` checked when given)."""
    import torch

    from moeflow.compress.bits import bits_to_tensor

    n = math.prod(shape)
    bits, name = decode(msg, threads, expect=None if dtype is None else (dtype, n))
    if bits.size != n:
        raise CorruptDataError(
            f"collective message holds {bits.size} values, shape {tuple(shape)} needs {n}"
        )
    t = bits_to_tensor(bits, name, tuple(shape))
    assert isinstance(t, torch.Tensor)
    return t


def exponent_entropy_bound(x, dtype: str | None = None) -> tuple[float, float]:
    """(empirical exponent entropy ``H_exp`` in bits, the ratio bound ``bits / (bits -
    exp_bits + H_exp)``) of a message: the best any code that stores the non-exponent bits
    raw can do (DFloat11, ZipNN)."""
    from moeflow.compress.stats import entropy_bits, exponent_histogram

    vals, dtype = _as_bits(x, dtype)
    spec = float_spec(dtype)
    h = entropy_bits(exponent_histogram(vals, spec))
    return h, spec.bits / (spec.bits - spec.exp_bits + h)


def expected_ratio(x, dtype: str | None = None, shapes=SHAPES) -> float:
    """The ratio the chosen table's model predicts for ``x`` (sample statistic only, no
    encode): what the adaptive switch uses before deciding to compress."""
    vals, dtype = _as_bits(x, dtype)
    spec = float_spec(dtype)
    tab = choose(vals, dtype, shapes).table(dtype)
    sym_bits = 8 if dtype == "float16" else spec.exp_bits  # bits the symbol replaces
    return spec.bits / (spec.bits - sym_bits + tab.model_bits)
