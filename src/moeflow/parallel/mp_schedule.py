"""Parm (INFOCOM'24): MoE schedules for MP + EP + ESP where the MP group is the ESP group.

Shapes: T tokens of the MP group (identical on its S ranks), D hidden, T_s the tokens of
MP rank s after the split (``T // S`` plus one for the first ``T % S`` ranks).

After model-parallel attention every MP rank holds the same T tokens. ``ExpertParallel(...,
mp_group=..., schedule=...)`` runs the MoE layer on them with:

* ``plain``: every MP rank routes and dispatches all T tokens, as a naive MP+EP stack does:
  S copies of each row cross the network and every F-slice computes S copies. The loss is
  replicated over the MP group, so gradients are scaled by 1/S on the way back (the S
  copies then add up to one) and the input gradient is all-reduced over the MP group.
* ``split_tokens`` (Parm's S1; ``"s1"`` is accepted): MP-Split before the gate (rank s
  takes its T_s tokens), the expert-parallel layer on the split (dispatch all-to-all, ESP
  all-gather, expert GEMMs on the F-slice, ESP reduce-scatter, combine all-to-all, the ESP
  collectives of one chunk overlapping the all-to-all of the next on the wavefront), and an
  MP-AllGather after combine. Each row crosses the network once: 1/S of plain's inter-node
  bytes.
* ``split_rows`` (Parm's S2; ``"s2"`` is accepted): MP-Split after the gate: every MP rank
  routes all T tokens (the same routing everywhere), keeps the assignment rows
  ``n ≡ s (mod S)``, runs the expert-parallel pipeline on them, and an MP-AllGather of the
  expert-output rows rebuilds all N rows for the (replicated) combine. Also 1/S of plain's
  inter-node bytes; the MP collective moves k·T/S rows instead of split_tokens' T/S
  tokens, in exchange routing and capacity act on the MP group's whole batch, exactly as
  plain and the single-device layer (split_tokens routes each split).
* ``auto``: the cheapest under :mod:`moeflow.plan.parm`'s α-β model, per call.

Routing acts on the batch each rank routes (the rule of ``ExpertParallel``): T tokens for
plain and split_rows, the split for split_tokens; for dropless token-choice routers all
give the same outputs.

Each schedule runs the layer through the public ``ExpertParallel.forward_local`` and hands
its output and aux loss back to ``ExpertParallel.forward``. ``ep.parm_bytes`` counts the
bytes this rank's EP all-to-alls (dispatch + combine, forward) handed to torch.distributed
per link level (``intra_node`` / ``inter_node``), measured by the collectives
(:mod:`moeflow.comm.bytes`); capacity's padded rows included.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from moeflow.comm.collectives import all_gather_v, all_reduce, reduce_scatter_v
from moeflow.errors import ConfigError

SCHEDULES = ("plain", "split_tokens", "split_rows", "auto")
#: Parm's names (INFOCOM'24, S1 / S2), still accepted
SCHEDULE_ALIASES = {"s1": "split_tokens", "s2": "split_rows"}


def canonical_schedule(name: str) -> str:
    """The role name of schedule ``name`` (``"s1"`` -> ``"split_tokens"``, ...)."""
    return SCHEDULE_ALIASES.get(name, name) if isinstance(name, str) else name


def split_range(T: int, S: int, s: int) -> tuple[int, int]:
    """Tokens ``[lo, hi)`` of MP rank s when T tokens are cut into S near-equal pieces."""
    lo = (T // S) * s + min(T % S, s)
    return lo, lo + T // S + (1 if s < T % S else 0)


class _MPCopy(torch.autograd.Function):
    """Identity forward; backward sums the MP ranks' partial input gradients."""

    @staticmethod
    def forward(ctx, x, group, timeout_s):
        ctx.group, ctx.timeout_s = group, timeout_s
        return x.view_as(x)

    @staticmethod
    def backward(ctx, g):
        g = g.contiguous().clone()
        return (
            all_reduce(g, ctx.group, "Parm MP input-gradient all-reduce", ctx.timeout_s),
            None,
            None,
        )


class _ScaleGrad(torch.autograd.Function):
    """Identity forward; backward multiplies by ``scale`` (S duplicates count once)."""

    @staticmethod
    def forward(ctx, x, scale):
        ctx.scale = scale
        return x.view_as(x)

    @staticmethod
    def backward(ctx, g):
        return g * ctx.scale, None


class _MPSplit(torch.autograd.Function):
    """MP-Split: keep rows ``[lo, hi)``; backward all-gathers the pieces' gradients."""

    @staticmethod
    def forward(ctx, x_TD, sizes, s, group, timeout_s):
        ctx.sizes, ctx.group, ctx.timeout_s = sizes, group, timeout_s
        lo = sum(sizes[:s])
        return x_TD[lo : lo + sizes[s]].clone()

    @staticmethod
    def backward(ctx, g):
        full = all_gather_v(
            g.contiguous(), ctx.sizes, ctx.group, "Parm MP-Split backward all-gather", ctx.timeout_s
        ).wait()
        return full, None, None, None, None


class _MPAllGather(torch.autograd.Function):
    """MP-AllGather: concatenate the pieces; backward keeps this rank's piece (the loss is
    replicated over the MP group, so each rank differentiates it once for its own rows)."""

    @staticmethod
    def forward(ctx, y_sD, sizes, s, group, timeout_s):
        ctx.lo, ctx.n = sum(sizes[:s]), sizes[s]
        return all_gather_v(y_sD.contiguous(), sizes, group, "Parm MP-AllGather", timeout_s).wait()

    @staticmethod
    def backward(ctx, g):
        return g[ctx.lo : ctx.lo + ctx.n].contiguous(), None, None, None, None


class _GatherRows(torch.autograd.Function):
    """split_rows' MP-AllGather of expert-output rows into the full row order; backward sums the
    MP ranks' gradients of this rank's rows (reduce-scatter)."""

    @staticmethod
    def forward(ctx, y_sD, share):
        ctx.share = share
        g = all_gather_v(
            y_sD.contiguous(),
            share.sizes,
            share.group,
            "Parm S2 MP-AllGather of expert rows",
            share.timeout_s,
        ).wait()
        return g.new_empty(share.N, g.shape[-1]).index_copy_(0, share.order, g)

    @staticmethod
    def backward(ctx, g_ND):
        sh = ctx.share
        g = g_ND.index_select(0, sh.order)
        own = reduce_scatter_v(
            g.contiguous(),
            sh.sizes,
            sh.group,
            "Parm S2 MP reduce-scatter of row gradients",
            sh.timeout_s,
        )
        return own.wait(), None


class RowShare:
    """Parm's S2 (``split_rows``): MP rank s keeps the assignment rows ``n ≡ s (mod S)``
    (a subsequence of rows sorted by expert stays sorted); ``gather`` puts every rank's
    expert outputs back."""

    def __init__(self, S: int, s: int, group, timeout_s: float):
        self.S, self.s, self.group, self.timeout_s = S, s, group, timeout_s
        self.counts_E = None

    def select(self, x_ND: torch.Tensor, routing):
        N, S = x_ND.shape[0], self.S
        self.N = N
        self.sizes = [len(range(i, N, S)) for i in range(S)]
        self.order = torch.cat([torch.arange(i, N, S) for i in range(S)]).to(x_ND.device)
        idx = torch.arange(self.s, N, S, device=x_ND.device)
        E = routing.counts_E.numel()
        self.counts_E = torch.bincount(routing.expert_idx_N.index_select(0, idx), minlength=E)
        return x_ND.index_select(0, idx), self.counts_E

    def gather(self, y_sD: torch.Tensor) -> torch.Tensor:
        return _GatherRows.apply(y_sD, self)


def check_mp_group(ep, mp_group, schedule: str) -> str:
    """The MP group must hold exactly this rank's ESP group (Parm's setting)."""
    from moeflow.comm.groups import global_ranks

    schedule = canonical_schedule(schedule)
    if schedule not in SCHEDULES:
        raise ConfigError("schedule", schedule, f"one of {SCHEDULES} (aliases: {SCHEDULE_ALIASES})")
    if mp_group is None:
        if schedule != "plain":
            raise ConfigError("schedule", schedule, "'plain' unless mp_group is given")
        return schedule
    if sorted(global_ranks(mp_group)) != sorted(global_ranks(ep.esp_group)):
        raise ConfigError(
            "mp_group",
            global_ranks(mp_group),
            f"this rank's ESP group {global_ranks(ep.esp_group)} (Parm: the "
            f"MP group is the expert-sharding group; set esp_size to its size)",
        )
    return schedule


def _forward_counting(ep, *args, **kwargs) -> tuple:
    """``ep.forward_local(*args)``, adding to ``ep.parm_bytes`` the bytes its EP all-to-alls
    (dispatch + combine) handed to torch.distributed per link level, as measured by the
    dispatcher's counter (:mod:`moeflow.comm.bytes`)."""
    before = dict(ep.dispatcher.bytes_sent)
    out = ep.forward_local(*args, **kwargs)
    for link, n in ep.dispatcher.bytes_sent.items():
        if n - before.get(link, 0):
            ep.parm_bytes[link] = ep.parm_bytes.get(link, 0) + n - before.get(link, 0)
    return out


def choose(ep, T: int, D: int, row_bytes: int) -> str:
    """``auto``: Parm's choice from the α-β model of :mod:`moeflow.plan.parm`."""
    from moeflow.plan.parm import ParmLayer, choose_schedule

    layer = ParmLayer(
        tokens=max(T, 1),
        hidden=D,
        top_k=ep.cfg.top_k,
        mp=ep.esp_size,
        nodes=ep.topology.num_nodes,
        bytes_per_elem=max(row_bytes // D, 1),
    )
    cluster = ep.parm_cluster
    if cluster is None:
        from moeflow.plan.parm import ParmCluster

        cluster = ParmCluster()
    return canonical_schedule(choose_schedule(layer, cluster, ep.r_fwd)[0])


def parm_forward(ep, x: torch.Tensor, r_fwd=None, r_bwd=None) -> tuple:
    """The MoE layer on the MP group's replicated tokens ``x`` under ``ep.parm_schedule``:
    ``(output, aux loss)`` through the public ``ep.forward_local``."""
    shape = x.shape
    x_TD = x.reshape(-1, shape[-1])
    T, D = x_TD.shape
    S, s, group, t = ep.esp_size, ep.esp_rank, ep.mp_group, ep.timeout_s
    row_bytes = D * x_TD.element_size()
    schedule = ep.parm_schedule
    if schedule == "auto":
        schedule = choose(ep, T, D, row_bytes)
    ep.last_schedule = schedule
    if schedule == "plain" or S == 1:
        x_in = _MPCopy.apply(x_TD, group, t) if S > 1 else x_TD
        y_TD, aux = _forward_counting(ep, x_in, r_fwd, r_bwd)
        if S > 1:
            y_TD = _ScaleGrad.apply(y_TD, 1.0 / S)
            aux = aux / S  # each MP rank holds the same batch's aux loss
        return y_TD.reshape(shape), aux
    if dist.get_world_size(group) != S:
        raise ConfigError("mp_group", dist.get_world_size(group), f"{S} ranks (= esp_size)")
    if schedule == "split_rows":
        share = RowShare(S, s, group, t)
        y_TD, aux = _forward_counting(
            ep, _MPCopy.apply(x_TD, group, t), r_fwd, r_bwd, mp_rows=share
        )
        return _ScaleGrad.apply(y_TD, 1.0 / S).reshape(shape), aux / S
    sizes = [split_range(T, S, i)[1] - split_range(T, S, i)[0] for i in range(S)]
    x_s = _MPSplit.apply(x_TD, sizes, s, group, t)
    y_s, aux = _forward_counting(ep, x_s, r_fwd, r_bwd)
    return _MPAllGather.apply(y_s, sizes, s, group, t).reshape(shape), aux
