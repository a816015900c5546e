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

Every wait has a deadline (:func:`moeflow.comm.timeouts.wait_work`): an EG rank that dies
makes the AG raise :class:`moeflow.errors.CommTimeoutError` naming the transfer (layer,
micro-batch, chunk, peer). A layout that cannot work (``ag + eg != world``, experts not
divisible by ``eg``) raises :class:`moeflow.errors.DistributedConfigError` before any
communication.

Numerics: routing is per token and dropless, so chunking and micro-batching change only which
rows share a GEMM; logits match single-process generation to rounding (tests: 1e-5, fp32).
"""

from __future__ import annotations

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
    """Point-to-point messages to one peer. Rows messages are tagged ``2 * count + 1`` (both
    sides count), headers all ``HEADER_TAG`` (even), so a receiver may post the next header
    before the rows of the current message, and an EG rank serving several AG ranks may post
    one header receive from any of them (gloo delivers one pair's messages in order)."""

    HEADER, ROWS = 0, 1
    HEADER_TAG = 0  # every header: an EG rank may receive the next one from any AG rank

    def _tag(self, counts: list[int], kind: int) -> int:
        counts[kind] += 1
        return self.HEADER_TAG if kind == self.HEADER else 2 * counts[kind] + kind

    def __init__(self, peer: int, timeout_s: float):
        self.peer, self.timeout_s = peer, timeout_s
        self.sent = [0, 0]
        self.received = [0, 0]

    def isend(self, t: torch.Tensor, op: str, kind: int):
        import torch.distributed as dist

        tag = self._tag(self.sent, kind)
        try:
            return dist.isend(t.contiguous(), self.peer, tag=tag)
        except RuntimeError as e:  # gloo fails at once when the peer is already gone
            raise CommTimeoutError(
                f"{op} to rank {self.peer} failed: a peer rank died or "
                f"dropped its connection ({str(e).splitlines()[0][:200]})"
            ) from e

    def irecv(self, t: torch.Tensor, op: str, kind: int):
        import torch.distributed as dist

        tag = self._tag(self.received, kind)
        try:
            return dist.irecv(t, self.peer, tag=tag)
        except RuntimeError as e:
            raise CommTimeoutError(
                f"{op} from rank {self.peer} failed: a peer rank died or "
                f"dropped its connection ({str(e).splitlines()[0][:200]})"
            ) from e

    @classmethod
    def irecv_any(cls, t: torch.Tensor, op: str):
        """A header from whichever rank sends one first (``work._source_rank()`` names it)."""
        import torch.distributed as dist

        try:
            return dist.irecv(t, None, tag=cls.HEADER_TAG)
        except RuntimeError as e:
            raise CommTimeoutError(
                f"{op} failed: a peer rank died or dropped its connection "
                f"({str(e).splitlines()[0][:200]})"
            ) from e


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
        self._waited = 0.0

    # -- a2e ---------------------------------------------------------------------------
    def _send_chunk(self, l: int, j: int, c: int, x_TD: torch.Tensor) -> _Chunk:
        mlp = self.model.layers[l].mlp
        routing = mlp.route(x_TD)
        x_ND = mlp.permute(x_TD, routing)
        counts_E = routing.counts_E
        per_rank = counts_E.view(self.eg, self.local)
        n_R = per_rank.sum(1).tolist()
        parts, off = [], 0
        for e, n in enumerate(n_R):
            header = torch.tensor([_CMD_DATA, l, n, *per_rank[e].tolist()], dtype=torch.long)
            where = f"(layer {l}, micro-batch {j}, chunk {c}, {n} rows)"
            self.sends.append(self.links[e].isend(header, f"a2e header {where}", _Link.HEADER))
            if n == 0:
                parts.append(None)
                continue
            self.sends.append(self.links[e].isend(x_ND[off : off + n], f"a2e {where}", _Link.ROWS))
            buf = torch.empty(n, x_ND.shape[1], dtype=x_ND.dtype)
            op = f"e2a from EG rank {self.ag + e} {where}"
            work = self.links[e].irecv(buf, op, _Link.ROWS)
            parts.append((n, buf, work, op))
            off += n
        return _Chunk(routing, x_TD.shape[0], parts)

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
                chunks = [
                    self._send_chunk(l, j, c, x_TD[a:b])
                    for c, (a, b) in enumerate(_split(x_TD.shape[0], s.r2))
                ]
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
        ms = 1e3 * (time.perf_counter() - t0)
        key = (int(ids_BT.shape[0]), int(ids_BT.shape[1]), s.r1, s.r2, s.order)
        count = self.plan_counts.get(key)
        if count is None:
            self.plan_counts[key] = [1, ms]
        else:
            count[0] += 1
            count[1] += ms
        if self.steps is None:
            return logits
        self.steps.append(
            {
                "seqs": int(ids_BT.shape[0]),
                "tokens": int(ids_BT.shape[1]),
                "r1": s.r1,
                "r2": s.r2,
                "order": s.order,
                "ms": ms,
                "wait_ms": 1e3 * self._waited,
            }
        )
        return logits

    @staticmethod
    def _shared(layer, x_TD):
        shared = layer.mlp.shared
        return None if shared is None else shared(x_TD)

    def close(self) -> None:
        """Tell every EG rank this AG rank is done."""
        stop = torch.tensor([_CMD_STOP, 0, 0, *([0] * self.local)], dtype=torch.long)
        works = [lk.isend(stop.clone(), "stop message", _Link.HEADER) for lk in self.links]
        for w in works:
            wait_work(w, "stop message to the EG", self.timeout_s)


class ExpertServer:
    """The EG side: this rank's ``E / eg`` experts of every layer, serving AG ranks until each
    has sent its stop message. With several AG ranks, messages are taken in the order they
    arrive (:meth:`_arrivals`)."""

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
        self.links = {a: _Link(a, self.timeout_s) for a in range(ag)}
        self.stats = {"messages": 0, "rows": 0, "busy_s": 0.0}

    @torch.no_grad()
    def run(self) -> dict:
        active = list(self.links)
        sends = []
        # the next header is posted as soon as the previous one arrived, so its latency
        # hides behind this rank's expert work; with several AG ranks it may come from any
        # of them, in the order they send (a server's AG ranks step independently)
        posted = self._post_header(active)
        while active:
            header, work, op = posted
            wait_work(work, op, self.idle_timeout_s)
            a = active[0] if len(self.links) == 1 else work._source_rank()
            lk = self.links[a]
            if int(header[0]) == _CMD_STOP:
                active.remove(a)
                if active:
                    posted = self._post_header(active)
                continue
            posted = self._post_header(active)
            l, n = int(header[1]), int(header[2])
            if n == 0:
                continue
            x_ND = torch.empty(n, self.D, dtype=self.dtype)
            op = f"a2e rows from AG rank {a} (layer {l})"
            wait_work(lk.irecv(x_ND, op, _Link.ROWS), op, self.timeout_s)
            t0 = time.perf_counter()
            y_ND = self.experts[l](x_ND, header[3:])
            self.stats["busy_s"] += time.perf_counter() - t0
            self.stats["messages"] += 1
            self.stats["rows"] += n
            sends.append(lk.isend(y_ND, f"e2a (layer {l})", _Link.ROWS))
            if len(sends) > 64:  # keep the list short; old sends are done
                for w in sends[:32]:
                    wait_work(w, f"e2a send to AG rank {a}", self.timeout_s)
                del sends[:32]
        for w in sends:
            wait_work(w, "e2a send", self.timeout_s)
        return self.stats

    def _post_header(self, active: list[int]):
        header = torch.empty(3 + self.local, dtype=torch.long)
        if len(self.links) == 1:
            a = active[0]
            op = f"a2e header from AG rank {a}"
            return header, self.links[a].irecv(header, op, _Link.HEADER), op
        op = f"a2e header from any of AG ranks {active}"
        return header, _Link.irecv_any(header, op), op


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
