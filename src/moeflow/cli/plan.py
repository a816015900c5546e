"""``moeflow plan``: choose FSMoE pipeline degrees and compare with the baselines.

    moeflow plan --model mixtral-8x7b --cluster fsmoe-testbed-a --tokens 8192 [--json]

``--tokens`` is tokens per GPU per step (B * L). The default layout follows FSMoE: expert
parallelism across nodes (N_EP = nodes) and expert sharding inside a node
(N_ESP = GPUs per node); ``--esp 1`` puts all GPUs in one EP group instead.

Every flag is checked by :func:`validate_common_args` / :func:`validate_plan_args` before any
planning: a bad value raises :class:`moeflow.errors.ConfigError` naming the flag, a missing
or malformed ``--perf`` file :class:`moeflow.errors.InputError` naming the file, and output
paths are checked before the work runs. Upper limits keep the run bounded: pipeline degrees
(``--r-max``, ``--tutel-r``) at most :data:`MAX_DEGREE`, at most :data:`MAX_LAYERS` layers,
:data:`MAX_NODES` nodes and :data:`MAX_TOKENS` tokens per GPU.
"""

from __future__ import annotations

import argparse
import json
import math

from moeflow.errors import ConfigError
from moeflow.files import atomic_path, check_output
from moeflow.plan.io import (
    MAX_DEGREE,
    MAX_LAYERS,
    MAX_NODES,
    MAX_TOKENS,
    load_perf_file,
)
from moeflow.validate import positive_int

#: ``--method``: FSMoE degrees, HierMoE dedup levels, or Parm schedules
METHODS = ("fsmoe", "hiermoe", "parm")


def add_common_arguments(p: argparse.ArgumentParser) -> None:
    from moeflow.clusters import cluster_names
    from moeflow.config import preset_names

    p.add_argument("--model", default="mixtral-8x7b", help=f"one of {preset_names()}")
    p.add_argument("--cluster", default="fsmoe-testbed-a", help=f"one of {cluster_names()}")
    p.add_argument("--tokens", type=int, default=8192, help="tokens per GPU per step (B*L)")
    p.add_argument(
        "--seq-len", type=int, default=None, help="sequence length L (default min(tokens, 4096))"
    )
    p.add_argument("--nodes", type=int, default=None, help="override the cluster's node count")
    p.add_argument(
        "--esp",
        type=int,
        default=None,
        help="expert-sharding degree inside a node (default: GPUs per node)",
    )
    p.add_argument(
        "--layers", type=int, default=None, help="number of MoE layers (default: the model's)"
    )
    p.add_argument(
        "--perf",
        default=None,
        help="PerfModel JSON (from `moeflow profile`); default: the cluster preset",
    )
    p.add_argument(
        "--r-max", type=int, default=16, help=f"largest pipeline degree searched (1..{MAX_DEGREE})"
    )


def add_plan_arguments(p: argparse.ArgumentParser) -> None:
    add_common_arguments(p)
    p.add_argument(
        "--tutel-r", type=int, default=2, help=f"Tutel-style fixed degree (1..{MAX_DEGREE})"
    )
    p.add_argument("--lina-chunk-mb", type=float, default=4.0, help="Lina chunk size (MiB)")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.add_argument(
        "--out",
        default=None,
        help="write the FSMoE plan JSON here (atomically; refused if it exists, unless --force)",
    )
    p.add_argument(
        "--force", action="store_true", help="replace an existing --out file (never the --perf)"
    )
    p.add_argument(
        "--method",
        default="fsmoe",
        choices=METHODS,
        help="fsmoe: pipeline degrees vs baselines; hiermoe: dedup level per layer "
        "(HierMoE Eq. 6); parm: MP+EP+ESP schedule per layer (Parm, α-β)",
    )


def validate_common_args(args) -> None:
    """Check the flags shared by ``plan`` and ``simulate`` (ConfigError naming the flag)."""
    args.tokens = positive_int("--tokens", args.tokens, maximum=MAX_TOKENS)
    args.seq_len = positive_int("--seq-len", args.seq_len, maximum=args.tokens, allow_none=True)
    args.nodes = positive_int("--nodes", args.nodes, maximum=MAX_NODES, allow_none=True)
    args.esp = positive_int("--esp", args.esp, allow_none=True)
    args.layers = positive_int("--layers", args.layers, maximum=MAX_LAYERS, allow_none=True)
    args.r_max = positive_int("--r-max", args.r_max, maximum=MAX_DEGREE)
    if getattr(args, "tutel_r", None) is not None:
        args.tutel_r = positive_int("--tutel-r", args.tutel_r, maximum=MAX_DEGREE)


def validate_plan_args(args) -> None:
    """Check every ``moeflow plan`` flag before planning (ConfigError / InputError)."""
    validate_common_args(args)
    mb = args.lina_chunk_mb
    if not (isinstance(mb, (int, float)) and math.isfinite(mb) and mb > 0):
        raise ConfigError("--lina-chunk-mb", mb, "a finite number > 0 (MiB)")
    check_output("--out", args.out, inputs=[args.perf], force=getattr(args, "force", False))


def setup(args):
    """(workloads, perf, cluster, model preset) from the common arguments."""
    from moeflow.clusters import cluster_preset
    from moeflow.config import model_preset
    from moeflow.perf import perf_preset
    from moeflow.perf.presets import h200_8x_ib
    from moeflow.plan.workload import LayerWorkload

    mp = model_preset(args.model)
    cluster = cluster_preset(args.cluster)
    if args.nodes is not None:
        cluster = cluster.with_nodes(args.nodes)
    if args.perf:
        perf = load_perf_file(args.perf)
    elif cluster.name == "h200-8x-ib":
        perf = h200_8x_ib(cluster.nodes)
    else:
        perf = perf_preset(cluster.name)
    esp = cluster.gpus_per_node if args.esp is None else args.esp
    if cluster.gpus_per_node % esp:  # an ESP group lives inside one node (FSMoE's layout)
        from moeflow.errors import DistributedConfigError

        raise DistributedConfigError(
            f"--esp {esp} must divide the GPUs per node ({cluster.gpus_per_node}) of {cluster.name}"
        )
    w = LayerWorkload.from_config(
        mp,
        tokens=args.tokens,
        seq_len=args.seq_len,
        n_ep=cluster.world_size // esp,
        n_esp=esp,
        n_dp=1,
        bytes_per_element=perf.bytes_per_element,
    )
    layers = mp.num_layers if args.layers is None else args.layers
    return [w] * layers, perf, cluster, mp


def compare(args) -> dict:
    from moeflow.plan import baselines, fsmoe

    workloads, perf, cluster, mp = setup(args)
    fs = fsmoe.plan(workloads, perf, cluster, r_max=args.r_max, model=mp.name)
    others = [
        baselines.deepspeed_moe(workloads, perf, cluster, model=mp.name),
        baselines.tutel(workloads, perf, cluster, r=args.tutel_r, model=mp.name),
        baselines.pipemoe(workloads, perf, cluster, r_max=args.r_max, model=mp.name),
        baselines.lina(
            workloads,
            perf,
            cluster,
            chunk_bytes=args.lina_chunk_mb * 2**20,
            r_max=args.r_max,
            model=mp.name,
        ),
    ]
    rows = []
    for p in [fs, *others]:
        degs = sorted(set(p.degrees()))
        rows.append(
            {
                "method": p.method,
                "degrees": degs,
                "step_ms": p.predicted_step_ms,
                "fsmoe_speedup": p.predicted_step_ms / fs.predicted_step_ms,
                "tail_ar_MB": p.tail_ar_bytes / 1e6,
                "solve_ms": p.solve_ms,
            }
        )
    return {
        "model": mp.name,
        "cluster": cluster.name,
        "nodes": cluster.nodes,
        "gpus_per_node": cluster.gpus_per_node,
        "tokens_per_gpu": args.tokens,
        "n_ep": workloads[0].n_ep,
        "n_esp": workloads[0].n_esp,
        "layers": len(workloads),
        "perf": perf.name,
        "rows": rows,
        "plan": fs,
    }


def run_method(args) -> int:
    """``--method hiermoe|parm``: the choice per layer (dedup level, or Parm schedule)."""
    from moeflow.plan import hiermoe, parm

    workloads, perf, cluster, mp = setup(args)
    w = workloads[0]
    cfg = mp.moe
    head = {
        "method": args.method,
        "model": mp.name,
        "cluster": cluster.name,
        "nodes": cluster.nodes,
        "gpus_per_node": cluster.gpus_per_node,
        "tokens_per_gpu": args.tokens,
        "layers": len(workloads),
    }
    if args.method == "hiermoe":
        rows = hiermoe.plan_levels(
            num_experts=cfg.num_experts,
            top_k=cfg.top_k,
            hidden=cfg.hidden_size,
            bytes_per_elem=perf.bytes_per_element,
            ranks_per_node=cluster.gpus_per_node // w.n_esp,
            num_ranks=w.n_ep,
            tokens=args.tokens,
            layers=len(workloads),
            links=hiermoe.links_of(cluster),
        )
    else:
        layer = parm.ParmLayer(
            tokens=args.tokens,
            hidden=cfg.hidden_size,
            top_k=cfg.top_k,
            mp=w.n_esp,
            nodes=cluster.nodes,
            bytes_per_elem=perf.bytes_per_element,
        )
        rows = parm.plan_schedules(layer, parm.cluster_of(cluster), len(workloads))
    if args.json:
        print(json.dumps({**head, "rows": rows}, indent=2))
        return 0
    print(
        f"{args.method}: model {mp.name} on {cluster.name} ({cluster.nodes} x "
        f"{cluster.gpus_per_node} GPUs), {args.tokens} tokens/GPU, {len(rows)} MoE layers"
    )
    for row in rows:
        if args.method == "hiermoe":
            ts = ", ".join(f"{t:.3f}" for t in row["t_levels_ms"])
            print(
                f"layer {row['layer']:>3}: dedup level {row['level']:<5} t_d (ms) [{ts}]  "
                f"flat a2a {row['t_flat_ms']:.3f} ms"
            )
        else:
            ts = ", ".join(f"{k} {v:.3f}" for k, v in row["t_ms"].items())
            print(f"layer {row['layer']:>3}: schedule {row['schedule']:<5} (ms: {ts})")
    return 0


def run_plan(args) -> int:
    validate_plan_args(args)
    if getattr(args, "method", "fsmoe") != "fsmoe":
        return run_method(args)
    res = compare(args)
    fs = res.pop("plan")
    if args.out:
        with atomic_path(args.out, force=getattr(args, "force", False)) as tmp:
            fs.save(tmp)
    if args.json:
        res["fsmoe_plan"] = fs.to_dict()
        print(json.dumps(res, indent=2))
        return 0
    print(
        f"model {res['model']} on {res['cluster']} ({res['nodes']} x {res['gpus_per_node']} "
        f"GPUs, N_EP={res['n_ep']}, N_ESP={res['n_esp']}), {res['tokens_per_gpu']} tokens/GPU, "
        f"{res['layers']} MoE layers, costs: {res['perf']}"
    )
    print(
        f"{'method':<16} {'(r_fwd, r_bwd)':<22} {'step (ms)':>12} {'FSMoE speedup':>14} "
        f"{'tail AR (MB)':>13}"
    )
    for row in res["rows"]:
        degs = ", ".join(f"({a},{b})" for a, b in row["degrees"][:3])
        if len(row["degrees"]) > 3:
            degs += ", ..."
        print(
            f"{row['method']:<16} {degs:<22} {row['step_ms']:>12.2f} "
            f"{row['fsmoe_speedup']:>13.3f}x {row['tail_ar_MB']:>13.1f}"
        )
    print(f"FSMoE solve time: {fs.solve_ms:.1f} ms for {len(fs.layers)} layers")
    if args.out:
        print(f"plan written to {args.out}")
    return 0


add_arguments = add_plan_arguments
run = run_plan
