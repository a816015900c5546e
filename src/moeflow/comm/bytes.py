"""Bytes handed to torch.distributed, counted where the tensors are handed over.

Every collective of :mod:`moeflow.comm.collectives` (and the compressed all-to-all of
:mod:`moeflow.comm.compressed`, with its encoded wire bytes) calls :func:`record` with the
bytes it gives torch.distributed for each peer, computed from the tensor it passes and its
splits. The records go to every :class:`ByteCounter` installed at that moment
(:func:`count`, or :func:`counting` for a counter that lives longer, e.g. a dispatcher's),
which sums them per collective kind (``by_op``), per link level (``by_level``:
``intra_node`` / ``inter_node`` from the counter's node map, ``unknown`` where it has none)
and per both (``by_op_level``). Rows a rank addresses to itself cross no link: they go to
``self_bytes`` only.

Kinds and what is recorded per peer j (``n`` the bytes of the tensor handed over):
``all_to_all_v`` the rows of split j; ``all_gather_v`` / ``all_gather_equal`` all of ``n``
(the all-to-all form ships it to every peer); ``reduce_scatter_v`` the rows of block j;
``all_to_all_equal`` ``n / W``; ``all_reduce`` ``n`` once, on the widest level the group
spans (the payload; the wire traffic of the backend's algorithm is not visible here);
``compressed_all_to_all`` the encoded bytes of message j (``compressed_all_to_all_sizes``:
its size exchange).

Counters are installed per thread: a collective that a worker thread runs on behalf of the
caller (the asynchronous compressed collectives of :mod:`moeflow.comm.compressed`) records
into the counters that were installed where it was issued (:func:`installed`, then
:func:`counting_all` in the worker), never into another thread's.
"""

from __future__ import annotations

import re
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch.distributed as dist

from moeflow.comm.groups import global_ranks

_LOCAL = threading.local()
_RECORD_LOCK = threading.Lock()  # module-level: counters stay copyable and picklable


def _active() -> list[ByteCounter]:
    """The counters installed in the calling thread."""
    stack = getattr(_LOCAL, "counters", None)
    if stack is None:
        stack = _LOCAL.counters = []
    return stack


_CHUNK = re.compile(r" \(chunk \d+/\d+\)")


def node_map(topology, group=None) -> dict[int, int]:
    """Global rank -> node of the ranks of ``group`` laid out as ``topology`` says."""
    return {g: topology.node_of(i) for i, g in enumerate(global_ranks(group))}


class ByteCounter:
    """Bytes this rank handed to torch.distributed, per collective kind and link level.

    ``nodes``: global rank -> node id (:func:`node_map`), or a function returning it (called
    at the first record); None: every link is ``unknown``.
    ``by_label`` sums per role label of the call (chunk suffixes removed)."""

    def __init__(self, nodes: dict[int, int] | None = None):
        self.nodes = nodes
        self.reset()

    def reset(self) -> None:
        self.by_op: dict[str, int] = {}
        self.by_level: dict[str, int] = {}
        self.by_op_level: dict[tuple[str, str], int] = {}
        self.by_label: dict[str, int] = {}
        self.calls: dict[str, int] = {}
        self.self_bytes = 0

    @property
    def total(self) -> int:
        return sum(self.by_op.values())

    def level(self, a: int, b: int) -> str:
        """Link level between global ranks a and b."""
        if callable(self.nodes):  # resolved at first use (needs torch.distributed up)
            self.nodes = self.nodes()
        nodes = self.nodes
        if nodes is None or a not in nodes or b not in nodes:
            return "unknown"
        return "intra_node" if nodes[a] == nodes[b] else "inter_node"

    def add(self, kind: str, label: str, level: str, nbytes: int) -> None:
        if nbytes <= 0:
            return
        self.by_op[kind] = self.by_op.get(kind, 0) + nbytes
        self.by_level[level] = self.by_level.get(level, 0) + nbytes
        key = (kind, level)
        self.by_op_level[key] = self.by_op_level.get(key, 0) + nbytes
        label = _CHUNK.sub("", label)
        self.by_label[label] = self.by_label.get(label, 0) + nbytes

    def record(self, kind: str, label: str, ranks: list[int], me: int, sent: Sequence[int]):
        with _RECORD_LOCK:  # a worker thread may record while the caller does
            self._record(kind, label, ranks, me, sent)

    def _record(self, kind: str, label: str, ranks: list[int], me: int, sent: Sequence[int]):
        self.calls[kind] = self.calls.get(kind, 0) + 1
        for j, n in enumerate(sent):
            if j == me:
                self.self_bytes += int(n)
            else:
                self.add(kind, label, self.level(ranks[me], ranks[j]), int(n))

    def record_span(self, kind: str, label: str, ranks: list[int], nbytes: int) -> None:
        with _RECORD_LOCK:  # a worker thread may record while the caller does
            self._record_span(kind, label, ranks, nbytes)

    def _record_span(self, kind: str, label: str, ranks: list[int], nbytes: int) -> None:
        self.calls[kind] = self.calls.get(kind, 0) + 1
        levels = {self.level(ranks[0], g) for g in ranks[1:]}
        level = next((lv for lv in ("unknown", "inter_node") if lv in levels), "intra_node")
        self.add(kind, label, level, int(nbytes))


def active() -> bool:
    """True while any counter is installed in this thread (collectives skip the bookkeeping
    otherwise)."""
    return bool(_active())


def installed() -> tuple[ByteCounter, ...]:
    """The counters installed in this thread now (for a worker to record into:
    :func:`counting_all`)."""
    return tuple(_active())


def record(kind: str, group, sent_per_peer: Sequence[int], label: str = "") -> None:
    """This rank handed ``sent_per_peer[j]`` bytes for group rank j of ``group`` to
    torch.distributed in one ``kind`` collective."""
    counters = _active()
    if not counters:
        return
    ranks = global_ranks(group)
    me = dist.get_rank(group)
    for c in counters:
        c.record(kind, label, ranks, me, sent_per_peer)


def record_span(kind: str, group, nbytes: int, label: str = "") -> None:
    """A collective whose per-peer traffic depends on the backend's algorithm (all-reduce):
    its payload ``nbytes``, on the widest link level ``group`` spans."""
    counters = _active()
    if not counters:
        return
    ranks = global_ranks(group)
    for c in counters:
        c.record_span(kind, label, ranks, nbytes)


@contextmanager
def counting(counter: ByteCounter) -> Iterator[ByteCounter]:
    """Install ``counter`` for the scope, in this thread (nested counters all receive the
    records)."""
    with counting_all((counter,)):
        yield counter


@contextmanager
def counting_all(counters: Sequence[ByteCounter]) -> Iterator[None]:
    """Install every one of ``counters`` for the scope, in this thread."""
    stack = _active()
    stack.extend(counters)
    try:
        yield
    finally:
        for c in counters:
            stack.remove(c)


@contextmanager
def count(topology=None, group=None, nodes: dict | None = None) -> Iterator[ByteCounter]:
    """``with count(topology, group) as c: ...``: a fresh counter for the scope.

    ``topology`` (a :class:`moeflow.comm.Topology` of ``group``, default the world) or
    ``nodes`` (global rank -> node) gives the link levels; without either they are
    ``unknown``."""
    if nodes is None and topology is not None:
        nodes = node_map(topology, group)
    with counting(ByteCounter(nodes)) as c:
        yield c


__all__ = [
    "ByteCounter",
    "active",
    "count",
    "counting",
    "counting_all",
    "installed",
    "node_map",
    "record",
    "record_span",
]
