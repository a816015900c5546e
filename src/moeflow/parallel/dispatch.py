"""Token dispatchers: move (token, expert) rows to the ranks that own the experts and back.

Shapes: N local assignments (rows of ``x_ND``, sorted by global expert), E global experts,
P expert-parallel ranks (the EP group), E_l = E / P local experts per EP rank, S the ESP
group size (ranks that share the same experts, each with an F-slice), r pipeline chunks.

Three dispatchers share one interface (FSMoE, ASPLOS'25: the dispatch module of the layer):

* ``A2ADispatcher`` ("a2a"): flat, dropless. Per-expert counts are exchanged first
  (an all-to-all of a ``[P, E_l]`` int tensor), then rows move with variable splits.
* ``CapacityDispatcher`` ("capacity"): fixed-capacity, GShard style. Every (rank, expert)
  sends exactly ``slots`` rows, zero-padded; no count exchange, equal splits. ``slots`` is
  the largest per-rank capacity ``ceil(f*T*K/E)`` over the group (one tiny all-reduce,
  issued by ``begin`` before routing so it overlaps the router), so drop semantics stay
  those of the single-device layer on each rank's batch (the router has already dropped;
  padding rows are zeros, which every expert maps to zeros).
* ``HierarchicalDispatcher`` ("2dh"): 2-D hierarchical all-to-all (FSMoE / Tutel 2DH):
  an intra-node all-to-all that gathers on rank (a, j) every row of node a headed for
  local index j on any node, then an inter-node all-to-all among ranks with local index j.
  Combine runs the mirror image. Counts are all-gathered over the EP group (``[P, P, E_l]``)
  because the intermediate rank needs them.

Pipelining cuts every (source, destination, expert) block into r near-equal pieces
(``split_sizes``). Both ends compute the same pieces from the exchanged counts, so chunk c
needs no further count exchange, and any chunk degree works for forward and backward.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass, field

import torch

from moeflow.comm.collectives import all_gather_equal, all_to_all_equal, all_to_all_v
from moeflow.comm.timeouts import Pending
from moeflow.errors import ConfigError
from moeflow.parallel.dedup import DedupDispatcher

# keyword arguments every dispatcher takes; each class adds its own in ``options``
COMMON_ARGS = (
    "ep_group",
    "ep_size",
    "ep_rank",
    "esp_group",
    "esp_size",
    "esp_rank",
    "num_local_experts",
    "timeout_s",
)


# -- index arithmetic on variable-size blocks -----------------------------------------------
def split_sizes(n: torch.Tensor, r: int, c: int) -> torch.Tensor:
    """Size of piece c when each entry of ``n`` is cut into r pieces (first n % r get +1)."""
    return n // r + (n % r > c).long()


def split_offsets(n: torch.Tensor, r: int, c: int) -> torch.Tensor:
    """Offset of piece c inside each block of size ``n``."""
    return (n // r) * c + torch.clamp(n % r, max=c)


def exclusive_cumsum(t: torch.Tensor) -> torch.Tensor:
    flat = t.reshape(-1)
    out = torch.zeros_like(flat)
    if flat.numel() > 1:
        out[1:] = torch.cumsum(flat[:-1], 0)
    return out.view(t.shape)


def sub_block_index(
    sizes: torch.Tensor,
    sub_off: torch.Tensor | None = None,
    sub_len: torch.Tensor | None = None,
    perm: tuple | None = None,
) -> torch.Tensor:
    """Row index that picks ``[sub_off, sub_off+sub_len)`` of every block and reorders blocks.

    Blocks are stored contiguously in C order of ``sizes`` (any number of dims). The result
    lists the picked rows block by block in the order of ``sizes.permute(perm)``.
    """
    base = exclusive_cumsum(sizes)
    if sub_off is not None:
        base = base + sub_off
    length = sizes if sub_len is None else sub_len
    if perm is not None:
        base, length = base.permute(perm), length.permute(perm)
    base, length = base.reshape(-1), length.reshape(-1)
    total = int(length.sum())
    starts = exclusive_cumsum(length)
    return torch.repeat_interleave(base - starts, length, output_size=total) + torch.arange(
        total, dtype=torch.long
    )


# -- one communication step of a chunk -----------------------------------------------------
@dataclass
class CommStep:
    """Reorder rows (``pre_index``), all-to-all them, reorder the result (``post_index``)."""

    label: str
    group: object
    in_splits: list
    out_splits: list
    pre_index: torch.Tensor | None = None
    post_index: torch.Tensor | None = None
    compression: object | None = None  # a comm.compressed.Compression: ZipCCL a2a (CPU)

    def to(self, device) -> CommStep:
        """Move the reorder indices to ``device`` once (no host sync inside the pipeline)."""
        if self.pre_index is not None:
            self.pre_index = self.pre_index.to(device)
        if self.post_index is not None:
            self.post_index = self.post_index.to(device)
        return self

    def issue(self, buf: torch.Tensor, timeout_s: float, skip_pre: bool = False) -> Pending:
        """Start the step on ``buf`` (already reordered when ``skip_pre``)."""
        if self.pre_index is not None and not skip_pre:
            buf = buf.index_select(0, self.pre_index)
        if self.compression is not None and not buf.is_cuda and buf.is_floating_point():
            from moeflow.comm.compressed import all_to_all as compressed_all_to_all

            p = Pending.ready(
                compressed_all_to_all(
                    buf,
                    self.in_splits,
                    self.out_splits,
                    self.group,
                    self.compression,
                    op=self.label,
                    timeout_s=timeout_s,
                )
            )
        else:
            p = all_to_all_v(
                buf, self.in_splits, self.out_splits, self.group, self.label, timeout_s
            )
        if self.post_index is None:
            return p
        post = self.post_index

        def finish() -> torch.Tensor:
            out = p.wait()
            return out.index_select(0, post)

        return Pending(None, self.label, timeout_s, finish)


@dataclass
class ChunkRoute:
    """Everything one chunk needs to travel: which local rows, and the steps each way.

    ``recv_SPE[s, p, e]`` rows reach ESP peer s from EP source p for local expert e; on
    this rank the dispatch steps deliver rows in ``[p][e]`` order with sizes
    ``recv_SPE[my_esp_rank]``; the combine steps take that order back to ``send_index``'s.
    """

    send_index: torch.Tensor  # rows of x_ext (index N = a zero padding row)
    dispatch: list  # CommSteps, source -> expert owner
    combine: list  # CommSteps, expert owner -> source
    recv_SPE: torch.Tensor
    device: object = None
    send_gather: torch.Tensor | None = None  # send_index fused with dispatch[0]'s regroup
    expert_major: torch.Tensor | None = None  # [s][p][e] -> expert-major (None: same)
    expert_counts: torch.Tensor | None = None  # rows per local expert, on the device

    def to(self, device) -> ChunkRoute:
        """Build the fused/expert-major indices and move every index to ``device`` once."""
        if self.device == device:
            return self
        gather = self.send_index
        if self.dispatch[0].pre_index is not None:  # one gather instead of two
            gather = gather.index_select(0, self.dispatch[0].pre_index.cpu())
        self.send_gather = gather.to(device)
        self.send_index = self.send_index.to(device)
        em = sub_block_index(self.recv_SPE, perm=(2, 0, 1))
        # one local expert, or one source: rows already arrive expert-major (skip 2 copies)
        identity = bool(torch.equal(em, torch.arange(em.numel())))
        self.expert_major = None if identity else em.to(device)
        self.expert_counts = self.recv_SPE.sum((0, 1)).to(device)
        for st in (*self.dispatch, *self.combine):
            st.to(device)
        self.device = device
        return self


@dataclass
class CountExchange:
    """Result of the count exchange for one forward call (shared by fwd and bwd chunks)."""

    counts_E: torch.Tensor  # this rank's real assignments per global expert
    send_PE: torch.Tensor  # rows sent per (EP destination, local expert)
    recv_SPE: torch.Tensor  # rows received by each ESP peer from each EP source
    full_PPE: torch.Tensor | None = None  # [src, dst, e] over the EP group (2dh only)
    slots: int | None = None  # capacity mode: rows per (rank, expert)
    num_rows: int = 0  # N
    cache: dict = field(default_factory=dict)

    @property
    def padded(self) -> bool:
        return self.slots is not None


class TokenDispatcher(abc.ABC):
    """Interface: ``exchange`` once per forward, then ``route(exchange, r, c)`` per chunk.

    ``ep_group`` holds the P expert shards (group rank p owns experts
    ``[p*E_l, (p+1)*E_l)``), ``esp_group`` the S ranks sharing this rank's experts.
    """

    name = "base"
    #: keyword arguments this dispatcher takes beyond :data:`COMMON_ARGS`
    options: tuple[str, ...] = ()

    def __init__(
        self,
        *,
        ep_group,
        ep_size: int,
        ep_rank: int,
        esp_group,
        esp_size: int,
        esp_rank: int,
        num_local_experts: int,
        timeout_s: float,
    ):
        self.ep_group, self.P, self.p_me = ep_group, ep_size, ep_rank
        self.esp_group, self.S, self.s_me = esp_group, esp_size, esp_rank
        self.E_l = num_local_experts
        self.timeout_s = timeout_s

    def begin(self, capacity: int | None, device=None) -> Pending | None:
        """Start whatever can go before routing (capacity mode: agree on the slot count)."""
        return None

    # collective: every rank of the EP and ESP groups must call it, in the same order
    @abc.abstractmethod
    def exchange(
        self,
        counts_E: torch.Tensor,
        *,
        capacity: int | None = None,
        device=None,
        started: Pending | None = None,
    ) -> CountExchange:
        """Exchange per-expert counts; returns what every chunk's routing is derived from."""

    #: ZipCCL policy (``moeflow.comm.compressed.Compression``) for the row all-to-alls, or
    #: None (plain); set by ``ExpertParallel(compress=...)``
    compression = None

    def route(self, ex: CountExchange, r: int, c: int) -> ChunkRoute:
        key = (r, c)
        if key not in ex.cache:
            rt = self._route(ex, r, c)
            if self.compression is not None:
                for step in rt.dispatch + rt.combine:
                    step.compression = self.compression
            ex.cache[key] = rt
        return ex.cache[key]

    @abc.abstractmethod
    def _route(self, ex: CountExchange, r: int, c: int) -> ChunkRoute:
        """The send/receive layout of chunk ``c`` of ``r`` (cached by :meth:`route`)."""

    # helpers ---------------------------------------------------------------------------
    def _gather_esp(self, recv_PE: torch.Tensor, device) -> torch.Tensor:
        if self.S == 1:
            return recv_PE.unsqueeze(0)
        t = all_gather_equal(
            recv_PE.to(device), self.esp_group, "ESP count all-gather", self.timeout_s
        )
        return t.cpu()

    def _dropless_send_index(self, ex: CountExchange, r: int, c: int) -> torch.Tensor:
        n = ex.counts_E
        return sub_block_index(n, split_offsets(n, r, c), split_sizes(n, r, c))

    def _flat_steps(self, send_c: torch.Tensor, recv_c: torch.Tensor, c: int, r: int):
        d = CommStep(
            f"dispatch all-to-all (chunk {c + 1}/{r})",
            self.ep_group,
            send_c.sum(1).tolist(),
            recv_c[self.s_me].sum(1).tolist(),
        )
        k = CommStep(
            f"combine all-to-all (chunk {c + 1}/{r})",
            self.ep_group,
            recv_c[self.s_me].sum(1).tolist(),
            send_c.sum(1).tolist(),
        )
        return [d], [k]


class A2ADispatcher(TokenDispatcher):
    """Flat dropless all-to-all: counts first, then rows with variable splits."""

    name = "a2a"

    def exchange(self, counts_E, *, capacity=None, device=None, started=None):
        counts_E = counts_E.detach().to("cpu", torch.long)
        send_PE = counts_E.view(self.P, self.E_l)
        recv_PE = (
            all_to_all_equal(
                send_PE.to(device), self.ep_group, "count all-to-all", self.timeout_s
            ).cpu()
            if self.P > 1
            else send_PE
        )
        return CountExchange(
            counts_E=counts_E,
            send_PE=send_PE,
            recv_SPE=self._gather_esp(recv_PE, device),
            num_rows=int(counts_E.sum()),
        )

    def _route(self, ex, r, c):
        send_c = split_sizes(ex.send_PE, r, c)
        recv_c = split_sizes(ex.recv_SPE, r, c)
        d, k = self._flat_steps(send_c, recv_c, c, r)
        return ChunkRoute(self._dropless_send_index(ex, r, c), d, k, recv_c)


class CapacityDispatcher(TokenDispatcher):
    """Fixed-capacity all-to-all: ``slots`` zero-padded rows per (rank, expert), equal splits."""

    name = "capacity"
    options = ("world_group",)

    def __init__(self, *, world_group=None, **kw):
        super().__init__(**kw)
        self.world_group = world_group

    def _max_over_ranks(self, local: int, device) -> Pending:
        # The router already dropped beyond its per-rank capacity; ranks may have different
        # T, so they agree on the largest slot count (one int over the whole group).
        t = torch.tensor([local], dtype=torch.long, device=device)
        if self.P * self.S == 1:
            return Pending.ready(t)
        work = torch.distributed.all_reduce(
            t, op=torch.distributed.ReduceOp.MAX, group=self.world_group, async_op=True
        )
        return Pending(work, "capacity all-reduce", self.timeout_s, lambda: t)

    def begin(self, capacity, device=None):
        """With a capacity known from T alone, agree on it while the router runs."""
        return None if capacity is None else self._max_over_ranks(int(capacity), device)

    def exchange(self, counts_E, *, capacity=None, device=None, started=None):
        counts_E = counts_E.detach().to("cpu", torch.long)
        if started is not None:  # issued by begin() before routing
            slots = int(started.wait().item())
        else:
            local = (
                int(capacity)
                if capacity is not None
                else int(counts_E.max())
                if counts_E.numel()
                else 0
            )
            slots = int(self._max_over_ranks(local, device).wait().item())
        if counts_E.numel() and int(counts_E.max()) > slots:
            raise ConfigError(
                "capacity", slots, f"at least the largest expert count {int(counts_E.max())}"
            )
        send_PE = torch.full((self.P, self.E_l), slots, dtype=torch.long)
        recv_SPE = torch.full((self.S, self.P, self.E_l), slots, dtype=torch.long)
        return CountExchange(
            counts_E=counts_E,
            send_PE=send_PE,
            recv_SPE=recv_SPE,
            slots=slots,
            num_rows=int(counts_E.sum()),
        )

    def _route(self, ex, r, c):
        E, C, N = ex.counts_E.numel(), ex.slots, ex.num_rows
        full = torch.full((E,), C, dtype=torch.long)
        v = sub_block_index(full, split_offsets(full, r, c), split_sizes(full, r, c))
        e, j = v // max(C, 1), v % max(C, 1)
        start = exclusive_cumsum(ex.counts_E)
        send_index = torch.where(j < ex.counts_E[e], start[e] + j, torch.full_like(v, N))
        d, k = self._flat_steps(split_sizes(ex.send_PE, r, c), split_sizes(ex.recv_SPE, r, c), c, r)
        return ChunkRoute(send_index, d, k, split_sizes(ex.recv_SPE, r, c))


class HierarchicalDispatcher(TokenDispatcher):
    """2DH: intra-node all-to-all, then inter-node all-to-all (and the mirror to combine).

    The EP group is node-major with L members per node and n = P / L nodes; EP rank
    p = a*L + i sits on node a with local index i. ``intra_group`` holds the L members of
    this node, ``inter_group`` the n members with this local index.
    """

    name = "2dh"
    options = ("intra_group", "inter_group", "ranks_per_node")

    def __init__(self, *, intra_group, inter_group, ranks_per_node: int, **kw):
        super().__init__(**kw)
        self.intra_group, self.inter_group = intra_group, inter_group
        self.L = ranks_per_node
        self.n = self.P // self.L
        self.a_me, self.j_me = divmod(self.p_me, self.L)

    def exchange(self, counts_E, *, capacity=None, device=None, started=None):
        counts_E = counts_E.detach().to("cpu", torch.long)
        send_PE = counts_E.view(self.P, self.E_l)
        full = (
            all_gather_equal(
                send_PE.to(device), self.ep_group, "count all-gather (2dh)", self.timeout_s
            ).cpu()
            if self.P > 1
            else send_PE.unsqueeze(0)
        )
        recv_PE = full[:, self.p_me]
        return CountExchange(
            counts_E=counts_E,
            send_PE=send_PE,
            recv_SPE=self._gather_esp(recv_PE, device),
            full_PPE=full,
            num_rows=int(counts_E.sum()),
        )

    def _route(self, ex, r, c):
        n, L, E_l, a, j = self.n, self.L, self.E_l, self.a_me, self.j_me
        f5 = split_sizes(ex.full_PPE, r, c).view(n, L, n, L, E_l)  # [a, i, b, j, e]
        send_c = split_sizes(ex.send_PE, r, c)
        recv_c = split_sizes(ex.recv_SPE, r, c)
        tag = f"(chunk {c + 1}/{r})"
        # dispatch step 1 (intra-node): my rows [b][j'][e] regrouped as [j'][b][e]
        mine = send_c.view(n, L, E_l)
        s1 = CommStep(
            f"2dh dispatch intra-node all-to-all {tag}",
            self.intra_group,
            mine.sum((0, 2)).tolist(),
            f5[a, :, :, j, :].sum((1, 2)).tolist(),
            pre_index=sub_block_index(mine, perm=(1, 0, 2)),
        )
        # dispatch step 2 (inter-node): received [i][b][e] regrouped as [b][i][e]
        m = f5[a, :, :, j, :]  # [i, b, e]
        s2 = CommStep(
            f"2dh dispatch inter-node all-to-all {tag}",
            self.inter_group,
            m.sum((0, 2)).tolist(),
            f5[:, :, a, j, :].sum((1, 2)).tolist(),
            pre_index=sub_block_index(m, perm=(1, 0, 2)),
        )
        # combine step 1 (inter-node): my rows [a'][i][e] back to their nodes
        back = f5[:, :, a, j, :]  # [a', i, e]
        got = f5[a, :, :, j, :].permute(1, 0, 2)  # [b', i, e] arrival order
        k1 = CommStep(
            f"2dh combine inter-node all-to-all {tag}",
            self.inter_group,
            back.sum((1, 2)).tolist(),
            got.sum((1, 2)).tolist(),
            post_index=sub_block_index(got.contiguous(), perm=(1, 0, 2)),
        )
        # combine step 2 (intra-node): rows [i][b][e] back to local index i; arrive [j'][b][e]
        mine_back = f5[a, :, :, j, :]  # [i, b, e] after k1
        arr = send_c.view(n, L, E_l).permute(1, 0, 2).contiguous()  # [j', b, e]
        k2 = CommStep(
            f"2dh combine intra-node all-to-all {tag}",
            self.intra_group,
            mine_back.sum((1, 2)).tolist(),
            arr.sum((1, 2)).tolist(),
            post_index=sub_block_index(arr, perm=(1, 0, 2)),
        )
        return ChunkRoute(self._dropless_send_index(ex, r, c), [s1, s2], [k1, k2], recv_c)


# "dedup" (HierMoE token dedup, :mod:`moeflow.parallel.dedup`) moves tokens, not permuted rows:
# same constructor arguments, its own forward_tokens instead of exchange/route
DISPATCHER_CLASSES: dict[str, type] = {
    cls.name: cls
    for cls in (A2ADispatcher, CapacityDispatcher, HierarchicalDispatcher, DedupDispatcher)
}
DISPATCHERS = tuple(DISPATCHER_CLASSES)


def dispatcher_class(name: str) -> type:
    """The dispatcher class registered as ``name``; ConfigError naming the known ones."""
    try:
        return DISPATCHER_CLASSES[name]
    except (KeyError, TypeError):
        raise ConfigError("dispatcher", name, f"one of {DISPATCHERS}") from None


def make_dispatcher(name: str, **kw):
    """Build dispatcher ``name`` from :data:`COMMON_ARGS` plus the class's own ``options``.

    An argument the class does not declare is a ConfigError naming the ones it takes, so a
    group meant for another dispatcher is never silently dropped.
    """
    cls = dispatcher_class(name)
    allowed = COMMON_ARGS + cls.options
    unknown = sorted(set(kw) - set(allowed))
    if unknown:
        raise ConfigError(
            f"make_dispatcher({name!r}) arguments",
            unknown,
            f"the keyword arguments of {cls.__name__}: {list(allowed)}",
        )
    missing = [a for a in COMMON_ARGS if a not in kw]
    if missing:
        raise ConfigError(
            f"make_dispatcher({name!r}) arguments",
            sorted(kw),
            f"all of {list(COMMON_ARGS)}; missing {missing}",
        )
    return cls(**kw)
