"""Validate the FSMoE planner: optimality, speedup, solve time, fidelity.

    python benchmarks/plan_validation.py [--fidelity] [--out benchmarks/results]

1. Optimality: over FSMoE's 1458-layer sweep on the fsmoe-testbed-a and -b presets, is the
   planner's (r_fwd, r_bwd) within 1% of the best degree in 1..16 found by simulating every
   option?  Target: >= 99% of layers.
2. Speedup: simulated FSMoE layer time vs Tutel-style fixed degree, Tutel+PipeMoE and
   DeepSpeed-MoE (no overlap) over the sweep, and whole-model steps (with gradient all-reduce
   partitioning) for GPT2-XL-MoE, Mixtral-8x7B and Mixtral-8x22B; next to the published
   1.18x / 1.22x (over Tutel+PipeMoE) and 1.28-3.01x (over DeepSpeed-MoE).
   An ablation table moves one factor at a time toward the paper's setting (the cost fits,
   the topology, the baseline's pipelining of ag/rs) and reports the per-layer speedup over
   Tutel+PipeMoE next to the published 1.18x / 1.22x.
3. Solve time: median per layer (forward + backward), target < 20 ms (paper: 193 ms).
4. Fidelity (--fidelity): 4 gloo ranks declared as 2 nodes x 2, profile them, predict the
   step time (forward + backward) of moeflow.parallel.ExpertParallel for r in {1, 2, 4} with
   the simulator, measure it, report the error (target within 15%).

Layout of the sweep (our reading of FSMoE): expert parallelism across nodes (N_EP = nodes),
expert sharding inside a node (N_ESP = GPUs per node), one expert per EP rank, top-2.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import cpu_isa, cpu_name  # noqa: E402

from moeflow.config import model_preset  # noqa: E402
from moeflow.perf import perf_preset  # noqa: E402
from moeflow.plan import LayerWorkload, baselines, fsmoe, fsmoe_sweep  # noqa: E402
from moeflow.sim import pass_time  # noqa: E402

TESTBEDS = {"fsmoe-testbed-a": (6, 8), "fsmoe-testbed-b": (8, 4)}
DATE = datetime.date.today().isoformat()
MACHINE = f"{os.cpu_count()} vCPUs, {cpu_name()} ({cpu_isa()}), no GPU"


def layer_time(w, perf, r_f, r_b):
    return pass_time(w.pass_cost(perf), r_f) + pass_time(w.pass_cost(perf, True), r_b, 0.0, True)


def ag_as_rs(perf):
    """Sensitivity variant: the published ag beta (10x rs's) replaced by rs's fit."""
    from dataclasses import replace

    costs = dict(perf.costs)
    costs["ag"] = replace(costs["rs"], note="sensitivity: ag := rs")
    return replace(perf, name=perf.name + " (ag:=rs)", costs=costs)


def variants() -> list[tuple[str, str, object, int, int]]:
    """(label, preset, perf, n_ep, n_esp): the presets in FSMoE's layout, then sensitivity."""
    out = []
    for name, (ep, esp) in TESTBEDS.items():
        out.append((name, name, perf_preset(name), ep, esp))
    for name, (ep, esp) in TESTBEDS.items():
        out.append(
            (f"{name}, ESP=1 (EP over all {ep * esp} GPUs)", name, perf_preset(name), ep * esp, 1)
        )
        out.append((f"{name}, ag beta := rs beta", name, ag_as_rs(perf_preset(name)), ep, esp))
    return out


def esp_whole_time(w, perf, r: int) -> float:
    """Forward + backward of a baseline that pipelines a2a and the expert GEMMs in ``r``
    chunks but runs the ESP all-gather and reduce-scatter whole, outside the pipeline (as
    Tutel does; pipelining them is one of FSMoE's contributions). Without ESP it is the
    chunked pass itself."""
    from dataclasses import replace

    total = 0.0
    for backward in (False, True):
        pc = w.pass_cost(perf, backward)
        bare = replace(pc, alpha_ag=0.0, work_ag=0.0, alpha_rs=0.0, work_rs=0.0)
        total += pass_time(bare, r, 0.0, backward)
        total += pc.alpha_ag + pc.work_ag + pc.alpha_rs + pc.work_rs
    return total


WHOLE = "tutel+pipemoe, ag/rs whole"


def sweep(label: str, perf, ep: int, esp: int, step: int = 1) -> dict:
    """Section 1-3 figures over FSMoE's sweep (every ``step``-th layer)."""
    name = label
    ws = fsmoe_sweep(n_ep=ep, n_esp=esp)[::step]
    within = within_model = differ = 0
    worst = 0.0
    solve = []
    cases: dict[str, int] = {}
    sp = {"tutel(r=2)": [], "tutel+pipemoe": [], "deepspeed-moe": [], WHOLE: []}
    for w in ws:
        d = fsmoe.plan_layer(w, perf)
        solve.append(d.solve_ms)
        cases[d.fwd.case] = cases.get(d.fwd.case, 0) + 1
        dm = fsmoe.plan_layer(w, perf, evaluator="model")
        pf, pb = w.pass_cost(perf), w.pass_cost(perf, True)
        tf = [pass_time(pf, r) for r in range(1, 17)]
        tb = [pass_time(pb, r, 0.0, True) for r in range(1, 17)]
        best = min(tf) + min(tb)
        gap = d.t_ms / best - 1
        worst = max(worst, gap)
        within += gap <= 0.01
        within_model += dm.t_ms / best - 1 <= 0.01
        differ += d.r_fwd != d.r_bwd
        rp = baselines.pipemoe_degree(w, perf)
        sp["tutel(r=2)"].append((tf[1] + tb[1]) / d.t_ms)
        sp["tutel+pipemoe"].append((tf[rp - 1] + tb[rp - 1]) / d.t_ms)
        sp["deepspeed-moe"].append((tf[0] + tb[0]) / d.t_ms)
        sp[WHOLE].append(esp_whole_time(w, perf, rp) / d.t_ms)
    n = len(ws)
    return {
        "cluster": name,
        "layers": n,
        "n_ep": ep,
        "n_esp": esp,
        "within_1pct": within / n,
        "within_1pct_model_only": within_model / n,
        "worst_gap": worst,
        "fwd_ne_bwd": differ,
        "binding_case_fwd": cases,
        "solve_ms_median": statistics.median(solve),
        "solve_ms_p99": sorted(solve)[int(0.99 * n)],
        "speedup": {
            k: {"mean": statistics.fmean(v), "min": min(v), "max": max(v)} for k, v in sp.items()
        },
    }


MODELS = {"gpt2-xl-moe": 2048, "mixtral-8x7b": 4096, "mixtral-8x22b": 4096}


def models(name: str) -> list[dict]:
    perf = perf_preset(name)
    ep, esp = TESTBEDS[name]
    rows = []
    for m, tokens in MODELS.items():
        mp = model_preset(m)
        w = LayerWorkload.from_config(
            mp, tokens=tokens, seq_len=min(tokens, 2048), n_ep=ep, n_esp=esp
        )
        L = mp.num_layers
        fs = fsmoe.plan(w, perf, num_layers=L, model=m)
        row = {
            "model": m,
            "tokens_per_gpu": tokens,
            "layers": L,
            "fsmoe_ms": fs.predicted_step_ms,
            "solve_ms": fs.solve_ms,
            "fsmoe_degrees": sorted(set(fs.degrees())),
        }
        for b in (
            baselines.deepspeed_moe(w, perf, num_layers=L),
            baselines.tutel(w, perf, num_layers=L),
            baselines.pipemoe(w, perf, num_layers=L),
            baselines.lina(w, perf, num_layers=L),
        ):
            row[b.method] = b.predicted_step_ms / fs.predicted_step_ms
        rows.append(row)
    return rows


# ---- fidelity -------------------------------------------------------------------------------
FID_CFG = dict(hidden_size=256, ffn_hidden_size=256, num_experts=8, top_k=2)
FID_TOKENS = 1024
FID_RS = (1, 2, 4)


def _calibrate_compute(cfg, reps: int = 3) -> dict:
    """On every rank at once: fit the expert FFN kernel (forward; backward) per FLOP and time
    the replicated rest of the layer (router, permutation, combine).

    FSMoE's "GEMM" task is the expert FFN; on a CPU its SwiGLU element-wise work is a large
    share of it, so we fit the kernel the runtime calls (``moeflow.kernels.expert_ffn``),
    not bare matmuls. The rest is the single-device layer's forward + backward on the local
    tokens minus its expert FFN share (a constant per step).
    """
    import torch
    import torch.distributed as dist

    from moeflow import MoELayer
    from moeflow.kernels import expert_ffn
    from moeflow.perf import LinearCost
    from moeflow.perf.measure import time_ms

    D, F = cfg.hidden_size, cfg.ffn_hidden_size
    E_l = cfg.num_experts // 4
    w_in = torch.randn(E_l, 2 * F, D, requires_grad=True)
    w_out = torch.randn(E_l, D, F, requires_grad=True)
    grp, dev = dist.group.WORLD, torch.device("cpu")
    ns, tf, tfb = [], [], []
    for N in (256, 768, 1280, 1792, 2304):
        x = torch.randn(N, D, requires_grad=True)
        c = torch.tensor([N // E_l] * (E_l - 1) + [N - N // E_l * (E_l - 1)])

        def fwd(x=x, c=c):
            with torch.no_grad():
                expert_ffn(x, c, w_in, w_out)

        def fwdbwd(x=x, c=c):
            expert_ffn(x, c, w_in, w_out).sum().backward()

        ns.append(2.0 * N * D * F * 3)
        tf.append(time_ms(fwd, reps=reps, trials=3, group=grp, device=dev))
        tfb.append(time_ms(fwdbwd, reps=reps, trials=3, group=grp, device=dev))
    exp_f = LinearCost.fit(ns, tf, note="expert_ffn forward, n = FLOPs", nonneg_alpha=True)
    exp_b = LinearCost.fit(
        ns,
        [b - f for f, b in zip(tf, tfb)],
        nonneg_alpha=True,
        note="expert_ffn backward, n = forward FLOPs",
    )
    torch.manual_seed(0)
    layer = MoELayer(cfg)
    xl = torch.randn(FID_TOKENS, D)

    def full():
        xi = xl.clone().requires_grad_(True)
        layer(xi).sum().backward()

    t_layer = time_ms(full, reps=reps, trials=3, group=grp, device=dev)
    rows = cfg.top_k * FID_TOKENS
    # overlap probe: does an async a2a progress while this rank computes?
    xr = torch.randn(rows, D)
    cr = torch.tensor([rows // E_l] * (E_l - 1) + [rows - rows // E_l * (E_l - 1)])
    buf, out = torch.randn(rows * D), torch.empty(rows * D)

    def comp():
        with torch.no_grad():
            expert_ffn(xr, cr, w_in, w_out)

    def comm():
        dist.all_to_all_single(out, buf)

    def both():
        work = dist.all_to_all_single(out, buf, async_op=True)
        comp()
        work.wait()

    t_g, t_a, t_b = (
        time_ms(f, reps=reps, trials=3, group=grp, device=dev) for f in (comp, comm, both)
    )
    eta = max(0.0, min(1.0, (t_g + t_a - t_b) / min(t_g, t_a)))
    n_flops = 2.0 * rows * D * F * 3
    rest = t_layer - exp_f(n_flops) - exp_b(n_flops)
    return {
        "exp_fwd": exp_f.to_dict(),
        "exp_bwd": exp_b.to_dict(),
        "single_device_layer_ms": t_layer,
        "rest_ms": rest,
        "probe": {"compute_ms": t_g, "a2a_ms": t_a, "both_ms": t_b, "overlap": eta},
    }


def _fid_rank(rank, world, iters):
    """One rank of the fidelity run (forked by moeflow.launch, gloo group up); rank 0
    returns the record."""
    import torch
    import torch.distributed as dist

    from moeflow import MoEConfig, MoELayer
    from moeflow.apps.profile import profile

    gemm_m = (96, 160, 224, 288, 352)
    perf = profile(
        nodes=2,
        sizes=(65536, 262144, 1048576, 2097152, 4194304),
        gemm_sizes=gemm_m,
        reps=3,
        trials=3,
        progress=rank == 0,
    )
    cfg = MoEConfig(**FID_CFG)
    res = {
        "perf": perf.to_dict(),
        "calib": _calibrate_compute(cfg),
        "measured": {},
        "runtime": None,
    }
    from moeflow.comm import Topology
    from moeflow.parallel import ExpertParallel

    torch.manual_seed(0)
    layer = MoELayer(cfg)
    topo = Topology.explicit(world_size=world, ranks_per_node=2)
    torch.manual_seed(100 + rank)
    x = torch.randn(FID_TOKENS, cfg.hidden_size)
    eps = {
        r: ExpertParallel(layer, group=None, topology=topo, dispatcher="a2a", r_fwd=r, r_bwd=r)
        for r in FID_RS
    }
    times: dict[int, list[float]] = {r: [] for r in FID_RS}
    # round robin over r, so that load from other processes on this shared host hits
    # every degree alike
    torch.manual_seed(0)
    ref_layer = MoELayer(cfg)
    ref_times: list[float] = []
    for it in range(iters + 1):
        # a reference workload timed under the same load: the single-device layer on
        # the local tokens (what calibration timed as single_device_layer_ms)
        xi = x.clone().requires_grad_(True)
        dist.barrier()
        t0 = time.perf_counter()
        ref_layer(xi).sum().backward()
        dt = torch.tensor([(time.perf_counter() - t0) * 1e3])
        dist.all_reduce(dt, op=dist.ReduceOp.MAX)
        if it >= 1:
            ref_times.append(float(dt))
        for r in FID_RS:
            xi = x.clone().requires_grad_(True)
            dist.barrier()
            t0 = time.perf_counter()
            y = eps[r](xi)
            y.float().sum().backward()
            dt = torch.tensor([(time.perf_counter() - t0) * 1e3])
            dist.all_reduce(dt, op=dist.ReduceOp.MAX)
            if it >= 1:
                times[r].append(float(dt))
    res["measured"] = {r: statistics.median(v) for r, v in times.items()}
    res["measured_all"] = times
    res["reference_ms"] = ref_times
    res["runtime"] = "moeflow.parallel.ExpertParallel"
    dist.barrier()
    # through JSON, as the record is stored: measured times keyed by str(r)
    return json.loads(json.dumps(res)) if rank == 0 else None


def predict_step(perf, calib: dict, r: int) -> dict:
    """Simulated forward + backward of the fidelity layer on one rank (fp32, 4 ranks, EP=4).

    The chunked pass is FSMoE's model (a2a from the profiled ``a2a`` fit, the expert task from
    the expert-FFN fits of :func:`_calibrate_compute`); on top come one count-exchange a2a
    (latency only) and the replicated rest of the layer (router, permutation, combine),
    which the runtime does not overlap.
    """
    from dataclasses import replace

    from moeflow.perf import LinearCost

    w = LayerWorkload(
        B=1,
        L=FID_TOKENS,
        M=FID_CFG["hidden_size"],
        H=FID_CFG["ffn_hidden_size"],
        E=FID_CFG["num_experts"],
        k=FID_CFG["top_k"],
        f=None,
        ffn="mixtral",
        n_ep=4,
        n_esp=1,
        bytes_per_element=4,
    )
    ef, eb = LinearCost.from_dict(calib["exp_fwd"]), LinearCost.from_dict(calib["exp_bwd"])
    n = w.expert_flops
    pf = replace(w.pass_cost(perf), alpha_exp=ef.alpha, work_exp=ef.beta * n)
    pb = replace(w.pass_cost(perf, True), alpha_exp=eb.alpha, work_exp=eb.beta * n)
    other = calib["rest_ms"] + perf.cost("a2a").alpha
    out = {"other": other, "overlap": calib["probe"]["overlap"]}
    # the runtime issues work in wavefront order; "separate": link and cores are independent
    # resources (GPU + NIC), "shared": gloo's threads and the compute share the same cores
    for mode, kw in (("separate", {}), ("shared", {"link": "cpu", "compute": "cpu"})):
        fwd = pass_time(pf, r, order="wavefront", **kw)
        bwd = pass_time(pb, r, 0.0, True, order="wavefront", **kw)
        out[mode] = {"fwd": fwd, "bwd": bwd, "total": fwd + bwd + other}
    out["mode"] = "separate" if out["overlap"] >= 0.5 else "shared"
    out.update(out[out["mode"]])
    return out


def fidelity(iters: int = 5) -> dict:
    from moeflow.launch import launch
    from moeflow.perf import PerfModel

    res = launch(
        _fid_rank,
        4,
        iters,
        name="plan_validation fidelity",
        threads=1,
        stall_timeout_s=300,
        pg_timeout_s=300,
    )[0]
    perf = PerfModel.from_dict(res["perf"])
    ref = res.get("reference_ms")
    # load drift between calibration and measurement: the reference layer's slowdown
    drift = (statistics.median(ref) / res["calib"]["single_device_layer_ms"]) if ref else None
    rows = []
    for r in FID_RS:
        pred = predict_step(perf, res["calib"], r)
        meas = res["measured"].get(str(r))
        rows.append(
            {
                "r": r,
                "predicted_ms": pred["total"],
                "pred_fwd": pred["fwd"],
                "mode": pred["mode"],
                "pred_separate": pred["separate"]["total"],
                "pred_shared": pred["shared"]["total"],
                "pred_bwd": pred["bwd"],
                "pred_other": pred["other"],
                "measured_all": res.get("measured_all", {}).get(str(r)),
                "measured_ms": meas,
                "error": None if meas is None else pred["total"] / meas - 1,
                "error_drift": None
                if (meas is None or drift is None)
                else pred["total"] * drift / meas - 1,
                "error_best": None
                if not res.get("measured_all")
                else pred["total"] / min(res["measured_all"][str(r)]) - 1,
            }
        )
    return {
        "perf": res["perf"],
        "calib": res["calib"],
        "rows": rows,
        "drift": drift,
        "reference_ms": ref,
        "runtime": res["runtime"],
    }


def gaps(sw: list[dict], mods: dict) -> str:
    """The explanation of the gap to the published speedups, with this run's figures."""
    esp1 = [s for s in sw if "ESP=1" in s["cluster"]]
    t2 = [s["speedup"]["tutel(r=2)"] for s in esp1]
    ds = [s["speedup"]["deepspeed-moe"] for s in esp1]
    rows = [r for rs in mods.values() for r in rs]
    lina = [r["lina"] for r in rows]
    dsm = [r["deepspeed-moe"] for r in rows]
    rng = lambda v: f"{min(v):.2f}-{max(v):.2f}x"  # noqa: E731
    txt = (
        "**Why the simulated per-layer speedups are far below the published 1.18x / "
        "1.22x.** (a) With the published testbed-A fits, all-gather costs 2.32e-6 ms/B "
        "(about 0.43 GB/s, ten times reduce-scatter's 2.34e-7). In FSMoE's layout (ESP "
        "inside a node) a layer's ag/rs then outweigh its a2a and GEMMs, most layers are "
        "intra-node bound (table above), and in that regime pipelining can only hide the "
        "small a2a and GEMM terms: every degree, r = 1 included, is within a few percent of "
        "the best. Testbed B inherits the ratio (derived preset). "
    )
    if esp1:
        txt += (
            "The sensitivity rows show the planner's gain where a2a and compute are "
            f"balanced: with all GPUs in one EP group (no ag/rs) FSMoE averages "
            f"{rng([x['mean'] for x in t2])} over a fixed r = 2 (up to "
            f"{max(x['max'] for x in t2):.2f}x) and {rng([x['mean'] for x in ds])} over "
            f"no overlap (up to {max(x['max'] for x in ds):.2f}x). "
        )
    txt += (
        "(b) Our baselines run in the same ideal simulator: Tutel and PipeMoE get the same "
        "overlap engine (perfectly concurrent streams, no slowdown under contention, no "
        "framework overhead), so only their degrees differ. The published numbers are "
        "measured on real systems, where the baselines also differ in kernels, a2a "
        "implementation and (Tutel) the lack of ag/rs pipelining. "
    )
    if rows:
        txt += (
            "(c) Whole-model gains come mostly from hiding the data-parallel all-reduce "
            "(published ar beta 4.95e-6 ms/B) in idle link time: Lina's greedy placement "
            f"of the same all-reduce is within {rng(lina)} of FSMoE here, and the "
            f"{rng(dsm)} over DeepSpeed-MoE is mostly that all-reduce. The paper's 3.01x "
            "implies a much slower real baseline than our idealised one."
        )
    return txt


PUBLISHED_VS_PIPEMOE = {"fsmoe-testbed-a": 1.18, "fsmoe-testbed-b": 1.22}


def ablation_rows(sw: list[dict]) -> list[dict]:
    """Per testbed, the per-layer speedup over Tutel+PipeMoE as one factor at a time moves
    toward the paper's setting (and the two that move it most together)."""
    by = {s["cluster"]: s for s in sw}
    out = []
    for name, (ep, esp) in TESTBEDS.items():
        agrs, esp1 = (
            by.get(f"{name}, ag beta := rs beta"),
            by.get(f"{name}, ESP=1 (EP over all {ep * esp} GPUs)"),
        )
        if name not in by or agrs is None or esp1 is None:
            continue
        for setting, factor, s, key in (
            ("preset, FSMoE's layout (table above)", "none", by[name], "tutel+pipemoe"),
            ("ag beta := rs beta", "cost fits", agrs, "tutel+pipemoe"),
            (f"ESP=1 (EP over all {ep * esp} GPUs, no ag/rs)", "topology", esp1, "tutel+pipemoe"),
            (
                "baseline runs ag/rs whole, outside its pipeline (Tutel)",
                "baseline strength",
                by[name],
                WHOLE,
            ),
            (
                "ag beta := rs beta and baseline runs ag/rs whole",
                "cost fits + baseline strength",
                agrs,
                WHOLE,
            ),
        ):
            v = s["speedup"][key]
            out.append(
                {
                    "testbed": name,
                    "setting": setting,
                    "factor": factor,
                    "mean": v["mean"],
                    "min": v["min"],
                    "max": v["max"],
                    "published": PUBLISHED_VS_PIPEMOE[name],
                }
            )
    return out


def ablation_lines(sw: list[dict]) -> list[str]:
    rows = ablation_rows(sw)
    if not rows:
        return []
    L = [
        "",
        "**Ablation toward the paper's setting** (per layer, forward + backward, over the "
        f"{sw[0]['layers']} layers; speedup of the FSMoE plan over Tutel+PipeMoE, one factor "
        "moved at a time, then the cost fit and the baseline together):",
        "",
        "| testbed | setting | factor | mean | range | published |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        L.append(
            f"| {r['testbed']} | {r['setting']} | {r['factor']} | {r['mean']:.3f}x | "
            f"{r['min']:.3f}-{r['max']:.3f}x | {r['published']:.2f}x |"
        )
    single = [r for r in rows if "+" not in r["factor"] and r["factor"] != "none"]
    top = max(single, key=lambda r: r["mean"])
    both = [r for r in rows if "+" in r["factor"]]
    L += [
        "",
        f"The single factor that moves the mean most is {top['factor']} "
        f"({top['testbed']}: {top['mean']:.3f}x, up to {top['max']:.3f}x). With the cost "
        "fit and the baseline both moved the means are "
        + ", ".join(f"{r['testbed']} {r['mean']:.3f}x (up to {r['max']:.3f}x)" for r in both)
        + ", against the published "
        + " / ".join(f"{v:.2f}x" for v in PUBLISHED_VS_PIPEMOE.values())
        + ". What none of these rows can move: the simulator overlaps streams perfectly and "
        "charges no contention or framework time to either schedule, while the published "
        "figures are measured on real systems whose baselines also differ in kernels and "
        "a2a implementation. The ag := rs rows are a sensitivity check, not a correction: "
        "the preset keeps FSMoE's published ag fit (2.32e-6 ms/B, ten times rs's), which "
        "makes most layers intra-node bound, where no degree hides much.",
    ]
    return L


# ---- report ---------------------------------------------------------------------------------
def render(
    sw: list[dict], mods: dict, fid: dict | None, cmd: str, wall: float, load: tuple = ()
) -> str:
    L = [
        f"# Plan validation ({DATE})",
        "",
        f"- Machine: {MACHINE} ({platform.python_version()}, {platform.machine()})",
        f"- Command: `{cmd}`",
        f"- Wall time: {wall:.0f} s",
        "- 1-minute load average at start / end: "
        + " / ".join(f"{x:.1f}" for x in load)
        + " (section 4's timings move with the "
        "machine's load)",
        "",
        "Cost models: `fsmoe-testbed-a` = FSMoE's published fits; `fsmoe-testbed-b` = derived "
        "from them by datasheet rate ratios (see `moeflow.perf.presets`). Layout: N_EP = nodes, "
        "N_ESP = GPUs per node, one expert per EP rank, top-2, fp16 messages. Rows after the "
        "first two are sensitivity checks, not the presets: all GPUs in one EP group "
        "(no ag/rs), and the published ag beta replaced by rs's (see section 2).",
        "",
        "## 1. Optimality over FSMoE's 1458-layer sweep (target: within 1% of the best "
        "r in 1..16 in >= 99% of layers)",
        "",
        "| testbed | layers | within 1% | worst gap | within 1% (four-case model only, no sim "
        "in the integer search) | r_fwd != r_bwd |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for s in sw:
        L.append(
            f"| {s['cluster']} | {s['layers']} | {100 * s['within_1pct']:.2f}% | "
            f"{100 * s['worst_gap']:.2f}% | {100 * s['within_1pct_model_only']:.2f}% | "
            f"{s['fwd_ne_bwd']} of {s['layers']} (paper: 912 of 1458) |"
        )
    L += [
        "",
        "## 2. Simulated speedup of the FSMoE plan",
        "",
        "Per layer (forward + backward, no gradient all-reduce), over the 1458 layers:",
        "",
        "| testbed | vs Tutel-style r=2 | vs Tutel+PipeMoE (paper: 1.18x A, 1.22x B) | "
        "vs DeepSpeed-MoE |",
        "| --- | --- | --- | --- |",
    ]
    for s in sw:
        sp = s["speedup"]
        cell = lambda k, sp=sp: (
            f"mean {sp[k]['mean']:.3f}x, range "  # noqa: E731
            f"{sp[k]['min']:.3f}-{sp[k]['max']:.3f}x"
        )
        L.append(
            f"| {s['cluster']} | {cell('tutel(r=2)')} | {cell('tutel+pipemoe')} | "
            f"{cell('deepspeed-moe')} |"
        )
    L += [
        "",
        "Binding form of the forward pass at the relaxed optimum (four-case model):",
        "",
        "| testbed | " + " | ".join(("inter", "compute", "a2a", "intra")) + " |",
        "| --- | --- | --- | --- | --- |",
    ]
    for s in sw:
        c = s["binding_case_fwd"]
        L.append(
            f"| {s['cluster']} | "
            + " | ".join(str(c.get(k, 0)) for k in ("inter", "compute", "a2a", "intra"))
            + " |"
        )
    L += ["", gaps(sw, mods)]
    L += ablation_lines(sw)
    L += [
        "",
        "Whole-model training step (all MoE layers, attention GEMMs, data-parallel "
        "gradient all-reduce partitioned by FSMoE, after the backward for the baselines; "
        "Lina fills idle windows greedily). Speedup of FSMoE over each (paper: 1.28-3.01x "
        "over DeepSpeed-MoE):",
        "",
        "| testbed | model | tokens/GPU | FSMoE step (ms) | FSMoE (r_fwd, r_bwd) | "
        "vs DeepSpeed-MoE | vs Tutel r=2 | vs Tutel+PipeMoE | vs Lina | solve (ms) |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for tb, rows in mods.items():
        for r in rows:
            degs = ", ".join(f"({a},{b})" for a, b in r["fsmoe_degrees"][:3])
            L.append(
                f"| {tb} | {r['model']} | {r['tokens_per_gpu']} | {r['fsmoe_ms']:.0f} | "
                f"{degs} | {r['deepspeed-moe']:.3f}x | {r['tutel(r=2)']:.3f}x | "
                f"{r['tutel+pipemoe']:.3f}x | {r['lina']:.3f}x | {r['solve_ms']:.0f} |"
            )
    L += [
        "",
        "## 3. Solve time per layer (forward + backward; target median < 20 ms, paper 193 ms)",
        "",
        "| testbed | median | p99 |",
        "| --- | --- | --- |",
    ]
    for s in sw:
        L.append(f"| {s['cluster']} | {s['solve_ms_median']:.2f} ms | {s['solve_ms_p99']:.2f} ms |")
    L += ["", "## 4. Fidelity on this machine (4 gloo ranks = 2 nodes x 2; target within 15%)", ""]
    if fid is None:
        L.append("Not run in this invocation (pass `--fidelity`).")
    else:
        L += [
            f"Layer: MoEConfig({', '.join(f'{k}={v}' for k, v in FID_CFG.items())}), "
            f"SwiGLU, dropless, fp32, {FID_TOKENS} tokens per rank, dispatcher a2a, "
            f"runtime: {fid['runtime']}. Step = forward + backward (median of timed "
            "iterations, slowest rank; the degrees are timed round robin).",
            "",
            "| r | predicted (ms) | of which fwd pass / bwd pass / not overlapped rest | "
            "other resource model (ms) | measured (ms), median | individual runs (ms) | "
            "error vs median | error vs fastest run | error vs median, drift-corrected |",
            "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
        ]
        for r in fid["rows"]:
            meas = "-" if r["measured_ms"] is None else f"{r['measured_ms']:.1f}"
            err = "-" if r["error"] is None else f"{100 * r['error']:+.1f}%"
            runs = ", ".join(f"{v:.0f}" for v in (r["measured_all"] or []))
            other = "separate" if r["mode"] == "shared" else "shared"
            err_b = "-" if r["error_best"] is None else f"{100 * r['error_best']:+.1f}%"
            L.append(
                f"| {r['r']} | {r['predicted_ms']:.1f} ({r['mode']}) | "
                f"{r['pred_fwd']:.1f} / {r['pred_bwd']:.1f} / {r['pred_other']:.1f} | "
                f"{r['pred_' + other]:.1f} ({other}) | {meas} | {runs} | {err} | "
                f"{err_b} | "
                + ("-" if r["error_drift"] is None else f"{100 * r['error_drift']:+.1f}%")
                + " |"
            )
        c = fid["calib"]
        pr = c["probe"]
        if fid.get("drift"):
            L += [
                "",
                "Drift correction: the single-device layer (forward + backward on the local "
                f"tokens) took {c['single_device_layer_ms']:.1f} ms at calibration and a "
                f"median {statistics.median(fid['reference_ms']):.1f} ms when timed in the "
                "same rounds as the runtime (runs: "
                + ", ".join(f"{v:.0f}" for v in fid["reference_ms"])
                + f"); the last error "
                f"column scales the prediction by that ratio ({fid['drift']:.2f}), i.e. "
                "compares with a reference measured under the same load. The target is "
                "judged on the plain median column.",
            ]
        L += [
            "",
            "Resource model: the simulator builds the runtime's wavefront order. An "
            "overlap probe (async a2a of the r = 1 dispatch size issued, expert FFN forward "
            f"run, then waited) measured compute {pr['compute_ms']:.1f} ms, a2a "
            f"{pr['a2a_ms']:.1f} ms, both {pr['both_ms']:.1f} ms: overlap "
            f"{pr['overlap']:.2f} of the shorter one. At >= 0.5 link and compute are "
            "separate resources ('separate'); below, gloo's threads and the compute share "
            "this host's cores and are one resource ('shared').",
            "",
            f"Expert FFN fits (all 4 ranks at once): forward alpha "
            f"{c['exp_fwd']['alpha']:.3g} ms, beta {c['exp_fwd']['beta']:.3g} ms/FLOP "
            f"(R^2 {c['exp_fwd']['r2']:.4f}); backward alpha {c['exp_bwd']['alpha']:.3g} ms, "
            f"beta {c['exp_bwd']['beta']:.3g} ms/FLOP (R^2 {c['exp_bwd']['r2']:.4f}). "
            f"Single-device layer forward+backward on the local tokens: "
            f"{c['single_device_layer_ms']:.1f} ms, of which {c['rest_ms']:.1f} ms is not "
            "expert FFN.",
            "",
            "Profiled fits used for the prediction:",
            "",
            "| primitive | alpha (ms) | beta (ms/unit) | R^2 |",
            "| --- | --- | --- | --- |",
        ]
        for k, c in sorted(fid["perf"]["costs"].items()):
            L.append(f"| {k} | {c['alpha']:.4g} | {c['beta']:.4g} | {c['r2']:.4f} |")
    return "\n".join(L) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--fidelity", action="store_true", help="also run the gloo fidelity check")
    ap.add_argument("--fidelity-only", action="store_true")
    ap.add_argument("--iters", type=int, default=5)
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"))
    ap.add_argument("--host", default=f"{os.cpu_count()}cpu-x86", help="machine label")
    args = ap.parse_args(argv)
    t0 = time.time()
    load0 = os.getloadavg()[0]
    sw, mods = [], {}
    if not args.fidelity_only:
        for label, name, perf, ep, esp in variants():
            s = sweep(label, perf, ep, esp)
            sw.append(s)
            print(json.dumps(s, indent=1), flush=True)
            if label == name:
                mods[name] = models(name)
                print(json.dumps(mods[name], indent=1), flush=True)
    fid = fidelity(args.iters) if (args.fidelity or args.fidelity_only) else None
    if fid:
        print(json.dumps(fid["rows"], indent=1))
    cmd = "python benchmarks/plan_validation.py " + " ".join(argv or sys.argv[1:])
    md = render(sw, mods, fid, cmd.strip(), time.time() - t0, (load0, os.getloadavg()[0]))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    name = f"plan_validation_{args.host}_{DATE}" + ("_fidelity" if args.fidelity_only else "")
    (out / f"{name}.md").write_text(md)
    (out / f"{name}.json").write_text(
        json.dumps({"sweep": sw, "models": mods, "fidelity": fid}, indent=1)
    )
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
