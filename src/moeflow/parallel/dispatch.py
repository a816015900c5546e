"""Row dispatchers and the registry: move (token, expert) rows to the expert owners and back.

Shapes: N local assignments (rows of ``x_ND``, sorted by global expert), E global experts,
P expert-parallel ranks (the EP group), E_l = E / P local experts per EP rank, S the ESP
group size (ranks that share the same experts, each with an F-slice), r pipeline chunks.

Every dispatcher fits the contract of :mod:`moeflow.parallel.contract` (FSMoE, ASPLOS'25:
the dispatch module of the layer), driven by the one chunk pipeline of
:mod:`moeflow.parallel.expert_parallel`. The row dispatchers here move the layer's permuted
rows; ``"dedup"`` (HierMoE, :mod:`moeflow.parallel.dedup`) moves tokens:

* ``A2ADispatcher`` ("a2a"): flat, dropless. Per-expert counts are exchanged first
  (an all-to-all of a ``[P, E_l]`` int tensor, issued by ``start_exchange`` as soon as
  routing has counted and waited on after the permutation), then rows move with variable
  splits.
* ``CapacityDispatcher`` ("capacity"): fixed-capacity, GShard style. Every (rank, expert)
  sends exactly ``slots`` rows, zero-padded, with equal splits: no count exchange before
  the rows move. ``slots`` is the largest per-rank capacity ``ceil(f*T*K/E)`` over the
  group (one tiny all-reduce, issued by ``begin`` before routing so it overlaps the
  router), so drop semantics stay those of the single-device layer on each rank's batch
  (the router has already dropped). The real rows of each slot block are its first ones;
  their counts travel in an all-to-all issued beside the first chunk's rows and read only
  by the expert stage, which computes the real rows alone (no GEMM over padding) and
  returns zeros in the padding slots.
* ``HierarchicalDispatcher`` ("hierarchical"; alias "2dh", the 2-D hierarchical all-to-all
  of FSMoE / Tutel 2DH):
  an intra-node all-to-all that gathers on rank (a, j) every row of node a headed for
  local index j on any node, then an inter-node all-to-all among ranks with local index j.
  Combine runs the mirror image. Counts are all-gathered over the EP group (``[P, P, E_l]``)
  because the intermediate rank needs them.
* ``DedupDispatcher`` ("dedup"): HierMoE token dedup, a token crosses a level's link once.

Pipelining cuts every (source, destination, expert) block into r near-equal pieces
(``split_sizes``). Both ends compute the same pieces from the exchanged counts, so chunk c
needs no further count exchange, and any chunk degree works for forward and backward.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.distributed import ReduceOp

from moeflow.comm.collectives import (
    all_gather_equal_start,
    all_reduce_start,
    all_to_all_equal_start,
)
from moeflow.comm.groups import global_ranks
from moeflow.comm.timeouts import Pending
from moeflow.errors import ConfigError
from moeflow.parallel.contract import (
    COMMON_ARGS,
    ChunkRoute,
    CommStep,
    CountExchange,
    TokenDispatcher,
    exclusive_cumsum,
    split_offsets,
    split_sizes,
    sub_block_index,
)
from moeflow.parallel.dedup import DedupDispatcher


class A2ADispatcher(TokenDispatcher):
    """Flat dropless all-to-all: counts first, then rows with variable splits."""

    name = "a2a"

    def start_exchange(self, counts_E, *, started=None, device=None):
        """Issue the count all-to-all (a ``[P, E_l]`` int tensor); :meth:`exchange` waits."""
        send_PE = counts_E.detach().to(device if device is not None else "cpu", torch.long)
        return all_to_all_equal_start(
            send_PE.view(self.P, self.E_l), self.ep_group, "count all-to-all", self.timeout_s
        )

    def exchange(
        self, counts_E, *, capacity=None, device=None, started=None, routing=None, tokens=None
    ):
        counts_E = counts_E.detach().to("cpu", torch.long)
        send_PE = counts_E.view(self.P, self.E_l)
        if started is None:  # nobody issued it early: issue it now
            started = self.start_exchange(counts_E, device=device)
        recv_PE = started.wait().cpu()
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


@dataclass
class CapacityExchange(CountExchange):
    """The capacity exchange: ``recv_SPE`` is the padded arrival layout (``slots`` rows per
    block); the real rows of each block, its first ``filled_SPE[s, p, e]``, come from a
    count all-to-all issued beside the first chunk's rows and waited for only where the
    experts first need them."""

    filled_pending: Pending | None = None
    gather_esp: object = None  # the dispatcher's ESP count all-gather
    device: object = None
    _filled: torch.Tensor | None = None

    @property
    def filled_SPE(self) -> torch.Tensor:
        """Real rows per arrival block ``[s, p, e]`` (collective over ESP on first use)."""
        if self._filled is None:
            recv_PE = self.filled_pending.wait().cpu()
            self._filled = self.gather_esp(recv_PE, self.device)
            self.filled_pending = None
        return self._filled

    @property
    def computed_rows(self) -> int:
        return int(self.filled_SPE.sum())


class CapacityRoute(ChunkRoute):
    """A capacity chunk's route: the experts compute only the filled prefix of each slot
    block. ``expert_major`` / ``expert_counts`` are derived from the exchanged real counts
    when the expert stage first reads them (after the chunk's rows have arrived)."""

    def __init__(self, *args, ex: CapacityExchange, r: int, c: int, **kw):
        self._ex, self._r, self._c = ex, r, c
        self._major = None
        super().__init__(*args, **kw)

    # the base class's eager expert-major order of every slot is replaced by the lazy one
    expert_major = property(
        lambda self: self._resolve()[0], lambda self, v: None, doc="filled rows, expert-major"
    )
    expert_counts = property(
        lambda self: self._resolve()[1], lambda self, v: None, doc="filled rows per expert"
    )

    def _resolve(self):
        if self._major is None:
            F, C, r, c = self._ex.filled_SPE, self._ex.slots, self._r, self._c
            full = torch.full_like(F, C)
            off, size = split_offsets(full, r, c), split_sizes(full, r, c)
            n = torch.clamp(torch.minimum(F - off, size), min=0)  # filled rows of the piece
            idx = sub_block_index(size, sub_len=n, perm=(2, 0, 1))
            dev = self.device
            self._major = (idx.to(dev), n.sum((0, 1)).to(dev))
        return self._major


class CapacityDispatcher(TokenDispatcher):
    """Fixed-capacity all-to-all: ``slots`` zero-padded rows per (rank, expert), equal splits;
    the experts compute only the real rows (no GEMM over padding)."""

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
        return all_reduce_start(
            t, self.world_group, "capacity all-reduce", self.timeout_s, ReduceOp.MAX
        )

    def begin(self, capacity, device=None):
        """With a capacity known from T alone, agree on it while the router runs."""
        return None if capacity is None else self._max_over_ranks(int(capacity), device)

    def exchange(
        self, counts_E, *, capacity=None, device=None, started=None, routing=None, tokens=None
    ):
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
        real_PE = counts_E.view(self.P, self.E_l)
        # The real counts travel beside the rows (started now, waited for by the experts):
        # nothing waits for them before the first chunk's slots are sent.
        filled = (
            all_to_all_equal_start(
                real_PE.to(device), self.ep_group, "capacity count all-to-all", self.timeout_s
            )
            if self.P > 1
            else Pending.ready(real_PE)
        )
        send_PE = torch.full((self.P, self.E_l), slots, dtype=torch.long)
        recv_SPE = torch.full((self.S, self.P, self.E_l), slots, dtype=torch.long)
        return CapacityExchange(
            counts_E=counts_E,
            send_PE=send_PE,
            recv_SPE=recv_SPE,
            slots=slots,
            num_rows=int(counts_E.sum()),
            filled_pending=filled,
            gather_esp=self._gather_esp,
            device=device,
        )

    def _route(self, ex, r, c):
        E, C, N = ex.counts_E.numel(), ex.slots, ex.num_rows
        full = torch.full((E,), C, dtype=torch.long)
        v = sub_block_index(full, split_offsets(full, r, c), split_sizes(full, r, c))
        e, j = v // max(C, 1), v % max(C, 1)
        start = exclusive_cumsum(ex.counts_E)
        real = j < ex.counts_E[e]
        send_index = torch.where(real, start[e] + j, torch.full_like(v, N))
        d, k = self._flat_steps(split_sizes(ex.send_PE, r, c), split_sizes(ex.recv_SPE, r, c), c, r)
        # GShard's fixed slots: the pipeline gathers the real rows straight into the send
        # buffer and zeroes only the padding slots (no zero row appended to the input)
        return CapacityRoute(
            send_index,
            d,
            k,
            split_sizes(ex.recv_SPE, r, c),
            send_src=torch.where(real, send_index, torch.zeros_like(v)),
            pad_slots=torch.nonzero(~real).view(-1),
            ex=ex,
            r=r,
            c=c,
        )

    def canonical_index(self, ex, r, c):
        """Real rows only, in ``[e][s][p]`` blocks of ``filled_SPE``; chunk c holds slots
        ``[off, off + size)`` of each block, so its rows start at ``off`` in the block."""
        F, C = ex.filled_SPE, ex.slots
        full = torch.full_like(F, C)
        off, size = split_offsets(full, r, c), split_sizes(full, r, c)
        n = torch.clamp(torch.minimum(F - off, size), min=0)
        return sub_block_index(F, torch.minimum(off, F), n, perm=(2, 0, 1))


class HierarchicalDispatcher(TokenDispatcher):
    """Intra-node all-to-all, then inter-node all-to-all (and the mirror to combine): the
    2-D hierarchical all-to-all (2DH) of FSMoE / Tutel.

    The EP group is node-major with L members per node and n = P / L nodes; EP rank
    p = a*L + i sits on node a with local index i. ``intra_group`` holds the L members of
    this node, ``inter_group`` the n members with this local index.
    """

    name = "hierarchical"
    options = ("intra_group", "inter_group", "ranks_per_node")

    def __init__(self, *, intra_group, inter_group, ranks_per_node: int, **kw):
        super().__init__(**kw)
        self.intra_group, self.inter_group = intra_group, inter_group
        self.L = ranks_per_node
        self.n = self.P // self.L
        self.a_me, self.j_me = divmod(self.p_me, self.L)
        # EP rank p = a*L + i sits on node a (ExpertParallel sets the whole group's map)
        self.byte_counter.nodes = lambda: {
            g: p // self.L for p, g in enumerate(global_ranks(self.ep_group))
        }

    def start_exchange(self, counts_E, *, started=None, device=None):
        """Issue the count all-gather (``[P, P, E_l]``: the intermediate rank needs every
        pair's counts); :meth:`exchange` waits."""
        send_PE = counts_E.detach().to(device if device is not None else "cpu", torch.long)
        return all_gather_equal_start(
            send_PE.view(self.P, self.E_l),
            self.ep_group,
            "count all-gather (hierarchical)",
            self.timeout_s,
        )

    def exchange(
        self, counts_E, *, capacity=None, device=None, started=None, routing=None, tokens=None
    ):
        counts_E = counts_E.detach().to("cpu", torch.long)
        send_PE = counts_E.view(self.P, self.E_l)
        if started is None:  # nobody issued it early: issue it now
            started = self.start_exchange(counts_E, device=device)
        full = started.wait().cpu()
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
            f"hierarchical dispatch intra-node all-to-all {tag}",
            self.intra_group,
            mine.sum((0, 2)).tolist(),
            f5[a, :, :, j, :].sum((1, 2)).tolist(),
            pre_index=sub_block_index(mine, perm=(1, 0, 2)),
        )
        # dispatch step 2 (inter-node): received [i][b][e] regrouped as [b][i][e]
        m = f5[a, :, :, j, :]  # [i, b, e]
        s2 = CommStep(
            f"hierarchical dispatch inter-node all-to-all {tag}",
            self.inter_group,
            m.sum((0, 2)).tolist(),
            f5[:, :, a, j, :].sum((1, 2)).tolist(),
            pre_index=sub_block_index(m, perm=(1, 0, 2)),
        )
        # combine step 1 (inter-node): my rows [a'][i][e] back to their nodes
        back = f5[:, :, a, j, :]  # [a', i, e]
        got = f5[a, :, :, j, :].permute(1, 0, 2)  # [b', i, e] arrival order
        k1 = CommStep(
            f"hierarchical combine inter-node all-to-all {tag}",
            self.inter_group,
            back.sum((1, 2)).tolist(),
            got.sum((1, 2)).tolist(),
            post_index=sub_block_index(got.contiguous(), perm=(1, 0, 2)),
        )
        # combine step 2 (intra-node): rows [i][b][e] back to local index i; arrive [j'][b][e]
        mine_back = f5[a, :, :, j, :]  # [i, b, e] after k1
        arr = send_c.view(n, L, E_l).permute(1, 0, 2).contiguous()  # [j', b, e]
        k2 = CommStep(
            f"hierarchical combine intra-node all-to-all {tag}",
            self.intra_group,
            mine_back.sum((1, 2)).tolist(),
            arr.sum((1, 2)).tolist(),
            post_index=sub_block_index(arr, perm=(1, 0, 2)),
        )
        return ChunkRoute(self._dropless_send_index(ex, r, c), [s1, s2], [k1, k2], recv_c)


DISPATCHER_CLASSES: dict[str, type] = {
    cls.name: cls
    for cls in (A2ADispatcher, CapacityDispatcher, HierarchicalDispatcher, DedupDispatcher)
}
DISPATCHERS = tuple(DISPATCHER_CLASSES)
#: older spellings still accepted (the paper's name for the hierarchical all-to-all)
DISPATCHER_ALIASES = {"2dh": "hierarchical"}


def canonical_dispatcher(name: str) -> str:
    """The registered name of ``name`` (an alias such as ``"2dh"`` resolved)."""
    return dispatcher_class(name).name


def dispatcher_class(name: str) -> type:
    """The dispatcher class registered as ``name`` or an alias of it; ConfigError naming the
    known ones."""
    try:
        return DISPATCHER_CLASSES[DISPATCHER_ALIASES.get(name, name)]
    except (KeyError, TypeError):
        raise ConfigError(
            "dispatcher", name, f"one of {DISPATCHERS} (aliases: {DISPATCHER_ALIASES})"
        ) from None


def make_dispatcher(name: str, **kw):
    """Build dispatcher ``name`` (or an alias) from :data:`COMMON_ARGS` plus the class's
    own ``options``.

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
