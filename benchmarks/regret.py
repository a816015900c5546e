"""Regret of every automatic choice: each option and the ``auto`` pick measured side by side.

    python benchmarks/regret.py [--cells loopback,2x1@1gbit,...] [--reps 5] [--window 12]
                                [--out DIR]

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

Writes ``regret_<host>_<date>.md`` and ``.json`` under ``--out``.
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
DECISIONS = ("degrees", "zipccl", "dedup", "parm")
#: a case's entries that are not decisions
CASE_INFO = ("picks", "window_s", "refits")
#: the auto arms' online-refinement window: recorded calls at 1, 2, 4 chunks in turn
WINDOW = 12
#: the profile sweep inside each job: collective sizes (bytes) and square GEMM sizes
PROFILE_SIZES = (16384, 65536, 262144, 1048576)
PROFILE_GEMM = (64, 128, 192, 256)


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
    perf = profile(
        dist.group.WORLD,
        nodes=nodes,
        sizes=PROFILE_SIZES,
        gemm_sizes=PROFILE_GEMM,
        reps=2,
        trials=3,
        progress=False,
        compute_dtypes=tuple(dtypes),
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
    for sname in shapes:
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
    if rank == 0:
        print("RESULT " + json.dumps(out), flush=True)
    dist.barrier()
    dist.destroy_process_group()


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


def render(results: dict, args, skipped: dict, date: str) -> list[str]:
    import torch

    isa = cpu_isa()
    L = [
        f"# Regret of moeflow's automatic choices ({date}, {args.host})",
        "",
        f"Command: `{args.command}` (as root for the emulated cells). "
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
            if getattr(args, "load", None)
            else ""
        )
        + f". {args.reps} timed repeats per arm after a warm-up round, arms interleaved in a "
        "rotating order; medians, with the min-max spread. The plans come from a "
        "`moeflow profile` run inside each cell's job before any timed step, refitted by "
        f"each `auto` arm after a {getattr(args, 'window', WINDOW)}-call window on a warm-up "
        "batch.",
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
        L += [
            "- not covered: FinDEP's (r1, r2, order) and the geo planner's partition (no "
            "grid cell here runs them); every cell of the grid above ran.",
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
        L.append(f"- {cell}: profile {res['profile_s']:.0f} s; " + "; ".join(parts))
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
    if skipped:
        L += ["## Cells not run", ""] + [f"- {c}: {why}" for c, why in skipped.items()] + [""]
    return L


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
    args = ap.parse_args(argv)
    if args.render:
        with open(args.render) as f:
            info = json.load(f)
        args.command, args.host = info["command"], info["host"]
        args.reps = info.get("reps", args.reps)
        args.window = info.get("window", args.window)
        args.load = info.get("load_1min")
        tag = os.path.splitext(os.path.basename(args.render))[0]
        lines = render(info["cells"], args, info["skipped"], info["date"])
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
        t0 = time.time()
        res, why = run_cell(
            cell, args.reps, decisions, shapes, dtypes, args.port + i, window=args.window
        )
        print(f"{cell}: {'done' if res else why} in {time.time() - t0:.0f} s", flush=True)
        args.load.append(os.getloadavg()[0])
        if res is None:
            skipped[cell] = why
        else:
            results[cell] = res
    date = datetime.date.today().isoformat()
    info = {
        "date": date,
        "host": args.host,
        "machine": cpu_name(),
        "command": args.command,
        "reps": args.reps,
        "window": args.window,
        "load_1min": args.load,
        "torch": __import__("torch").__version__,
        "cells": results,
        "summary": {c: summarize(r) for c, r in results.items()},
        "skipped": skipped,
    }
    write_record(args.out, f"regret_{args.host}_{date}", info, render(results, args, skipped, date))
    return 0


if __name__ == "__main__":
    sys.exit(main())
