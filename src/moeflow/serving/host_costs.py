"""This host's costs as FinDEP's model reads them, measured where the server runs.

FinDEP (arXiv 2512.21487, section 4) predicts a step from four alpha-beta costs
(:class:`moeflow.perf.cost.LinearCost`, ms): ``gemm`` (``t_gm`` vs FLOPs, the expert FFN as
the EG runs it), ``link`` (``t_c`` vs bytes, one a2e or e2a message), ``attention`` (``t_a``
vs FLOPs, the attention half of a layer) and ``head`` (the AG's per-step embedding and LM
head vs tokens). :func:`fit_gemm`, :func:`fit_attention` and :func:`fit_head` time this
runtime's own modules on one thread; :func:`pingpong` times gloo round trips between two
ranks of an initialised group (across whatever link joins them) and :func:`fit_link` fits
them. :class:`HostCosts` holds the four, with a JSON form (``moeflow serve --costs FILE``,
and what ``/health`` reports). :func:`step_planner` builds the
:class:`moeflow.plan.findep.StepPlanner` that solves every forward step from them; it is used
by ``moeflow serve --ag N --eg M`` (:mod:`moeflow.serving.disagg_server`, which refits them
to the steps it serves: :meth:`moeflow.plan.findep.StepPlanner.refit`) and by ``moeflow
serve-bench``.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial

from moeflow.errors import ConfigError, InputError

COSTS = ("gemm", "link", "attention", "head")
#: the unit of each cost's ``n``
UNITS = {"gemm": "FLOP", "link": "B", "attention": "FLOP", "head": "token"}


@dataclass(frozen=True)
class HostCosts:
    """The four measured costs of one host (module doc)."""

    gemm: object
    link: object
    attention: object
    head: object

    def to_dict(self) -> dict:
        """``{cost: {"alpha_ms", "beta_ms", "r2", "unit", "note"}}``."""
        return {
            k: {
                "alpha_ms": c.alpha,
                "beta_ms": c.beta,
                "r2": c.r2,
                "unit": UNITS[k],
                "note": c.note,
            }
            for k, c in zip(COSTS, (self.gemm, self.link, self.attention, self.head))
        }

    @classmethod
    def from_dict(cls, d, where: str = "costs") -> HostCosts:
        """Back from :meth:`to_dict`; a missing or malformed cost raises
        :class:`~moeflow.errors.ConfigError` naming it."""
        from moeflow.perf.cost import LinearCost

        if not isinstance(d, dict):
            raise ConfigError(where, type(d).__name__, f"a JSON object with costs {COSTS}")
        out = {}
        for k in COSTS:
            c = d.get(k)
            if not isinstance(c, dict) or not all(
                isinstance(c.get(f), (int, float)) for f in ("alpha_ms", "beta_ms")
            ):
                raise ConfigError(
                    f"{where}: {k}",
                    c,
                    f'{{"alpha_ms": ms, "beta_ms": ms per {UNITS[k]}}} (the {k} cost is missing)',
                )
            r2 = c.get("r2")
            out[k] = LinearCost(
                float(c["alpha_ms"]),
                float(c["beta_ms"]),
                r2=None if r2 is None else float(r2),
                source="measured",
                note=str(c.get("note", "")),
            )
        return cls(**out)


def load_costs(path) -> HostCosts:
    """A :class:`HostCosts` from a JSON file (:meth:`HostCosts.to_dict`; a ``"costs"`` key
    around it is accepted too)."""
    import json

    try:
        with open(path) as f:
            d = json.load(f)
    except OSError as e:
        raise InputError(f"costs file {path}: {e.strerror or e}") from None
    except json.JSONDecodeError as e:
        raise InputError(f"costs file {path} is not JSON: {e}") from None
    if isinstance(d, dict) and isinstance(d.get("costs"), dict):
        d = d["costs"]
    return HostCosts.from_dict(d, where=f"costs file {path}")


def fit_gemm(cfg, eg: int):
    """``t_gm`` (ms, FLOPs) as the EG runs it: this host's expert FFN (one thread, ``E / eg``
    experts, n rows spread evenly, the median of 5 runs by :func:`moeflow.perf.measure.time_ms`)
    read through FinDEP's ``t_e = 3 (E/eg) t_gm(2 m_e M H)``, so the intercept holds the
    per-GEMM and per-call overheads of this runtime."""
    import torch

    from moeflow.layer.experts import Experts
    from moeflow.perf.measure import fit, time_ms

    moe = cfg.moe
    local = moe.num_experts // eg
    n_threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        ex = Experts(
            local,
            moe.hidden_size,
            moe.ffn_hidden_size,
            moe.expert_type,
            moe.kernel,
            moe.expert_activation,
        ).eval()
        flops, ms = [], []
        with torch.no_grad():
            for n in (local, local * 4, local * 16, local * 64, local * 256, local * 512):
                x = torch.randn(n, moe.hidden_size)
                counts = torch.full((local,), n // local)
                t = time_ms(partial(ex, x, counts), trials=5)
                flops.append(2.0 * (n / local) * moe.hidden_size * moe.ffn_hidden_size)
                ms.append(t / (3 * local))
    finally:
        torch.set_num_threads(n_threads)
    # relative error: a decode step's GEMMs of a few rows count as much as a prefill's
    return fit(flops, ms, relative=True, note="expert FFN of this runtime, 1 thread, per GEMM")


def fit_attention(cfg):
    """``t_a`` (ms vs FLOPs of projections plus causal core, FinDEP's ``t_a`` terms) of this
    host's attention half of a layer (norm, projections, RoPE, KV-cache write, SDPA; one
    thread), over prefill shapes (sequences x tokens) and decode shapes (sequences x 1 token
    after 32 cached positions), the median of 5 runs each, fitted on relative error."""
    import torch

    from moeflow.models.decoder import DecoderLayer, KVCache, Rotary
    from moeflow.perf.measure import fit, time_ms

    D, H, K, d = cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    proj_params = D * H * d + 2 * D * K * d + H * d * D
    n_threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        layer, rotary = DecoderLayer(cfg).eval(), Rotary(d, cfg.rope_theta)
        flops, ms = [], []
        with torch.no_grad():
            shapes = ((1, 1), (8, 1), (32, 1), (1, 16), (4, 32), (4, 128), (8, 128), (4, 256))
            for b, s in shapes:
                s = min(s, cfg.max_position_embeddings)
                past = 32 if s == 1 else 0
                cache = KVCache(cfg, b, past + s)
                h = torch.randn(b, s, D)
                pos = torch.arange(past, past + s).repeat(b, 1)
                cos, sin = rotary(pos, h.dtype)
                rows = torch.arange(b)
                t = time_ms(partial(layer.attend, h, cos, sin, cache, 0, rows, pos), trials=5)
                flops.append(2.0 * b * s * proj_params + b * H * 2 * d * s * s)
                ms.append(t)
    finally:
        torch.set_num_threads(n_threads)
    return fit(flops, ms, relative=True, note="attention half of a layer, 1 thread, this host")


def fit_head(model):
    """The AG's per-step work outside the layers (embedding, final norm, LM head; one
    thread), ms vs the step's tokens, 1 to 1536, the median of 5 runs each, fitted on relative
    error."""
    import torch

    from moeflow.perf.measure import fit, time_ms

    def step(ids):
        pos = torch.zeros_like(ids)
        h, _, _ = model.embed(ids, pos)
        return model.head(h)

    n_threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        xs, ms = [], []
        with torch.no_grad():
            for b, s in ((1, 1), (8, 1), (32, 1), (8, 32), (32, 48)):
                ids = torch.ones(b, s, dtype=torch.long)
                xs.append(b * s)
                ms.append(time_ms(partial(step, ids), trials=5))
    finally:
        torch.set_num_threads(n_threads)
    return fit(xs, ms, relative=True, note="embedding and LM head, 1 thread, this host")


def pingpong(rank: int, world: int, sizes, a: int = 0, b: int = 1) -> list[float]:
    """On ranks ``a`` and ``b`` of an initialised group: ms of half the round trip of an
    a2e-shaped message (a header, then ``n`` bytes of rows) and its e2a reply, for every
    ``n`` in ``sizes``, the median of 14 round trips each (rank ``a``'s clock; ``b`` returns
    its own). Other ranks return [] at once (they take no part)."""
    import torch
    import torch.distributed as dist

    from moeflow.perf.measure import time_ms

    out: list[float] = []
    if rank not in (a, b):
        return out
    peer = b if rank == a else a
    header = torch.zeros(8, dtype=torch.long)
    for n in sizes:
        x = torch.zeros(n // 4)

        def round_trip(x=x):
            if rank == a:
                dist.send(header, peer)
                dist.send(x, peer)
                dist.recv(x, peer)
            else:
                dist.recv(header, peer)
                dist.recv(x, peer)
                dist.send(x, peer)

        out.append(time_ms(round_trip, trials=14) / 2)
    return out


#: message sizes of the link fit: a decode step's messages are tens of KiB, a prefill's MiB
LINK_SIZES = (1 << 10, 4 << 10, 16 << 10, 64 << 10, 256 << 10, 1 << 20, 4 << 20)


def fit_link(sizes, ms, note: str):
    """The link cost from :func:`pingpong` figures, as Hockney's model is fitted: ``beta``
    the least-squares slope over the messages of 256 KiB and more (what a byte costs once a
    shaped link's token bucket is drained, as it is in a step's stream of messages), ``alpha``
    the median of ``t - beta n`` over the messages of 16 KiB and less (the per-message latency,
    which every chunk and micro-batch pays and which dominates decode steps), at least 0.

    A least-squares line over all sizes fits neither: on absolute error the MiB messages set
    it and the latency came out as 0 ms across a 100 Mbit/s link; on relative error the small
    messages, which the bucket's burst lets through at line rate, halved its per-byte cost."""
    import statistics

    from moeflow.perf.cost import LinearCost

    big = [(n, t) for n, t in zip(sizes, ms) if n >= 256 << 10]
    small = [(n, t) for n, t in zip(sizes, ms) if n <= 16 << 10]
    if len(big) < 2 or not small:
        raise InputError("the link fit needs two sizes >= 256 KiB and one <= 16 KiB")
    mx = statistics.fmean(n for n, _ in big)
    my = statistics.fmean(t for _, t in big)
    beta = sum((n - mx) * (t - my) for n, t in big) / sum((n - mx) ** 2 for n, _ in big)
    beta = max(beta, max(t / n for n, t in big) * 1e-3)  # never free or falling
    alpha = max(0.0, statistics.median(t - beta * n for n, t in small))
    mean = statistics.fmean(ms)
    ss_tot = sum((t - mean) ** 2 for t in ms)
    ss_res = sum((t - alpha - beta * n) ** 2 for n, t in zip(sizes, ms))
    return LinearCost(
        alpha, beta, r2=1 - ss_res / ss_tot if ss_tot else 1.0, source="measured", note=note
    )


def measure_link():
    """``t_c`` (ms, bytes): half the round trip of an a2e message (header and rows) and its
    e2a reply between two forked gloo ranks on 127.0.0.1, 1 KiB to 4 MiB, the median of 14
    round trips each (:func:`fit_link`)."""
    from moeflow.launch import launch

    ms = launch(pingpong, 2, list(LINK_SIZES), progress=False, timeout_s=120)[0]
    return fit_link(LINK_SIZES, ms, note="gloo loopback, this host")


def findep_model(cfg):
    """FinDEP's view of a :class:`moeflow.models.DecoderConfig` (fp32 weights and cache)."""
    from moeflow.plan import findep as fd

    D, H, K, d = cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    moe = cfg.moe
    return fd.FinDEPModel(
        name="serve-bench",
        hidden_size=D,
        expert_ffn=moe.ffn_hidden_size,
        num_experts=moe.num_experts,
        top_k=moe.top_k,
        num_shared=moe.num_shared_experts,
        shared_ffn=moe.shared_ffn_hidden_size or moe.ffn_hidden_size,
        attn_proj_params=D * H * d + 2 * D * K * d + H * d * D,
        attn_core_dim=H * 2 * d,
        kv_bytes_per_token=2 * K * d * 4,
        num_layers=cfg.num_layers,
        bytes_per_element=4,
        source="derived",
    )


def host_testbed(ag: int, eg: int, gemm, link, attention=None, name: str = "loopback"):
    """This host as a FinDEP testbed: the measured costs (memory is not the limit here)."""
    from moeflow.plan import findep as fd

    return fd.Testbed(
        name=name,
        gpu="cpu thread",
        ag=ag,
        eg=eg,
        mem_GB=64.0,
        gemm=gemm,
        link=link,
        source="derived",
        note="profiled on this host",
        attention=attention,
    )


def step_planner(
    cfg, ag: int, eg: int, gemm, link, attention=None, name: str = "loopback", head=None
):
    """The :class:`~moeflow.plan.findep.StepPlanner` of this host (``max_r2 = 8``)."""
    from moeflow.plan import findep as fd

    tb = host_testbed(ag, eg, gemm, link, attention, name)
    return fd.StepPlanner(findep_model(cfg), tb, max_r2=8, head=head)


def measure_compute(model, eg: int, link) -> HostCosts:
    """:class:`HostCosts` of this process: ``gemm``, ``attention`` and ``head`` timed here on
    ``model``'s shapes (:func:`fit_gemm`, :func:`fit_attention`, :func:`fit_head`; ``model``
    needs ``cfg``, ``embed`` and ``head``: a full model or an attention rank's part), with the
    ``link`` cost measured by the caller (:func:`pingpong` across the link the ranks use)."""
    return HostCosts(fit_gemm(model.cfg, eg), link, fit_attention(model.cfg), fit_head(model))


def perf_planner(cfg, ag: int, eg: int, perf):
    """The :class:`~moeflow.plan.findep.StepPlanner` of ``cfg`` (``max_r2 = 8``, the LM head
    priced) from a ``moeflow profile`` :class:`~moeflow.perf.PerfModel`
    (:meth:`~moeflow.plan.findep.StepPlanner.from_perf`; ConfigError naming a cost it
    lacks)."""
    from moeflow.plan import findep as fd

    return fd.StepPlanner.from_perf(
        findep_model(cfg), perf, ag=ag, eg=eg, vocab_size=cfg.vocab_size, max_r2=8
    )


def planner_costs(planner) -> HostCosts:
    """The costs a :class:`~moeflow.plan.findep.StepPlanner` solves from, as
    :class:`HostCosts`."""
    tb = planner.testbed
    return HostCosts(tb.gemm, tb.link, tb.attention, planner.head)
