"""Lossless compressed collectives (ZipCCL): all-to-all, all-gather, reduce-scatter, all-reduce.

ZipCCL compresses the bf16/fp16/fp32 payload of training collectives with exponent codes
predicted from the tensor's scale (``moeflow.compress.collective``), and switches per call:
compress only when ``t_encode(n) + t_comm(n / ratio) + t_decode(n) < t_comm(n)`` under a
:class:`moeflow.perf.PerfModel`.

Algorithms (the uncompressed path runs the same ones, so results do not depend on the switch):

- **all-to-all** (uneven splits): every rank encodes one message per peer, exchanges the
  message sizes (a small all-to-all), then the bytes (an uneven ``all_to_all_single``), and
  decodes. The slice a rank keeps is never encoded.
- **all-gather**: one message per rank; sizes all-gathered, messages padded to the largest.
- **reduce-scatter**: compressed all-to-all of the ``W`` row blocks, decode, sum in fp32 in
  rank order 0..W-1, cast back.
- **all-reduce**: the flat tensor is cut into ``W`` chunks; reduce-scatter them as above, then
  encode the reduced chunk and all-gather it compressed (ZipCCL's composition).

Asynchronous forms (:func:`all_to_all_start`, :func:`all_reduce_start`): the caller gets a
handle at once and a worker thread of the process group does the work. For the all-to-all the
worker encodes, exchanges the sizes and issues the bytes, then takes its next job while they
travel (the next chunk's encode overlaps this chunk's transfer); the decode runs where the
handle is waited on. A pipeline thus overlaps one chunk's encode, transfer and decode with
other chunks' expert compute (the numba codec releases the GIL). The all-reduce (DDP hook)
runs whole on the worker. One worker per process group issues that group's collectives in
submission order, so every rank issues them in the same order - the condition for collectives
not to deadlock; the caller must not issue other collectives on the group while a handle of
it is pending.

Every message carries a checksum: a rank that receives corrupted bytes raises
``CorruptDataError``; it then leaves the collective sequence, so its peers fail their next
wait with ``CommTimeoutError`` (every wait has the deadline ``timeout_s``), never a hang.
"""

from __future__ import annotations

import concurrent.futures
import copy
import math
import os
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.distributed as dist

from moeflow.comm import bytes as comm_bytes
from moeflow.comm.collectives import all_to_all_v
from moeflow.comm.timeouts import DEFAULT_TIMEOUT_S, Pending, resolve_timeout, wait_work
from moeflow.errors import CommTimeoutError, ConfigError, InputError

# torch >= 2.13 names the tensor variant all_gather_single
_ALL_GATHER = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
_DTYPES = {torch.bfloat16: "bfloat16", torch.float16: "float16", torch.float32: "float32"}
_UINT = {2: torch.int16, 4: torch.int32}
#: ratio assumed for a dtype before any message of it was compressed (typical training
#: tensors: bf16 exponents carry ~2.6 of 8 bits, so 16 / (8 + 2.6))
PRIOR_RATIO = {"bfloat16": 1.5, "float16": 1.17, "float32": 1.2}
#: the best ratio a code storing the non-exponent bits raw can reach (exponents free)
MAX_RATIO = {"bfloat16": 2.0, "float16": 16 / 11, "float32": 32 / 24}
CODEC_COSTS_KEY = "codec_costs"  # PerfModel.meta entry of models profiled before the costs
ENCODE, DECODE = "zipccl_encode", "zipccl_decode"

# test hook: called as hook(op, received_bytes_uint8_numpy) on the receiving side before
# decoding, so a test can corrupt bytes "in transit"
_TRANSIT_HOOK: Callable[[str, np.ndarray], None] | None = None


def set_transit_hook(hook: Callable[[str, np.ndarray], None] | None) -> None:
    """Install (or clear with None) the in-transit test hook of this process."""
    global _TRANSIT_HOOK
    _TRANSIT_HOOK = hook


# ------------------------------------------------------------------------ the policy
_STATS_LOCK = threading.Lock()  # module-level: the statistics stay copyable


@dataclass
class CompressionStats:
    """What the switch decided and what it saved, per operation name (this rank's sends)."""

    calls: dict = field(default_factory=dict)
    compressed: dict = field(default_factory=dict)
    raw_bytes: dict = field(default_factory=dict)
    wire_bytes: dict = field(default_factory=dict)

    def add(self, op: str, compressed: bool, raw_bytes: int, wire_bytes: int) -> None:
        with _STATS_LOCK:  # workers of several process groups may share one policy
            self._add(op, compressed, raw_bytes, wire_bytes)

    def _add(self, op: str, compressed: bool, raw_bytes: int, wire_bytes: int) -> None:
        for d, v in (
            (self.calls, 1),
            (self.compressed, int(compressed)),
            (self.raw_bytes, raw_bytes),
            (self.wire_bytes, wire_bytes),
        ):
            d[op] = d.get(op, 0) + v

    @property
    def bytes_saved(self) -> int:
        return sum(self.raw_bytes.values()) - sum(self.wire_bytes.values())

    def as_dict(self) -> dict:
        return {
            op: {
                "calls": self.calls[op],
                "compressed": self.compressed.get(op, 0),
                "raw_bytes": self.raw_bytes.get(op, 0),
                "wire_bytes": self.wire_bytes.get(op, 0),
            }
            for op in sorted(self.calls)
        }


def codec_costs(model) -> tuple | None:
    """(encode, decode) ``LinearCost`` (ms per raw byte) of a PerfModel, or None.

    Read from ``model.costs`` (where ``moeflow profile`` writes them), else from
    ``model.meta["codec_costs"]`` (where earlier versions of it wrote them), so older models
    still load."""
    from moeflow.perf.cost import LinearCost

    if model is None:
        return None
    costs = getattr(model, "costs", {})
    if ENCODE in costs and DECODE in costs:
        return costs[ENCODE], costs[DECODE]
    meta = (getattr(model, "meta", {}) or {}).get(CODEC_COSTS_KEY)
    if meta and ENCODE in meta and DECODE in meta:
        return LinearCost.from_dict(meta[ENCODE]), LinearCost.from_dict(meta[DECODE])
    return None


class Compression:
    """Whether and how a collective compresses: ``mode`` True (always), False (never) or
    "auto" (ZipCCL's per-call switch under ``perf``, a PerfModel with codec costs).

    The auto decision must be the same on every rank of a collective, so ``perf`` must be the
    same on every rank (``moeflow profile`` fits one model for all, codec costs included; a
    model without them is refused with a :class:`ConfigError` naming the missing cost), and the
    decision uses only what every rank knows: the message size in bytes (equal for
    all-gather, reduce-scatter and all-reduce) and a ratio estimate per (operation, dtype)
    that is updated from the exchanged message sizes of the last compressed call (every
    rank sees the same sizes).
    The uneven all-to-all is decided per sender instead; receivers learn each sender's
    choice in the size exchange.
    """

    def __init__(
        self,
        mode=True,
        perf=None,
        *,
        threads: int | None = 1,
        timeout_s: float | None = None,
        shapes=None,
    ):
        if mode not in (True, False, "auto"):
            raise ConfigError("compress", mode, "True, False or 'auto'")
        self.mode = mode
        self.perf = perf
        self.costs = codec_costs(perf)
        if mode == "auto":
            if perf is None:
                raise ConfigError(
                    "perf", None, "a PerfModel (e.g. from `moeflow profile`) when compress='auto'"
                )
            if self.costs is None:
                raise ConfigError(
                    "perf",
                    getattr(perf, "name", perf),
                    f"a PerfModel with the codec costs {ENCODE!r} and {DECODE!r} when "
                    "compress='auto' (`moeflow profile` measures them)",
                )
        self.threads = threads
        self.timeout_s = resolve_timeout(timeout_s)
        from moeflow.compress import collective as codec

        self.codec = codec
        self.shapes = codec.SHAPES if shapes is None else tuple(shapes)
        self.stats = CompressionStats()
        self._ratio: dict = {}

    # -- the switch ---------------------------------------------------------------------
    def ratio_estimate(self, op: str, dtype: str) -> float:
        return self._ratio.get((op, dtype), PRIOR_RATIO[dtype])

    def learn_ratio(self, op: str, dtype: str, raw: int, wire: int) -> None:
        if wire > 0:
            self._ratio[(op, dtype)] = raw / wire

    def _comm(self, primitive: str, n: float) -> float:
        return self.perf.time(primitive, n)

    def predicted_ms(
        self,
        primitive: str,
        n: float,
        ratio: float,
        enc_bytes: float | None = None,
        dec_bytes: float | None = None,
    ) -> tuple[float, float]:
        """(raw, compressed) predicted time of one collective step moving ``n`` bytes (the
        PerfModel's size for ``primitive``) when this rank encodes ``enc_bytes`` and decodes
        ``dec_bytes`` (default ``n`` each)."""
        enc, dec = self.costs
        raw = self._comm(primitive, n)
        e = n if enc_bytes is None else enc_bytes
        d = n if dec_bytes is None else dec_bytes
        return raw, enc(e) + self._comm(primitive, n / ratio) + dec(d)

    def decide(
        self,
        op: str,
        primitive: str,
        nbytes: float,
        dtype: str,
        steps: Sequence[tuple] = (),
        enc_bytes: float | None = None,
        dec_bytes: float | None = None,
    ) -> bool:
        """Compress this call? ``steps``: extra ``(primitive, bytes, enc_bytes, dec_bytes)``
        of the same algorithm (all-reduce: the all-gather after the all-to-all)."""
        if self.mode is not True and self.mode is not False:
            if nbytes <= 0:
                return False
            r = self.ratio_estimate(op, dtype)
            raw, comp = self.predicted_ms(primitive, nbytes, r, enc_bytes, dec_bytes)
            for prim, n, e, d in steps:
                a, b = self.predicted_ms(prim, n, r, e, d)
                raw, comp = raw + a, comp + b
            return comp < raw
        return bool(self.mode) and nbytes > 0

    def with_mode(self, mode) -> Compression:
        """This policy with a fixed decision (``True``/``False``) for one call; it shares the
        statistics and ratio estimates."""
        c = copy.copy(self)
        c.mode = bool(mode)
        return c

    def never_pays(self, primitive: str, dtype: str) -> bool:
        """True when compression cannot pay for any size, even at the best possible ratio:
        ``beta_comm (1 - 1/r_max) <= beta_enc + beta_dec`` (linear costs). Every rank then
        agrees to send raw without exchanging anything."""
        enc, dec = self.costs
        c = self.perf.cost(primitive)
        return c.beta * (1 - 1 / MAX_RATIO[dtype]) <= enc.beta + dec.beta


def as_compression(compress, perf=None, **kw) -> Compression:
    return compress if isinstance(compress, Compression) else Compression(compress, perf, **kw)


# ------------------------------------------------------------------------ devices
def codec_device_error(
    compress, device, where: str, *, any_mode: bool = False
) -> ConfigError | None:
    """The error a compression setting meets on ``device``, or None when it can be honoured.

    ``compress``: a :class:`Compression`, its mode (True / False / "auto"), or None. The
    collectives of this module encode with the CPU codec (``moeflow.compress.collective``,
    numpy buffers) and stage their messages in host memory, so they serve CPU tensors
    only. The GPU codec (``moeflow.compress.collective_gpu``, ZipCCL's fixed-length
    exponent code) encodes one bf16/fp32 tensor into one device message, but no collective
    here exchanges such messages, so a setting that may compress (True or "auto") on any
    other device is refused rather than sent as raw bytes under a compression setting.
    ``any_mode``: refuse False too (the collectives of this module themselves, which stage
    their buffers in host memory whatever the mode).
    """
    mode = compress.mode if isinstance(compress, Compression) else compress
    dev = device if isinstance(device, torch.device) else torch.device(device)
    if dev.type == "cpu" or (not any_mode and (compress is None or mode is False)):
        return None
    fix = (
        "on CPU tensors only (for device tensors use the plain collectives)"
        if any_mode
        else f"False for {dev.type} tensors"
    )
    return ConfigError(
        "compress",
        mode,
        f"{fix} ({where}): ZipCCL's compressed collectives (moeflow.comm.compressed) "
        "run on CPU tensors only; the GPU codec (moeflow.compress.collective_gpu) has no "
        "compressed collective yet",
    )


def check_codec_device(compress, device, where: str, *, any_mode: bool = False) -> None:
    """Raise :func:`codec_device_error`'s ConfigError, if any (call it before any
    communication of the collective it guards)."""
    err = codec_device_error(compress, device, where, any_mode=any_mode)
    if err is not None:
        raise err


def _check_cpu(x: torch.Tensor, cz: Compression, op: str) -> None:
    # even uncompressed, these collectives stage buffers in host memory
    check_codec_device(cz, x.device, op, any_mode=True)


# ------------------------------------------------------------------------ helpers
def _dtype_name(t: torch.Tensor) -> str:
    if t.dtype not in _DTYPES:
        raise InputError(
            f"compressed collectives take {sorted(_DTYPES.values())} tensors, got {t.dtype}"
        )
    return _DTYPES[t.dtype]


def _bits_np(t: torch.Tensor) -> np.ndarray:
    """Flat raw bits of a contiguous CPU tensor as numpy (a view)."""
    t = t.detach().contiguous().reshape(-1)
    u = np.uint16 if t.element_size() == 2 else np.uint32
    if t.numel() == 0:
        return np.empty(0, u)
    return t.view(_UINT[t.element_size()]).numpy().view(u)


def _from_bits(bits: np.ndarray, like: torch.Tensor, shape) -> torch.Tensor:
    i = torch.from_numpy(bits.view(np.int16 if bits.dtype == np.uint16 else np.int32))
    return i.view(like.dtype).reshape(shape)


def _wait(work, op: str, timeout_s: float) -> None:
    wait_work(work, op, timeout_s)


def _group_size(group) -> int:
    return dist.get_world_size(group)


def _recv_hook(op: str, buf: torch.Tensor) -> None:
    if _TRANSIT_HOOK is not None and buf.numel():
        _TRANSIT_HOOK(op, buf.numpy())


# ------------------------------------------------------------------------ all-to-all
def all_to_all(
    x_RD: torch.Tensor,
    in_splits: Sequence[int],
    out_splits: Sequence[int],
    group=None,
    compress="auto",
    perf=None,
    *,
    op: str = "all-to-all",
    timeout_s: float | None = None,
) -> torch.Tensor:
    """Send rows ``x_RD[sum(in_splits[:j]):...]`` to rank j; receive ``out_splits[j]`` rows
    from j (like ``all_to_all_single`` with uneven splits), each message compressed.

    ``compress``: a :class:`Compression`, or its ``mode`` (True / False / "auto" with
    ``perf``)."""
    cz = as_compression(compress, perf, timeout_s=timeout_s)
    _check_cpu(x_RD, cz, op)
    return _all_to_all_begin(x_RD, in_splits, out_splits, group, cz, op)()


def _all_to_all_begin(
    x_RD: torch.Tensor, in_splits, out_splits, group, cz: Compression, op: str
) -> Callable[[], torch.Tensor]:
    """Encode, exchange the message sizes and issue the bytes; returns the step that waits
    for them and decodes (so the bytes travel while the caller does other work)."""
    W = _group_size(group)
    me = dist.get_rank(group)
    in_splits = [int(s) for s in in_splits]
    out_splits = [int(s) for s in out_splits]
    if len(in_splits) != W or len(out_splits) != W or sum(in_splits) != x_RD.shape[0]:
        raise InputError(
            f"{op}: in_splits {in_splits} / out_splits {out_splits} must have "
            f"{W} entries and in_splits must sum to {x_RD.shape[0]} rows"
        )
    dtype = _dtype_name(x_RD)
    x_RD = x_RD.contiguous()
    tail = tuple(x_RD.shape[1:])
    row = math.prod(tail) * x_RD.element_size()
    raw_send = (sum(in_splits) - in_splits[me]) * row
    if W == 1:
        out1 = x_RD.clone()
        return lambda: out1
    if cz.mode == "auto":
        # senders choose, receivers learn the choice from the size exchange, unless no
        # size can pay (then every rank knows it and nothing is exchanged). The PerfModel
        # sizes an all-to-all by the buffer each rank hands over, its own rows included.
        exchange = not cz.never_pays("a2a", dtype)
        buf_bytes = raw_send * W / (W - 1)
        use = exchange and cz.decide(
            op, "a2a", buf_bytes, dtype, enc_bytes=raw_send, dec_bytes=raw_send
        )
    else:
        use = exchange = bool(cz.mode)
    if not exchange:  # the plain path: no size exchange, bytes as they are
        out = x_RD.new_empty((sum(out_splits),) + tail)
        comm_bytes.record("all_to_all_v", group, [n * row for n in in_splits], op)
        work = dist.all_to_all_single(out, x_RD, out_splits, in_splits, group=group, async_op=True)
        cz.stats.add(op, False, raw_send, raw_send)

        def finish_plain() -> torch.Tensor:
            _wait(work, op, cz.timeout_s)
            return out

        return finish_plain
    # encode one message per peer (or send raw bytes: size -1)
    pieces = list(x_RD.split(in_splits))
    msgs: list = []
    sizes = torch.empty(W, dtype=torch.int64)
    for j, p in enumerate(pieces):
        if j != me and use and p.numel():
            m = cz.codec.encode(_bits_np(p), dtype, cz.threads, cz.shapes)
            msgs.append(torch.from_numpy(m))
            sizes[j] = m.size
        else:
            msgs.append(p.reshape(-1).view(torch.uint8))
            sizes[j] = -1
    rsizes = torch.empty(W, dtype=torch.int64)
    comm_bytes.record("compressed_all_to_all_sizes", group, [sizes.element_size()] * W, op)
    _wait(
        dist.all_to_all_single(rsizes, sizes, group=group, async_op=True),
        f"{op} (sizes)",
        cz.timeout_s,
    )
    send_b = [int(m.numel()) for m in msgs]
    recv_b = [int(s) if s >= 0 else out_splits[j] * row for j, s in enumerate(rsizes.tolist())]
    sendbuf = torch.cat(msgs) if msgs else torch.empty(0, dtype=torch.uint8)
    recvbuf = torch.empty(sum(recv_b), dtype=torch.uint8)
    comm_bytes.record("compressed_all_to_all", group, send_b, op)
    work = dist.all_to_all_single(recvbuf, sendbuf, recv_b, send_b, group=group, async_op=True)
    wire = sum(send_b) - send_b[me]
    cz.stats.add(op, use, raw_send, wire)
    if use:
        cz.learn_ratio(op, dtype, raw_send, wire)

    def finish() -> torch.Tensor:
        _wait(work, op, cz.timeout_s)
        _recv_hook(op, recvbuf)
        out = x_RD.new_empty((sum(out_splits),) + tail)
        outs = out.split(out_splits)
        offs = np.concatenate([[0], np.cumsum(recv_b)])
        for j in range(W):
            seg = recvbuf[int(offs[j]) : int(offs[j + 1])]
            if rsizes[j] < 0:
                outs[j].reshape(-1).view(torch.uint8).copy_(seg)
            else:
                n = out_splits[j] * (row // x_RD.element_size())
                bits = _bits_np(outs[j])
                cz.codec.decode(seg.numpy(), cz.threads, out=bits, expect=(dtype, n))
        return out

    return finish


# ------------------------------------------------------------------------ asynchronous
_WORKERS: dict[int, tuple[object, concurrent.futures.ThreadPoolExecutor]] = {}
_WORKERS_LOCK = threading.Lock()
# a forked child has none of its parent's threads: it starts its own workers
os.register_at_fork(after_in_child=_WORKERS.clear)


def _worker(group) -> concurrent.futures.ThreadPoolExecutor:
    """The one thread that issues this process's asynchronous compressed collectives on
    ``group`` (FIFO: the submission order is the issue order)."""
    key = id(group) if group is not None else id(dist.GroupMember.WORLD)
    with _WORKERS_LOCK:
        entry = _WORKERS.get(key)
        if entry is None or entry[0] is not group:
            pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="zipccl")
            entry = _WORKERS[key] = (group, pool)
    return entry[1]


def submit(group, fn: Callable, *args, **kw) -> concurrent.futures.Future:
    """Run ``fn(*args, **kw)`` (collectives on ``group``) on the group's worker thread; the
    bytes it hands to torch.distributed go to the counters installed here, now."""
    counters = comm_bytes.installed()

    def job():
        with comm_bytes.counting_all(counters):
            return fn(*args, **kw)

    return _worker(group).submit(job)


def _pending(fut: concurrent.futures.Future, op: str, timeout_s: float) -> Pending:
    # Each collective inside the job waits with its own deadline; this bound covers the
    # job's few collectives plus the jobs queued before it on the same worker.
    bound = 4 * timeout_s

    def finish() -> torch.Tensor:
        try:
            return fut.result(timeout=bound)
        except concurrent.futures.TimeoutError:
            raise CommTimeoutError(f"{op} did not finish within {bound:g}s") from None

    return Pending(None, op, timeout_s, finish)


def all_to_all_start(
    x_RD: torch.Tensor,
    in_splits: Sequence[int],
    out_splits: Sequence[int],
    group=None,
    compress="auto",
    perf=None,
    *,
    op: str = "all-to-all",
    timeout_s: float | None = None,
) -> Pending:
    """:func:`all_to_all`, issued now: the group's worker thread encodes the messages,
    exchanges their sizes and issues the bytes; ``wait()`` waits for them and decodes, on
    the waiting thread. ``x_RD`` must not change until then."""
    cz = as_compression(compress, perf, timeout_s=timeout_s)
    _check_cpu(x_RD, cz, op)  # before anything is queued
    dtype = _dtype_name(x_RD)
    if cz.mode is False or (cz.mode == "auto" and cz.never_pays("a2a", dtype)):
        # every rank knows nothing will be encoded: the plain all-to-all, issued here
        # (no worker, no size exchange), as :func:`all_to_all`'s plain path sends it
        p = all_to_all_v(x_RD, in_splits, out_splits, group, op, cz.timeout_s)
        me = dist.get_rank(group)
        row = math.prod(x_RD.shape[1:]) * x_RD.element_size()
        raw_send = (sum(int(n) for n in in_splits) - int(in_splits[me])) * row
        cz.stats.add(op, False, raw_send, raw_send)
        return p
    # the worker encodes, exchanges sizes and issues the bytes, then takes the next job
    # while they travel; the decode runs where the handle is waited on
    fut = submit(group, _all_to_all_begin, x_RD, in_splits, out_splits, group, cz, op)
    begun = _pending(fut, op, cz.timeout_s)
    return Pending(None, op, cz.timeout_s, lambda: begun.wait()())


def all_reduce_start(
    x: torch.Tensor,
    group=None,
    compress="auto",
    perf=None,
    *,
    op: str = "all-reduce",
    timeout_s: float | None = None,
) -> concurrent.futures.Future:
    """:func:`all_reduce`, issued now on the group's worker thread: a future of the sum.
    ``x`` must not change until it completes."""
    cz = as_compression(compress, perf, timeout_s=timeout_s)
    _check_cpu(x, cz, op)
    return submit(group, all_reduce, x, group, cz, op=op)


# ------------------------------------------------------------------------ all-gather
def all_gather(
    x: torch.Tensor,
    group=None,
    compress="auto",
    perf=None,
    *,
    counts: Sequence[int] | None = None,
    op: str = "all-gather",
    timeout_s: float | None = None,
) -> torch.Tensor:
    """Every rank's ``x`` concatenated along dim 0 in rank order (``all_gather_into_tensor``),
    each rank's contribution sent as one compressed message. ``counts``: rows per rank when
    they differ (default: all equal to ``x.shape[0]``)."""
    cz = as_compression(compress, perf, timeout_s=timeout_s)
    _check_cpu(x, cz, op)
    W = _group_size(group)
    me = dist.get_rank(group)
    dtype = _dtype_name(x)
    x = x.contiguous()
    tail = tuple(x.shape[1:])
    counts = [x.shape[0]] * W if counts is None else [int(c) for c in counts]
    if len(counts) != W or counts[me] != x.shape[0]:
        raise InputError(f"{op}: counts {counts} must have {W} entries, this rank's = {x.shape[0]}")
    per = math.prod(tail)
    raw = sum(counts) * per * x.element_size()
    if W == 1:
        return x.clone()
    # the PerfModel sizes an all-gather by its output; this rank encodes its own part and
    # decodes the others'
    mine_b = x.numel() * x.element_size()
    use = cz.decide(op, "ag", raw, dtype, enc_bytes=mine_b, dec_bytes=raw - mine_b)
    out = x.new_empty((sum(counts),) + tail)
    outs = out.split(counts)
    if not use:
        buf = torch.empty(W * max(counts) * per, dtype=x.dtype)
        mine = torch.zeros(max(counts) * per, dtype=x.dtype)
        mine[: x.numel()] = x.reshape(-1)
        comm_bytes.record("compressed_all_gather", group, [mine.numel() * x.element_size()] * W, op)
        _wait(_ALL_GATHER(buf, mine, group=group, async_op=True), op, cz.timeout_s)
        for j in range(W):
            outs[j].copy_(
                buf[j * max(counts) * per : j * max(counts) * per + counts[j] * per].view_as(
                    outs[j]
                )
            )
        cz.stats.add(op, False, x.numel() * x.element_size(), max(counts) * per * x.element_size())
        return out
    msg = torch.from_numpy(cz.codec.encode(_bits_np(x), dtype, cz.threads, cz.shapes))
    sizes = torch.empty(W, dtype=torch.int64)
    comm_bytes.record("compressed_all_gather_sizes", group, [sizes.element_size()] * W, op)
    _wait(
        _ALL_GATHER(sizes, torch.tensor([msg.numel()]), group=group, async_op=True),
        f"{op} (sizes)",
        cz.timeout_s,
    )
    big = int(sizes.max())
    mine = torch.zeros(big, dtype=torch.uint8)
    mine[: msg.numel()] = msg
    buf = torch.empty(W * big, dtype=torch.uint8)
    comm_bytes.record("compressed_all_gather", group, [big] * W, op)
    _wait(_ALL_GATHER(buf, mine, group=group, async_op=True), op, cz.timeout_s)
    _recv_hook(op, buf)
    cz.stats.add(op, True, x.numel() * x.element_size(), big)
    cz.learn_ratio(op, dtype, raw, int(sizes.sum()))
    for j in range(W):
        if j == me:
            outs[j].copy_(x)
            continue
        seg = buf[j * big : j * big + int(sizes[j])]
        cz.codec.decode(
            seg.numpy(), cz.threads, out=_bits_np(outs[j]), expect=(dtype, counts[j] * per)
        )
    return out


# ------------------------------------------------------------------------ reductions
def _sum_in_rank_order(blocks: Sequence[torch.Tensor], dtype: torch.dtype) -> torch.Tensor:
    """Sum in fp32, rank 0 first: a fixed order, so every path gives the same bits."""
    acc = blocks[0].to(torch.float32, copy=True)
    for b in blocks[1:]:
        acc += b.to(torch.float32)
    return acc.to(dtype)


def reduce_scatter(
    x: torch.Tensor,
    group=None,
    compress="auto",
    perf=None,
    *,
    counts: Sequence[int] | None = None,
    op: str = "reduce-scatter",
    timeout_s: float | None = None,
) -> torch.Tensor:
    """Rank j gets the sum over ranks of rows ``[sum(counts[:j]), ...)`` of ``x`` (default
    counts: ``x.shape[0] / W`` each): compressed all-to-all, decode, fp32 sum in rank order."""
    cz = as_compression(compress, perf, timeout_s=timeout_s)
    _check_cpu(x, cz, op)
    W = _group_size(group)
    me = dist.get_rank(group)
    if counts is None:
        if x.shape[0] % W:
            raise InputError(
                f"{op}: {x.shape[0]} rows do not split into {W} equal blocks; pass counts="
            )
        counts = [x.shape[0] // W] * W
    counts = [int(c) for c in counts]
    if W == 1:
        return x.clone()
    recv = all_to_all(x, counts, [counts[me]] * W, group, cz, op=op)
    return _sum_in_rank_order(recv.split(counts[me]), x.dtype)


def _decide_all_reduce(cz: Compression, op: str, nbytes: int, dtype: str, W: int) -> bool:
    # the ratio estimate comes from the all-gather step, whose message sizes every rank sees
    part = nbytes * (W - 1) / W  # sent (and received) in the a2a, received in the all-gather
    # the PerfModel sizes an all-to-all by the buffer each rank hands over (own part included)
    return cz.decide(
        f"{op} (all-gather)",
        "a2a",
        nbytes,
        dtype,
        steps=[("ag", nbytes, nbytes / W, part)],
        enc_bytes=part,
        dec_bytes=part,
    )


def all_reduce(
    x: torch.Tensor,
    group=None,
    compress="auto",
    perf=None,
    *,
    op: str = "all-reduce",
    timeout_s: float | None = None,
) -> torch.Tensor:
    """Sum of ``x`` over the group (a new tensor of ``x``'s shape and dtype): ZipCCL's
    compressed all-to-all -> decode -> fp32 reduce in rank order -> encode -> compressed
    all-gather. The same algorithm runs uncompressed when the switch says so, so the result
    is bit-identical either way."""
    cz = as_compression(compress, perf, timeout_s=timeout_s)
    _check_cpu(x, cz, op)
    W = _group_size(group)
    dtype = _dtype_name(x)
    if W == 1:
        return x.clone()
    flat = x.detach().contiguous().reshape(-1)
    n = flat.numel()
    counts = [n // W + (1 if j < n % W else 0) for j in range(W)]
    use = _decide_all_reduce(cz, op, n * x.element_size(), dtype, W)
    mode = cz.with_mode(use)  # one decision for both steps, the same on every rank
    me = dist.get_rank(group)
    recv = all_to_all(flat, counts, [counts[me]] * W, group, mode, op=f"{op} (a2a)")
    red = _sum_in_rank_order(recv.split(counts[me]), x.dtype)
    out = all_gather(red, group, mode, counts=counts, op=f"{op} (all-gather)")
    return out.view(x.shape)


def timed(fn, *args, **kw) -> tuple[object, float]:
    """(result, milliseconds) of one call (benchmarks)."""
    t0 = time.perf_counter()
    r = fn(*args, **kw)
    return r, (time.perf_counter() - t0) * 1e3


__all__ = [
    "check_codec_device",
    "codec_device_error",
    "Compression",
    "CompressionStats",
    "all_to_all",
    "all_to_all_start",
    "all_gather",
    "reduce_scatter",
    "all_reduce",
    "all_reduce_start",
    "codec_costs",
    "submit",
    "set_transit_hook",
    "DEFAULT_TIMEOUT_S",
    "ENCODE",
    "DECODE",
    "CODEC_COSTS_KEY",
]
