"""HierMoE dedup dispatch: each token crosses a level's link once per destination group.

Shapes: T local tokens, D hidden, N local assignments (token, expert) after the router's
capacity drop, P EP ranks (node-major, L per node), E_l local experts, A assignments of the
whole EP group in one chunk, R rows of one hop.

HierMoE (hierarchical token deduplication): with dedup at level d (0: rank, 1: node) a
token whose experts live on several ranks of one level-d group crosses the link into that
group once, then is copied to the ranks and experts under it. Combine is the mirror image:
the expert outputs of a token are weighted and summed at their rank, the per-rank partial
sums are summed at the relay, and only then cross back. The schedule, its message sizes and
the level choice ``d* = argmin_d t_d`` are in :mod:`moeflow.plan.hiermoe` (Eq. 3-6).

The dispatcher fits the contract of :mod:`moeflow.parallel.contract` with a token layout
(``consumes_tokens``): it only describes chunks, and the one chunk pipeline of
:mod:`moeflow.parallel.expert_parallel` (wavefront, FSMoE overlap, and its autograd) runs
them. ``exchange`` all-gathers the routing of every rank (token, expert, weight of each
assignment) over the EP group, so every rank derives every hop's layout from the same data
with no count exchange per chunk. Tokens are cut into r contiguous ranges (chunks); each
chunk's route is: dispatch hops (each a gather of the previous hop's rows, one copy per
destination group, then an all-to-all) -> expansion to the token's local experts, expert
FFN, weighted sum per arrived row -> combine hops (all-to-all, then a sum into the previous
hop's rows, the adjoint of its gather) -> sum into the tokens. Backward runs the same route
with the output gradient (the adjoint of a sum is a copy); the gradient of each combine
weight, ``<dL/dy_t, y_e(x_t)>``, is formed at the expert's rank and summed over the group
by :meth:`DedupDispatcher.weight_grad` (one float per assignment).

Capacity (drop) mode needs nothing special: the router has already dropped, and dedup
moves only the kept assignments with variable splits.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

from moeflow.comm import bytes as comm_bytes
from moeflow.comm.bytes import ByteCounter, counting
from moeflow.comm.collectives import all_gather_equal, all_gather_v, all_reduce
from moeflow.comm.groups import global_ranks
from moeflow.comm.timeouts import wait_work
from moeflow.errors import ConfigError
from moeflow.parallel.contract import ChunkRoute, CommStep, CountExchange, TokenDispatcher

LEVELS = ("rank", "node")
LINK_NAMES = {1: "intra_node", 2: "inter_node"}


def _range_start(T_P: torch.Tensor, r: int, c: int) -> torch.Tensor:
    """First token of chunk c when each source's T tokens are cut into r near-equal ranges."""
    c = min(c, r)
    return (T_P // r) * c + torch.clamp(T_P % r, max=c)


def _position_in_group(group_R: torch.Tensor, order_R: torch.Tensor) -> torch.Tensor:
    """Position of each row among the rows of its group, ordered by ``order_R``."""
    R = group_R.numel()
    if R == 0:
        return group_R.clone()
    big = int(order_R.max()) + 1
    perm = torch.argsort(group_R * big + order_R, stable=True)
    counts = torch.bincount(group_R)
    starts = torch.zeros_like(counts)
    starts[1:] = torch.cumsum(counts[:-1], 0)
    pos = torch.empty_like(group_R)
    pos[perm] = torch.arange(R) - starts[group_R[perm]]
    return pos


@dataclass
class DedupExchange(CountExchange):
    """The exchange of one call: every rank's routing, the level, the assignments held here."""

    routing: dict | None = None  # see DedupDispatcher._gather_routing
    level: int = 0
    held: torch.Tensor | None = None  # sorted global ids of the assignments computed here

    @property
    def computed_rows(self) -> int:
        return int(self.held.numel())


class DedupDispatcher(TokenDispatcher):
    """HierMoE token dedup at level ``level`` (0 / "rank", 1 / "node", or "auto").

    Built by ``make_dispatcher("dedup", ...)`` like the row dispatchers of
    :mod:`moeflow.parallel.dispatch`, and driven by the same pipeline; its layout is tokens
    (``consumes_tokens``): ``exchange`` takes the routing of the batch. ``bytes_sent`` (of
    every dispatcher) holds the row bytes this rank handed to torch.distributed per link
    level, dispatch and combine, forward and backward, as the collectives measured them;
    ``reset_bytes`` clears it.
    """

    name = "dedup"
    options = ("intra_group", "inter_group", "ranks_per_node", "level", "links")
    consumes_tokens = True

    @property
    def compression(self):
        """ZipCCL compression of the row all-to-alls: not available on the dedup hops."""
        return None

    @compression.setter
    def compression(self, value) -> None:
        if value is not None:
            raise ConfigError(
                "compress",
                "on",
                "False with dispatcher='dedup' (ZipCCL "
                "compresses the a2a / capacity / hierarchical all-to-alls)",
            )

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
        intra_group,
        inter_group,
        ranks_per_node: int,
        level="auto",
        links=None,
    ):
        super().__init__(
            ep_group=ep_group,
            ep_size=ep_size,
            ep_rank=ep_rank,
            esp_group=esp_group,
            esp_size=esp_size,
            esp_rank=esp_rank,
            num_local_experts=num_local_experts,
            timeout_s=timeout_s,
        )
        if self.S != 1:
            raise ConfigError(
                "esp_size",
                self.S,
                "1 with dispatcher='dedup' (a token is copied to whole experts after crossing)",
            )
        self.set_level(level)
        self.links = links
        self.intra_group, self.inter_group = intra_group, inter_group
        self.L = int(ranks_per_node)
        self.n = self.P // self.L
        self.owner_E = torch.arange(self.P * self.E_l) // self.E_l  # expert -> EP rank
        self.slot_E = torch.arange(self.P * self.E_l) % self.E_l  # expert -> local slot
        # EP rank p sits on node p // L (one rank per expert shard: S == 1)
        self.byte_counter.nodes = lambda: {
            g: p // self.L for p, g in enumerate(global_ranks(self.ep_group))
        }
        self.last_level: int | None = None
        self.last_routing: dict | None = None
        self.last_times: list | None = None

    def set_level(self, level) -> None:
        """The dedup level of the next calls: 0 / "rank", 1 / "node", or "auto" (d* of each
        batch, HierMoE Eq. 6); e.g. the level :func:`moeflow.plan.hiermoe.plan_dedup` chose
        from earlier batches. Every rank must set the same one."""
        if level in LEVELS:
            level = LEVELS.index(level)
        if level != "auto" and not (
            isinstance(level, int) and not isinstance(level, bool) and 0 <= level < len(LEVELS)
        ):
            raise ConfigError("level", level, f"0, 1, one of {LEVELS} or 'auto'")
        self.level = level

    def last_assignments(self) -> list:
        """``[s][t] -> experts`` of the last call's batch on every source rank (the input of
        :func:`moeflow.plan.hiermoe.swap_step` and of the dedup byte formula)."""
        g = self.last_routing
        out = [[[] for _ in range(int(T))] for T in g["T_P"].tolist()]
        for s, t, e in zip(g["src"].tolist(), g["tok"].tolist(), g["exp"].tolist()):
            out[s][t].append(e)
        return out

    def expert_rows(self) -> torch.Tensor:
        """Row of each expert when the ranks' local experts are stacked in rank order."""
        return self.owner_E * self.E_l + self.slot_E

    def set_placement(self, owner_E: torch.Tensor, slot_E: torch.Tensor) -> None:
        """Expert -> (rank, local slot) map; every rank must set the same one."""
        self.owner_E, self.slot_E = owner_E.to("cpu", torch.long), slot_E.to("cpu", torch.long)

    # -- routing of the whole group -----------------------------------------------------
    def _gather_routing(self, routing, T: int, device, dtype):
        """All-gather ``(T, N)`` and every assignment's (token, expert, weight)."""
        N = int(routing.token_idx_N.numel())
        sizes = all_gather_equal(
            torch.tensor([T, N], device=device),
            self.ep_group,
            "dedup size all-gather",
            self.timeout_s,
        ).cpu()
        T_P, N_P = sizes[:, 0].clone(), sizes[:, 1].clone()
        meta = torch.stack([routing.token_idx_N, routing.expert_idx_N], 1).to(device, torch.long)
        w = routing.weight_N.detach().to(device, dtype).unsqueeze(1)
        if self.P > 1:
            meta = all_gather_v(
                meta, N_P.tolist(), self.ep_group, "dedup routing all-gather", self.timeout_s
            ).wait()
            w = all_gather_v(
                w, N_P.tolist(), self.ep_group, "dedup weight all-gather", self.timeout_s
            ).wait()
        meta = meta.cpu()
        src_A = torch.repeat_interleave(torch.arange(self.P), N_P)
        return dict(
            T_P=T_P,
            N_P=N_P,
            src=src_A,
            tok=meta[:, 0],
            exp=meta[:, 1],
            w=w.view(-1),
            base_P=torch.cumsum(N_P, 0) - N_P,
        )

    def _hop_rows(self, g: dict, level: int, chunk_mask) -> list:
        """Rows of each hop of dedup at ``level`` for the assignments in ``chunk_mask``."""
        P, L = self.P, self.L
        Tmax = int(g["T_P"].max()) + 1 if g["T_P"].numel() else 1
        s, t, e = g["src"], g["tok"], g["exp"]
        if chunk_mask is not None:
            s, t, e = s[chunk_mask], t[chunk_mask], e[chunk_mask]
        r = self.owner_E[e]
        u = 1 if level == 0 else L
        hops = []
        # hop 1: one row per (source, token, level-d group), to the relay at s's position
        key1 = torch.unique((s * P + r // u) * Tmax + t)
        s1, grp, t1 = key1 // (P * Tmax), (key1 // Tmax) % P, key1 % Tmax
        recv1 = grp * u + s1 % u
        hops.append(
            dict(
                key=key1,
                sender=s1,
                receiver=recv1,
                tok=t1,
                src=s1,
                parent=t1,
                sgr=s1 // u if level else s1,
                rgr=grp,
            )
        )
        if u > 1:
            # hop 2: one row per (source, token, destination rank), relay -> rank in the group
            key2 = torch.unique((s * P + r) * Tmax + t)
            s2, r2, t2 = key2 // (P * Tmax), (key2 // Tmax) % P, key2 % Tmax
            relay = (r2 // u) * u + s2 % u
            parent = torch.searchsorted(key1, (s2 * P + r2 // u) * Tmax + t2)
            hops.append(
                dict(
                    key=key2,
                    sender=relay,
                    receiver=r2,
                    tok=t2,
                    src=s2,
                    parent=parent,
                    sgr=s2 % u,
                    rgr=r2 % u,
                )
            )
        return hops

    def choose_level(self, g: dict, row_bytes: int) -> int:
        """``d* = argmin_d t_d`` for this batch's routing (HierMoE, Eq. 6)."""
        if self.level != "auto":
            return self.level
        from moeflow.plan.hiermoe import HopRows, best_level, level_time

        U = [1, self.L, self.P]
        times = []
        for d in range(len(LEVELS)):
            hops = []
            for h in self._hop_rows(g, d, None):
                a, b = h["sender"], h["receiver"]
                lk = torch.where(a // U[1] == b // U[1], 1, 2)
                per = torch.bincount((a * 3 + lk)[a != b], minlength=3 * self.P).view(self.P, 3)
                hops.append(HopRows(tuple({1: int(x[1]), 2: int(x[2])} for x in per)))
            times.append(level_time(hops, row_bytes, self.links))
        self.last_times = times
        return best_level(times)

    # -- the per-chunk layout on this rank ----------------------------------------------
    def _group_of_hop(self, level: int, k: int):
        """(process group, member EP ranks) of hop k at ``level`` for this rank."""
        me, L = self.p_me, self.L
        if level == 0:
            return self.ep_group, list(range(self.P))
        if k == 0:
            return self.inter_group, [b * L + me % L for b in range(self.n)]
        return self.intra_group, [(me // L) * L + i for i in range(L)]

    def build_route(self, g: dict, level: int, r: int, c: int) -> ChunkRoute:
        """Layout of chunk c of r: token ranges ``split_offsets(T_s, r, c)`` of every source."""
        me = self.p_me
        lo, hi = _range_start(g["T_P"], r, c), _range_start(g["T_P"], r, c + 1)
        in_chunk = (g["tok"] >= lo[g["src"]]) & (g["tok"] < hi[g["src"]])
        hops_rows = self._hop_rows(g, level, in_chunk)
        Tmax = int(g["T_P"].max()) + 1 if g["T_P"].numel() else 1
        dispatch, combine, send0, prev_recv_pos = [], [], None, None
        prev_rows = int(g["T_P"][me])
        for k, h in enumerate(hops_rows):
            tie = h["src"] * Tmax + h["tok"]
            send_pos = _position_in_group(h["sender"], h["rgr"] * (self.P * Tmax) + tie)
            recv_pos = _position_in_group(h["receiver"], h["sgr"] * (self.P * Tmax) + tie)
            mine = h["sender"] == me
            src_index = h["parent"] if k == 0 else prev_recv_pos[h["parent"]]
            send_index = torch.empty(int(mine.sum()), dtype=torch.long)
            send_index[send_pos[mine]] = src_index[mine]
            group, members = self._group_of_hop(level, k)
            G = len(members)
            in_splits = torch.bincount(h["rgr"][mine], minlength=G).tolist()
            out_splits = torch.bincount(h["sgr"][h["receiver"] == me], minlength=G).tolist()
            tag = f"(level {LEVELS[level]}, hop {k + 1}, chunk {c + 1}/{r})"
            # hop k gathers from the previous hop's rows (hop 1: the tokens, the route's
            # send_index); its combine mirror sums the arrived rows back into them
            send0 = send_index if k == 0 else send0
            dispatch.append(
                CommStep(
                    f"dedup dispatch {tag}",
                    group,
                    in_splits,
                    out_splits,
                    pre_index=None if k == 0 else send_index,
                )
            )
            combine.insert(
                0,
                CommStep(
                    f"dedup combine {tag}",
                    group,
                    out_splits,
                    in_splits,
                    post_index=None if k == 0 else send_index,
                    post_reduce_rows=None if k == 0 else prev_rows,
                ),
            )
            prev_rows = int((h["receiver"] == me).sum())
            prev_recv_pos = recv_pos
        # copy each arriving row to the token's local experts, expert-major
        last = hops_rows[-1]
        s, t, e = g["src"][in_chunk], g["tok"][in_chunk], g["exp"][in_chunk]
        gid = torch.arange(g["src"].numel())[in_chunk]
        w = g["w"][in_chunk.to(g["w"].device)]
        mine = self.owner_E[e] == me
        key = (s * self.P + self.owner_E[e]) * Tmax + t  # the last hop's (s, rank, t)
        row = prev_recv_pos[torch.searchsorted(last["key"], key[mine])]
        slot = self.slot_E[e[mine]]
        order = torch.argsort(slot * (prev_rows + 1) + row, stable=True)
        return ChunkRoute(
            send0,
            dispatch,
            combine,
            expand=True,
            expert_major=row[order],
            expert_counts=torch.bincount(slot, minlength=self.E_l),
            expert_weights=w[mine.to(w.device)][order.to(w.device)],
            assignment_index=gid[mine][order],
        )

    # -- the contract ------------------------------------------------------------------
    def exchange(
        self, counts_E, *, capacity=None, device=None, started=None, routing=None, tokens=None
    ) -> DedupExchange:
        """All-gather the routing of ``tokens`` over the EP group and pick the level.

        Capacity (drop) mode needs nothing here: the router has already dropped."""
        T = tokens.shape[0]
        row_bytes = tokens.shape[-1] * tokens.element_size()
        g = self._gather_routing(routing, T, tokens.device, tokens.dtype)
        self.last_routing = g
        level = self.choose_level(g, row_bytes)
        self.last_level = level
        held = torch.nonzero(self.owner_E[g["exp"]] == self.p_me).view(-1)
        return DedupExchange(
            num_rows=T,
            num_assignments=int(g["src"].numel()),
            routing=g,
            level=level,
            held=held,
        )

    def _route(self, ex: DedupExchange, r: int, c: int) -> ChunkRoute:
        return self.build_route(ex.routing, ex.level, r, c)

    def canonical_index(self, ex: DedupExchange, r: int, c: int) -> torch.Tensor:
        """Position of each assignment of the chunk among those held here (by global id)."""
        return torch.searchsorted(ex.held, self.route(ex, r, c).assignment_index.cpu())

    def weight_grad(self, ex: DedupExchange, grad_A: torch.Tensor) -> torch.Tensor:
        """Every assignment's weight gradient was formed at its expert's rank: sum over the
        EP group, keep this rank's."""
        all_reduce(grad_A, self.ep_group, "dedup weight-gradient all-reduce", self.timeout_s)
        g = ex.routing
        b, n = int(g["base_P"][self.p_me]), int(g["N_P"][self.p_me])
        return grad_A[b : b + n]


# -- expert placement (HierMoE expert swap) --------------------------------------------------
def local_experts(disp: DedupDispatcher, rank: int | None = None) -> list[int]:
    """Experts of EP rank ``rank`` (default: this rank) in local-slot order."""
    p = disp.p_me if rank is None else rank
    mine = [e for e in range(disp.owner_E.numel()) if int(disp.owner_E[e]) == p]
    return sorted(mine, key=lambda e: int(disp.slot_E[e]))


def _check_owner(disp: DedupDispatcher, owner_E) -> torch.Tensor:
    P, E_l = disp.P, disp.E_l
    owner = torch.as_tensor(owner_E, dtype=torch.long).cpu().reshape(-1)
    if (
        owner.numel() != P * E_l
        or int(owner.min()) < 0
        or int(owner.max()) >= P
        or not bool((torch.bincount(owner, minlength=P) == E_l).all())
    ):
        raise ConfigError(
            "owner_E",
            owner.tolist(),
            f"{P * E_l} ranks in [0, {P}), each rank owning exactly {E_l} experts",
        )
    return owner


def _expert_tensors(ep, optimizer) -> list[torch.Tensor]:
    """Every tensor of the local experts, first dim = local slot: the weights, their
    gradients and the optimizer state shaped like them (e.g. Adam's exp_avg, exp_avg_sq),
    in an order every rank derives the same way."""
    out = []
    for param in (ep.w_in, ep.w_out):
        out.append(param.data)
        if param.grad is not None:
            out.append(param.grad)
        state = optimizer.state.get(param, {}) if optimizer is not None else {}
        for key in sorted(state):
            v = state[key]
            if torch.is_tensor(v) and v.shape == param.shape:
                out.append(v)
    return out


@torch.no_grad()
def apply_placement(ep, owner_E, optimizer=None) -> dict[str, int]:
    """Move experts to the ranks ``owner_E[e]`` names: weights, gradients and the optimizer
    state shaped like them (e.g. Adam's moments), with no change to the layer's function.

    Only the experts whose owner changes travel, point to point (one
    ``batch_isend_irecv`` of one message per peer and dtype: the leaving experts' rows of
    every tensor, packed). Their bytes are recorded with :mod:`moeflow.comm.bytes` (kind
    ``expert_swap``, per peer), so a counter installed around the call sees them; the
    dispatcher's ``bytes_sent`` (the dispatch traffic) does not. Returns the bytes this
    rank sent per link level (``intra_node`` / ``inter_node``).

    Collective over the EP group; every rank passes the same ``owner_E`` and the same kind
    of optimizer (with state for the same parameters). Each rank keeps E_l experts. The new
    local order is by expert id. The parameters stay the same objects, so optimizers keep
    them.
    """
    disp = ep.dispatcher
    if not isinstance(disp, DedupDispatcher):
        raise ConfigError(
            "dispatcher",
            getattr(ep, "dispatcher_name", type(disp).__name__),
            "'dedup' (the dispatcher that takes any expert placement)",
        )
    P, E_l, me = disp.P, disp.E_l, disp.p_me
    owner = _check_owner(disp, owner_E)
    old_owner, old_slot = disp.owner_E, disp.slot_E
    slot = torch.zeros(P * E_l, dtype=torch.long)
    for p in range(P):
        slot[owner == p] = torch.arange(E_l)  # new local order: by expert id
    moving = old_owner != owner
    ranks = global_ranks(disp.ep_group)
    # experts leaving this rank for q / arriving from q, by expert id (both ends agree)
    leave = [torch.nonzero(moving & (old_owner == me) & (owner == q)).view(-1) for q in range(P)]
    arrive = [torch.nonzero(moving & (old_owner == q) & (owner == me)).view(-1) for q in range(P)]
    tensors = _expert_tensors(ep, optimizer)
    by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
    for t in tensors:
        by_dtype.setdefault(t.dtype, []).append(t)
    ops, recvs, sent = [], [], [0] * P
    for dtype, ts in by_dtype.items():
        width = [t[0].numel() for t in ts]  # elements of one expert in each tensor
        for q in range(P):
            if q == me:
                continue
            if leave[q].numel():
                rows = old_slot[leave[q]].to(ts[0].device)
                buf = torch.cat([t.index_select(0, rows).reshape(-1) for t in ts])
                ops.append(dist.P2POp(dist.isend, buf, ranks[q], disp.ep_group))
                sent[q] += buf.numel() * buf.element_size()
            if arrive[q].numel():
                n = arrive[q].numel()
                buf = torch.empty(n * sum(width), dtype=dtype, device=ts[0].device)
                ops.append(dist.P2POp(dist.irecv, buf, ranks[q], disp.ep_group))
                recvs.append((arrive[q], ts, width, buf))
    counter = ByteCounter(disp.byte_counter.nodes)
    with counting(counter):
        comm_bytes.record("expert_swap", disp.ep_group, sent, "expert swap")
    if ops:
        for work in dist.batch_isend_irecv(ops):
            wait_work(work, "expert swap (point to point)", disp.timeout_s)
    # arrived rows, per tensor: (expert ids, their rows), unpacked from each message
    arrived: dict[int, list] = {id(t): [] for t in tensors}
    for experts, ts, width, buf in recvs:
        n, off = experts.numel(), 0
        for t, w in zip(ts, width):
            arrived[id(t)].append((experts, buf[off : off + n * w].view(n, *t.shape[1:])))
            off += n * w
    stay = torch.nonzero((owner == me) & ~moving).view(-1)
    for t in tensors:
        fresh = torch.empty_like(t)
        fresh[slot[stay].to(t.device)] = t.index_select(0, old_slot[stay].to(t.device))
        for experts, block in arrived[id(t)]:
            fresh[slot[experts].to(t.device)] = block
        t.copy_(fresh)
    disp.set_placement(owner, slot)
    return dict(counter.by_level)


__all__ = ["DedupDispatcher", "DedupExchange", "LEVELS", "apply_placement", "local_experts"]
