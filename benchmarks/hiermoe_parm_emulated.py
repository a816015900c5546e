"""HierMoE dedup, FSMoE's planned degrees and Parm's schedules on an emulated 2-node cluster.

    python benchmarks/hiermoe_parm_emulated.py [--rates 100mbit,1gbit] [--reps 5]

World 4 as 2 nodes x 2: each node is a network namespace, the nodes joined by a link shaped
with ``tc tbf`` (``emulated_cluster.py``; needs root; ``MOEFLOW_EMU_PREFIX`` names the
namespaces). ``--rates loopback`` runs the same arms on 127.0.0.1 without namespaces.

The layer is DeepSeek-style: 16 experts, top-4 with group-limited routing (4 groups of 4
experts, each token picks 2 groups: at most 2 ranks per token, as DeepSeek-V2's
device-limited routing), hidden 512, FFN 1024, GELU, fp32, 512 tokens per rank. Every arm
trains its own copy of the same layer with Adam: forward + backward of the layer, the
router's gradient all-reduce, the optimizer step.

Arms: the plain all-to-all at pipeline degree r = 1, 2, 4, 8 and at the degrees the FSMoE
planner (``moeflow.plan.fsmoe.plan_layer``) picks from a profile of this cluster
(``moeflow.apps.profile``); Tutel's ``2dh``; HierMoE ``dedup`` as planned by
``moeflow.plan.hiermoe.plan_dedup`` (level or "none", and placement) from the routing of
``WARMUP`` earlier batches, never the timed ones; Parm's ``plain``, ``s1``, ``s2``
(MP = ESP = 2 = the node, the node's ranks sharing one batch). The planned swap runs once,
after the warm-up: its time and bytes are spread over the timed steps and included in every
dedup figure.

Timing: after one untimed step per arm, ``--reps`` rounds; each round runs every arm once on
that round's batch (fresh batches, the same for every arm) in a shuffled order (seeded by
the round). Reported per arm: every round's step time, median and spread; bytes per step
per link level as ``moeflow.comm.bytes`` counted them where tensors entered
torch.distributed (every collective of the step, summed over the 4 ranks). Then where the
time goes: a few more steps of the a2a and dedup arms under cProfile on rank 0, bucketed
into expert compute, waiting on collectives, issuing them and other host work; and a
swap check: one expert of rank 0 and one of rank 2 trade places and back, timed and counted
next to the prediction of ``moeflow.plan.hiermoe.swap_time``.

Writes ``hiermoe_parm_emulated_<host>_<date>.md`` (and ``.json``) under ``--out``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import random
import statistics
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import cpu_isa, cpu_name, write_record  # noqa: E402

D, F, E, K, T = 512, 1024, 16, 4, 512
GROUPS, TOPK_GROUPS = 4, 2
WARMUP = 4  # batches whose routing the dedup plan reads (search on 3, check on the last)
FIXED = (1, 2, 4, 8)
PROFILED = (*(f"a2a-r{r}" for r in FIXED), "a2a-planned", "dedup")
PROFILE_STEPS = 3
ARMS = (
    *(f"a2a-r{r}" for r in FIXED),
    "a2a-planned",
    "2dh",
    "dedup",
    "parm-plain",
    "parm-s1",
    "parm-s2",
)


def _links(rate: str) -> dict:
    """α-β per link level for the dedup plan: the node's own stack (loopback class) and the
    configured rate of the shaped link (its queue's 50 ms bound is not a delay)."""
    import emulated_cluster as ec

    inter = 8 / ec.rate_bits(rate) if rate != "loopback" else 1 / 2e9
    return {1: (50e-6, 1 / 2e9), 2: (200e-6, inter)}


def _fsmoe_degrees(cfg) -> dict:
    """FSMoE degrees for this layer from a profile of the cluster the ranks run on."""
    from moeflow.apps.profile import profile
    from moeflow.plan import LayerWorkload
    from moeflow.plan.fsmoe import plan_layer

    errors = []
    for _ in range(2):  # a profile on a loaded machine can fit a negative slope: again
        try:
            t0 = time.perf_counter()
            perf = profile(
                None,
                nodes=2,
                sizes=(2**16, 2**18, 2**20),
                gemm_sizes=(64, 128, 256),
                reps=2,
                trials=1,
                progress=False,
            )
            w = LayerWorkload.from_config(cfg, tokens=T, n_ep=4, bytes_per_element=4)
            d = plan_layer(w, perf)
            a2a = perf.cost("a2a")
            return {
                "r_fwd": d.r_fwd,
                "r_bwd": d.r_bwd,
                "case_fwd": d.fwd.case,
                "case_bwd": d.bwd.case,
                "predicted_ms": d.t_ms,
                "profile_s": time.perf_counter() - t0,
                "a2a_alpha_ms": a2a.alpha,
                "a2a_MBps": 1e-3 / a2a.beta if a2a.beta > 0 else None,
                "errors": errors,
            }
        except Exception as e:  # noqa: BLE001 - the record names it
            errors.append(f"{type(e).__name__}: {e}")
    return {"r_fwd": 1, "r_bwd": 1, "errors": errors, "failed": True}


def _category(name: str) -> str:
    """Bucket of a cProfile entry: expert compute, waiting on or issuing a collective, or
    other host work (routing, index building, copies, autograd and Python glue)."""
    if "grouped_mm" in name or "gelu" in name:
        return "expert_compute"
    if "_distributed_c10d" in name:
        return "comm_wait" if "wait" in name else "comm_issue"
    return "host_other"


def _where_the_time_goes(step, batch, dist) -> dict:
    """After the timed rounds: ``PROFILE_STEPS`` steps of each arm in ``PROFILED`` under
    cProfile (every rank; rank 0's figures are kept), on fresh batches, the arms
    interleaved. Per arm: median wall time of the step and median self time per bucket."""
    import cProfile
    import pstats

    rows: dict = {n: {} for n in PROFILED}
    for i in range(PROFILE_STEPS):
        for name in PROFILED if i % 2 == 0 else PROFILED[::-1]:
            x = batch(13, i, False)
            prof = cProfile.Profile()
            dist.barrier()
            t0 = time.perf_counter()
            prof.enable()
            step(name, x)
            prof.disable()
            dist.barrier()
            cat = {"step": time.perf_counter() - t0}
            for (_, _, fn), (_, _, tt, _, _) in pstats.Stats(prof).stats.items():
                cat[_category(fn)] = cat.get(_category(fn), 0.0) + tt
            for k, v in cat.items():
                rows[name].setdefault(k, []).append(1e3 * v)
    return {n: {k: statistics.median(v) for k, v in r.items()} for n, r in rows.items()}


def _swap_check(arm, topo, U, expert_bytes: float, links, dist) -> dict:
    """After the timed rounds: swap one expert of rank 0 with one of rank 2 (across the
    nodes) and back, each timed and counted, next to ``swap_time``'s prediction."""
    from moeflow.comm import bytes as comm_bytes
    from moeflow.plan.hiermoe import swap_time

    ep, opt = arm
    owner = ep.dispatcher.owner_E.tolist()
    a, b = owner.index(0), owner.index(2)
    there = list(owner)
    there[a], there[b] = 2, 0
    out = {"predicted_ms": 1e3 * swap_time(owner, there, U, expert_bytes, links)}
    opt.zero_grad(set_to_none=True)
    for name, target in (("there", there), ("back", owner)):
        dist.barrier()
        t0 = time.perf_counter()
        with comm_bytes.count(topo) as c:
            ep.apply_placement(target, opt)
        dist.barrier()
        sent = _summed(dist, [c.by_level.get(lv, 0) for lv in ("intra_node", "inter_node")])
        out[name] = {
            "ms": 1e3 * (time.perf_counter() - t0),
            "intra_MB": sent[0] / 1e6,
            "inter_MB": sent[1] / 1e6,
        }
    out["expected_inter_MB"] = 2 * expert_bytes / 1e6  # one expert each way
    return out


def _summed(dist, xs: list) -> list:
    """``xs`` summed over the ranks."""
    import torch

    t = torch.tensor([float(x) for x in xs])
    dist.all_reduce(t)
    return t.tolist()


def rank_main(rank: int, master: str, port: int, reps: int, rate: str) -> None:
    import copy

    import torch
    import torch.distributed as dist

    from moeflow import MoEConfig, MoELayer
    from moeflow.comm import Topology
    from moeflow.comm import bytes as comm_bytes
    from moeflow.comm.groups import subgroup
    from moeflow.parallel import ExpertParallel
    from moeflow.plan.hiermoe import contiguous_owner, plan_dedup

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://{master}:{port}", rank=rank, world_size=4)
    cfg = MoEConfig(
        hidden_size=D,
        ffn_hidden_size=F,
        num_experts=E,
        top_k=K,
        expert_type="gelu",
        router="deepseek",
        n_group=GROUPS,
        topk_group=TOPK_GROUPS,
        score_func="sigmoid",
    )
    torch.manual_seed(0)
    layer = MoELayer(cfg)
    node = rank // 2
    topo = Topology.explicit(4, 2)
    U = [1, 2, 4]
    mp = subgroup(None, [2 * node, 2 * node + 1])

    def batch(kind: int, i: int, parm: bool) -> torch.Tensor:
        who = 100 + node if parm else rank  # Parm: the node's ranks share one batch
        return torch.randn(T, D, generator=torch.Generator().manual_seed(kind + 1000 * who + i))

    t_start = time.perf_counter()

    def log(what: str) -> None:  # progress on stderr (rank 0)
        if rank == 0:
            print(f"[{time.perf_counter() - t_start:6.1f} s] {rate}: {what}", file=sys.stderr)

    fsmoe = _fsmoe_degrees(cfg)
    log(f"FSMoE degrees {fsmoe['r_fwd']}, {fsmoe['r_bwd']}")

    def build(**kw):
        ep = ExpertParallel(copy.deepcopy(layer), topology=topo, timeout_s=600, **kw)
        return ep, torch.optim.Adam(ep.parameters(), lr=1e-3)

    arms = {}
    for r in FIXED:
        arms[f"a2a-r{r}"] = build(dispatcher="a2a", r_fwd=r, r_bwd=r)
    arms["a2a-planned"] = build(dispatcher="a2a", r_fwd=fsmoe["r_fwd"], r_bwd=fsmoe["r_bwd"])
    arms["2dh"] = build(dispatcher="2dh")
    for s in ("plain", "s1", "s2"):
        arms[f"parm-{s}"] = build(esp_size=2, mp_group=mp, schedule=s)

    def step(name: str, x: torch.Tensor) -> None:
        ep, opt = arms[name]
        opt.zero_grad(set_to_none=True)
        xi = x.clone().requires_grad_(True)
        ep(xi).sum().backward()
        ep.sync_gradients("mean")
        opt.step()

    # the dedup plan: routing of the warm-up batches (earlier batches, never a timed one)
    dedup = arms["dedup"] = build(dispatcher="dedup", dispatcher_options={"level": "auto"})
    history = []
    for i in range(WARMUP):
        step("dedup", batch(0, i, False))
        history.append(dedup[0].dispatcher.last_assignments())
    expert_bytes = 3 * 4 * (layer.experts.w_in[0].numel() + layer.experts.w_out[0].numel())
    t0 = time.perf_counter()
    plan = plan_dedup(
        history,
        contiguous_owner(E, 4),
        U,
        D * 4,
        _links(rate),
        expert_bytes=expert_bytes,  # weights and Adam's two moments (gradients are unset)
        horizon=reps,
        max_swaps=8,
    )
    plan_s = time.perf_counter() - t0
    kind, opts = plan.dispatcher()
    swap_s, swap_bytes = 0.0, {}
    if kind == "a2a":
        arms["dedup"] = build(dispatcher="a2a")
    else:
        dedup[0].dispatcher.set_level(opts["level"])
    if kind == "dedup" and plan.moved:
        ep, opt = dedup
        opt.zero_grad(set_to_none=True)
        dist.barrier()
        t0 = time.perf_counter()
        with comm_bytes.count(topo) as c:
            ep.apply_placement(list(plan.owner), opt)
        dist.barrier()
        swap_s = time.perf_counter() - t0
        swap_bytes = dict(c.by_level)

    log(f"dedup plan {plan.level_name}, {plan.moved} moved ({plan_s:.1f} s)")
    for name in ARMS:  # one untimed step per arm
        step(name, batch(0, 0, name.startswith("parm")))
    times = {n: [] for n in ARMS}
    nbytes = {n: {} for n in ARMS}
    log("warm-up steps done")
    for i in range(reps):
        log(f"round {i + 1}/{reps}")
        order = list(ARMS)
        random.Random(i).shuffle(order)
        for name in order:
            x = batch(7, i, name.startswith("parm"))
            dist.barrier()
            t0 = time.perf_counter()
            with comm_bytes.count(topo) as c:
                step(name, x)
            dist.barrier()
            times[name].append(time.perf_counter() - t0)
            for k, v in c.by_level.items():
                nbytes[name][k] = nbytes[name].get(k, 0) + v
    times["dedup"] = [t + swap_s / reps for t in times["dedup"]]
    log("profiled steps")
    where = _where_the_time_goes(step, batch, dist)
    check = None
    if kind == "dedup":  # the swap's cost model against a measured swap, there and back
        log("swap check")
        check = _swap_check(dedup, topo, U, expert_bytes, _links(rate), dist)
    for k, v in swap_bytes.items():
        nbytes["dedup"][k] = nbytes["dedup"].get(k, 0) + v
    levels = ("intra_node", "inter_node")
    bt = torch.tensor([[float(nbytes[n].get(lv, 0)) for lv in levels] for n in ARMS])
    dist.all_reduce(bt)
    sw = torch.tensor([float(swap_bytes.get(lv, 0)) for lv in levels])
    dist.all_reduce(sw)
    out = {
        "arms": {
            n: {
                "step_ms": [1e3 * t for t in times[n]],
                "intra_MB": bt[j, 0].item() / reps / 1e6,
                "inter_MB": bt[j, 1].item() / reps / 1e6,
            }
            for j, n in enumerate(ARMS)
        },
        "fsmoe": fsmoe,
        "where_ms": where,
        "swap_check": check,
        "dedup_plan": {
            "level": plan.level_name,
            "moved_experts": plan.moved,
            "predicted_ms": {k: 1e3 * v for k, v in plan.times_s.items()},
            "predicted_swap_ms": 1e3 * plan.swap_s,
            "plan_s": plan_s,
            "swap_ms": 1e3 * swap_s,
            "swap_intra_MB": sw[0].item() / 1e6,
            "swap_inter_MB": sw[1].item() / 1e6,
        },
    }
    if rank == 0:
        print(json.dumps(out), flush=True)
    dist.destroy_process_group()


def _launch(rate: str, reps: int, port: int, wrap, master: str):
    me = [sys.executable, os.path.abspath(__file__), "--master", master, "--port", str(port)]
    me += ["--reps", str(reps), "--rates", rate]
    procs = [
        subprocess.Popen(wrap(r, me + ["--rank", str(r)]), stdout=subprocess.PIPE, text=True)
        for r in range(4)
    ]
    outs = [p.communicate(timeout=1500)[0] for p in procs]
    if any(p.returncode for p in procs):
        return None, f"a rank exited with {[p.returncode for p in procs]}"
    return json.loads([ln for ln in outs[0].splitlines() if ln.startswith("{")][-1]), None


def shaped(rate: str, reps: int):
    import emulated_cluster as ec

    if rate == "loopback":
        return _launch(rate, reps, 29734, lambda r, cmd: cmd, "127.0.0.1")
    reason = ec.unavailable()
    if reason:
        return None, reason
    if ec.namespaces():
        return None, f"an emulated cluster with prefix {ec.PREFIX} is already up; not touched"
    ec.up(2, rate)
    try:
        return _launch(rate, reps, 29733, lambda r, cmd: ec.node_command(r // 2, cmd), ec.addr(0))
    finally:
        ec.down()


def _stats(xs: list) -> str:
    return f"{statistics.median(xs):.0f} ({min(xs):.0f}-{max(xs):.0f})"


def _ratio(base: list, arm: list) -> dict:
    """Median-over-median ratio and the per-round ratios (same batch, same round)."""
    per = [b / a for b, a in zip(base, arm)]
    return {
        "ratio": statistics.median(base) / statistics.median(arm),
        "per_round": per,
        "per_round_median": statistics.median(per),
        "per_round_min": min(per),
        "per_round_max": max(per),
    }


def summarize(res: dict) -> dict:
    a = res["arms"]
    fixed = {f"a2a-r{r}": statistics.median(a[f"a2a-r{r}"]["step_ms"]) for r in FIXED}
    best = min(fixed, key=fixed.get)
    return {
        "dedup_vs_a2a_r1": _ratio(a["a2a-r1"]["step_ms"], a["dedup"]["step_ms"]),
        "planned_vs_r1": _ratio(a["a2a-r1"]["step_ms"], a["a2a-planned"]["step_ms"]),
        "planned_vs_best_fixed": {
            "best_fixed": best,
            **_ratio(a[best]["step_ms"], a["a2a-planned"]["step_ms"]),
        },
    }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rates", default="100mbit,1gbit")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--out", default="benchmarks/results")
    ap.add_argument("--host", default=f"{os.cpu_count()}cpu-x86")
    ap.add_argument("--rank", type=int, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--master", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--port", type=int, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.rank is not None:
        rank_main(args.rank, args.master, args.port, args.reps, args.rates)
        return 0
    import torch

    isa = cpu_isa()
    date = datetime.date.today().isoformat()
    lines = [
        f"# HierMoE dedup, FSMoE degrees and Parm on an emulated 2-node cluster ({date})",
        "",
        f"Command: `python benchmarks/hiermoe_parm_emulated.py --rates {args.rates} "
        f"--reps {args.reps}` (as root). Machine: {args.host}, {cpu_name()} ({isa}); "
        f"Python {platform.python_version()}, torch {torch.__version__}. World 4 as 2 nodes "
        "x 2 (network namespaces, `tc tbf` on the link between them), gloo, one thread per "
        f"rank. Layer: {E} experts top-{K}, group-limited routing ({GROUPS} groups, "
        f"{TOPK_GROUPS} per token, sigmoid scores), hidden {D}, FFN {F}, GELU, fp32, {T} "
        "tokens per rank; a step is forward + backward + router gradient all-reduce + Adam. "
        f"Each of {args.reps} rounds runs every arm once on the round's fresh batch in a "
        "shuffled order; every round is listed, then median (min-max). Bytes: per step, "
        "whole group, every collective, as `moeflow.comm.bytes` counted them. The dedup plan "
        f"(level and placement) comes from {WARMUP} warm-up batches, never a timed one; its "
        "swap's time and bytes are spread over the timed steps and included in the dedup row.",
        "",
    ]
    info = {"date": date, "host": args.host, "machine": cpu_name(), "isa": isa, "rates": {}}
    for rate in args.rates.split(","):
        res, why = shaped(rate, args.reps)
        lines += [f"## {rate}", ""]
        if res is None:
            lines += [f"skipped: {why}", ""]
            info["rates"][rate] = {"skipped": why}
            continue
        res["summary"] = summarize(res)
        info["rates"][rate] = res
        lines += [
            "| arm | step ms, median (min-max) | every round (ms) | intra-node MB | "
            "inter-node MB |",
            "| --- | --- | --- | --- | --- |",
        ]
        for name in ARMS:
            r = res["arms"][name]
            rounds = ", ".join(f"{t:.0f}" for t in r["step_ms"])
            lines.append(
                f"| {name} | {_stats(r['step_ms'])} | {rounds} | {r['intra_MB']:.2f} | "
                f"{r['inter_MB']:.2f} |"
            )
        dp, fs, s = res["dedup_plan"], res["fsmoe"], res["summary"]
        pred = ", ".join(f"{k} {v:.0f}" for k, v in dp["predicted_ms"].items())
        lines += [
            "",
            f"Dedup plan: level **{dp['level']}**, {dp['moved_experts']} experts moved "
            f"(swap {dp['swap_ms']:.0f} ms measured, {dp['predicted_swap_ms']:.0f} ms "
            f"predicted; {dp['swap_intra_MB']:.2f} MB intra-node, {dp['swap_inter_MB']:.2f} "
            f"MB inter-node); predicted comm per step (ms): {pred}; planning took "
            f"{dp['plan_s']:.1f} s.",
            f"FSMoE plan: r_fwd = {fs['r_fwd']}, r_bwd = {fs['r_bwd']}"
            + (
                f" (cases {fs['case_fwd']} / {fs['case_bwd']}; profiled a2a "
                f"alpha {fs['a2a_alpha_ms']:.2f} ms, {fs['a2a_MBps'] or 0:.1f} MB/s)"
                if not fs.get("failed")
                else f" (planning failed: {fs['errors']})"
            )
            + ".",
            "",
            "| ratio | target | median / median | per round: median (min-max) |",
            "| --- | --- | --- | --- |",
        ]
        for key, label, target in (
            ("dedup_vs_a2a_r1", "dedup vs a2a (r = 1), swap included", ">= 1.2x"),
            ("planned_vs_r1", "FSMoE-planned degrees vs r = 1", ">= 1.3x"),
            (
                "planned_vs_best_fixed",
                f"planned vs the best fixed degree ({s['planned_vs_best_fixed']['best_fixed']})",
                ">= 0.97x",
            ),
        ):
            q = s[key]
            lines.append(
                f"| {label} | {target} | {q['ratio']:.2f}x | {q['per_round_median']:.2f}x "
                f"({q['per_round_min']:.2f}-{q['per_round_max']:.2f}) |"
            )
        sc = res.get("swap_check")
        if sc:
            lines += [
                "",
                "Swap check (after the timed rounds): one expert of rank 0 and one of rank 2 "
                "trade places and back, each with its weights and Adam moments; measured "
                f"{sc['there']['ms']:.0f} / {sc['back']['ms']:.0f} ms against "
                f"{sc['predicted_ms']:.0f} ms predicted (`swap_time`), "
                f"{sc['there']['inter_MB']:.2f} / {sc['back']['inter_MB']:.2f} MB inter-node "
                f"and {sc['there']['intra_MB']:.2f} / {sc['back']['intra_MB']:.2f} MB "
                f"intra-node counted, {sc['expected_inter_MB']:.2f} MB expected.",
            ]
        lines += [
            "",
            f"Where the time goes (rank 0, {PROFILE_STEPS} more steps per arm under cProfile "
            "after the timed rounds, interleaved; median ms of the step's wall time and of the "
            "self time per bucket: expert GEMMs and activation, waiting on collectives, "
            "issuing them, other host work):",
            "",
            "| arm | step | expert compute | comm wait | comm issue | other host |",
            "| --- | --- | --- | --- | --- | --- |",
        ]
        for name, w in res["where_ms"].items():
            lines.append(
                f"| {name} | {w['step']:.0f} | {w.get('expert_compute', 0):.0f} | "
                f"{w.get('comm_wait', 0):.0f} | {w.get('comm_issue', 0):.0f} | "
                f"{w.get('host_other', 0):.0f} |"
            )
        lines.append("")
    lines += [
        "Load: the 4 ranks share 2 CPU cores with other work on the machine, so compute "
        "times (and the 1 Gbit/s rows, mostly compute) vary between rounds. Parm's ranks "
        "share their node's batch (MP), so its rows are comparable with each other only.",
        "",
    ]
    write_record(args.out, f"hiermoe_parm_emulated_{args.host}_{date}", info, lines)
    return 0


if __name__ == "__main__":
    sys.exit(main())
