"""Disaggregated expert-parallel serving: attention ranks (AG) and expert ranks (EG).

FinDEP (arXiv 2512.21487) and MegaScale-Infer split an MoE model over two groups of ranks:
the AG runs embeddings, attention with the KV cache, the router, the shared experts and the
LM head; the EG runs the routed experts, ``E / eg`` per rank. Every layer, each AG rank sends
its tokens' rows to the EG ranks that own their experts (a2e) and gets the expert outputs
back (e2a), as point-to-point transfers.

Ranks ``0 .. ag-1`` are the AG, ``ag .. ag+eg-1`` the EG (one launch: ``torchrun`` or
:func:`serve`, which forks gloo ranks with :func:`moeflow.launch.launch`). Requests are dealt
to AG ranks round-robin; each AG rank runs :func:`moeflow.models.generate` with
:class:`DisaggregatedForward` as its forward pass.

Schedules (:class:`ServeSchedule`), per forward call of ``B`` sequences:

* ``naive``: one micro-batch, one chunk (``r1 = r2 = 1``): AG and EG take turns.
* ``pppipe``: MegaScale-Infer's ping-pong: ``r1 = 2`` micro-batches (by default) alternate
  between AG and EG; each micro-batch's expert work is sent whole (``r2 = 1``), ASAS.
* ``findep``: ``r1`` micro-batches, each layer's MoE input cut into ``r2`` token chunks whose
  a2e / experts / e2a pipeline, and the order of attention (A) and shared experts (S):
  ``ASAS`` (A_0 S_0 A_1 S_1 ...) or ``AASS`` (A_0 A_1 ... S_0 S_1 ...); from
  :func:`moeflow.plan.findep.solve` or given.

A schedule built with :meth:`ServeSchedule.per_step` and a
:class:`moeflow.plan.findep.StepPlanner` is solved at every forward call for that call's shape
(sequences x new tokens: a prefill or a decode step), over its own grid (FinDEP: r1, r2 and
order; PPPipe: r1; naive: none). :attr:`DisaggregatedForward.steps` logs each call's shape,
plan and wall time when given a list (``serve_rank``'s ``steps``).

Overlap comes from asynchronous transfers (``isend`` / ``irecv``): while the EG computes
micro-batch ``j``'s experts, the AG runs micro-batch ``j+1``'s attention or ``j``'s shared
experts. A micro-batch's layer is finished (routed outputs combined, shared output and
residual added) only when its next layer needs it.

Protocol (:class:`_Link`): each AG-EG pair posts one sequence of messages, identical on
both sides, matched by position only (no tags, no any-source receive), so that it runs on
NCCL, which ignores tags and runs a pair's operations in the order posted. Per micro-batch
and layer, the AG rank sends each EG rank a first header (command, layer, chunk count, and
chunk 0's row count and per-expert counts), the other chunks' headers in one message, then
the rows of every chunk, and posts a receive for each chunk's reply; the EG rank receives
the headers, posts every chunk's row receive at once, runs each chunk's experts as its rows
arrive and sends its reply. An EG rank serves each AG rank from its own thread.

Every wait has a deadline (:func:`moeflow.comm.timeouts.wait_work`): an EG rank that dies
makes the AG raise :class:`moeflow.errors.CommTimeoutError` naming the transfer (layer,
micro-batch, chunk, peer). A layout that cannot work (``ag + eg != world``, experts not
divisible by ``eg``) raises :class:`moeflow.errors.DistributedConfigError` before any
communication.

Numerics: routing is per token and dropless, so chunking and micro-batching change only which
rows share a GEMM; logits match single-process generation to rounding (tests: 1e-5, fp32).
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field

import torch

from moeflow.comm.timeouts import resolve_timeout, wait_work
from moeflow.errors import CommTimeoutError, ConfigError, DistributedConfigError
from moeflow.layer.experts import Experts
from moeflow.validate import positive_int

SCHEDULES = ("naive", "pppipe", "findep")
ORDERS = ("ASAS", "AASS")
_CMD_STOP, _CMD_DATA = 0, 1


@dataclass(frozen=True)
class ServeSchedule:
    """``r1`` micro-batches, ``r2`` chunks, ``order`` ASAS or AASS (see the module doc).

    ``decode`` optionally gives another ``(r1, r2, order)`` for decode steps (one token per
    sequence): FinDEP's best split of a prefill pass rarely suits a decode step, whose GEMMs
    are small enough that per-message and per-GEMM latency dominate."""

    name: str = "findep"
    r1: int = 1
    r2: int = 1
    order: str = "ASAS"
    decode: tuple[int, int, str] | None = None
    planner: object | None = field(default=None, compare=False, repr=False)

    def for_tokens(self, tokens_per_seq: int) -> ServeSchedule:
        """The schedule of a forward call with ``tokens_per_seq`` new tokens per sequence."""
        if tokens_per_seq == 1 and self.decode is not None:
            r1, r2, order = self.decode
            return ServeSchedule(self.name, r1, r2, order)
        return self

    def for_step(self, seqs: int, tokens_per_seq: int) -> ServeSchedule:
        """The schedule of a forward call of ``seqs`` sequences with ``tokens_per_seq`` new
        tokens each: with a ``planner`` (a :class:`moeflow.plan.findep.StepPlanner`), the
        plan it solves for that step shape and this schedule's grid (FinDEP per step);
        otherwise :meth:`for_tokens`."""
        if self.planner is None:
            return self.for_tokens(tokens_per_seq)
        p = self.planner.plan(self.name, seqs, tokens_per_seq)
        return ServeSchedule(self.name, p.r1, p.r2, p.order)

    @classmethod
    def per_step(cls, name: str, planner) -> ServeSchedule:
        """``name``'s schedule solved at every step by ``planner``."""
        return cls(name, planner=planner)

    def __post_init__(self) -> None:
        if self.decode is not None:
            if self.name != "findep" or len(self.decode) != 3:
                raise ConfigError(
                    "decode", self.decode, "None or (r1, r2, order) of a findep schedule"
                )
            ServeSchedule("findep", *self.decode)
        if self.name not in SCHEDULES:
            raise ConfigError("schedule", self.name, f"one of {SCHEDULES}")
        positive_int("r1", self.r1)
        positive_int("r2", self.r2)
        if self.order not in ORDERS:
            raise ConfigError("order", self.order, f"one of {ORDERS}")
        if self.name == "naive" and (self.r1, self.r2) != (1, 1):
            raise ConfigError("r1, r2", (self.r1, self.r2), "(1, 1) for the naive schedule")
        if self.name == "pppipe" and (self.r2 != 1 or self.order != "ASAS"):
            raise ConfigError(
                "r2, order", (self.r2, self.order), "(1, 'ASAS') for the pppipe schedule"
            )

    @classmethod
    def naive(cls) -> ServeSchedule:
        return cls("naive", 1, 1, "ASAS")

    @classmethod
    def pppipe(cls, r1: int = 2) -> ServeSchedule:
        return cls("pppipe", r1, 1, "ASAS")

    @classmethod
    def from_plan(cls, plan, decode_plan=None) -> ServeSchedule:
        """From a :class:`moeflow.plan.findep.FinDEPPlan` (and one for decode steps)."""
        dec = None if decode_plan is None else (decode_plan.r1, decode_plan.r2, decode_plan.order)
        return cls("findep", plan.r1, plan.r2, plan.order, dec)


def check_layout(world: int, ag: int, eg: int, num_experts: int) -> None:
    """DistributedConfigError unless ``ag + eg == world`` and ``eg`` divides the experts."""
    for name, v in (("ag", ag), ("eg", eg)):
        if not (isinstance(v, int) and v >= 1):
            raise DistributedConfigError(f"{name}={v!r} is not allowed: a positive int")
    if ag + eg != world:
        raise DistributedConfigError(
            f"ag={ag} + eg={eg} = {ag + eg} ranks, but the world has "
            f"{world}: ag + eg must equal the world size"
        )
    if num_experts % eg:
        raise DistributedConfigError(
            f"eg={eg} does not divide num_experts={num_experts}: "
            "each EG rank holds num_experts / eg experts"
        )


def _split(n: int, parts: int) -> list[tuple[int, int]]:
    """``parts`` contiguous, near-equal, non-empty ranges covering ``range(n)``."""
    parts = max(1, min(parts, n))
    bounds = [n * i // parts for i in range(parts + 1)]
    return [(bounds[i], bounds[i + 1]) for i in range(parts)]


class _Link:
    """Point-to-point messages with one peer, in one order both sides agree on.

    Every message of a pair is matched by its position in that pair's sequence, never by a
    tag or an any-source receive: NCCL ignores tags, has no any-source receive, and runs a
    pair's sends and receives in the order they were posted, so a receive posted ahead of its
    turn holds back every later send of the pair. The protocol (module doc, "Protocol") posts
    the same sequence on both sides, so it runs on NCCL as it does on gloo (which matches one
    pair's messages of one tag in order, too)."""

    TAG = 0

    def __init__(self, peer: int, timeout_s: float):
        self.peer, self.timeout_s = peer, timeout_s

    def isend(self, t: torch.Tensor, op: str):
        import torch.distributed as dist

        try:
            return dist.isend(t.contiguous(), self.peer, tag=self.TAG)
        except RuntimeError as e:  # gloo fails at once when the peer is already gone
            raise CommTimeoutError(
                f"{op} to rank {self.peer} failed: a peer rank died or "
                f"dropped its connection ({str(e).splitlines()[0][:200]})"
            ) from e

    def irecv(self, t: torch.Tensor, op: str):
        import torch.distributed as dist

        try:
            return dist.irecv(t, self.peer, tag=self.TAG)
        except RuntimeError as e:
            raise CommTimeoutError(
                f"{op} from rank {self.peer} failed: a peer rank died or "
                f"dropped its connection ({str(e).splitlines()[0][:200]})"
            ) from e


def header_size(local: int) -> int:
    """Longs in a group's first header: command, layer, chunks, then chunk 0's row count
    and per-expert counts (``local`` experts on the receiving EG rank)."""
    return 4 + local


@dataclass
class _Chunk:
    routing: object
    rows: int
    parts: list  # per EG rank: (n rows, recv buffer, work, op name) or None


class DisaggregatedForward:
    """The AG side: ``forward(ids_BT, rows_B, start_B) -> logits_BTV`` (the seam of
    :func:`moeflow.models.generate`), with the routed experts on the EG ranks."""

    def __init__(
        self,
        model,
        cache,
        schedule: ServeSchedule,
        ag: int,
        eg: int,
        timeout_s: float | None = None,
    ):
        self.model, self.cache, self.s = model, cache, schedule
        self.ag, self.eg = ag, eg
        self.timeout_s = resolve_timeout(timeout_s)
        self.links = [_Link(ag + e, self.timeout_s) for e in range(eg)]
        self.local = model.cfg.moe.num_experts // eg
        self.sends: list = []
        self.calls = 0
        #: None (a server's default: nothing kept), or a list that gets one record per
        #: forward call: seqs, tokens (new per sequence), r1, r2, order, ms (wall time) and
        #: wait_ms (of it, the time spent waiting for e2a replies)
        self.steps: list[dict] | None = None
        #: every forward call counted by its shape and plan, kept by a server for
        #: ``/health``: ``(seqs, tokens, r1, r2, order) -> [calls, total ms]`` (bounded by
        #: the step shapes the engine can form)
        self.plan_counts: dict[tuple[int, int, int, int, str], list] = {}
        #: None, or a function called with each forward call's record (as :attr:`steps`
        #: gets it) once the call is done: a server refits its step planner there
        self.on_step = None
        self._waited = 0.0

    # -- a2e ---------------------------------------------------------------------------
    def _send_group(self, l: int, j: int, x_TD: torch.Tensor, r2: int) -> list[_Chunk]:
        """Micro-batch ``j``'s MoE input at layer ``l``, cut into ``r2`` token chunks: to each
        EG rank its headers, then its rows of every chunk, then a receive for each reply
        (the order :meth:`ExpertServer._serve` posts the other side of)."""
        mlp = self.model.layers[l].mlp
        bounds = _split(x_TD.shape[0], r2)
        routed = []
        for a, b in bounds:
            routing = mlp.route(x_TD[a:b])
            per_rank = routing.counts_E.view(self.eg, self.local)
            routed.append((routing, mlp.permute(x_TD[a:b], routing), per_rank))
        # per chunk, per EG rank: [rows, rows per local expert]; one host read for them all
        table = torch.stack([pr for _, _, pr in routed])  # chunk x eg x local
        table = torch.cat([table.sum(2, keepdim=True), table], 2).to(torch.long)
        rows_CR = table[:, :, 0].tolist()
        chunks = [_Chunk(routing, b - a, []) for (routing, _, _), (a, b) in zip(routed, bounds)]
        where = f"(layer {l}, micro-batch {j}, {len(bounds)} chunks)"
        cmd = torch.tensor([_CMD_DATA, l, len(bounds)], device=table.device)
        for e, lk in enumerate(self.links):
            first = torch.cat([cmd, table[0, e]])
            self.sends.append(lk.isend(first, f"a2e header {where}"))
            if len(bounds) > 1:
                self.sends.append(lk.isend(table[1:, e], f"a2e headers {where}"))
            off = [sum(rows_CR[c][:e]) for c in range(len(bounds))]
            for c, (_, x_ND, _) in enumerate(routed):
                n = rows_CR[c][e]
                if n:
                    rows = x_ND[off[c] : off[c] + n]
                    self.sends.append(
                        lk.isend(rows, f"a2e (layer {l}, micro-batch {j}, chunk {c})")
                    )
            for c, (_, x_ND, _) in enumerate(routed):
                n = rows_CR[c][e]
                if not n:
                    chunks[c].parts.append(None)
                    continue
                buf = torch.empty(n, x_ND.shape[1], dtype=x_ND.dtype, device=x_ND.device)
                op = (
                    f"e2a from EG rank {self.ag + e} "
                    f"(layer {l}, micro-batch {j}, chunk {c}, {n} rows)"
                )
                chunks[c].parts.append((n, buf, lk.irecv(buf, op), op))
        return chunks

    def _finish(self, l: int, h_attn, chunks: list[_Chunk], shared_TD) -> torch.Tensor:
        mlp = self.model.layers[l].mlp
        ys = []
        for ch in chunks:
            outs = []
            for p in ch.parts:
                if p is not None:
                    n, buf, work, op = p
                    t0 = time.perf_counter()
                    wait_work(work, op, self.timeout_s)
                    self._waited += time.perf_counter() - t0
                    outs.append(buf)
            y_ND = torch.cat(outs) if outs else h_attn.new_zeros(0, h_attn.shape[-1])
            ys.append(mlp.combine(y_ND, ch.routing, ch.rows))
        y_TD = torch.cat(ys)
        if shared_TD is not None:
            y_TD = y_TD + shared_TD
        return h_attn + y_TD.view_as(h_attn)

    # -- the forward pass ----------------------------------------------------------------
    @torch.no_grad()
    def __call__(self, ids_BT, rows_B, start_B) -> torch.Tensor:
        t0, self._waited = time.perf_counter(), 0.0
        m, s = self.model, self.s.for_step(ids_BT.shape[0], ids_BT.shape[1])
        rows_B, pos_BT = m.positions(ids_BT, rows_B, start_B)
        B = ids_BT.shape[0]
        mbs = []
        for a, b in _split(B, s.r1):
            h, cos, sin = m.embed(ids_BT[a:b], pos_BT[a:b])
            mbs.append(
                {
                    "h": h,
                    "cos": cos,
                    "sin": sin,
                    "rows": rows_B[a:b],
                    "pos": pos_BT[a:b],
                    "pending": None,
                }
            )

        def finish(l, mb):
            if mb["pending"] is not None:
                h_attn, chunks, shared_TD = mb["pending"]
                mb["h"] = self._finish(l - 1, h_attn, chunks, shared_TD)
                mb["pending"] = None

        for l, layer in enumerate(m.layers):
            xs = []
            for j, mb in enumerate(mbs):
                finish(l, mb)
                h_attn = layer.attend(
                    mb["h"], mb["cos"], mb["sin"], self.cache, l, mb["rows"], mb["pos"]
                )
                x_TD = layer.ffn_input(h_attn)
                chunks = self._send_group(l, j, x_TD, s.r2)
                mb["pending"] = [h_attn, chunks, None]
                xs.append(x_TD)
                if s.order == "ASAS":
                    mb["pending"][2] = self._shared(layer, x_TD)
            if s.order == "AASS":
                for mb, x_TD in zip(mbs, xs):
                    mb["pending"][2] = self._shared(layer, x_TD)
        for mb in mbs:
            finish(len(m.layers), mb)
        for w in self.sends:  # sends are long done once their replies arrived
            wait_work(w, "a2e send", self.timeout_s)
        self.sends.clear()
        self.calls += 1
        logits = m.head(torch.cat([mb["h"] for mb in mbs]))
        if logits.is_cuda:  # the step's time is the device's, not its launches'
            torch.cuda.synchronize(logits.device)
        ms = 1e3 * (time.perf_counter() - t0)
        key = (int(ids_BT.shape[0]), int(ids_BT.shape[1]), s.r1, s.r2, s.order)
        count = self.plan_counts.get(key)
        if count is None:
            self.plan_counts[key] = [1, ms]
        else:
            count[0] += 1
            count[1] += ms
        if self.steps is None and self.on_step is None:
            return logits
        record = {
            "seqs": int(ids_BT.shape[0]),
            "tokens": int(ids_BT.shape[1]),
            "r1": s.r1,
            "r2": s.r2,
            "order": s.order,
            "ms": ms,
            "wait_ms": 1e3 * self._waited,
        }
        if self.steps is not None:
            self.steps.append(record)
        if self.on_step is not None:
            self.on_step(record)
        return logits

    @staticmethod
    def _shared(layer, x_TD):
        shared = layer.mlp.shared
        return None if shared is None else shared(x_TD)

    def close(self) -> None:
        """Tell every EG rank this AG rank is done."""
        device = next(self.model.parameters()).device
        stop = torch.zeros(header_size(self.local), dtype=torch.long, device=device)
        stop[0] = _CMD_STOP
        works = [lk.isend(stop.clone(), "stop message") for lk in self.links]
        for w in works:
            wait_work(w, "stop message to the EG", self.timeout_s)


class ExpertServer:
    """The EG side: this rank's ``E / eg`` experts of every layer, serving AG ranks until each
    has sent its stop message. Each AG rank is served by its own thread (:meth:`_serve`),
    since a server's AG ranks step independently and a receive cannot name "whichever peer
    sends first" on NCCL; the expert GEMMs of different AG ranks take turns under one lock
    (one device, one stream of work), in the order their rows arrive."""

    def __init__(
        self,
        model,
        rank: int,
        ag: int,
        eg: int,
        timeout_s: float | None = None,
        idle_timeout_s: float | None = None,
    ):
        cfg = model.cfg
        local = cfg.moe.num_experts // eg
        lo = (rank - ag) * local
        experts = []
        for layer in model.layers:
            full = layer.mlp.experts
            mine = Experts(
                local,
                full.hidden_size,
                full.ffn_hidden_size,
                full.expert_type,
                full.kernel,
                full.activation,
            )
            with torch.no_grad():
                mine.w_in.copy_(full.w_in[lo : lo + local])
                mine.w_out.copy_(full.w_out[lo : lo + local])
            experts.append(mine.eval())
        self._setup(cfg, experts, rank, ag, eg, timeout_s, idle_timeout_s)

    @classmethod
    def from_experts(
        cls,
        cfg,
        experts: list,
        rank: int,
        ag: int,
        eg: int,
        timeout_s: float | None = None,
        idle_timeout_s: float | None = None,
    ) -> ExpertServer:
        """A server over ``experts`` (this rank's :class:`Experts` of every layer, e.g. from
        :func:`moeflow.serving.disagg_weights.load_expert_part`), with no model around them."""
        self = cls.__new__(cls)
        self._setup(cfg, experts, rank, ag, eg, timeout_s, idle_timeout_s)
        return self

    def _setup(self, cfg, experts, rank, ag, eg, timeout_s, idle_timeout_s) -> None:
        self.e = rank - ag
        self.local = cfg.moe.num_experts // eg
        if len(experts) != cfg.num_layers or any(x.num_experts != self.local for x in experts):
            raise ConfigError(
                "experts", f"{len(experts)} layers", f"{cfg.num_layers} layers of {self.local}"
            )
        self.experts = experts
        self.D = cfg.hidden_size
        self.dtype = experts[0].w_in.dtype
        self.timeout_s = resolve_timeout(timeout_s)
        self.idle_timeout_s = resolve_timeout(idle_timeout_s or 10 * self.timeout_s)
        self.device = experts[0].w_in.device
        self.links = {a: _Link(a, self.timeout_s) for a in range(ag)}
        self._lock = threading.Lock()  # one AG rank's expert GEMMs at a time
        self.stats = {"messages": 0, "rows": 0, "busy_s": 0.0}

    def run(self) -> dict:
        """Serve every AG rank until each has sent its stop message; the first error of any
        AG rank's thread is raised here (the others are left to the process's end)."""
        peers = sorted(self.links)
        if len(peers) == 1:
            self._serve(peers[0])
            return self.stats
        done = threading.Condition()
        finished: list = []
        errors: list[BaseException] = []

        def serve(a: int) -> None:
            try:
                self._serve(a)
            except BaseException as e:  # noqa: BLE001 - raised by run()
                errors.append(e)
            with done:
                finished.append(a)
                done.notify_all()

        for a in peers:
            name = f"moeflow-eg{self.e}-ag{a}"
            threading.Thread(target=serve, args=(a,), name=name, daemon=True).start()
        with done:
            while len(finished) < len(peers) and not errors:
                done.wait()
        if errors:
            raise errors[0]
        return self.stats

    @torch.no_grad()
    def _serve(self, a: int) -> None:
        """AG rank ``a``'s messages, in the order :meth:`DisaggregatedForward._send_group`
        sends them: per micro-batch and layer, the first header (command, layer, chunks,
        chunk 0's rows and per-expert counts), the other chunks' headers in one message, then
        every chunk's rows, all received at once; each chunk's experts run as soon as its
        rows are in, and its reply is sent. The next header is received after the last
        reply is posted, its turn in the pair's sequence."""
        lk, local = self.links[a], self.local
        sends: list = []
        while True:
            first = torch.empty(header_size(local), dtype=torch.long, device=self.device)
            op = f"a2e header from AG rank {a}"
            wait_work(lk.irecv(first, op), op, self.idle_timeout_s)
            head = first.tolist()
            if head[0] == _CMD_STOP:
                break
            l, chunks = head[1], head[2]
            table = [head[3:]]
            if chunks > 1:
                rest = torch.empty(chunks - 1, 1 + local, dtype=torch.long, device=self.device)
                op = f"a2e headers from AG rank {a} (layer {l})"
                wait_work(lk.irecv(rest, op), op, self.timeout_s)
                table += rest.tolist()
            posted = []
            for c, (n, *_) in enumerate(table):
                if n:
                    x_ND = torch.empty(n, self.D, dtype=self.dtype, device=self.device)
                    op = f"a2e rows from AG rank {a} (layer {l}, chunk {c})"
                    posted.append((c, x_ND, lk.irecv(x_ND, op), op))
            for c, x_ND, work, op in posted:
                wait_work(work, op, self.timeout_s)
                counts = first[4:] if c == 0 else rest[c - 1, 1:]
                with self._lock:
                    t0 = time.perf_counter()
                    y_ND = self.experts[l](x_ND, counts)
                    self.stats["busy_s"] += time.perf_counter() - t0
                    self.stats["messages"] += 1
                    self.stats["rows"] += x_ND.shape[0]
                sends.append(lk.isend(y_ND, f"e2a to AG rank {a} (layer {l}, chunk {c})"))
            if len(sends) > 64:  # keep the list short; old sends are done
                for w in sends[:32]:
                    wait_work(w, f"e2a send to AG rank {a}", self.timeout_s)
                del sends[:32]
        for w in sends:
            wait_work(w, f"e2a send to AG rank {a}", self.timeout_s)


def serve_rank(
    rank: int,
    world: int,
    model,
    requests,
    ag: int,
    eg: int,
    schedule: ServeSchedule,
    timeout_s: float | None = None,
    return_logits: bool = False,
    on_token=None,
    warmup: bool = False,
    steps: list | None = None,
):
    """One rank of a disaggregated run (call it on every rank of an initialised gloo or NCCL
    group, e.g. under ``torchrun``). AG ranks return ``[(request index, GenerationResult)]``
    for their share of ``requests``; EG ranks return their expert statistics. ``warmup``:
    one unmeasured one-token request first (gloo connects peers on first use). ``steps``: on
    AG ranks, a list that receives one record per measured forward call (step shape, its
    ``(r1, r2, order)`` and wall time; :attr:`DisaggregatedForward.steps`)."""
    from moeflow.models.generate import Request, SamplingParams, generate

    check_layout(world, ag, eg, model.cfg.moe.num_experts)  # before any communication
    if rank >= ag:
        return {"role": "eg", **ExpertServer(model, rank, ag, eg, timeout_s).run()}
    mine = [i for i in range(len(requests)) if i % ag == rank]
    cache = model.new_cache(max(1, len(mine)))
    fwd = DisaggregatedForward(model, cache, schedule, ag, eg, timeout_s)
    try:
        if warmup:  # slot 0, position 0: the real prefill overwrites it
            generate(model, [Request([1], SamplingParams(1))], forward=fwd)
        fwd.steps = steps  # the measured calls only
        res = generate(
            model,
            [requests[i] for i in mine],
            forward=fwd,
            return_logits=return_logits,
            on_token=on_token,
        )
    except BaseException:
        try:  # let the EG ranks go if they still listen; the first error is the one to see
            fwd.close()
        except Exception:
            pass
        raise
    fwd.close()
    return list(zip(mine, res))


def _serve_rank_portable(rank, world, *args):
    # torch pickles tensors through shared memory, which a rank that exits right after
    # sending cannot serve; numpy arrays travel by value
    steps: list = []
    out = serve_rank(rank, world, *args, steps=steps)
    if isinstance(out, list):
        for _, r in out:
            r.logits = [t.numpy() for t in r.logits]
        return out, steps
    return out


def serve(
    model,
    requests,
    *,
    ag: int = 1,
    eg: int = 1,
    schedule: ServeSchedule | None = None,
    timeout_s: float = 60.0,
    return_logits: bool = False,
    threads: int = 1,
    progress: bool = False,
    warmup: bool = False,
    force: bool = False,
    steps: list | None = None,
):
    """Fork ``ag + eg`` gloo ranks on this host, serve ``requests`` and return the
    :class:`~moeflow.models.generate.GenerationResult` of each, in request order.

    As in :func:`~moeflow.models.generate.generate`, a bad request (empty prompt, ids out of
    range, sampling parameters out of range) gets a result with its typed ``error`` and no
    tokens, and the others are served; bad requests are found here, before any rank starts.

    ``timeout_s`` bounds every transfer; ``force`` allows more ranks than
    :func:`moeflow.launch.max_ranks`. Both are checked before any rank starts. ``steps``: a
    list that receives every AG rank's step records (``serve_rank``'s ``steps``, with
    ``"rank"`` added)."""
    import time

    from moeflow.errors import MoeflowError
    from moeflow.launch import check_nproc, launch
    from moeflow.models.generate import GenerationResult, validate_request
    from moeflow.validate import positive_float

    timeout_s = positive_float("timeout_s", timeout_s)
    check_layout(ag + eg, ag, eg, model.cfg.moe.num_experts)
    check_nproc(ag + eg, force=force, flag="ag + eg")
    schedule = schedule or ServeSchedule.naive()
    requests = list(requests)
    results = [None] * len(requests)
    live = []
    for i, r in enumerate(requests):
        try:
            validate_request(r, model.cfg.vocab_size, model.cfg.max_position_embeddings)
            live.append(i)
        except MoeflowError as e:
            prompt = getattr(r, "prompt", None)
            results[i] = GenerationResult(
                getattr(r, "request_id", None),
                len(prompt) if isinstance(prompt, (list, tuple, str, bytes)) else 0,
                finish_reason="error",
                error=e,
                start_time=time.perf_counter(),
            )
    if not live:
        return results
    out = launch(
        _serve_rank_portable,
        ag + eg,
        model,
        [requests[i] for i in live],
        ag,
        eg,
        schedule,
        timeout_s,
        return_logits,
        None,
        warmup,
        threads=threads,
        progress=progress,
        name="serve",
        force=force,
        stall_timeout_s=max(30.0, 2 * timeout_s),
        timeout_s=None,
    )
    for rank, (part, part_steps) in enumerate(out[:ag]):
        if steps is not None:
            steps.extend({"rank": rank, **st} for st in part_steps)
        for j, r in part:
            r.logits = [torch.from_numpy(a) for a in r.logits]
            results[live[j]] = r
    return results
