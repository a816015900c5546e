"""ExpertParallel: one MoELayer sharded over ranks, with pipelined comm/compute overlap.

Shapes: T local tokens, D hidden, F FFN width, E experts, N local assignments; W ranks in
``group``; S = ``esp_size`` ranks share one set of experts (expert-sharding parallelism,
each with an F/S slice); P = W / S expert-parallel shards, E_l = E / P local experts.

Group layout (group ranks): ESP groups are S consecutive ranks ``{p*S + s}`` (inside one
node); EP groups are ``{s + S*p}``. EP shard p owns experts ``[p*E_l, (p+1)*E_l)``; ESP rank
s holds F-slice ``[s*F/S, (s+1)*F/S)`` of each.

Per forward call (FSMoE, ASPLOS'25: the MoE layer as swappable modules, gate -> order ->
dispatch -> expert FFN -> combine):
  route (replicated router, local tokens) -> the dispatcher's layout (permuted rows, or
  tokens) -> exchange -> r chunks of [dispatch steps -> ESP all-gather -> expert GEMMs on
  the F-slice -> ESP reduce-scatter -> combine steps] (wavefront,
  :mod:`moeflow.parallel.pipeline`) -> unpermute and weight (row layouts) -> + shared
  experts (replicated).
Backward is the mirror image in :class:`PipelinedExperts` with its own degree r_bwd: grads
travel like tokens (the adjoint of combine is a dispatch, of reduce-scatter an all-gather).
Every dispatcher (:mod:`moeflow.parallel.contract`) runs through this one pipeline.

Semantics: routing, capacity (drop mode) and expert choice act on each rank's own batch,
exactly as the single-device layer on that batch; aux losses are per rank by default, or
over the global batch with :mod:`moeflow.parallel.aux_loss`. Token-choice dropless routing
is per token, so the output equals the single-device layer on the global batch.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn as nn

from moeflow.comm.bytes import node_map
from moeflow.comm.collectives import (
    DEFAULT_BUCKET_BYTES,
    all_gather_v,
    all_reduce,
    reduce_gradients,
    reduce_scatter_v,
)
from moeflow.comm.groups import subgroup
from moeflow.comm.timeouts import resolve_timeout
from moeflow.comm.topology import Topology
from moeflow.errors import ConfigError, DistributedConfigError
from moeflow.layer.experts import ExpertFFN, experts_eager
from moeflow.layer.moe import MoELayer
from moeflow.layer.routers import Routing
from moeflow.layer.routers import capacity as capacity_of
from moeflow.parallel import mp_schedule as parm
from moeflow.parallel import refit as online
from moeflow.parallel.contract import CountExchange, TokenDispatcher
from moeflow.parallel.dedup import apply_placement
from moeflow.parallel.dispatch import dispatcher_class, make_dispatcher
from moeflow.parallel.pipeline import run_wavefront
from moeflow.perf.record import DurationRecorder
from moeflow.validate import positive_int


def resolve_degrees(plan, layer_index: int, r_fwd: int, r_bwd: int) -> tuple[int, int]:
    """``(r_fwd, r_bwd)`` from a plan (``moeflow.plan.degrees_for_layer``) or plain ints."""
    if plan is not None:
        if isinstance(plan, int):
            return positive_int("plan", plan), plan
        if isinstance(plan, (tuple, list)) and len(plan) == 2:
            return positive_int("plan[0]", plan[0]), positive_int("plan[1]", plan[1])
        import moeflow.plan as mplan  # lazy: the runtime works without planners installed

        rf, rb = mplan.degrees_for_layer(plan, layer_index)
        return positive_int("plan r_fwd", int(rf)), positive_int("plan r_bwd", int(rb))
    return positive_int("r_fwd", r_fwd), positive_int("r_bwd", r_bwd)


class _Run:
    """State of one forward call that backward reuses (exchange, routes, saved inputs).

    The one driver of every dispatcher: it runs the routes of
    :mod:`moeflow.parallel.contract` on the wavefront scheduler, forward with r_fwd chunks
    and backward with r_bwd. ``expert_fn(x_MD, counts, w_in, w_out)`` is the grouped
    expert FFN on expert-major rows.
    """

    def __init__(
        self,
        dispatcher: TokenDispatcher,
        ex: CountExchange,
        expert_fn,
        r_fwd: int,
        r_bwd: int,
        recorder=None,
    ):
        self.disp, self.ex, self.expert_fn = dispatcher, ex, expert_fn
        self.r_fwd, self.r_bwd = r_fwd, r_bwd
        self.recorder = recorder  # a moeflow.perf.record.DurationRecorder, or None
        self.grad_enabled = torch.is_grad_enabled()
        self.graphs: list | None = None
        self.x_full: torch.Tensor | None = None  # recompute path (no hand-written backward)
        self.saved: list | None = None  # residual path: expert residuals, canonical order
        self.y_full: torch.Tensor | None = None  # residual path, expanding routes: outputs
        self.w_in_d = self.w_out_d = None

    # -- the chunk pipeline, shared by forward and backward -------------------------------
    def _pipeline(
        self, rows: torch.Tensor, r: int, compute, backward: bool = False
    ) -> torch.Tensor:
        """send -> dispatch steps -> ESP gather -> experts -> ESP reduce-scatter -> combine
        steps -> place, for r chunks (FSMoE's wavefront); ``compute(c, x_e, counts, w_e)``
        runs the experts on chunk c's expert-major rows (``w_e``: their combine weights
        where the route expands rows, else None). With a recorder, the pass's durations
        are recorded (:meth:`_record`)."""
        disp, ex = self.disp, self.ex
        S, timeout = disp.S, disp.timeout_s
        N, D = rows.shape[0], rows.shape[-1]
        pad = ex.padded
        # all index tensors reach the device before any chunk is queued (no syncs later)
        routes = [disp.route(ex, r, c).to(rows.device) for c in range(r)]
        stages = []
        if pad:
            # GShard's fixed slots: one send buffer for the call, a disjoint slice per chunk
            # (a slice is never reused while its all-to-all may still read it). Each chunk
            # gathers its real rows straight into its slice and zeroes only its padding
            # slots; nothing else of the input is copied. Padding slots come back to a
            # scratch row N of the output, which is neither zeroed nor returned.
            sizes = [rt.send_index.numel() for rt in routes]
            offsets = [sum(sizes[:c]) for c in range(r)]
            send_buf = rows.new_empty(sum(sizes), D)
            out = rows.new_empty(N + 1, D)
        else:
            out = rows.new_zeros(rows.shape)

        def send(c, _):
            rt = routes[c]
            if pad:
                buf = send_buf.narrow(0, offsets[c], sizes[c])
                if N:  # with no rows every slot is padding
                    torch.index_select(rows, 0, rt.send_src, out=buf)
                if rt.pad_slots.numel():
                    buf.index_fill_(0, rt.pad_slots, 0)
            else:
                buf = rows.index_select(0, rt.send_gather)
            return rt.dispatch[0].issue(buf, timeout, skip_pre=True)

        stages.append(send)
        for k in range(1, len(routes[0].dispatch)):
            stages.append(lambda c, buf, k=k: routes[c].dispatch[k].issue(buf, timeout))
        if S > 1:

            def gather(c, buf):
                sizes = routes[c].recv_SPE.sum((1, 2)).tolist()
                return all_gather_v(
                    buf, sizes, disp.esp_group, f"ESP all-gather (chunk {c + 1}/{r})", timeout
                )

            stages.append(gather)

        def experts(c, buf):
            rt = routes[c]
            idx, counts = rt.expert_major, rt.expert_counts
            if rt.expand:  # rows -> (token, expert) assignments -> weighted sum per row
                y_e = compute(c, buf.index_select(0, idx), counts, rt.expert_weights)
                y = buf.new_zeros(buf.shape[0], y_e.shape[-1]).index_add_(0, idx, y_e)
            elif idx is None:
                y = compute(c, buf, counts, None)
            else:
                y_e = compute(c, buf.index_select(0, idx), counts, None)
                # padded routes compute only the filled slots; the others go back as zeros
                new = buf.new_zeros if pad else buf.new_empty
                y = new(buf.shape[0], y_e.shape[-1]).index_copy_(0, idx, y_e)
            if S > 1:
                return reduce_scatter_v(
                    y,
                    rt.recv_SPE.sum((1, 2)).tolist(),
                    disp.esp_group,
                    f"ESP reduce-scatter (chunk {c + 1}/{r})",
                    timeout,
                )
            return rt.combine[0].issue(y, timeout)

        stages.append(experts)
        if S > 1:
            stages.append(lambda c, y: routes[c].combine[0].issue(y, timeout))
        for k in range(1, len(routes[0].combine)):
            stages.append(lambda c, y, k=k: routes[c].combine[k].issue(y, timeout))

        def place(c, y):
            rt = routes[c]
            if rt.expand:  # a token sent to several destinations comes back once from each
                out.index_add_(0, rt.send_index, y)
            else:
                out.index_copy_(0, rt.send_index, y)
            return None

        stages.append(place)
        if self.recorder is None or rows.device.type != "cpu":  # host clocks time CPU work
            run_wavefront(r, stages)
        else:
            self._record(r, stages, routes, rows, backward)
        return out[:N] if pad else out

    def _record(self, r: int, stages: list, routes: list, rows: torch.Tensor, backward: bool):
        """Run the wavefront timing each stage, and record (:mod:`moeflow.perf.record`):

        * ``expert_fwd@<dtype>`` / ``expert_bwd@<dtype>`` per chunk: the chunk's local work
          (send gather, expert GEMMs, placing), what the compute resource of FSMoE's model
          does per chunk, with ``n`` = the chunk's forward expert FLOPs (``2 M D X`` for its
          M rows through ``w_in`` and ``w_out``, the ``moeflow profile`` convention), so the
          host work per chunk enters the cost's alpha and compute under contention its beta;
        * the whole pass's wall time at its degree ``r`` (``add_pass``), which the refit
          matches with FSMoE's simulated pass;
        * ``a2a`` per collective, where nothing else of this rank runs between its issue
          and its wait: the dispatch of the first chunk and the combine of the last (the
          flat route: one dispatch and one combine step, no ESP), with ``n`` = the buffer
          this rank hands over, its own rows included.

        A pass that compressed a message records nothing (ZipCCL's encode and its blocking
        size exchange run inside the issue: they are the codec's costs).
        """
        import time

        clock = time.perf_counter
        n_st = len(stages)
        start = [[0.0] * n_st for _ in range(r)]
        end = [[0.0] * n_st for _ in range(r)]
        in_rows = [[0] * n_st for _ in range(r)]
        local = [0.0] * r

        def timed(i, stage):
            def run(c, value):
                if isinstance(value, torch.Tensor):
                    in_rows[c][i] = value.shape[0]
                t0 = clock()
                out = stage(c, value)
                t1 = clock()
                start[c][i], end[c][i] = t0, t1
                local[c] += t1 - t0
                return out

            return run

        disp = self.disp
        cz = disp.compression
        squeezed = None if cz is None else sum(cz.stats.compressed.values())
        t_pass = clock()
        run_wavefront(r, [timed(i, st) for i, st in enumerate(stages)])
        t_pass = clock() - t_pass
        rec = self.recorder
        if cz is not None and sum(cz.stats.compressed.values()) != squeezed:
            return  # the codec's work and size exchange are its own costs, not these
        dtype = str(rows.dtype).removeprefix("torch.")
        key = f"expert_{'bwd' if backward else 'fwd'}@{dtype}"
        rec.add_pass(key, r, t_pass * 1e3)
        D = rows.shape[-1]
        for c, rt in enumerate(routes):
            counts = rt.expert_counts
            m = int(counts.sum()) if counts is not None else in_rows[c][n_st - 2]
            rec.add(key, 2.0 * m * D * self.expert_width, local[c] * 1e3)
        if n_st == 3 and disp.S == 1:  # send, experts (+ combine issue), place
            row = D * rows.element_size()
            rec.add("a2a", routes[0].send_index.numel() * row, (start[0][1] - end[0][0]) * 1e3)
            rec.add("a2a", in_rows[r - 1][1] * row, (start[r - 1][2] - end[r - 1][1]) * 1e3)

    def _canonical(self, r: int, device) -> list:
        return [self.disp.canonical_index(self.ex, r, c).to(device) for c in range(r)]

    # -- forward / backward ---------------------------------------------------------------
    def forward(self, x, w_in, w_out, needs_grad: bool) -> torch.Tensor:
        """Forward over r_fwd chunks. What backward gets: r_fwd == r_bwd, each chunk's
        autograd graph; otherwise each chunk's expert residuals (``expert_fn.forward_saving``:
        input, pre-activation, activation) scattered into canonical order, so a backward
        chunk gathers its rows and runs the hand-written backward (FSMoE, ASPLOS'25: the
        degrees of the two directions are chosen independently, so backward must not pay a
        second expert forward). An expert function without ``forward_saving`` (a custom
        one) has its inputs saved and its forward re-run per backward chunk."""
        expert_fn = self.expert_fn
        keep_graphs = needs_grad and self.r_fwd == self.r_bwd
        residuals = needs_grad and not keep_graphs and hasattr(expert_fn, "forward_saving")
        expands = self.disp.consumes_tokens
        if needs_grad:
            self.w_in_d = w_in.detach().requires_grad_(True)
            self.w_out_d = w_out.detach().requires_grad_(True)
        if keep_graphs:
            self.graphs = [None] * self.r_fwd
        # the rows each chunk computes are known when its experts run (a padded route learns
        # its filled slots then), so the canonical order and M are built on first use
        canon: list = []

        def canonical(c):
            if not canon:
                canon.extend(self._canonical(self.r_fwd, x.device))
            return canon[c]

        def save_residuals(c, y, saved):
            M = self.ex.computed_rows
            if self.saved is None:  # shapes are known at the first non-empty chunk
                self.saved = [t.new_empty((M,) + tuple(t.shape[1:])) for t in saved]
                if expands:  # the combine weights' gradient needs y per assignment
                    self.y_full = y.new_empty(M, y.shape[-1])
            for buf, t in zip(self.saved, saved):
                buf.index_copy_(0, canonical(c), t)
            if expands:
                self.y_full.index_copy_(0, canonical(c), y)

        def compute(c, x_e, counts, w_e):
            if x_e.shape[0] == 0:
                if keep_graphs:
                    self.graphs[c] = None
                return x_e.new_zeros(0, x_e.shape[-1])
            if keep_graphs:
                xc = x_e.detach().requires_grad_(True)
                with torch.enable_grad():
                    yc = expert_fn(xc, counts, self.w_in_d, self.w_out_d)
                self.graphs[c] = (xc, yc)
                y = yc.detach()
            elif residuals:
                y, saved = expert_fn.forward_saving(x_e, counts, w_in, w_out)
                save_residuals(c, y, saved)
            else:
                if needs_grad:
                    if self.x_full is None:
                        self.x_full = x.new_empty(self.ex.computed_rows, x.shape[-1])
                    self.x_full.index_copy_(0, canonical(c), x_e)
                y = expert_fn(x_e, counts, w_in, w_out)
            return y if w_e is None else y * w_e.to(y.dtype).unsqueeze(1)

        self.expert_width = w_in.shape[1] + w_out.shape[-1]  # X + F/S: FLOPs per row / 2D
        return self._pipeline(x, self.r_fwd, compute)

    def _chunk_backward(self, c, g_e, counts, canon, x_dtype):
        """``(grad x, grad w_in, grad w_out, y)`` of backward chunk c's expert rows."""
        expert_fn = self.expert_fn
        if self.graphs is not None:
            xc, yc = self.graphs[c]
            self.graphs[c] = None  # free the chunk's activations as soon as used
        elif self.saved is not None:
            idx = canon[c]
            saved = [buf.index_select(0, idx) for buf in self.saved]
            y = None if self.y_full is None else self.y_full.index_select(0, idx)
            return (
                lambda g: expert_fn.backward(g, saved, counts, self.w_in_d, self.w_out_d, x_dtype)
            ), y
        else:
            xc = self.x_full.index_select(0, canon[c]).requires_grad_(True)
            with torch.enable_grad():  # recompute: backward chunks differ from forward's
                yc = expert_fn(xc, counts, self.w_in_d, self.w_out_d)

        def grads(g):
            return torch.autograd.grad(yc, (xc, self.w_in_d, self.w_out_d), g, allow_unused=True)

        return grads, yc.detach()

    def backward(self, grad_y):
        """``(grad x, grad of the exchange's weights or None, grad w_in, grad w_out)``."""
        disp, ex = self.disp, self.ex
        gw_in = torch.zeros_like(self.w_in_d)
        gw_out = torch.zeros_like(self.w_out_d)
        expands = disp.consumes_tokens
        g_A = grad_y.new_zeros(ex.num_assignments) if expands else None
        canon = None if self.graphs is not None else self._canonical(self.r_bwd, grad_y.device)
        routes = [disp.route(ex, self.r_bwd, c) for c in range(self.r_bwd)]

        def compute(c, g_e, counts, w_e):
            if g_e.shape[0] == 0:
                return g_e.new_zeros(0, g_e.shape[-1])
            grads, y = self._chunk_backward(c, g_e, counts, canon, grad_y.dtype)
            if w_e is not None:
                # HierMoE: dL/dw_a = <dL/dy_t, y_a> for assignment a of token t
                idx = routes[c].assignment_index.to(g_A.device)
                g_A.index_add_(0, idx, (g_e * y).sum(1).to(g_A.dtype))
                g_e = g_e * w_e.to(g_e.dtype).unsqueeze(1)
            gx, gi, go = grads(g_e)
            if gi is not None:
                gw_in.add_(gi)
            if go is not None:
                gw_out.add_(go)
            return gx

        gx = self._pipeline(grad_y.contiguous(), self.r_bwd, compute, backward=True)
        self.graphs = self.x_full = self.saved = self.y_full = None
        g_weight = disp.weight_grad(ex, g_A)
        return gx, g_weight, gw_in, gw_out


class PipelinedExperts(torch.autograd.Function):
    """Dispatch -> experts -> combine over r_fwd chunks; backward over r_bwd chunks.

    Inputs: ``x`` in the dispatcher's layout (``consumes_tokens``: local assignments sorted
    by expert, or tokens), the combine weights the pipeline applies (token layouts; None
    for row layouts, whose output is unweighted), the local (ESP-sliced) expert weights,
    and the call state. Output: in x's row order. FSMoE's overlap: chunk i's GEMMs run
    under chunk i+1's dispatch and chunk i-1's combine, in both directions. The only
    autograd Function of the expert-parallel engine: every dispatcher runs through it.
    """

    @staticmethod
    def forward(ctx, x, weight_N, w_in, w_out, run: _Run):
        # grad mode is off inside forward: the caller's mode was recorded on the run
        needs = run.grad_enabled and any(ctx.needs_input_grad[:4])
        y = run.forward(x, w_in, w_out, needs)
        ctx.run = run
        ctx.weight_dtype = None if weight_N is None else weight_N.dtype
        return y

    @staticmethod
    def backward(ctx, grad_y):
        gx, g_weight, gw_in, gw_out = ctx.run.backward(grad_y)
        ctx.run = None
        if g_weight is not None:
            g_weight = g_weight.to(ctx.weight_dtype)
        return gx, g_weight, gw_in, gw_out, None


def pipelined_experts(
    dispatcher: TokenDispatcher,
    ex: CountExchange,
    x: torch.Tensor,
    weight_N: torch.Tensor | None,
    w_in: torch.Tensor,
    w_out: torch.Tensor,
    expert_fn,
    r_fwd: int,
    r_bwd: int,
    recorder=None,
) -> torch.Tensor:
    """Run the experts on ``x`` (the layout of ``dispatcher``) through the one pipeline.

    ``ex`` is ``dispatcher.exchange(...)`` of this call, ``weight_N`` the routing's combine
    weights for token layouts (None for row layouts), ``expert_fn(x_MD, counts, w_in,
    w_out)`` the grouped expert FFN. Collective over the dispatcher's groups. ``recorder``
    (a :class:`moeflow.perf.record.DurationRecorder`) records both passes' durations.
    """
    run = _Run(dispatcher, ex, expert_fn, r_fwd, r_bwd, recorder)
    return PipelinedExperts.apply(x, weight_N, w_in, w_out, run)


def slice_w_in(w_in: torch.Tensor, e0: int, e1: int, s: int, S: int, swiglu: bool) -> torch.Tensor:
    """Experts ``[e0, e1)`` of ``w_in`` (E, X, D), FFN slice ``s`` of ``S`` (ESP rank s).

    For SwiGLU, X = 2F holds gate rows then up rows; the slice keeps that layout,
    ``[gate_s; up_s]`` (2F/S rows), because the expert kernels split it in the middle.
    """
    F = w_in.shape[1] // 2 if swiglu else w_in.shape[1]
    f = F // S
    w = w_in[e0:e1]
    if not swiglu:
        return w[:, s * f : (s + 1) * f]
    # gate rows then up rows: keep that layout inside the slice (kernels expect it)
    return torch.cat([w[:, s * f : (s + 1) * f], w[:, F + s * f : F + (s + 1) * f]], dim=1)


class LocalExpertFFN:
    """The grouped expert FFN for ``(activation, gated)`` (``MoEConfig.expert_activation``):
    called with the signature of :func:`moeflow.kernels.expert_ffn` (its activation argument
    is ignored: bound here), it runs the fused kernel where it covers the pair, else the
    per-expert loop. :meth:`bind` gives the :class:`moeflow.layer.experts.ExpertFFN` of a
    kernel, whose saved-residual forward and hand-written backward let backward chunks
    differ from forward chunks without re-running the experts."""

    def __init__(self, activation: str, gated: bool):
        self.activation, self.gated = activation, gated

    def __call__(self, x_ND, counts_E, w_in, w_out, _activation, kernel):
        return experts_eager(x_ND, counts_E, w_in, w_out, self.activation, self.gated, kernel)

    def bind(self, kernel: str) -> ExpertFFN:
        return ExpertFFN(self.activation, self.gated, kernel)


def local_expert_ffn(activation: str, gated: bool) -> LocalExpertFFN:
    """The grouped expert FFN for ``(activation, gated)``; see :class:`LocalExpertFFN`."""
    return LocalExpertFFN(activation, gated)


class _LayerSteps(nn.Module):
    """The steps of a :class:`moeflow.MoELayer` without its routed experts (router, shared
    experts, config): what every rank replicates. Holding this instead of the layer keeps the
    full expert weights unreferenced, so they can be freed (or never exist: a meta layer)."""

    def __init__(self, layer: nn.Module):
        super().__init__()
        self.cfg = layer.cfg
        self.router = layer.router
        self.shared = layer.shared

    check_input = MoELayer.check_input
    route = MoELayer.route
    permute = staticmethod(MoELayer.permute)
    combine = staticmethod(MoELayer.combine)
    combine_with_shared = MoELayer.combine_with_shared


class ExpertParallel(nn.Module):
    """Run ``layer`` (a :class:`moeflow.MoELayer`) with its experts sharded over ``group``.

    Args:
        layer: the full single-device layer; every rank must pass the same (same seed)
            layer. Its router and shared experts are used as replicas; its routed experts
            are sliced into local parameters ``w_in`` (E_l, 2F/S or F/S, D) and
            ``w_out`` (E_l, D, F/S), and the layer's full expert weights are not kept. A
            layer on the meta device gives meta slices: allocate them with ``to_empty`` and
            load this rank's share (:func:`moeflow.parallel.parallelize` does both).
        group: process group of the W ranks (None: the default group).
        topology: :class:`Topology` of ``group`` (default ``Topology.from_env``).
        dispatcher: ``"a2a"`` (flat dropless), ``"capacity"`` (fixed capacity, padded),
            ``"hierarchical"`` (intra-node then inter-node: FSMoE / Tutel's 2DH; ``"2dh"``
            is accepted as an alias) or ``"dedup"`` (HierMoE token dedup).
        esp_size: S, ranks sharing each expert's FFN (must fit inside a node).
        r_fwd, r_bwd: pipeline degrees (chunks) of forward and backward.
        plan: a ``moeflow.plan.Plan`` (read with ``degrees_for_layer(plan, layer_index)``),
            an int, a ``(r_fwd, r_bwd)`` pair, or ``"auto"`` (planned on ``perf``, see
            below); overrides r_fwd / r_bwd.
        timeout_s: deadline of every collective; a dead or stalled peer raises
            :class:`moeflow.errors.CommTimeoutError` naming the operation.
        compress: ZipCCL lossless compression of the dispatch/combine all-to-alls (CPU):
            False (default), True, or "auto" (per call, under ``perf``, a PerfModel with
            codec costs; see :mod:`moeflow.comm.compressed`). Results are bit-identical.
            The codec runs on CPU tensors: True or "auto" on a device input is a
            ConfigError naming ``compress``, raised before the first collective.
        dispatcher_options: extra keyword arguments of the dispatcher class, e.g.
            ``{"level": "auto"}`` for ``dispatcher="dedup"`` (HierMoE token dedup at level
            0 = rank, 1 = node, or chosen per batch; :mod:`moeflow.parallel.dedup`).
        mp_group, schedule, parm_cluster: Parm (INFOCOM'24,
            :mod:`moeflow.parallel.mp_schedule`): the
            model-parallel group holding the same tokens on each rank, which must be this
            rank's ESP group; ``schedule`` ``"plain"`` (every MP rank dispatches the tokens),
            ``"split_tokens"`` (Parm's S1: MP-Split before the gate, MP-AllGather after
            combine), ``"split_rows"`` (Parm's S2: split of the routed rows after the gate,
            MP-AllGather of expert outputs) or ``"auto"`` (α-β choice of
            :mod:`moeflow.plan.parm` under ``parm_cluster``); ``"s1"`` / ``"s2"`` are
            accepted as aliases.
        perf: the :class:`moeflow.perf.PerfModel` (``moeflow profile``) that the ``auto``
            choices read: ``compress="auto"``, ``plan="auto"`` (the degree of 1, 2 and 4
            with the smallest predicted forward + backward under FSMoE's simulated pass,
            one for both passes, planned at the first call for the largest token count of
            any rank: :func:`moeflow.parallel.refit.plan_degrees`), and the refit below.
        refit_after: online refinement (:mod:`moeflow.parallel.refit`): record the
            pipeline's durations over this many calls after the first (a warm-up window
            run at 1, 2 and 4 chunks in turn), then refit ``perf`` from every rank's
            samples and decide the ``auto`` choices again (degrees, ZipCCL, dedup level,
            Parm schedule); None (default) records nothing. :meth:`refit` is the same
            step on demand.

    Raises DistributedConfigError before any communication when E is not divisible by
    P = W / S, S does not divide the node, or F is not divisible by S.
    """

    def __init__(
        self,
        layer: nn.Module,
        group=None,
        topology: Topology | None = None,
        dispatcher: str = "a2a",
        esp_size: int = 1,
        r_fwd: int = 1,
        r_bwd: int = 1,
        plan=None,
        layer_index: int = 0,
        timeout_s: float | None = None,
        kernel: str | None = None,
        compress=False,
        perf=None,
        dispatcher_options: dict | None = None,
        mp_group=None,
        schedule: str = "plain",
        parm_cluster=None,
        refit_after: int | None = None,
    ):
        super().__init__()
        cfg = layer.cfg
        dispatcher_cls = dispatcher_class(dispatcher)
        esp_size = positive_int("esp_size", esp_size)
        self.auto_degrees = isinstance(plan, str) and plan == "auto"
        if self.auto_degrees:
            if perf is None:
                raise ConfigError("perf", None, "a PerfModel (`moeflow profile`) for plan='auto'")
            perf.require("a2a", who="plan='auto'")
            plan = None
        self.r_fwd, self.r_bwd = resolve_degrees(plan, layer_index, r_fwd, r_bwd)
        if refit_after is not None:
            refit_after = positive_int("refit_after", refit_after)
            if perf is None:
                raise ConfigError("perf", None, "a PerfModel (`moeflow profile`) to refit")
        self.perf, self.refit_after = perf, refit_after
        self.recorder = DurationRecorder() if refit_after is not None else None
        self.fixed_degrees = (self.r_fwd, self.r_bwd)  # what the refit window restores
        self.calls, self.probed, self.recording = 0, False, False
        self.plan_tokens = self.plan_bytes = self.plan_dtype = None
        self.timeout_s = resolve_timeout(timeout_s)
        if not dist.is_initialized():
            raise DistributedConfigError(
                "torch.distributed is not initialised: call init_process_group first"
            )
        W = dist.get_world_size(group)
        rank = dist.get_rank(group)
        topology = topology if topology is not None else Topology.from_env(group)
        if topology.world_size != W:
            raise DistributedConfigError(
                f"topology.world_size={topology.world_size} does not match the group size {W}"
            )
        R = topology.ranks_per_node
        S = esp_size
        if S > R or R % S:
            raise DistributedConfigError(
                f"esp_size={S} must divide the ranks per node ({R}): an ESP group lives "
                f"inside one node"
            )
        P = W // S
        E, F = cfg.num_experts, cfg.ffn_hidden_size
        if E % P:
            raise DistributedConfigError(
                f"num_experts={E} is not divisible by the expert-parallel size "
                f"{P} (= world {W} / esp_size {S})"
            )
        if F % S:
            raise DistributedConfigError(f"ffn_hidden_size={F} is not divisible by esp_size={S}")

        # Replicated parts (router, shared experts) are the layer's own modules. The full
        # layer is not kept: only its expert-free steps, so after construction nothing here
        # references the full expert weights (a layer built on the meta device never has any).
        self.__dict__["_layer"] = _LayerSteps(layer)
        self.cfg = cfg
        for name, child in layer.named_children():
            if name != "experts":
                self.add_module(name, child)
        # forward pre-hooks of the layer (Mixtral's router jitter) act on our input the same way
        for hook in layer._forward_pre_hooks.values():
            self.register_forward_pre_hook(hook)
        if hasattr(layer, "router_jitter_noise"):
            self.router_jitter_noise = layer.router_jitter_noise
        self.group, self.topology = group, topology
        self.world_size, self.rank = W, rank
        self.esp_size, self.ep_size = S, P
        self.ep_rank, self.esp_rank = rank // S, rank % S
        self.num_local_experts = E // P
        # the experts' activation as the single-device layer computes it (GeGLU, exact GELU,
        # ReLU, ... included), not the expert type's default
        self.activation = cfg.expert_activation
        self.gated = cfg.expert_type == "swiglu"
        self.kernel = kernel or layer.experts.kernel

        e0, e1 = self.ep_rank * self.num_local_experts, (self.ep_rank + 1) * self.num_local_experts
        swiglu = self.gated
        f = F // S
        with torch.no_grad():
            self.w_in = nn.Parameter(
                slice_w_in(layer.experts.w_in.detach(), e0, e1, self.esp_rank, S, swiglu).clone()
            )
            self.w_out = nn.Parameter(
                layer.experts.w_out.detach()[
                    e0:e1, :, self.esp_rank * f : (self.esp_rank + 1) * f
                ].clone()
            )
        self.expert_range = (e0, e1)
        self.ffn_slice = (self.esp_rank * f, (self.esp_rank + 1) * f)

        # Process groups: every rank builds the same kinds in the same order.
        t = self.timeout_s
        self.esp_group = subgroup(group, [self.ep_rank * S + s for s in range(S)], t)
        ep_members = [self.esp_rank + S * p for p in range(P)]
        self.ep_group = subgroup(group, ep_members, t)
        # Only the groups the dispatcher declares (``options``) are built: making a group is
        # collective, and the hierarchical groups cost every rank a rendezvous.
        options = {}
        if "world_group" in dispatcher_cls.options:
            options["world_group"] = group
        if "intra_group" in dispatcher_cls.options:
            L = R // S  # EP members per node
            a = self.ep_rank // L
            j = self.ep_rank % L
            options["intra_group"] = subgroup(group, [ep_members[a * L + i] for i in range(L)], t)
            options["inter_group"] = subgroup(
                group, [ep_members[b * L + j] for b in range(P // L)], t
            )
            options["ranks_per_node"] = L
        options.update(dispatcher_options or {})
        self.dispatcher: TokenDispatcher = make_dispatcher(
            dispatcher,
            ep_group=self.ep_group,
            ep_size=P,
            ep_rank=self.ep_rank,
            esp_group=self.esp_group,
            esp_size=S,
            esp_rank=self.esp_rank,
            num_local_experts=self.num_local_experts,
            timeout_s=t,
            **options,
        )
        self.dispatcher_name = dispatcher_cls.name  # the registered name, aliases resolved
        # link levels of the measured bytes (``dispatcher.bytes_sent``): this group's layout
        self.dispatcher.byte_counter.nodes = node_map(topology, group)
        if compress is not False:  # ZipCCL: compressed row all-to-alls
            from moeflow.comm.compressed import as_compression

            self.dispatcher.compression = as_compression(compress, perf, timeout_s=t)
        # The grouped expert FFN (signature of moeflow.kernels.expert_ffn); a public seam so
        # benchmarks can time communication alone.
        self.expert_fn = local_expert_ffn(self.activation, self.gated)
        self.aux_loss = torch.zeros(())
        self.last_counts_E = torch.zeros(E, dtype=torch.long)
        self.parm_schedule = parm.check_mp_group(self, mp_group, schedule)
        self.mp_group, self.parm_cluster = mp_group, parm_cluster
        self.parm_bytes: dict = {}
        self.last_schedule: str | None = None

    @property
    def layer(self) -> nn.Module:
        return self._layer

    # -- parameters ----------------------------------------------------------------------
    def expert_parameters(self) -> list[nn.Parameter]:
        """This rank's unique expert slices (gradients already hold every rank's tokens)."""
        return [self.w_in, self.w_out]

    def replicated_parameters(self) -> list[nn.Parameter]:
        """Router and shared-expert parameters, identical on every rank."""
        ids = {id(p) for p in self.expert_parameters()}
        return [p for p in self.parameters() if id(p) not in ids]

    def sync_gradients(self, op: str = "mean", bucket_bytes: int = DEFAULT_BUCKET_BYTES) -> None:
        """Make gradients those of the global loss.

        ``op="sum"``: the loss is a sum over ranks' local losses (replicated grads are
        all-reduced in flat buckets, expert grads already are sums). ``op="mean"``: the loss
        is the mean of the local losses (everything divided by W; DDP's convention). A
        replicated parameter that got no gradient here (e.g. the router of a rank with zero
        tokens) contributes zeros. See :func:`moeflow.comm.collectives.reduce_gradients`.
        """
        replicated = [p for p in self.replicated_parameters() if p.requires_grad]
        reduce_gradients(
            list(self.parameters()),
            replicated,
            self.group,
            op=op,
            timeout_s=self.timeout_s,
            bucket_bytes=bucket_bytes,
        )

    def apply_placement(self, owner_E, optimizer=None) -> dict[str, int]:
        """HierMoE expert swap: move the experts whose owner changes to ranks ``owner_E``,
        point to point (weights, gradients and optimizer state; dispatcher="dedup"); returns
        the bytes this rank sent per link level. See
        :func:`moeflow.parallel.dedup.apply_placement`."""
        return apply_placement(self, owner_E, optimizer)

    @torch.no_grad()
    def full_expert_weights(self) -> tuple[torch.Tensor, torch.Tensor]:
        """All experts' ``(w_in (E, X, D), w_out (E, D, F))`` on every rank (all-gather).

        The inverse of the slicing in ``__init__``: what a single-device checkpoint holds.
        """
        from moeflow.comm.collectives import all_gather_equal

        S, P, E_l = self.esp_size, self.ep_size, self.num_local_experts
        w_in = all_gather_equal(
            self.w_in.detach(), self.group, "expert all-gather", self.timeout_s
        )  # [W, E_l, X/S, D]
        w_out = all_gather_equal(
            self.w_out.detach(), self.group, "expert all-gather", self.timeout_s
        )  # [W, E_l, D, F/S]
        w_in = w_in.view(P, S, *w_in.shape[1:])
        w_out = w_out.view(P, S, *w_out.shape[1:])
        if self.gated:  # slices are [gate_s; up_s]
            f = w_in.shape[3] // 2
            gate = w_in[:, :, :, :f].permute(0, 2, 1, 3, 4).reshape(P * E_l, S * f, -1)
            up = w_in[:, :, :, f:].permute(0, 2, 1, 3, 4).reshape(P * E_l, S * f, -1)
            full_in = torch.cat([gate, up], dim=1)
        else:
            full_in = w_in.permute(0, 2, 1, 3, 4).reshape(P * E_l, -1, w_in.shape[-1])
        full_out = w_out.permute(0, 2, 3, 1, 4).reshape(P * E_l, w_out.shape[3], -1)
        rows = self.dispatcher.expert_rows()  # a swapped placement (dedup)
        if rows is not None:
            full_in, full_out = full_in[rows], full_out[rows]
        return full_in, full_out

    @torch.no_grad()
    def update_correction_bias(self, rate: float = 1e-3) -> None:
        """DeepSeek aux-loss-free bias step from the *global* expert loads (all-reduced)."""
        counts = self.last_counts_E.to(torch.float64).clone()
        all_reduce(counts, self.group, "expert-load all-reduce", self.timeout_s)
        self.router.update_correction_bias(counts, rate)

    # -- forward -------------------------------------------------------------------------
    def _local_capacity(self, T: int) -> int | None:
        cfg = self.cfg
        if cfg.router == "expert_choice":
            return min(T, capacity_of(T, cfg.top_k, cfg.num_experts, cfg.capacity_factor or 1.0))
        if cfg.capacity_factor is not None:
            return capacity_of(T, cfg.top_k, cfg.num_experts, cfg.capacity_factor)
        return None

    def _empty_routing(self, x_TD: torch.Tensor) -> Routing:
        E = self.cfg.num_experts
        z = torch.zeros(0, dtype=torch.long, device=x_TD.device)
        return Routing(
            z,
            z.clone(),
            x_TD.new_zeros(0),
            torch.zeros(E, dtype=torch.long, device=x_TD.device),
            self.router.empty_aux(x_TD),  # a global aux loss's collective still runs
            x_TD.new_zeros(0, E),
            0,
        )

    def refit(self):
        """Refit ``self.perf`` from the durations ``self.recorder`` holds (every rank's,
        merged in rank order) and decide the ``auto`` choices again; collective over the
        group, every rank calls it alike. Returns the refitted model. See
        :mod:`moeflow.parallel.refit`."""
        return online.refit(self)

    def forward(
        self, x: torch.Tensor, r_fwd: int | None = None, r_bwd: int | None = None
    ) -> torch.Tensor:
        online.before_call(self, x)
        if self.mp_group is not None:  # Parm: tokens replicated over the MP group
            y, aux = parm.parm_forward(self, x, r_fwd, r_bwd)
        else:
            y, aux = self.forward_local(x, r_fwd, r_bwd)
        self.aux_loss = aux
        return y

    def forward_local(
        self, x: torch.Tensor, r_fwd: int | None = None, r_bwd: int | None = None, mp_rows=None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The layer on this rank's tokens ``x``: ``(output, aux loss of this rank's batch)``.

        The step the model-parallel schedules of :mod:`moeflow.parallel.mp_schedule` build
        on: ``mp_rows`` (Parm's split of the routed rows, a ``RowShare``) makes this rank
        dispatch only its share of the rows and gathers every share's expert outputs before
        the combine. Records ``last_counts_E``; :meth:`forward` records ``aux_loss``.
        """
        layer, disp = self._layer, self.dispatcher
        if disp.compression is not None:  # decided before the first collective (begin)
            from moeflow.comm.compressed import check_codec_device

            check_codec_device(disp.compression, x.device, "ExpertParallel row all-to-alls")
        layer.check_input(x)
        shape = x.shape
        x_TD = x.reshape(-1, shape[-1])
        T = x_TD.shape[0]
        cap = self._local_capacity(T)
        started = disp.begin(cap, device=x.device)  # overlaps routing
        # A rank with no tokens still takes part in every collective.
        routing = layer.route(x_TD) if T > 0 else self._empty_routing(x_TD)
        counts_E = routing.counts_E
        if mp_rows is None:  # the count exchange travels while the rows are permuted
            started = disp.start_exchange(counts_E, started=started, device=x.device)
        x_in, weight_N = disp.pipeline_input(x_TD, routing)  # the dispatcher's layout
        if mp_rows is not None:  # Parm S2: this MP rank's share of the rows (comm.parm)
            x_in, counts_E = mp_rows.select(x_in, routing)
            started = disp.start_exchange(counts_E, started=started, device=x.device)
        ex = disp.exchange(
            counts_E, capacity=cap, device=x.device, started=started, routing=routing, tokens=x_TD
        )
        y = pipelined_experts(
            disp,
            ex,
            x_in,
            weight_N,
            self.w_in,
            self.w_out,
            self._expert_kernel(),
            r_fwd or self.r_fwd,
            r_bwd or self.r_bwd,
            self.recorder if self.recording else None,
        )
        if mp_rows is not None:
            y = mp_rows.gather(y)
        y_TD = disp.pipeline_output(y, routing, T)
        if layer.shared is not None:
            y_TD = y_TD + layer.shared(x_TD)
        self.last_counts_E = routing.counts_E.detach()
        return y_TD.reshape(shape), routing.aux_loss

    def _expert_kernel(self):
        """What the pipeline runs: the bound :class:`ExpertFFN` (residual backward) for the
        built-in expert function, else the seam ``expert_fn`` with activation and kernel."""
        fn = self.expert_fn
        if isinstance(fn, LocalExpertFFN):
            return fn.bind(self.kernel)
        return self._bound_expert_fn

    def _bound_expert_fn(self, x_MD, counts, w_in, w_out):
        return self.expert_fn(x_MD, counts, w_in, w_out, self.activation, self.kernel)

    def extra_repr(self) -> str:
        return (
            f"dispatcher={self.dispatcher_name}, world={self.world_size}, "
            f"ep={self.ep_size}, esp={self.esp_size}, local_experts={self.expert_range}, "
            f"r_fwd={self.r_fwd}, r_bwd={self.r_bwd}"
        )
