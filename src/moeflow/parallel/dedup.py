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

How a call runs: the routing of every rank (token, expert, weight of each assignment) is
all-gathered over the EP group, so every rank derives every hop's layout from the same
data with no count exchange per chunk. Tokens are cut into r contiguous ranges (chunks);
each chunk runs dispatch hops -> copy to experts -> expert FFN -> weighted reduction ->
combine hops on the wavefront scheduler (FSMoE overlap), forward with r_fwd chunks and
backward with r_bwd. Backward sends the output gradient along the dispatch hops (the
adjoint of a sum is a copy), recomputes each chunk's expert FFN from the rows saved in
forward, and sends the input gradient back along the combine hops; the gradient of each
combine weight, ``<dL/dy_t, y_e(x_t)>``, is formed at the expert's rank and summed over
the group (one float per assignment).

Capacity (drop) mode needs nothing special: the router has already dropped, and dedup
moves only the kept assignments with variable splits.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from moeflow.comm.collectives import all_gather_equal, all_gather_v, all_reduce, all_to_all_v
from moeflow.comm.timeouts import Pending
from moeflow.errors import ConfigError

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
class Hop:
    """One all-to-all of a chunk, as this rank sees it.

    Dispatch: ``buf_prev.index_select(0, send_index)`` goes out with ``in_splits`` and
    ``out_splits`` rows arrive. Combine: the reverse all-to-all, then ``index_add`` into the
    previous buffer at ``send_index`` (the adjoint of the copy).
    """

    group: object
    send_index: torch.Tensor
    in_splits: list
    out_splits: list
    prev_rows: int  # rows of the buffer this hop gathers from
    dest_links: list  # link name (or None: self) of each group member
    label: str

    def to(self, device) -> Hop:
        self.send_index = self.send_index.to(device)
        return self


@dataclass
class DedupRoute:
    """The hops of one chunk and the copy from the last hop's rows to expert-major rows."""

    hops: list
    expand_index: torch.Tensor  # last-hop row of each local assignment (expert-major)
    counts_El: torch.Tensor  # local assignments per local expert
    weight_M: torch.Tensor  # combine weight of each local assignment
    gid_M: torch.Tensor  # global id of each local assignment
    recv_rows: int  # rows that the last hop delivers here
    device: object = None

    def to(self, device) -> DedupRoute:
        if self.device != device:
            for h in self.hops:
                h.to(device)
            self.expand_index = self.expand_index.to(device)
            self.counts_El = self.counts_El.to(device)
            self.device = device
        return self


class DedupDispatcher:
    """HierMoE token dedup at level ``level`` (0 / "rank", 1 / "node", or "auto").

    Built by ``make_dispatcher("dedup", ...)`` like the row dispatchers of
    :mod:`moeflow.parallel.dispatch` (same common arguments), but it works on tokens, not on
    permuted rows: ``ExpertParallel`` calls :meth:`forward_tokens` with the routing of the
    batch instead of the count exchange / per-chunk route interface. ``bytes_sent`` counts the row
    bytes this rank put on each link level (``intra_node`` / ``inter_node``), dispatch and
    combine, forward and backward; ``reset_bytes`` clears it.
    """

    name = "dedup"
    options = ("intra_group", "inter_group", "ranks_per_node", "level", "links")
    #: ExpertParallel hands this dispatcher the tokens and the routing (see forward_tokens)
    token_level = True

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
                "compresses the a2a / capacity / 2dh all-to-alls)",
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
        self.ep_group, self.P, self.p_me = ep_group, ep_size, ep_rank
        self.esp_group, self.S, self.s_me = esp_group, esp_size, esp_rank
        self.E_l = num_local_experts
        self.timeout_s = timeout_s
        if self.S != 1:
            raise ConfigError(
                "esp_size",
                self.S,
                "1 with dispatcher='dedup' (a token is copied to whole experts after crossing)",
            )
        if level in LEVELS:
            level = LEVELS.index(level)
        if level != "auto" and not (
            isinstance(level, int) and not isinstance(level, bool) and 0 <= level < len(LEVELS)
        ):
            raise ConfigError("level", level, f"0, 1, one of {LEVELS} or 'auto'")
        self.level = level
        self.links = links
        self.intra_group, self.inter_group = intra_group, inter_group
        self.L = int(ranks_per_node)
        self.n = self.P // self.L
        self.owner_E = torch.arange(self.P * self.E_l) // self.E_l  # expert -> EP rank
        self.slot_E = torch.arange(self.P * self.E_l) % self.E_l  # expert -> local slot
        self.bytes_sent = {"intra_node": 0, "inter_node": 0}
        self.last_level: int | None = None
        self.last_routing: dict | None = None
        self.last_times: list | None = None

    def last_assignments(self) -> list:
        """``[s][t] -> experts`` of the last call's batch on every source rank (the input of
        :func:`moeflow.plan.hiermoe.swap_step` and of the dedup byte formula)."""
        g = self.last_routing
        out = [[[] for _ in range(int(T))] for T in g["T_P"].tolist()]
        for s, t, e in zip(g["src"].tolist(), g["tok"].tolist(), g["exp"].tolist()):
            out[s][t].append(e)
        return out

    def reset_bytes(self) -> None:
        self.bytes_sent = {"intra_node": 0, "inter_node": 0}

    def expert_rows(self) -> torch.Tensor:
        """Row of each expert when the ranks' local experts are stacked in rank order."""
        return self.owner_E * self.E_l + self.slot_E

    def set_placement(self, owner_E: torch.Tensor, slot_E: torch.Tensor) -> None:
        """Expert -> (rank, local slot) map; every rank must set the same one."""
        self.owner_E, self.slot_E = owner_E.to("cpu", torch.long), slot_E.to("cpu", torch.long)

    def begin(self, capacity, device=None):
        """Nothing goes before routing: the routing itself is what dedup exchanges."""
        return None

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

    def _link_name(self, a: int, b: int) -> str | None:
        if a == b:
            return None
        return "intra_node" if a // self.L == b // self.L else "inter_node"

    def build_route(self, g: dict, level: int, r: int, c: int) -> DedupRoute:
        """Layout of chunk c of r: token ranges ``split_offsets(T_s, r, c)`` of every source."""
        me = self.p_me
        lo, hi = _range_start(g["T_P"], r, c), _range_start(g["T_P"], r, c + 1)
        in_chunk = (g["tok"] >= lo[g["src"]]) & (g["tok"] < hi[g["src"]])
        hops_rows = self._hop_rows(g, level, in_chunk)
        Tmax = int(g["T_P"].max()) + 1 if g["T_P"].numel() else 1
        hops, prev_recv_pos = [], None
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
            hops.append(
                Hop(
                    group,
                    send_index,
                    in_splits,
                    out_splits,
                    prev_rows,
                    [self._link_name(me, m) for m in members],
                    f"dedup {tag}",
                )
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
        return DedupRoute(
            hops,
            row[order],
            torch.bincount(slot, minlength=self.E_l),
            w[mine.to(w.device)][order.to(w.device)],
            gid[mine][order],
            prev_rows,
        )

    # -- moving rows -------------------------------------------------------------------
    def _count(self, hop: Hop, splits: list, row_bytes: int) -> None:
        for n, link in zip(splits, hop.dest_links):
            if link is not None and n:
                self.bytes_sent[link] += int(n) * row_bytes

    def _issue(self, hop: Hop, buf: torch.Tensor, reverse: bool) -> Pending:
        ins, outs = (hop.out_splits, hop.in_splits) if reverse else (hop.in_splits, hop.out_splits)
        self._count(hop, ins, buf.shape[-1] * buf.element_size())
        label = hop.label.replace("dedup", "dedup combine" if reverse else "dedup dispatch")
        return all_to_all_v(buf, ins, outs, hop.group, label, self.timeout_s)

    def run_chunks(self, routes: list, x_TD: torch.Tensor, T: int, expert_stage) -> torch.Tensor:
        """Dispatch hops -> ``expert_stage(c, rows_of_last_hop)`` -> combine hops -> tokens."""
        # lazy: the runtime package imports the dispatcher registry at import time
        from moeflow.parallel.pipeline import run_wavefront

        out = x_TD.new_zeros(T, expert_stage.out_dim)
        H = len(routes[0].hops)
        stages = [
            lambda c, _: self._issue(
                routes[c].hops[0], x_TD.index_select(0, routes[c].hops[0].send_index), False
            )
        ]
        for k in range(1, H):
            stages.append(
                lambda c, buf, k=k: self._issue(
                    routes[c].hops[k], buf.index_select(0, routes[c].hops[k].send_index), False
                )
            )

        def experts(c, buf):
            z = expert_stage(c, buf)  # rows of the last hop, reduced per row
            return self._issue(routes[c].hops[H - 1], z, True)

        stages.append(experts)
        for k in range(H - 1, 0, -1):

            def back(c, buf, k=k):
                hop = routes[c].hops[k]
                z = buf.new_zeros(hop.prev_rows, buf.shape[-1]).index_add_(0, hop.send_index, buf)
                return self._issue(routes[c].hops[k - 1], z, True)

            stages.append(back)

        def place(c, buf):
            out.index_add_(0, routes[c].hops[0].send_index, buf)
            return None

        stages.append(place)
        run_wavefront(len(routes), stages)
        return out

    def forward_tokens(
        self, ep, x_TD: torch.Tensor, routing, r_fwd: int, r_bwd: int
    ) -> torch.Tensor:
        """The routed experts' weighted sum per token, ``y_TD`` (shared experts excluded)."""
        T = x_TD.shape[0]
        g = self._gather_routing(routing, T, x_TD.device, x_TD.dtype)
        self.last_routing = g
        level = self.choose_level(g, x_TD.shape[-1] * x_TD.element_size())
        self.last_level = level
        call = _DedupCall(self, ep, g, level, r_fwd, r_bwd)
        call.grad_enabled = torch.is_grad_enabled()
        return _DedupExperts.apply(x_TD, routing.weight_N, ep.w_in, ep.w_out, call)


class _ExpertStage:
    """Callable for one pass: the last hop's rows -> per-row weighted expert sums."""

    def __init__(self, fn, out_dim: int):
        self.fn, self.out_dim = fn, out_dim

    def __call__(self, c, buf):
        return self.fn(c, buf)


class _DedupCall:
    """State of one forward call that backward reuses."""

    def __init__(self, disp: DedupDispatcher, ep, g: dict, level: int, r_fwd: int, r_bwd: int):
        self.disp, self.ep, self.g, self.level = disp, ep, g, level
        self.r_fwd, self.r_bwd = r_fwd, r_bwd
        self.saved_x: list = []
        self.saved_gid: list = []

    def routes(self, r: int, device) -> list:
        return [self.disp.build_route(self.g, self.level, r, c).to(device) for c in range(r)]

    def forward(self, x_TD, w_in, w_out, needs_grad: bool) -> torch.Tensor:
        ep, D = self.ep, x_TD.shape[-1]
        routes = self.routes(self.r_fwd, x_TD.device)

        def stage(c, buf):
            rt = routes[c]
            x_M = buf.index_select(0, rt.expand_index)
            if needs_grad:
                self.saved_x.append(x_M)
                self.saved_gid.append(rt.gid_M)
            if x_M.shape[0] == 0:
                return buf.new_zeros(rt.recv_rows, D)
            y_M = ep._expert_fn(x_M, rt.counts_El, w_in, w_out, ep.activation, ep.kernel)
            y_M = y_M * rt.weight_M.to(y_M.dtype).unsqueeze(1)
            return y_M.new_zeros(rt.recv_rows, D).index_add_(0, rt.expand_index, y_M)

        return self.disp.run_chunks(routes, x_TD, x_TD.shape[0], _ExpertStage(stage, D))

    def backward(self, gy_TD, w_in, w_out):
        ep, disp, g = self.ep, self.disp, self.g
        D = gy_TD.shape[-1]
        x_all = torch.cat(self.saved_x) if self.saved_x else gy_TD.new_zeros(0, D)
        gid_all = torch.cat(self.saved_gid) if self.saved_gid else torch.zeros(0, dtype=torch.long)
        where = torch.full((g["src"].numel(),), -1, dtype=torch.long)
        where[gid_all] = torch.arange(gid_all.numel())
        self.saved_x, self.saved_gid = [], []
        w_in_d = w_in.detach().requires_grad_(True)
        w_out_d = w_out.detach().requires_grad_(True)
        gw_in, gw_out = torch.zeros_like(w_in), torch.zeros_like(w_out)
        gweight_A = torch.zeros(g["src"].numel(), dtype=gy_TD.dtype, device=gy_TD.device)
        routes = self.routes(self.r_bwd, gy_TD.device)

        def stage(c, buf):
            rt = routes[c]
            if rt.gid_M.numel() == 0:
                return buf.new_zeros(rt.recv_rows, D)
            g_M = buf.index_select(0, rt.expand_index)
            xc = x_all.index_select(0, where[rt.gid_M].to(x_all.device)).requires_grad_(True)
            with torch.enable_grad():
                yc = ep._expert_fn(xc, rt.counts_El, w_in_d, w_out_d, ep.activation, ep.kernel)
            # dL/dw_a = <dL/dy_t, y_a> for assignment a of token t
            gweight_A.index_add_(0, rt.gid_M.to(gy_TD.device), (g_M * yc.detach()).sum(1))
            gy_M = g_M * rt.weight_M.to(g_M.dtype).unsqueeze(1)
            gx, gi, go = torch.autograd.grad(yc, (xc, w_in_d, w_out_d), gy_M, allow_unused=True)
            if gi is not None:
                gw_in.add_(gi)
            if go is not None:
                gw_out.add_(go)
            return gx.new_zeros(rt.recv_rows, D).index_add_(0, rt.expand_index, gx)

        gx_TD = disp.run_chunks(routes, gy_TD.contiguous(), gy_TD.shape[0], _ExpertStage(stage, D))
        # every assignment's weight gradient was formed at its expert's rank
        all_reduce(gweight_A, disp.ep_group, "dedup weight-gradient all-reduce", disp.timeout_s)
        b, n = int(g["base_P"][disp.p_me]), int(g["N_P"][disp.p_me])
        return gx_TD, gweight_A[b : b + n], gw_in, gw_out


class _DedupExperts(torch.autograd.Function):
    """x_TD, combine weights, local expert weights -> routed y_TD (dedup dispatch/combine)."""

    @staticmethod
    def forward(ctx, x_TD, weight_N, w_in, w_out, call: _DedupCall):
        # grad mode is off inside forward: the caller's mode was recorded on the call
        needs = call.grad_enabled and any(ctx.needs_input_grad[:4])
        y = call.forward(x_TD, w_in, w_out, needs)
        ctx.call = call
        ctx.save_for_backward(w_in, w_out)
        ctx.weight_dtype = weight_N.dtype
        return y

    @staticmethod
    def backward(ctx, gy_TD):
        w_in, w_out = ctx.saved_tensors
        gx, gweight, gi, go = ctx.call.backward(gy_TD, w_in, w_out)
        ctx.call = None
        return gx, gweight.to(ctx.weight_dtype), gi, go, None


# -- expert placement (HierMoE expert swap) --------------------------------------------------
def local_experts(disp: DedupDispatcher, rank: int | None = None) -> list[int]:
    """Experts of EP rank ``rank`` (default: this rank) in local-slot order."""
    p = disp.p_me if rank is None else rank
    mine = [e for e in range(disp.owner_E.numel()) if int(disp.owner_E[e]) == p]
    return sorted(mine, key=lambda e: int(disp.slot_E[e]))


@torch.no_grad()
def apply_placement(ep, owner_E, optimizer=None) -> None:
    """Move experts to the ranks ``owner_E[e]`` names: weights, gradients and the optimizer
    state shaped like them (e.g. Adam's moments), with no change to the layer's function.

    Collective over the EP group; every rank passes the same ``owner_E`` and the same kind of
    optimizer. Each rank must keep E_l experts (a swap exchanges two). The new local order
    is by expert id. The parameters stay the same objects, so optimizers keep them.
    """
    disp = ep.dispatcher
    if not isinstance(disp, DedupDispatcher):
        raise ConfigError(
            "dispatcher",
            getattr(ep, "dispatcher_name", type(disp).__name__),
            "'dedup' (the dispatcher that takes any expert placement)",
        )
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
    old_pos = disp.owner_E * E_l + disp.slot_E  # row of each expert in the gather
    mine = [e for e in range(P * E_l) if int(owner[e]) == disp.p_me]
    take = old_pos[torch.tensor(mine, dtype=torch.long)]
    slot = torch.zeros(P * E_l, dtype=torch.long)
    for p in range(P):
        for i, e in enumerate(e for e in range(P * E_l) if int(owner[e]) == p):
            slot[e] = i

    def moved(t: torch.Tensor) -> torch.Tensor:
        full = all_gather_equal(
            t.contiguous(), disp.ep_group, "expert placement all-gather", disp.timeout_s
        )
        return full.reshape(P * E_l, *t.shape[1:]).index_select(0, take.to(t.device))

    for param in (ep.w_in, ep.w_out):
        param.data.copy_(moved(param.data))
        if param.grad is not None:
            param.grad.copy_(moved(param.grad))
        state = optimizer.state.get(param, {}) if optimizer is not None else {}
        for key in sorted(state):
            v = state[key]
            if torch.is_tensor(v) and v.shape == param.shape:
                v.copy_(moved(v))
    disp.set_placement(owner, slot)


__all__ = ["DedupDispatcher", "LEVELS", "DedupRoute", "Hop", "apply_placement", "local_experts"]
