"""Regret of every automatic choice: each option and the ``auto`` pick measured side by side.

    python benchmarks/regret.py [--cells loopback,2x1@1gbit,...] [--reps 5] [--window 12]
                                [--out DIR]
    python benchmarks/regret.py --decisions findep,geo --cells loopback,2x1@1gbit \
        --dtypes float32 --merge benchmarks/results/regret_<host>_<date>.json

Per cell (a topology: ``loopback`` = 2 gloo ranks on 127.0.0.1; ``NxL@RATE`` = N emulated
nodes of L ranks behind links of RATE, ``emulated_cluster.py``, needs root and
``MOEFLOW_EMU_PREFIX`` for the namespaces), one job of gloo ranks (one thread each):

1. ``moeflow profile`` inside the job (``moeflow.apps.profile.profile`` on the job's group,
   both compute dtypes) fits the one :class:`moeflow.perf.PerfModel` every planner below
   reads. The plans are made from it before any timed step: a plan is never tuned on the
   batch it is timed on.
2. Per model shape and dtype, one MoE layer forward + backward of ``ExpertParallel``
   (T tokens per rank, SwiGLU experts, dropless) under each decision's options and its
   ``auto`` arm. Every ``auto`` arm is built with the profile and ``refit_after=--window``
   (online refinement, ``moeflow.parallel.refit``): before any timed step it runs one
   warm-up call and ``--window`` recorded calls at 1, 2 and 4 chunks in turn on a warm-up
   batch (never the timed one; the auto arms interleaved call by call), then refits the
   profile from every rank's recorded durations (each chunk's local work as the expert
   task, the unoverlapped all-to-alls) and decides again:

   * ``degrees`` (FSMoE, ASPLOS'25): r = 1, 2, 4 for both passes; auto = ``plan="auto"``
     (the degree with the smallest forward + backward of FSMoE's simulated pass on the
     refitted costs, ``moeflow.parallel.refit.plan_degrees``).
   * ``zipccl`` (ZipCCL): dispatch / combine all-to-alls raw or compressed; auto =
     ``compress="auto"`` under the refitted link and profiled codec costs (per call).
   * ``dedup`` (HierMoE, Eq. 6; cells with 2 ranks per node): level 0 (rank) and 1 (node);
     auto = ``level="auto"`` with the refitted ``link_costs`` (decided per batch from its
     routing, never from its timing).
   * ``parm`` (Parm, INFOCOM'24; cells with 2 ranks per node, MP = ESP = the node): plain,
     s1, s2; auto = ``schedule="auto"`` under ``cluster_from_perf`` of the refitted model.

   Every arm is timed ``reps`` times after a warm-up round, arms interleaved in an order
   that rotates (and reverses) every round; a time is the slowest rank's.

   In the cells of two ranks, two more decisions (``findep_cases``, ``geo_cases``):

   * ``findep`` (FinDEP, arXiv 2512.21487): AG rank 0 and EG rank 1 of
     ``moeflow.serving.disaggregated`` run one forward call of a small decoder per step
     shape (a prefill and a decode step) under naive DEP, PPPipe r1, FinDEP's (r1, r2, order)
     on a grid and the pick of ``StepPlanner.from_perf``; predictions are the planner's
     (closed form, or ``serial_time`` where the profile measured no overlap).
   * ``geo`` (FusionLLM, arXiv 2410.12707): a 2-stage ``moeflow.geo.pipeline`` GPipe step of
     the demo model under the exact plan, the even split, the AdaTopK pick of
     ``partition(adatopk=True)`` on ``device_graph_from_perf`` and its cut at other
     densities; predictions are the plan cost model's step time.
3. Each option's predicted time, from its decision's refitted model: the chunked pass of
   FSMoE's model simulated by ``moeflow.sim`` (``pass_time``: a2a and expert tasks from
   ``a2a`` and ``expert_fwd/bwd@<dtype>``; link and compute one resource when the profile
   measured that they barely overlap, as the planner assumes:
   ``plan.fsmoe.shared_resources``) plus the replicated rest of the layer priced by the
   profiled ``gemm``, ``index`` and ``elementwise`` costs of the dtype. Compression
   replaces each a2a by encode + a2a of ``n / ratio`` + decode (ratio: ZipCCL's prior for
   the dtype); dedup's a2a by HierMoE's ``t_d`` of the batch's routing; Parm's terms come
   from ``plan.parm.schedule_terms``.

Regret of a pick: its median time over the best median of all arms of that decision, - 1.

Writes ``regret_<host>_<date>.md`` and ``.json`` under ``--out``; with ``--merge RECORD``
the decisions run replace theirs in that record's cells (the others are kept) and the one
record is rewritten in its directory.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import cpu_isa, cpu_name, write_record  # noqa: E402

SHAPES = {
    "S": dict(hidden_size=128, ffn_hidden_size=256, num_experts=8, top_k=2),
    "M": dict(hidden_size=256, ffn_hidden_size=512, num_experts=8, top_k=2),
}
DTYPES = ("float32", "bfloat16")
TOKENS = 512
DEGREES = (1, 2, 4)
CELLS = ("loopback", "2x1@1gbit", "2x1@100mbit", "2x2@1gbit", "2x2@100mbit")
EP_DECISIONS = ("degrees", "zipccl", "dedup", "parm")
#: FinDEP and the geo planner need two ranks: they run in the cells of world size 2
PAIR_DECISIONS = ("findep", "geo")
DECISIONS = EP_DECISIONS + PAIR_DECISIONS
#: FinDEP's serving model (AG rank 0, EG rank 1), its step shapes (sequences, new tokens per
#: sequence, cached positions before them) and the options timed besides naive and the pick
FINDEP_MODEL = dict(hidden=128, layers=2, experts=8, vocab=2048, context=256)
FINDEP_STEPS = {"prefill 8x64": (8, 64, 0), "decode 8x1": (8, 1, 64)}
FINDEP_PPPIPE = (2, 4)
FINDEP_R1 = (1, 2, 4)
FINDEP_R2 = (2, 4, 8)
#: the geo pipeline's job (2 stages, one per rank) and its steps per timed run
GEO_JOB = dict(
    model="demo",
    dim=64,
    layers=2,
    heads=4,
    seq_len=128,
    experts=4,
    ffn=128,
    microbatch_size=4,
    microbatches=4,
)
GEO_STEPS = 4
#: each device's memory as a share of what the whole model needs (so a plan uses both)
GEO_MEMORY_FRACTION = 0.6
GEO_MIN_DENSITY = 0.05
#: densities timed at the pick's cut besides its own, half and twice it
GEO_DENSITIES = (1.0, 0.25, 0.1)
#: a case's entries that are not decisions
CASE_INFO = ("picks", "window_s", "refits")
#: the auto arms' online-refinement window: recorded calls at 1, 2, 4 chunks in turn
WINDOW = 12
#: the profile sweep inside each job: collective sizes (bytes) and square GEMM sizes
PROFILE_SIZES = (16384, 65536, 262144, 1048576)
PROFILE_GEMM = (64, 128, 192, 256)
#: added to the sweep when FinDEP runs: a decode step's messages (a few KiB) and expert calls
#: (a few rows per expert)
PAIR_PROFILE_SIZES = (4096,)
PAIR_EXPERT_ROWS = (16, 64)
#: trials per profiled point when FinDEP runs (the median of them): its few-KiB messages and
#: few-row expert calls are where a loaded machine's spikes land
PAIR_PROFILE_TRIALS = 7


def parse_cell(cell: str) -> tuple[int, int, str | None]:
    """(nodes, ranks per node, rate or None) of a cell name."""
    if cell == "loopback":
        return 1, 2, None
    shape, rate = cell.split("@")
    n, per = shape.split("x")
    return int(n), int(per), rate


# ---- prediction (pure: PerfModel in, ms out) ----------------------------------------------
def workload(shape: dict, world: int, dtype: str):
    from moeflow.plan.workload import LayerWorkload

    return LayerWorkload(
        B=1,
        L=TOKENS,
        M=shape["hidden_size"],
        H=shape["ffn_hidden_size"],
        E=shape["num_experts"],
        k=shape["top_k"],
        f=None,
        ffn="mixtral",
        n_ep=world,
        bytes_per_element=4 if dtype == "float32" else 2,
    )


def rest_ms(perf, shape: dict, dtype: str) -> float:
    """The replicated rest of one layer forward + backward on one rank (router GEMM,
    permutation gathers, weighted combine; backward twice the forward) and the count
    exchange's start-up."""
    D, E, k = shape["hidden_size"], shape["num_experts"], shape["top_k"]
    v = 4 if dtype == "float32" else 2
    rows_bytes = TOKENS * k * D * v
    fwd = (
        perf.time(f"gemm@{dtype}", 2.0 * TOKENS * D * E)
        + 2 * perf.time(f"index@{dtype}", rows_bytes)
        + perf.time(f"elementwise@{dtype}", rows_bytes)
    )
    return 3 * fwd + perf.cost("a2a").alpha


def with_a2a(perf, a2a):
    """``perf`` whose ``a2a`` cost is ``a2a``."""
    from dataclasses import replace

    return replace(perf, costs={**perf.costs, "a2a": a2a})


def compressed_a2a(perf, dtype: str):
    """The a2a as ZipCCL sends it: encode + a2a of n / ratio + decode (linear in n)."""
    from moeflow.comm.compressed import PRIOR_RATIO
    from moeflow.perf import LinearCost

    a, enc, dec = perf.cost("a2a"), perf.cost("zipccl_encode"), perf.cost("zipccl_decode")
    ratio = PRIOR_RATIO[dtype]
    return LinearCost(
        a.alpha + enc.alpha + dec.alpha, a.beta / ratio + enc.beta + dec.beta, source="derived"
    )


def predict_ms(perf, shape, dtype, world, r_fwd, r_bwd, a2a=None) -> float:
    """Predicted forward + backward of the layer (ms) with degrees (r_fwd, r_bwd)."""
    from moeflow.sim.builders import pass_time

    p = perf if a2a is None else with_a2a(perf, a2a)
    w = workload(shape, world, dtype)
    from moeflow.plan.fsmoe import shared_resources

    # the runtime's issue order; link and compute as the planner sees them (the profile's
    # measured overlap)
    kw = {"order": "wavefront", **dict(shared_resources(perf))}
    fwd = pass_time(w.pass_cost(p), r_fwd, **kw)
    bwd = pass_time(w.pass_cost(p, True), r_bwd, 0.0, True, **kw)
    return fwd + bwd + rest_ms(perf, shape, dtype)


def predict_dedup_ms(perf, shape, dtype, world, level_s: float) -> float:
    """Dedup at one level: the a2a-free layer plus four exchanges of ``t_d`` (dispatch and
    combine, forward and backward; HierMoE Eq. 3 of this batch's routing)."""
    from moeflow.perf import LinearCost

    free = LinearCost(0.0, 0.0, source="derived")
    return predict_ms(perf, shape, dtype, world, 1, 1, a2a=free) + 4e3 * level_s


def predict_parm_ms(perf, shape, dtype, nodes, schedule: str) -> float:
    """Parm's schedule terms (forward), backward = the same collectives and twice the
    experts, plus the replicated rest."""
    from moeflow.plan.parm import ParmLayer, cluster_from_perf, schedule_terms

    D, F = shape["hidden_size"], shape["ffn_hidden_size"]
    c = cluster_from_perf(perf, hidden=D, ffn=F, num_experts=shape["num_experts"], dtype=dtype)
    layer = ParmLayer(
        tokens=TOKENS,
        hidden=D,
        top_k=shape["top_k"],
        mp=2,
        nodes=nodes,
        bytes_per_elem=4 if dtype == "float32" else 2,
    )
    t = schedule_terms(layer, c, schedule)
    fb = perf.cost(f"expert_fwd@{dtype}").beta
    bwd_exp = t["experts"] * (perf.cost(f"expert_bwd@{dtype}").beta / fb if fb > 0 else 2.0)
    comm = t["a2a"] + t["esp"] + t["mp_allgather"]
    return 1e3 * (2 * comm + t["experts"] + bwd_exp + 3 * t["gate"]) + rest_ms(perf, shape, dtype)


# ---- one rank ----------------------------------------------------------------------------
def refit_summary(perf) -> dict:
    """The costs a refit moved: ``{key: [alpha ms, beta ms/unit, points]}``."""
    keys = sorted(perf.meta.get("refits", {}))
    return {k: [perf.costs[k].alpha, perf.costs[k].beta, len(perf.costs[k].points)] for k in keys}


def rank_main(rank, world, per_node, master, port, reps, decisions, shapes, dtypes, window) -> None:
    import torch
    import torch.distributed as dist

    from moeflow import MoEConfig, MoELayer
    from moeflow.apps.profile import profile
    from moeflow.comm import Topology
    from moeflow.comm.groups import subgroup
    from moeflow.parallel import ExpertParallel
    from moeflow.plan.parm import cluster_from_perf

    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"tcp://{master}:{port}", rank=rank, world_size=world
    )
    nodes = world // per_node
    t0 = time.perf_counter()
    pair = "findep" in decisions and world == 2
    perf = profile(
        dist.group.WORLD,
        nodes=nodes,
        sizes=(PAIR_PROFILE_SIZES if pair else ()) + PROFILE_SIZES,
        gemm_sizes=PROFILE_GEMM,
        reps=2,
        trials=PAIR_PROFILE_TRIALS if pair else 3,
        progress=False,
        compute_dtypes=tuple(dtypes),
        expert_rows=PAIR_EXPERT_ROWS if pair else (),
    )
    profile_s = time.perf_counter() - t0
    topo = Topology.explicit(world, per_node)
    node = rank // per_node
    mp = (
        subgroup(None, list(range(node * per_node, (node + 1) * per_node)))
        if per_node > 1
        else None
    )
    out = {"perf": perf.to_dict(), "profile_s": profile_s, "cases": {}}
    for sname in shapes if set(EP_DECISIONS) & set(decisions) else ():
        shape = SHAPES[sname]
        for dtype in dtypes:
            dt = getattr(torch, dtype)
            cfg = MoEConfig(**shape)
            torch.manual_seed(0)
            layer = MoELayer(cfg).to(dt)
            x = torch.randn(
                TOKENS, cfg.hidden_size, generator=torch.Generator().manual_seed(10 + rank)
            ).to(dt)
            x_node = torch.randn(
                TOKENS, cfg.hidden_size, generator=torch.Generator().manual_seed(100 + node)
            ).to(dt)
            # the warm-up window's batches: earlier batches, never the timed one
            x_warm = torch.randn(
                TOKENS, cfg.hidden_size, generator=torch.Generator().manual_seed(1000 + rank)
            ).to(dt)
            xn_warm = torch.randn(
                TOKENS, cfg.hidden_size, generator=torch.Generator().manual_seed(2000 + node)
            ).to(dt)
            arms = {}  # (decision, option) -> (module, input, predicted ms or None)
            picks: dict = {}
            autos = {}  # decision -> (its auto arm, its warm-up batch)

            def ep(layer=layer, **kw):
                return ExpertParallel(layer, topology=topo, timeout_s=600, **kw)

            refit = {"perf": perf, "refit_after": window}
            if "degrees" in decisions:
                autos["degrees"] = (ep(plan="auto", **refit), x_warm)
            if "zipccl" in decisions:
                autos["zipccl"] = (ep(compress="auto", **refit), x_warm)
            ep_dedup = "dedup" in decisions and per_node > 1 and nodes > 1
            if ep_dedup:
                o = {"level": "auto", "links": perf.link_costs()}
                autos["dedup"] = (ep(dispatcher="dedup", dispatcher_options=o, **refit), x_warm)
            ep_parm = "parm" in decisions and per_node > 1 and nodes > 1
            if ep_parm:
                pc = cluster_from_perf(
                    perf,
                    hidden=cfg.hidden_size,
                    ffn=cfg.ffn_hidden_size,
                    num_experts=cfg.num_experts,
                    dtype=dtype,
                )
                m = ep(esp_size=per_node, mp_group=mp, schedule="auto", parm_cluster=pc, **refit)
                autos["parm"] = (m, xn_warm)
            # online refinement: the auto arms run their window (one warm-up call, then
            # `window` recorded calls at 1, 2, 4 chunks) on the warm-up batch, arms
            # interleaved call by call; the next call refits and re-decides
            t0 = time.perf_counter()
            for _ in range(window + 2):
                for m, xw in autos.values():
                    m(xw.clone().requires_grad_(True)).float().sum().backward()
            window_s = time.perf_counter() - t0
            refits = {d: m.perf for d, (m, _) in autos.items()}
            if "zipccl" in autos:  # the picks count the timed calls only
                cz = autos["zipccl"][0].dispatcher.compression
                cz.stats = type(cz.stats)()
            if "degrees" in decisions:
                m, _ = autos["degrees"]
                pm = refits["degrees"]
                pick = (m.r_fwd, m.r_bwd)
                opts = [(r, r) for r in DEGREES]
                if pick not in opts:
                    opts.append(pick)
                for rf, rb in opts:
                    pred = predict_ms(pm, shape, dtype, world, rf, rb)
                    arms[("degrees", f"{rf},{rb}")] = (ep(r_fwd=rf, r_bwd=rb), x, pred)
                arms[("degrees", "auto")] = (m, x, None)
                picks["degrees"] = f"{pick[0]},{pick[1]}"
            if "zipccl" in decisions:
                pm = refits["zipccl"]
                raw = predict_ms(pm, shape, dtype, world, 1, 1)
                on = predict_ms(pm, shape, dtype, world, 1, 1, a2a=compressed_a2a(pm, dtype))
                arms[("zipccl", "off")] = (ep(compress=False), x, raw)
                arms[("zipccl", "on")] = (ep(compress=True), x, on)
                arms[("zipccl", "auto")] = (autos["zipccl"][0], x, None)
            if ep_dedup:
                links = refits["dedup"].link_costs()
                for lv in (0, 1):
                    o = {"level": lv, "links": links}
                    arms[("dedup", str(lv))] = (
                        ep(dispatcher="dedup", dispatcher_options=o),
                        x,
                        None,
                    )
                arms[("dedup", "auto")] = (autos["dedup"][0], x, None)
            if ep_parm:
                pm = refits["parm"]
                for s in ("plain", "s1", "s2"):
                    pred = predict_parm_ms(pm, shape, dtype, nodes, s)
                    m = ep(esp_size=per_node, mp_group=mp, schedule=s, parm_cluster=pc)
                    arms[("parm", s)] = (m, x_node, pred)
                arms[("parm", "auto")] = (autos["parm"][0], x_node, None)
            timed = [k for k, v in arms.items() if v[0] is not None]
            times = {k: [] for k in timed}
            for it in range(reps + 1):
                order = timed[it % len(timed) :] + timed[: it % len(timed)]
                if it % 2:
                    order.reverse()
                for key in order:
                    m, xi, _ = arms[key]
                    xi = xi.clone().requires_grad_(True)
                    dist.barrier()
                    t1 = time.perf_counter()
                    m(xi).float().sum().backward()
                    dt_ms = torch.tensor([(time.perf_counter() - t1) * 1e3])
                    dist.all_reduce(dt_ms, op=dist.ReduceOp.MAX)
                    if it:
                        times[key].append(float(dt_ms))
                    if key == ("dedup", "auto"):
                        picks.setdefault("dedup", []).append(m.dispatcher.last_level)
                    if key == ("parm", "auto"):
                        picks.setdefault("parm", []).append(m.last_schedule)
                    if key == ("zipccl", "auto"):
                        picks["zipccl"] = m.dispatcher.compression.stats.as_dict()
            case = {}
            for (dec, opt), (_m, _, pred) in arms.items():
                row = {"predicted_ms": pred, "times_ms": times[(dec, opt)]}
                if dec == "degrees" and opt == "auto":
                    row["pick"] = picks["degrees"]
                case.setdefault(dec, {})[opt] = row
            if "dedup" in case:  # HierMoE's t_d of the last batch, per level (s)
                lt = arms[("dedup", "auto")][0].dispatcher.last_times
                for lv in (0, 1):
                    case["dedup"][str(lv)]["predicted_ms"] = predict_dedup_ms(
                        refits["dedup"], shape, dtype, world, lt[lv]
                    )
            picks.pop("degrees", None)
            case["picks"] = picks
            case["window_s"] = window_s
            case["refits"] = {d: refit_summary(p) for d, p in refits.items()}
            out["cases"][f"{sname}/{dtype}"] = case
    if "findep" in decisions and world == 2:
        out["cases"].update(findep_cases(rank, perf, reps))
    if "geo" in decisions and world == 2:
        out["cases"].update(geo_cases(rank, master, port, perf, reps))
    if rank == 0:
        print("RESULT " + json.dumps(out), flush=True)
    dist.barrier()
    dist.destroy_process_group()


# ---- FinDEP: (r1, r2, order) of a disaggregated step ----------------------------------------
def findep_config():
    from moeflow.config import MoEConfig
    from moeflow.models import DecoderConfig

    d = FINDEP_MODEL["hidden"]
    return DecoderConfig(
        vocab_size=FINDEP_MODEL["vocab"],
        num_layers=FINDEP_MODEL["layers"],
        num_heads=8,
        num_kv_heads=4,
        head_dim=d // 8,
        moe=MoEConfig(
            hidden_size=d,
            ffn_hidden_size=2 * d,
            num_experts=FINDEP_MODEL["experts"],
            top_k=2,
            num_shared_experts=1,
        ),
        max_position_embeddings=FINDEP_MODEL["context"],
    )


def findep_name(r1: int, r2: int, order: str) -> str:
    """An option's name: ``naive``, ``pppipe <r1>`` or ``<r1>,<r2>,<order>``."""
    if r2 == 1 and order == "ASAS":
        return "naive" if r1 == 1 else f"pppipe {r1}"
    return f"{r1},{r2},{order}"


def findep_cases(rank: int, perf, reps: int) -> dict:
    """FinDEP's decision on two ranks (AG rank 0, EG rank 1; ``moeflow.serving.disaggregated``):
    per step shape, naive, PPPipe at each r1 of ``FINDEP_PPPIPE``, FinDEP's (r1, r2, order) over
    ``FINDEP_R1 x FINDEP_R2 x`` both orders, the step planner's pick, and the ``auto`` arm (a
    per-step schedule solved by the planner at every call). The planner is
    ``StepPlanner.from_perf`` of the job's profile; a time is the AG's wall time of the
    forward call (it ends when the last e2a reply is combined and the LM head ran)."""
    import torch
    import torch.distributed as dist

    from moeflow.apps.serve_bench import findep_model
    from moeflow.models import MoEDecoder
    from moeflow.plan.findep import StepPlanner
    from moeflow.serving.disaggregated import DisaggregatedForward, ExpertServer, ServeSchedule

    cfg = findep_config()
    torch.manual_seed(0)
    model = MoEDecoder(cfg).eval()
    planner = StepPlanner.from_perf(
        findep_model(cfg), perf, ag=1, eg=1, vocab_size=cfg.vocab_size, max_r2=max(FINDEP_R2)
    )
    cases = {}
    if rank == 1:
        ExpertServer(model, 1, 1, 1, timeout_s=600).run()
    else:
        seqs_max = max(s for s, _, _ in FINDEP_STEPS.values())
        cache = model.new_cache(seqs_max, cfg.max_position_embeddings)
        fwd = DisaggregatedForward(model, cache, ServeSchedule.naive(), 1, 1, timeout_s=600)
        auto = ServeSchedule.per_step("findep", planner)
        for step, (seqs, tokens, past) in FINDEP_STEPS.items():
            grid = set(planner.grid("findep", seqs, tokens))
            opts = {"naive": (1, 1, "ASAS")}
            for r1 in FINDEP_PPPIPE:
                if r1 <= seqs:
                    opts[findep_name(r1, 1, "ASAS")] = (r1, 1, "ASAS")
            for r1 in FINDEP_R1:
                for r2 in FINDEP_R2:
                    for order in ("ASAS", "AASS"):
                        if (r1, r2, order) in grid:
                            opts[findep_name(r1, r2, order)] = (r1, r2, order)
            p = planner.plan("findep", seqs, tokens)
            pick = findep_name(p.r1, p.r2, p.order)
            opts.setdefault(pick, (p.r1, p.r2, p.order))
            arms = {o: ServeSchedule("findep", *v) for o, v in opts.items()}
            arms["auto"] = auto
            g = torch.Generator().manual_seed(1)
            ids = torch.randint(1, cfg.vocab_size, (seqs, tokens), generator=g)
            rows = torch.arange(seqs)
            start = torch.full((seqs,), past, dtype=torch.long)
            times = {o: [] for o in arms}
            keys = list(arms)
            for it in range(reps + 1):
                order = keys[it % len(keys) :] + keys[: it % len(keys)]
                if it % 2:
                    order.reverse()
                for o in order:
                    fwd.s = arms[o]
                    t0 = time.perf_counter()
                    fwd(ids, rows, start)
                    if it:
                        times[o].append((time.perf_counter() - t0) * 1e3)
            case = {
                o: {
                    "predicted_ms": planner.predict_ms(seqs, tokens, *opts[o]),
                    "times_ms": times[o],
                }
                for o in opts
            }
            case["auto"] = {"predicted_ms": None, "times_ms": times["auto"], "pick": pick}
            cases[f"{step}/float32"] = {"findep": case, "picks": {}}
        fwd.close()
    dist.barrier()
    return cases


# ---- the geo planner: partition and AdaTopK densities of a 2-stage pipeline -----------------
def geo_options(ops, graph, m: int) -> tuple[dict, str]:
    """The geo decision's options (name -> (bounds, densities)) and the name of the pick
    (``partition(adatopk=True)``): the exact plan (``adatopk=False``), the even split, the
    exact plan's cut at the pick's density, the pick's cut at its density, half and twice
    it and ``GEO_DENSITIES``."""
    from moeflow.plan import geo as pgeo

    exact = pgeo.partition(ops, graph, microbatches=m)
    ada = pgeo.partition(ops, graph, microbatches=m, adatopk=True, min_density=GEO_MIN_DENSITY)

    def name(b, d):
        return f"cut {b[1]}, d {d:.3g}"

    n = len(ops.nodes)
    opts = {}
    for b, d in (
        (exact.bounds, 1.0),
        ((0, n // 2, n), 1.0),
        (ada.bounds, ada.densities[0] if ada.densities else 1.0),
        (ada.bounds, 1.0),
        (exact.bounds, ada.densities[0] if ada.densities else 1.0),
    ):
        if len(b) == 3:
            opts.setdefault(name(b, d), (tuple(b), (float(d),)))
    if len(ada.bounds) == 3:
        d = ada.densities[0]
        for x in sorted({max(GEO_MIN_DENSITY, d / 2), min(1.0, 2 * d), *GEO_DENSITIES}):
            opts.setdefault(name(ada.bounds, x), (tuple(ada.bounds), (x,)))
    pick = name(ada.bounds, ada.densities[0]) if len(ada.bounds) == 3 else None
    return opts, pick


def geo_cases(rank: int, master: str, port: int, perf, reps: int) -> dict:
    """The geo planner's decision on two ranks: the demo model of ``GEO_JOB`` cut into two
    stages (``moeflow.geo.pipeline``, GPipe, AdaTopK on the link where its density is below
    1), each device holding ``GEO_MEMORY_FRACTION`` of what the whole model needs so that
    every plan uses both. The planner reads ``device_graph_from_perf`` of the job's profile.
    Each repeat of an option is one run of ``GEO_STEPS`` steps (a fresh store and group, both
    ranks in the run); its time is the median over steps 2.. of the slower rank's step time.
    The ``auto`` arm runs the pick again."""
    import torch
    import torch.distributed as dist
    from torch.distributed import TCPStore

    from moeflow.errors import PlanError
    from moeflow.geo import pipeline as gp
    from moeflow.plan import geo as pgeo

    base = gp.GeoJob(**GEO_JOB, steps=GEO_STEPS, timeout_s=600.0)
    _, traced = gp.trace_job(base)
    ops, m = traced.ops, base.microbatches
    need = 4.0 * ops.param_bytes + m * sum(nd.saved_bytes for nd in ops.nodes)
    frac = GEO_MEMORY_FRACTION
    while True:  # from the given share up: the smallest at which a plan fits
        graph = pgeo.device_graph_from_perf(perf, ops, memory_bytes=frac * need)
        try:
            opts, pick = geo_options(ops, graph, m)
            break
        except PlanError:
            frac += 0.05
    got = [(opts, pick)]
    dist.broadcast_object_list(got, src=0)  # rank 0's plan: every rank runs the same arms
    opts, pick = got[0]
    if pick is None:
        return {}
    arms = {**opts, "auto": opts[pick]}
    times = {o: [] for o in arms}
    keys = list(arms)
    run = 0
    for it in range(reps + 1):
        order = keys[it % len(keys) :] + keys[: it % len(keys)]
        if it % 2:
            order.reverse()
        for o in order:
            bounds, dens = arms[o]
            job = gp.GeoJob(
                **GEO_JOB, steps=GEO_STEPS, timeout_s=600.0, bounds=bounds, densities=dens
            )
            p = port + 1000 + run
            run += 1
            store = TCPStore(master, p, None, True, wait_for_workers=False) if rank == 0 else None
            os.environ.update(
                {"MASTER_ADDR": master, "MASTER_PORT": str(p), "RANK": str(rank), "WORLD_SIZE": "2"}
            )
            res = gp.run_torchrun(job)
            mine = torch.tensor([res["times"][k] for k in range(GEO_STEPS)], dtype=torch.float64)
            dist.all_reduce(mine, op=dist.ReduceOp.MAX)
            dist.barrier()
            del store
            if it:
                times[o].append(1e3 * statistics.median(mine[1:].tolist()))
    case = {}
    for o, (bounds, dens) in opts.items():
        plan = pgeo.evaluate(
            ops,
            graph,
            bounds=bounds,
            devices=(0, 1),
            microbatches=m,
            densities=dens,
            check_memory=False,
        )
        case[o] = {"predicted_ms": 1e3 * plan.step_time_s, "times_ms": times[o]}
    case["auto"] = {"predicted_ms": None, "times_ms": times["auto"], "pick": pick}
    return {f"demo d{GEO_JOB['dim']} M{m}/float32": {"geo": case, "picks": {}}}


# ---- the driver --------------------------------------------------------------------------
def run_cell(
    cell: str, reps: int, decisions, shapes, dtypes, port: int, window: int = WINDOW
) -> tuple[dict | None, str]:
    """Run one cell's job; (result, "") or (None, why)."""
    nodes, per_node, rate = parse_cell(cell)
    world = nodes * per_node
    ec = None
    if rate is not None:
        import emulated_cluster as ec

        reason = ec.unavailable()
        if reason:
            return None, reason
        if ec.namespaces():
            ec.down()  # our own prefix's namespaces, left by an interrupted run
        ec.up(nodes, rate)
    master = "127.0.0.1" if ec is None else ec.addr(0)
    try:
        me = [sys.executable, os.path.abspath(__file__), "--master", master, "--port", str(port)]
        me += ["--reps", str(reps), "--world", str(world), "--per-node", str(per_node)]
        me += ["--decisions", ",".join(decisions), "--shapes", ",".join(shapes)]
        me += ["--dtypes", ",".join(dtypes), "--window", str(window)]
        env = {"OMP_NUM_THREADS": "1"}
        procs = []
        for r in range(world):
            cmd = me + ["--rank", str(r)]
            if ec is not None:
                cmd = ec.node_command(r // per_node, cmd, env)
            procs.append(
                subprocess.Popen(
                    cmd,
                    stdout=subprocess.PIPE,
                    stderr=subprocess.PIPE,
                    text=True,
                    env={**os.environ, **env},
                )
            )
        outs = [p.communicate(timeout=3000) for p in procs]
        if any(p.returncode for p in procs):
            err = next(o[1] for p, o in zip(procs, outs) if p.returncode)
            return None, f"a rank exited with {[p.returncode for p in procs]}: {err[-400:]}"
        line = [ln for ln in outs[0][0].splitlines() if ln.startswith("RESULT ")][-1]
        return json.loads(line[len("RESULT ") :]), ""
    finally:
        if ec is not None:
            ec.down()


def median(xs):
    return statistics.median(xs) if xs else None


PARM_NAMES = {"plain": "plain", "split_tokens": "s1", "split_rows": "s2"}


def resolve_pick(dec: str, opts: dict, seen) -> str:
    """The option the ``auto`` arm ran: the planned degrees, or the one level / schedule /
    compression setting it chose on every batch and call; ``"auto"`` when it mixed them."""
    if "pick" in opts["auto"]:
        return opts["auto"]["pick"]
    if dec == "zipccl" and seen:
        done = [(x["compressed"], x["calls"]) for x in seen.values()]
        if all(c == 0 for c, _ in done):
            return "off"
        if all(c == n for c, n in done):
            return "on"
    if dec == "dedup" and seen and len(set(seen)) == 1:
        return str(seen[0])
    if dec == "parm" and seen and len(set(seen)) == 1:
        return PARM_NAMES.get(seen[0], seen[0])
    return "auto"


def summarize(res: dict) -> dict:
    """Per case and decision: best option, the pick, its regret, and each option's
    predicted / measured ratio."""
    out = {}
    for case, decs in res["cases"].items():
        for dec, opts in decs.items():
            if dec in CASE_INFO:
                continue
            med = {o: median(r["times_ms"]) for o, r in opts.items() if "times_ms" in r}
            pick = resolve_pick(dec, opts, decs["picks"].get(dec))
            # the options are the distinct configurations; the auto arm is one of them
            # unless its choice was mixed (per call / per batch)
            cand = {o: t for o, t in med.items() if o != "auto" or pick == "auto"}
            best = min(cand, key=cand.get)
            regret = med[pick] / med[best] - 1
            fid = {
                o: r["predicted_ms"] / med[o]
                for o, r in opts.items()
                if r.get("predicted_ms") is not None and o in med
            }
            out[f"{case}/{dec}"] = {
                "best": best,
                "pick": pick,
                "regret": regret,
                "auto_arm_regret": med["auto"] / med[best] - 1 if "auto" in med else None,
                "median_ms": med,
                "pred_over_meas": fid,
            }
    return out


def spread(xs) -> str:
    return f"{min(xs):.1f}-{max(xs):.1f}"


def runs_text(runs) -> str:
    """The commands a record merges, each with its decisions and repeats."""
    return "Commands (each a job per cell; as root for the emulated cells): " + "; ".join(
        f"`{r['command']}` ({', '.join(r['decisions'])}: {r['reps']} timed repeats per arm"
        + (
            f"; load average (1 min) {min(r['load_1min']):.1f}-{max(r['load_1min']):.1f}"
            if r.get("load_1min")
            else ""
        )
        + ")"
        for r in runs
    )


def render(results: dict, args, skipped: dict, date: str, runs=None) -> list[str]:
    import torch

    isa = cpu_isa()
    if runs is None:
        runs = [{"command": args.command, "decisions": list(DECISIONS), "reps": args.reps}]
    L = [
        f"# Regret of moeflow's automatic choices ({date}, {args.host})",
        "",
        runs_text(runs) + ". "
        f"Machine: {cpu_name()} ({isa}), {os.cpu_count()} vCPUs shared with other work "
        f"(timings are noisy: every repeat is listed); Python {platform.python_version()}, "
        f"torch {torch.__version__}. One MoE layer forward + backward under "
        f"`ExpertParallel`, {TOKENS} tokens per rank, SwiGLU experts, dropless, one thread "
        "per rank; shapes "
        + ", ".join(
            f"{k} (D {v['hidden_size']}, F {v['ffn_hidden_size']}, E {v['num_experts']}, "
            f"top-{v['top_k']})"
            for k, v in SHAPES.items()
        )
        + (
            f". Load average (1 min) during the run: {min(args.load):.1f}-{max(args.load):.1f} "
            "on the 2 vCPUs"
            if getattr(args, "load", None) and len(runs) == 1
            else ""
        )
        + ". Every arm timed after a warm-up round, arms interleaved in a "
        "rotating order; medians, with the min-max spread. The plans come from a "
        "`moeflow profile` run inside each cell's job before any timed step, refitted by "
        f"each `auto` arm after a {getattr(args, 'window', WINDOW)}-call window on a warm-up "
        "batch.",
        "",
        f"FinDEP (two ranks: AG rank 0, EG rank 1, `moeflow.serving.disaggregated`): one "
        f"forward call of a {FINDEP_MODEL['layers']}-layer decoder (D {FINDEP_MODEL['hidden']}, "
        f"{FINDEP_MODEL['experts']} experts top-2, one shared expert, fp32) per step shape "
        f"({', '.join(FINDEP_STEPS)}: sequences x new tokens), the AG's wall time; options "
        "naive, PPPipe r1 = " + ", ".join(map(str, FINDEP_PPPIPE)) + ", FinDEP (r1, r2, order) "
        f"over r1 in {FINDEP_R1}, r2 in {FINDEP_R2}, both orders, and the pick of "
        "`StepPlanner.from_perf` (its closed form on the profiled `expert_fwd`, `gemm`, "
        "`attention` and `send`; every task on one resource, `serial_time`, where the "
        "profile's overlap probe read below 0.5); the `auto` arm solves each call "
        "(`ServeSchedule.per_step`). "
        f"Geo (two ranks, `moeflow.geo.pipeline`): a GPipe step of the demo model (dim "
        f"{GEO_JOB['dim']}, {GEO_JOB['layers']} layers, sequence {GEO_JOB['seq_len']}, "
        f"{GEO_JOB['microbatches']} micro-batches of {GEO_JOB['microbatch_size']}) cut into two "
        f"stages, each device holding {GEO_MEMORY_FRACTION:.0%} (or the least share above it "
        "that fits a plan) of what the whole model needs; options the exact plan "
        "(`partition`), the even split, the AdaTopK pick (`partition(adatopk=True)` on "
        "`device_graph_from_perf`) and its cut at other densities; a repeat is one run of "
        f"{GEO_STEPS} steps (median of steps 2..{GEO_STEPS}, the slower rank's). Geo regret "
        "is step time only (a lower density also changes the loss curve). The profile of a "
        "FinDEP run adds messages of "
        + ", ".join(f"{n // 1024} KiB" for n in PAIR_PROFILE_SIZES)
        + " and expert calls of "
        + ", ".join(map(str, PAIR_EXPERT_ROWS))
        + f" rows, and takes the median of {PAIR_PROFILE_TRIALS} trials per point.",
        "",
        "Regret: the median of the option the pick ran (the planned degrees; the level, "
        "schedule or compression setting `auto` chose on every batch; the `auto` arm itself "
        "when its choices were mixed) over the best median of the decision's options, - 1; "
        "the `auto` arm's own regret is in brackets (the same configuration timed again, so "
        "its difference is the noise of the machine). "
        "Fidelity: predicted / measured median of every option with a prediction.",
        "",
    ]
    rows, fids = [], []
    for cell, res in results.items():
        for key, s in summarize(res).items():
            rows.append((cell, key, s))
            fids += [(cell, key, o, f) for o, f in s["pred_over_meas"].items()]
    if rows:
        n5 = sum(1 for _, _, s in rows if s["regret"] <= 0.05)
        n10 = sum(1 for _, _, s in rows if s["regret"] <= 0.10)
        f15 = sum(1 for *_, f in fids if abs(f - 1) <= 0.15)
        L += [
            "## Summary",
            "",
            f"- regret <= 5% in {n5} of {len(rows)} cells ({n5 / len(rows):.0%}; target >= 90%), "
            f"<= 10% in {n10} of {len(rows)} (target: all).",
            f"- predicted within 15% of measured for {f15} of {len(fids)} options (target: all).",
        ]
        # the auto arm ran the same configuration as its pick wherever its choice was
        # uniform: the gap between the two medians is this machine's noise at these repeats
        noise = sorted(
            abs((1 + s["auto_arm_regret"]) / (1 + s["regret"]) - 1)
            for _, _, s in rows
            if s["pick"] != "auto" and s["auto_arm_regret"] is not None
        )
        if noise:
            L.append(
                f"- noise floor: where `auto` ran the same configuration as an option "
                f"({len(noise)} cells), the two medians differ by {statistics.median(noise):.1%} "
                f"(median over cells), up to {noise[-1]:.1%}: a regret below that cannot be "
                "told from zero on this machine."
            )
        ran = {d: {c for c, k, _ in rows if k.endswith("/" + d)} for d in DECISIONS}
        gaps = [
            f"{d} in {', '.join(c for c in results if c not in ran[d])}"
            for d in DECISIONS
            if ran[d] and any(c not in ran[d] for c in results)
        ]
        L += [
            "- not run: "
            + (
                "; ".join(gaps)
                + " (FinDEP and geo run in the cells of two ranks; dedup and Parm need two "
                "ranks per node)"
                if gaps
                else "nothing; every cell of the grid ran every decision"
            )
            + ".",
            "",
        ]
        for dec in DECISIONS:
            mine = [(c, k, s) for c, k, s in rows if k.endswith("/" + dec)]
            if not mine:
                continue
            worst = max(mine, key=lambda t: t[2]["regret"])
            fd = [f for c, k, o, f in fids if k.endswith("/" + dec)]
            L.append(
                f"- {dec}: {len(mine)} cells, regret <= 5% in "
                f"{sum(1 for *_, s in mine if s['regret'] <= 0.05)}, worst "
                f"{worst[2]['regret']:+.1%} ({worst[0]} {worst[1]}); predicted/measured "
                + (f"{min(fd):.2f}-{max(fd):.2f}" if fd else "n/a")
            )
        L.append("")
    for dec in DECISIONS:
        mine = [(c, k, s) for c, k, s in rows if k.endswith("/" + dec)]
        if not mine:
            continue
        L += [
            f"## {dec}",
            "",
            "| cell | shape/dtype | option | measured ms (median, spread) | predicted ms | "
            "pred/meas |",
            "| --- | --- | --- | --- | --- | --- |",
        ]
        for cell, key, s in mine:
            case = key.rsplit("/", 1)[0]
            opts = results[cell]["cases"][case][dec]
            for o, r in opts.items():
                if "times_ms" not in r:
                    continue
                tag = " (pick)" if o == s["pick"] else ""
                tag += " (best)" if o == s["best"] else ""
                pred = r.get("predicted_ms")
                L.append(
                    f"| {cell} | {case} | {o}{tag} | {median(r['times_ms']):.1f} "
                    f"({spread(r['times_ms'])}) | "
                    + ("-" if pred is None else f"{pred:.1f}")
                    + " | "
                    + ("-" if pred is None else f"{pred / median(r['times_ms']):.2f}")
                    + " |"
                )
            arm = s["auto_arm_regret"]
            L.append(
                f"| {cell} | {case} | **regret** | pick {s['pick']}, best {s['best']}: "
                f"**{s['regret']:+.1%}**"
                + ("" if arm is None or s["pick"] == "auto" else f" (auto arm {arm:+.1%})")
                + " | | |"
            )
        L.append("")
    L += [
        "## Picks and profiles",
        "",
        "What the `auto` arms chose on every timed call (ZipCCL: all-to-alls compressed / "
        "all; HierMoE: levels; Parm: schedules), and the profile's wall time in the job.",
        "",
    ]
    for cell, res in results.items():
        parts = []
        for case, c in res["cases"].items():
            got = []
            for d, v in c["picks"].items():
                if isinstance(v, list):
                    got.append(f"{d} {'/'.join(map(str, sorted(set(v))))}")
                else:
                    n = sum(x["compressed"] for x in v.values())
                    got.append(f"{d} {n}/{sum(x['calls'] for x in v.values())}")
            parts.append(f"{case}: {', '.join(got)}")
        extra = "".join(
            f"; profile of the {d} run {p['profile_s']:.0f} s"
            + (
                f" (load average {p['load'][0]:.1f} before the job, {p['load'][1]:.1f} after)"
                if p.get("load")
                else ""
            )
            for d, p in res.get("profiles", {}).items()
        )
        L.append(f"- {cell}: profile {res['profile_s']:.0f} s{extra}; " + "; ".join(parts))
    L.append("")
    L += [
        "## Online refinement",
        "",
        "Each `auto` arm ran its warm-up window (one call, then the recorded calls at 1, 2 "
        "and 4 chunks in turn) on a warm-up batch, refitted the profile from every rank's "
        "recorded durations and decided again; the predictions above read each decision's "
        "refitted model. Per cell and case: the window's wall time (all auto arms), and the "
        "refitted expert costs of the degrees arm (alpha ms per chunk + beta ms per forward "
        "FLOP, calibrated on the window's whole passes; the profile's in brackets). The "
        "collectives keep their profiled costs (a recorded all-to-all also holds the ranks' "
        "skew).",
        "",
        "| cell | case | window s | expert_fwd | expert_bwd |",
        "| --- | --- | --- | --- | --- |",
    ]
    for cell, res in results.items():
        prof = res["perf"]["costs"]
        for case, c in res["cases"].items():
            if "window_s" not in c:  # FinDEP and geo cases: no refit window
                continue
            ref = c.get("refits", {}).get("degrees", {})
            dt = case.split("/")[1]

            def cost(key, ref=ref, prof=prof):
                old = prof.get(key)
                new = ref.get(key)
                was = "" if old is None else f" ({old['alpha']:.3f} + {old['beta']:.2e})"
                return "-" if new is None else f"{new[0]:.3f} + {new[1]:.2e}{was}"

            L.append(
                f"| {cell} | {case} | {c.get('window_s', float('nan')):.1f} | "
                f"{cost('expert_fwd@' + dt)} | {cost('expert_bwd@' + dt)} |"
            )
    L.append("")
    L += [
        "## Fit quality of each cell's profile",
        "",
        "Largest relative residual of the fits the predictions read (over the profiled "
        "points), and the measured overlap of an all-to-all with compute (the planner "
        "models link and compute as one resource below 0.5).",
        "",
        "| cell | overlap | a2a | expert_fwd fp32 / bf16 | expert_bwd fp32 / bf16 | "
        "zipccl encode / decode |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for cell, res in results.items():
        c, meta = res["perf"]["costs"], res["perf"]["meta"]

        def q(*keys, c=c):
            return " / ".join(
                "-" if c.get(k, {}).get("max_rel_err") is None else f"{c[k]['max_rel_err']:.0%}"
                for k in keys
            )

        L.append(
            f"| {cell} | {meta.get('overlap', float('nan')):.2f} | {q('a2a')} | "
            f"{q('expert_fwd@float32', 'expert_fwd@bfloat16')} | "
            f"{q('expert_bwd@float32', 'expert_bwd@bfloat16')} | "
            f"{q('zipccl_encode', 'zipccl_decode')} |"
        )
    L.append("")
    pair = [(c, d, p["perf"]) for c, r in results.items() for d, p in r.get("profiles", {}).items()]
    if pair:
        L += [
            "Profiles of the later runs (the FinDEP and geo planners read them): largest "
            "relative residual of each fit they read.",
            "",
            "| cell | run | send | expert_fwd fp32 | gemm fp32 | attention fp32 | "
            "elementwise fp32 |",
            "| --- | --- | --- | --- | --- | --- | --- |",
        ]
        for cell, d, perf in pair:
            c = perf["costs"]
            q = [
                "-" if c.get(k, {}).get("max_rel_err") is None else f"{c[k]['max_rel_err']:.0%}"
                for k in (
                    "send",
                    "expert_fwd@float32",
                    "gemm@float32",
                    "attention@float32",
                    "elementwise@float32",
                )
            ]
            L.append(f"| {cell} | {d} | " + " | ".join(q) + " |")
        L.append("")
    if skipped:
        L += ["## Cells not run", ""] + [f"- {c}: {why}" for c, why in skipped.items()] + [""]
    return L


def record_runs(info: dict) -> list[dict]:
    """The runs a record holds (a record written before merging held one, of the EP
    decisions)."""
    if info.get("runs"):
        return info["runs"]
    return [
        {
            "command": info["command"],
            "decisions": list(EP_DECISIONS),
            "reps": info["reps"],
            "date": info["date"],
            "cells": list(info["cells"]),
            "window": info.get("window"),
            "load_1min": info.get("load_1min"),
        }
    ]


def merge_records(old: dict, results: dict, skipped: dict, run: dict) -> dict:
    """``old`` with this run merged: in each cell run here, the cases of ``run``'s decisions
    are replaced by this run's and its profile is kept under ``profiles`` (the cell's own
    ``perf`` stays the one its other decisions were planned with); cells new to the record
    come whole. The summary is recomputed."""
    cells = old["cells"]
    tag = ",".join(run["decisions"])
    for cell, res in results.items():
        if cell not in cells:
            cells[cell] = res
            continue
        c = cells[cell]
        for case in list(c["cases"]):
            decs = c["cases"][case]
            for d in run["decisions"]:
                decs.pop(d, None)
                decs.get("picks", {}).pop(d, None)
            if not set(decs) - {"picks"}:
                del c["cases"][case]
        c["cases"].update(res["cases"])
        c.setdefault("profiles", {})[tag] = {
            "perf": res["perf"],
            "profile_s": res["profile_s"],
            "load": res.get("load"),
        }
    skips = dict(old.get("skipped", {}))
    skips.update({f"{c} ({tag})": why for c, why in skipped.items()})
    # a run whose decisions and cells this one ran again is gone from the record
    runs = [
        r
        for r in record_runs(old)
        if r["decisions"] != run["decisions"] or not set(r["cells"]) <= set(run["cells"])
    ] + [run]
    return {
        **old,
        "date": run["date"],
        "command": "; ".join(r["command"] for r in runs),
        "runs": runs,
        "cells": cells,
        "summary": {c: summarize(r) for c, r in cells.items()},
        "skipped": skips,
    }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cells", default=",".join(CELLS))
    ap.add_argument("--decisions", default=",".join(DECISIONS))
    ap.add_argument("--shapes", default=",".join(SHAPES))
    ap.add_argument("--dtypes", default=",".join(DTYPES))
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument(
        "--window", type=int, default=WINDOW, help="recorded calls before the auto arms refit"
    )
    ap.add_argument("--out", default="benchmarks/results")
    ap.add_argument("--host", default=f"{os.cpu_count()}cpu-x86")
    ap.add_argument("--port", type=int, default=29811)
    for hidden in ("--rank", "--world", "--per-node"):
        ap.add_argument(hidden, type=int, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--master", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--render", default=None, help="re-render a record from its JSON")
    ap.add_argument(
        "--merge",
        default=None,
        metavar="JSON",
        help="merge into this record (same host): the decisions run here replace theirs in "
        "the cells run here, the rest is kept, and the one record is re-rendered",
    )
    args = ap.parse_args(argv)
    if args.render:
        with open(args.render) as f:
            info = json.load(f)
        args.command, args.host = info["command"], info["host"]
        args.reps = info.get("reps", args.reps)
        args.window = info.get("window", args.window)
        args.load = info.get("load_1min")
        tag = os.path.splitext(os.path.basename(args.render))[0]
        lines = render(info["cells"], args, info["skipped"], info["date"], record_runs(info))
        write_record(os.path.dirname(args.render) or ".", tag, info, lines)
        return 0
    decisions = args.decisions.split(",")
    shapes, dtypes = args.shapes.split(","), args.dtypes.split(",")
    if args.rank is not None:
        rank_main(
            args.rank,
            args.world,
            args.per_node,
            args.master,
            args.port,
            args.reps,
            decisions,
            shapes,
            dtypes,
            args.window,
        )
        return 0
    args.command = "python benchmarks/regret.py " + " ".join(
        a for a in (argv if argv is not None else sys.argv[1:])
    )
    results, skipped = {}, {}
    args.load = [os.getloadavg()[0]]
    for i, cell in enumerate(args.cells.split(",")):
        t0, load0 = time.time(), os.getloadavg()[0]
        res, why = run_cell(
            cell, args.reps, decisions, shapes, dtypes, args.port + i, window=args.window
        )
        if res is not None:  # the machine's 1-minute load average before and after the job
            res["load"] = [load0, os.getloadavg()[0]]
        print(f"{cell}: {'done' if res else why} in {time.time() - t0:.0f} s", flush=True)
        args.load.append(os.getloadavg()[0])
        if res is None:
            skipped[cell] = why
        else:
            results[cell] = res
    date = datetime.date.today().isoformat()
    run = {
        "command": args.command,
        "decisions": decisions,
        "reps": args.reps,
        "date": date,
        "cells": list(results),
        "window": args.window,
        "load_1min": args.load,
    }
    if args.merge:
        with open(args.merge) as f:
            old = json.load(f)
        if old["host"] != args.host:
            print(f"--merge: {args.merge} is of host {old['host']!r}, not {args.host!r}")
            return 2
        info = merge_records(old, results, skipped, run)
        out = os.path.dirname(args.merge) or "."
        results, skipped = info["cells"], info["skipped"]
    else:
        info = {
            "date": date,
            "host": args.host,
            "machine": cpu_name(),
            "command": args.command,
            "reps": args.reps,
            "window": args.window,
            "load_1min": args.load,
            "runs": [run],
            "torch": __import__("torch").__version__,
            "cells": results,
            "summary": {c: summarize(r) for c, r in results.items()},
            "skipped": skipped,
        }
        out = args.out
    lines = render(results, args, skipped, date, info["runs"])
    write_record(out, f"regret_{args.host}_{date}", info, lines)
    return 0


if __name__ == "__main__":
    sys.exit(main())
