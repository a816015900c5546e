"""The contract every token dispatcher fits, and the index arithmetic they share.

Shapes: N local assignments (rows of ``x_ND``, sorted by global expert), T local tokens,
E global experts, P expert-parallel ranks (the EP group), E_l = E / P local experts per EP
rank, S the ESP group size (ranks that share the same experts, each with an F-slice),
r pipeline chunks, M the (token, expert) assignments a chunk computes on this rank.

A dispatcher is the dispatch/combine module of the MoE layer (FSMoE, ASPLOS'25; the shape of
Megatron-Core's ``MoETokenDispatcher`` and torchtitan's dispatch/combine): it never runs
anything itself. Per forward call it ``exchange``-s what the layout is derived from, then
describes each chunk as a :class:`ChunkRoute`; the one chunk pipeline and its autograd
(:class:`moeflow.parallel.expert_parallel.PipelinedExperts`) drive every dispatcher from
these descriptions, forward with r_fwd chunks and backward with r_bwd.

A route is, in order:

* ``send_index``: the rows of the pipeline input this chunk sends (a gather);
* ``dispatch``: :class:`CommStep` s, each ``pre_index`` gather (which may repeat a row: one
  copy per destination) -> all-to-all -> ``post_index`` permutation;
* the expert stage: ``expert_major`` picks the rows each local expert computes, expert-major
  with ``expert_counts`` per expert; where the route ``expands`` rows (token layouts), the
  pick may repeat a row (one per (token, expert) assignment) and the outputs, scaled by
  ``expert_weights``, are summed back per row (``index_add``);
* ``combine``: :class:`CommStep` s in the mirror image, each all-to-all -> ``post_index``
  permutation, or with ``post_reduce_rows`` a sum of the arrived rows into that many rows
  (``index_add``, the adjoint of a gathering ``pre_index``);
* place: the chunk's rows go back to ``send_index`` (summed where the input rows repeat).

What the pipeline moves is the dispatcher's documented layout, :attr:`TokenDispatcher.
consumes_tokens`: permuted (token, expert) rows that come back unweighted (the layer's
combine weights them), or tokens that come back as the weighted sum of their experts (the
pipeline then also differentiates the combine weights).
"""

from __future__ import annotations

import abc
from dataclasses import dataclass, field

import torch

from moeflow.comm.bytes import ByteCounter, counting
from moeflow.comm.collectives import all_gather_equal, all_to_all_v
from moeflow.comm.timeouts import Pending
from moeflow.layer.moe import MoELayer

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
    """Gather rows (``pre_index``), all-to-all them, then permute the result (``post_index``)
    or, with ``post_reduce_rows``, sum it into that many rows at ``post_index``."""

    label: str
    group: object
    in_splits: list
    out_splits: list
    pre_index: torch.Tensor | None = None
    post_index: torch.Tensor | None = None
    #: a comm.compressed.Compression: ZipCCL a2a (CPU only), run as a pending stage
    compression: object | None = None
    post_reduce_rows: int | None = None
    #: a :class:`moeflow.comm.bytes.ByteCounter` that receives the bytes this step hands to
    #: torch.distributed (measured by the collective), or None
    meter: ByteCounter | None = None

    def to(self, device) -> CommStep:
        """Move the reorder indices to ``device`` once (no host sync inside the pipeline)."""
        if self.pre_index is not None:
            self.pre_index = self.pre_index.to(device)
        if self.post_index is not None:
            self.post_index = self.post_index.to(device)
        return self

    def issue(self, buf: torch.Tensor, timeout_s: float, skip_pre: bool = False) -> Pending:
        """Start the step on ``buf`` (already gathered when ``skip_pre``)."""
        if self.pre_index is not None and not skip_pre:
            buf = buf.index_select(0, self.pre_index)
        if self.meter is None:
            p = self._send(buf, timeout_s)
        else:
            with counting(self.meter):
                p = self._send(buf, timeout_s)
        if self.post_index is None:
            return p
        post, rows = self.post_index, self.post_reduce_rows

        def finish() -> torch.Tensor:
            out = p.wait()
            if rows is None:
                return out.index_select(0, post)
            return out.new_zeros(rows, out.shape[-1]).index_add_(0, post, out)

        return Pending(None, self.label, timeout_s, finish)

    def _send(self, buf: torch.Tensor, timeout_s: float) -> Pending:
        if self.compression is not None and buf.is_floating_point():
            from moeflow.comm.compressed import all_to_all_start, check_codec_device

            # ZipCCL's codec here is the CPU one: a device buffer is a ConfigError, never
            # raw bytes sent under a compression setting
            check_codec_device(self.compression, buf.device, self.label)
            # a stage of the chunk pipeline: the group's worker thread encodes and sends
            # while the caller computes other chunks' experts; the decode runs at the wait
            return all_to_all_start(
                buf,
                self.in_splits,
                self.out_splits,
                self.group,
                self.compression,
                op=self.label,
                timeout_s=timeout_s,
            )
        return all_to_all_v(buf, self.in_splits, self.out_splits, self.group, self.label, timeout_s)


@dataclass
class ChunkRoute:
    """Everything one chunk needs to travel: which input rows, the steps each way, and what
    the expert stage computes (see the module docstring for the order).

    Row dispatchers give ``recv_SPE[s, p, e]``, the rows that reach ESP peer s from EP
    source p for local expert e (the dispatch steps deliver rows in ``[p][e]`` order with
    sizes ``recv_SPE[my_esp_rank]``); :meth:`to` derives the expert-major order from it.
    Token dispatchers (``expand``) give ``expert_major`` (arrived row of each assignment),
    ``expert_counts``, ``expert_weights`` and ``assignment_index`` themselves.
    """

    send_index: torch.Tensor  # rows of the input (index N = a zero padding row)
    dispatch: list  # CommSteps, source -> expert owner
    combine: list  # CommSteps, expert owner -> source
    recv_SPE: torch.Tensor | None = None
    device: object = None
    send_gather: torch.Tensor | None = None  # send_index fused with dispatch[0]'s regroup
    expert_major: torch.Tensor | None = None  # arrived rows -> expert-major (None: same)
    expert_counts: torch.Tensor | None = None  # rows per local expert, on the device
    #: the expert stage expands arrived rows to (token, expert) assignments and sums the
    #: weighted outputs back per row; place sums rows whose token was sent more than once
    expand: bool = False
    expert_weights: torch.Tensor | None = None  # combine weight of each assignment (expand)
    #: index of each assignment in the call's weight-gradient vector (expand)
    assignment_index: torch.Tensor | None = None
    #: padded layouts (GShard capacity slots): the input row each send slot copies (a
    #: padding slot names any valid row; ``pad_slots`` overwrites it), and the send slots
    #: that are padding, zeroed in place: the pipeline gathers straight into its send buffer
    send_src: torch.Tensor | None = None
    pad_slots: torch.Tensor | None = None

    def to(self, device) -> ChunkRoute:
        """Build the fused/expert-major indices and move every index to ``device`` once."""
        if self.device == device:
            return self
        gather = self.send_index
        if self.dispatch and self.dispatch[0].pre_index is not None:  # one gather, not two
            gather = gather.index_select(0, self.dispatch[0].pre_index.cpu())
        self.send_gather = gather.to(device)
        self.send_index = self.send_index.to(device)
        if self.pad_slots is not None:
            if self.dispatch and self.dispatch[0].pre_index is not None:
                raise ValueError(
                    "a padded route gathers straight into its send buffer: its "
                    "first dispatch step must not regroup rows (pre_index)"
                )
            self.send_src = self.send_src.to(device)
            self.pad_slots = self.pad_slots.to(device)
        if self.expand:
            self.expert_major = self.expert_major.to(device)
            self.expert_counts = self.expert_counts.to(device)
            self.expert_weights = self.expert_weights.to(device)
            self.assignment_index = self.assignment_index.to(device)
        else:
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
    """Result of the exchange of one forward call (shared by fwd and bwd chunks)."""

    counts_E: torch.Tensor | None = None  # this rank's real assignments per global expert
    send_PE: torch.Tensor | None = None  # rows sent per (EP destination, local expert)
    recv_SPE: torch.Tensor | None = None  # rows received by each ESP peer from each source
    full_PPE: torch.Tensor | None = None  # [src, dst, e] over the EP group (hierarchical)
    slots: int | None = None  # capacity mode: rows per (rank, expert)
    num_rows: int = 0  # N
    cache: dict = field(default_factory=dict)
    #: length of the weight-gradient vector that ``assignment_index`` indexes (expand)
    num_assignments: int = 0

    @property
    def padded(self) -> bool:
        return self.slots is not None

    @property
    def computed_rows(self) -> int:
        """Rows the expert stage computes on this rank over all chunks of the call."""
        return int(self.recv_SPE.sum())


class TokenDispatcher(abc.ABC):
    """Interface: ``begin`` before routing, ``exchange`` once per forward, then
    ``route(exchange, r, c)`` per chunk; the pipeline does the rest.

    ``ep_group`` holds the P expert shards (group rank p owns experts
    ``[p*E_l, (p+1)*E_l)`` unless :meth:`expert_rows` says otherwise), ``esp_group`` the S
    ranks sharing this rank's experts.
    """

    name = "base"
    #: keyword arguments this dispatcher takes beyond :data:`COMMON_ARGS`
    options: tuple[str, ...] = ()
    #: The layout the pipeline moves. False: the layer's permuted (token, expert) rows
    #: ``x_ND`` go in and come back unweighted, and the layer's combine weights them. True:
    #: the tokens ``x_TD`` go in with the routing's combine weights, routes ``expand`` them
    #: to assignments on the expert's rank, and each token comes back as the weighted sum of
    #: its experts' outputs; the pipeline returns the weights' gradient through
    #: :meth:`weight_grad`.
    consumes_tokens = False

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
        #: the bytes the row all-to-alls of every route hand to torch.distributed (dispatch
        #: and combine, forward and backward), measured by the collectives; its ``nodes``
        #: (global rank -> node) name the link levels, ``unknown`` until someone sets them
        self.byte_counter = ByteCounter()

    @property
    def bytes_sent(self) -> dict:
        """Measured row bytes this rank sent per link level (``intra_node`` / ``inter_node``;
        ``unknown`` too while the node map is not set) since the last :meth:`reset_bytes`."""
        out = {"intra_node": 0, "inter_node": 0}
        for level, n in self.byte_counter.by_level.items():
            out[level] = out.get(level, 0) + n
        return out

    def reset_bytes(self) -> None:
        self.byte_counter.reset()

    def begin(self, capacity: int | None, device=None) -> Pending | None:
        """Start whatever can go before routing (capacity mode: agree on the slot count)."""
        return None

    # -- the layout (decided by ``consumes_tokens``) -------------------------------------
    def pipeline_input(self, x_TD: torch.Tensor, routing) -> tuple:
        """``(rows the pipeline moves, combine weights it applies or None)``."""
        if self.consumes_tokens:
            return x_TD, routing.weight_N
        return MoELayer.permute(x_TD, routing), None

    def pipeline_output(self, y: torch.Tensor, routing, num_tokens: int) -> torch.Tensor:
        """The routed experts' weighted sum per token from the pipeline's output."""
        if self.consumes_tokens:
            return y
        return MoELayer.combine(y, routing, num_tokens)

    # collective: every rank of the EP group must call it, in the same order
    def start_exchange(
        self, counts_E: torch.Tensor, *, started: Pending | None = None, device=None
    ) -> Pending | None:
        """Issue the count exchange as soon as routing has counted, without waiting for it.

        The layer calls this between routing and the permutation into the dispatcher's
        layout and hands the result to :meth:`exchange` as ``started``, so the exchange
        travels while the rows are permuted (FSMoE's overlap applied to the split sizes).
        The default has nothing to start and passes on what :meth:`begin` started."""
        return started

    # collective: every rank of the EP and ESP groups must call it, in the same order
    @abc.abstractmethod
    def exchange(
        self,
        counts_E: torch.Tensor,
        *,
        capacity: int | None = None,
        device=None,
        started: Pending | None = None,
        routing=None,
        tokens: torch.Tensor | None = None,
    ) -> CountExchange:
        """Exchange what every chunk's routing is derived from: the per-expert counts of the
        rows to send (row layouts), or the ``routing`` of the ``tokens`` (token layouts).
        ``started``: what :meth:`start_exchange` issued (waited on here), or None."""

    #: ZipCCL policy (``moeflow.comm.compressed.Compression``) for the row all-to-alls, or
    #: None (plain); set by ``ExpertParallel(compress=...)``
    compression = None

    def route(self, ex: CountExchange, r: int, c: int) -> ChunkRoute:
        key = (r, c)
        if key not in ex.cache:
            rt = self._route(ex, r, c)
            for step in rt.dispatch + rt.combine:
                step.meter = self.byte_counter
                if self.compression is not None:
                    step.compression = self.compression
            ex.cache[key] = rt
        return ex.cache[key]

    @abc.abstractmethod
    def _route(self, ex: CountExchange, r: int, c: int) -> ChunkRoute:
        """The send/receive layout of chunk ``c`` of ``r`` (cached by :meth:`route`)."""

    def canonical_index(self, ex: CountExchange, r: int, c: int) -> torch.Tensor:
        """Position of each expert-major row of chunk c of r among the ``ex.computed_rows``
        rows of the whole call: the same row has the same position for any r, so backward
        with another degree finds the expert inputs that forward saved."""
        R = ex.recv_SPE
        return sub_block_index(R, split_offsets(R, r, c), split_sizes(R, r, c), perm=(2, 0, 1))

    def weight_grad(self, ex: CountExchange, grad_A: torch.Tensor | None) -> torch.Tensor | None:
        """Gradient of this rank's combine weights from the ``ex.num_assignments`` partial
        sums formed where the experts ran (token layouts; collective). A row layout returns
        None: its rows come back unweighted and the layer's combine differentiates the
        weights itself."""
        return None

    def expert_rows(self) -> torch.Tensor | None:
        """Row of each global expert when the ranks' local experts are stacked in EP rank
        order; None for the contiguous placement (rank p owns ``[p*E_l, (p+1)*E_l)``)."""
        return None

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
