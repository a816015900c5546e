"""moeflow's expert parallelism side by side with DeepSpeed-MoE, Tutel and torchtitan on CPU.

One MoE layer configuration (D, F, E, top-2 softmax, capacity factor f, T tokens per rank,
fp32), fwd+bwd, on these cells:
  * ``single``   - one process: each library's MoE layer without expert parallelism;
  * ``lo2``, ``lo4`` - 2 and 4 gloo ranks on loopback, one "node";
  * ``emu2x1-1gbit``, ``emu2x2-1gbit``, ``emu2x1-100mbit``, ``emu2x2-100mbit`` - 2 emulated
    nodes (network namespaces, links shaped by ``tc tbf``; see ``emulated_cluster.py``) of
    1 or 2 ranks each.

Every implementation runs in its own processes, launched by ``torchrun`` (one launcher per
node), all of a cell's implementations started together and then taking turns: in round r
each implementation in turn times ``--steps`` steps while the others sleep (the order rotates
between rounds, so a load change on the shared machine hits every implementation alike).
A step is ``zero grads; barrier; t0; y = layer(x); y.sum().backward(); t1``, its time the
slowest rank's; the figure is the median over all rounds after ``--warmup`` steps, and
tokens/s counts every rank's tokens (``world * T / step``).

Implementations and what they share (the record repeats this):
  * ``deepspeed`` - ``deepspeed.moe.layer.MoE(ep_size=W, k=2, capacity_factor=f,
    drop_tokens=True, top2_2nd_expert_sampling=False)``, expert = ``Linear(D,F) ->
    GELU(tanh) -> Linear(F,D)`` without biases (one module per local expert, run in a loop);
    fixed-capacity all-to-all of ``E x C`` slots.
  * ``tutel`` - ``tutel.moe.moe_layer`` top-2 gate (``capacity_factor=f``, no noise), built-in
    ``ffn`` experts with GELU(tanh) and no biases; fixed-capacity all-to-all.
  * ``torchtitan`` - torchtitan's ``MoE`` (``TokenChoiceTopKRouter`` softmax top-2 with
    ``route_norm``, ``GroupedExperts``, ``AllToAllTokenDispatcher`` wired to a 1-D "ep"
    device mesh). Dropless and SwiGLU, and its grouped GEMMs always run in bf16 (the module
    casts), so it is compared with moeflow's dropless SwiGLU layer.
  * ``moeflow`` - ``MoELayer(MoEConfig(router="softmax_topk", norm_topk_prob=True,
    expert_type="gelu", capacity_factor=f))`` under ``ExpertParallel`` with the flat ``a2a``
    dispatcher, the hierarchical ``2dh`` one, and ``a2a`` with pipeline degrees planned by the
    FSMoE planner (ASPLOS'25, §4) from a profile of this very cluster
    (``moeflow.perf.profile`` + ``moeflow.plan.fsmoe.plan_layer``); plus
    ``expert_type="swiglu", capacity_factor=None`` (dropless) for the torchtitan pairing.
    Same drop rule as DeepSpeed and Tutel (GShard: first choices first, then token order),
    same capacity ``ceil(f k T / E)`` when ``f k T / E`` is an integer.

A peer that is not installed, or that fails, is reported with the reason.

    python benchmarks/peers_ep.py run                     # every cell, default sizes, record
    python benchmarks/peers_ep.py run --cells lo2 --tokens 64 --no-record
Peers come from a separate virtual environment (``benchmarks/peers/setup_env.sh``); its
interpreter is used for every implementation (``--python``, default ``.venv-peers``).
Emulated cells need root; without it they are reported as skipped.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import traceback

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
IMPLS = ("deepspeed", "tutel", "torchtitan", "moeflow")
PEERS = ("deepspeed", "tutel", "torchtitan")
#: fixed pipeline degrees (r_fwd = r_bwd = r) of the ``a2a`` dispatcher: the planned row is
#: compared with the best of them in the same cell (r = 1 is ``moeflow-a2a``)
FIXED_DEGREES = (2, 4, 8)
FIXED_VARIANTS = ("moeflow-a2a",) + tuple(f"moeflow-a2a-r{r}" for r in FIXED_DEGREES)
#: which moeflow variants have a peer's semantics (capacity drop + GELU, or dropless SwiGLU)
DROP_VARIANTS = (
    "moeflow",
    "moeflow-capacity",
    *FIXED_VARIANTS,
    "moeflow-2dh",
    "moeflow-planned",
)
DROPLESS_VARIANT = "moeflow-dropless-swiglu"
#: the same in bf16 (parameters and activations): torchtitan's grouped GEMMs always run in bf16
DROPLESS_BF16 = "moeflow-dropless-swiglu-bf16"
PAIRS = {
    "deepspeed": DROP_VARIANTS,
    "tutel": DROP_VARIANTS,
    "torchtitan": (DROPLESS_VARIANT, DROPLESS_BF16),
}


@dataclasses.dataclass(frozen=True)
class Cell:
    name: str
    nodes: int
    ranks_per_node: int
    rate: str | None = None  # None: loopback; else tc rate of each node's link

    @property
    def world(self) -> int:
        return self.nodes * self.ranks_per_node


CELLS = {
    c.name: c
    for c in (
        Cell("single", 1, 1),
        Cell("lo2", 1, 2),
        Cell("lo4", 1, 4),
        Cell("emu2x1-1gbit", 2, 1, "1gbit"),
        Cell("emu2x2-1gbit", 2, 2, "1gbit"),
        Cell("emu2x1-100mbit", 2, 1, "100mbit"),
        Cell("emu2x2-100mbit", 2, 2, "100mbit"),
    )
}


# ============================================================================================
# worker side: runs under torchrun, one process per rank
# ============================================================================================
def _wait_file(path: str, poll_s: float = 0.01) -> None:
    while not os.path.exists(path):
        time.sleep(poll_s)


def _touch(path: str, text: str = "") -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def _versions(impl: str) -> dict:
    import importlib.metadata as md

    import torch

    out = {"torch": torch.__version__}
    dist_name = {
        "deepspeed": "deepspeed",
        "tutel": "tutel",
        "torchtitan": "torchtitan",
        "moeflow": "moeflow",
    }[impl]
    try:
        out[impl] = md.version(dist_name)
    except md.PackageNotFoundError:
        out[impl] = "unknown"
    src = os.path.join(sys.prefix, "tutel-source.txt")  # written by peers/setup_env.sh
    if impl == "tutel" and os.path.exists(src):
        with open(src) as f:
            out[impl] += f" (source {f.read().strip()[:12]})"
    return out


def _build_deepspeed(c: dict, W: int):
    import deepspeed
    import torch.nn as nn
    from deepspeed.moe.layer import MoE

    D, F, E = c["dim"], c["ffn"], c["experts"]
    expert = nn.Sequential(
        nn.Linear(D, F, bias=False), nn.GELU(approximate="tanh"), nn.Linear(F, D, bias=False)
    )
    m = MoE(
        hidden_size=D,
        expert=expert,
        num_experts=E,
        ep_size=W,
        k=c["top_k"],
        capacity_factor=c["capacity_factor"],
        eval_capacity_factor=c["capacity_factor"],
        min_capacity=0,
        drop_tokens=True,
        use_rts=False,
        noisy_gate_policy=None,
        top2_2nd_expert_sampling=False,
    )  # plain top-2 (its default samples the 2nd)
    m.set_deepspeed_parallelism()  # what the DeepSpeed engine does: creates the EP group
    del deepspeed
    return {"deepspeed": (m, lambda x: m(x)[0])}


def _build_tutel(c: dict, W: int):
    import torch.distributed as dist
    import torch.nn.functional as Fn
    from tutel import moe as tutel_moe

    D, F, E = c["dim"], c["ffn"], c["experts"]
    m = tutel_moe.moe_layer(
        gate_type={
            "type": "top",
            "k": c["top_k"],
            "capacity_factor": c["capacity_factor"],
            "gate_noise": 0.0,
        },
        model_dim=D,
        experts={
            "type": "ffn",
            "count_per_node": E // W,
            "hidden_size_per_expert": F,
            "activation_fn": lambda x: Fn.gelu(x, approximate="tanh"),
            "has_fc1_bias": False,
            "has_fc2_bias": False,
        },
        scan_expert_func=lambda name, p: setattr(p, "skip_allreduce", True),
        group=dist.group.WORLD,
    )
    return {"tutel": (m, m)}


def _build_torchtitan(c: dict, W: int):
    import torch
    from torchtitan.distributed.utils import set_spmd_backend
    from torchtitan.models.common.linear import Linear
    from torchtitan.models.common.moe import (
        GroupedExperts,
        MoE,
        RoutedExperts,
        TokenChoiceTopKRouter,
    )
    from torchtitan.models.common.token_dispatcher import AllToAllTokenDispatcher

    # the DTensor path: "spmd_types" (the default) needs a model parallelized by the trainer
    set_spmd_backend("partial_dtensor")
    D, F, E, K = c["dim"], c["ffn"], c["experts"], c["top_k"]
    cfg = MoE.Config(
        num_experts=E,
        routed_experts=RoutedExperts.Config(
            inner_experts=GroupedExperts.Config(dim=D, hidden_dim=F, num_experts=E // W),
            token_dispatcher=AllToAllTokenDispatcher.Config(num_experts=E, top_k=K),
        ),
        router=TokenChoiceTopKRouter.Config(
            num_experts=E,
            gate=Linear.Config(in_features=D, out_features=E, bias=False),
            top_k=K,
            score_func="softmax",
            route_norm=True,
        ),
        load_balance_coeff=None,
    )
    m = cfg.build()
    with torch.no_grad():  # the trainer's init; the expert weights of this rank's shard
        for name, p in m.named_parameters():
            p.normal_(0.0, D**-0.5 if "gate" in name else 0.02)
    mesh = None
    if W > 1:
        from torch.distributed.device_mesh import init_device_mesh

        mesh = init_device_mesh("cpu", (W,), mesh_dim_names=("ep",))
    m.routed_experts.token_dispatcher.wire_meshes(ep_mesh=mesh)
    return {"torchtitan": (m, lambda x: m(x.view(1, *x.shape)))}


def _plan_degrees(c: dict, W: int, nodes: int, cfg) -> dict:
    """FSMoE degrees for this layer from a profile of the cluster we run on."""
    from moeflow.apps.profile import profile
    from moeflow.plan import LayerWorkload
    from moeflow.plan.fsmoe import plan_layer

    t0 = time.perf_counter()
    perf = profile(
        None,
        nodes=nodes,
        sizes=(2**16, 2**18, 2**20),
        gemm_sizes=(64, 128, 256),
        reps=2,
        trials=1,
        progress=False,
    )
    w = LayerWorkload.from_config(cfg, tokens=c["tokens"], n_ep=W, bytes_per_element=4)
    d = plan_layer(w, perf)
    return {
        "r_fwd": d.r_fwd,
        "r_bwd": d.r_bwd,
        "profile_s": time.perf_counter() - t0,
        "a2a_alpha_ms": perf.cost("a2a").alpha,
        "a2a_GBps": 1e-6 / perf.cost("a2a").beta if perf.cost("a2a").beta > 0 else None,
        "case_fwd": d.fwd.case,
        "case_bwd": d.bwd.case,
    }


def _build_moeflow(c: dict, W: int, nodes: int, meta: dict, deferred: dict):
    """moeflow's variants; the planned one goes into ``deferred``: it profiles the ranks, so
    it is built in moeflow's first turn, when the other implementations are idle."""
    import torch

    from moeflow import MoEConfig, MoELayer

    base = dict(
        hidden_size=c["dim"],
        ffn_hidden_size=c["ffn"],
        num_experts=c["experts"],
        top_k=c["top_k"],
        router="softmax_topk",
        norm_topk_prob=True,
    )
    drop = MoEConfig(**base, expert_type="gelu", capacity_factor=c["capacity_factor"])
    dropless = MoEConfig(**base, expert_type="swiglu", capacity_factor=None)

    def layer(cfg):
        torch.manual_seed(0)  # every rank the same layer (ExpertParallel slices it)
        return MoELayer(cfg)

    def bf16(m):  # fp32 in and out, as torchtitan's layer; bf16 parameters and GEMMs inside
        m.to(torch.bfloat16)
        return (m, lambda x: m(x.to(torch.bfloat16)).float())

    if W == 1:
        a, b = layer(drop), layer(dropless)
        return {"moeflow": (a, a), DROPLESS_VARIANT: (b, b), DROPLESS_BF16: bf16(layer(dropless))}
    from moeflow.comm import Topology
    from moeflow.parallel import ExpertParallel

    topo = Topology.from_env()

    def ep(cfg, **kw):
        m = ExpertParallel(layer(cfg), topology=topo, timeout_s=600, **kw)
        return (m, m)

    def planned():
        # A profile taken on a loaded machine can fit a negative slope, which the planner
        # rejects (InputError: negative task duration): profile again, then report it.
        errors = []
        for _ in range(2):
            try:
                plan = _plan_degrees(c, W, nodes, drop)
                break
            except Exception as e:  # noqa: BLE001 - the record names it
                errors.append(f"{type(e).__name__}: {e}")
        else:
            meta["planned_error"] = errors
            return None
        meta["planned"] = plan
        return ep(drop, dispatcher="a2a", r_fwd=plan["r_fwd"], r_bwd=plan["r_bwd"])

    deferred["moeflow-planned"] = planned
    out = {
        "moeflow-capacity": ep(drop, dispatcher="capacity"),
        "moeflow-a2a": ep(drop, dispatcher="a2a"),
        **{
            f"moeflow-a2a-r{r}": ep(drop, dispatcher="a2a", r_fwd=r, r_bwd=r) for r in FIXED_DEGREES
        },
        "moeflow-2dh": ep(drop, dispatcher="2dh"),
        DROPLESS_VARIANT: ep(dropless, dispatcher="a2a"),
    }
    out[DROPLESS_BF16] = bf16(
        ExpertParallel(
            layer(dropless).to(torch.bfloat16), topology=topo, timeout_s=600, dispatcher="a2a"
        )
    )
    return out


def worker(args) -> int:
    """One rank of one implementation: build, then time steps when the driver says go."""
    import datetime as dt

    import torch
    import torch.distributed as dist

    d = args.dir
    with open(os.path.join(d, "config.json")) as f:
        c = json.load(f)
    impl = args.impl
    rank = int(os.environ.get("RANK", "0"))
    nodes = int(c["nodes"])
    try:
        torch.set_num_threads(int(c["threads"]))
        if impl == "deepspeed":
            import deepspeed

            deepspeed.init_distributed(dist_backend="gloo", timeout=dt.timedelta(seconds=900))
        else:
            dist.init_process_group("gloo", timeout=dt.timedelta(seconds=900))
        W = dist.get_world_size()
        meta = {"versions": _versions(impl), "world": W, "threads": torch.get_num_threads()}
        build = {
            "deepspeed": lambda: _build_deepspeed(c, W),
            "tutel": lambda: _build_tutel(c, W),
            "torchtitan": lambda: _build_torchtitan(c, W),
            "moeflow": lambda: _build_moeflow(c, W, nodes, meta, deferred),
        }[impl]
        deferred: dict = {}
        variants = build()
        meta["variants"] = list(variants) + list(deferred)
        g = torch.Generator().manual_seed(1000 + rank)
        x = torch.randn(c["tokens"], c["dim"], generator=g).requires_grad_(True)

        def step(module, fn) -> float:
            module.zero_grad(set_to_none=True)
            x.grad = None
            dist.barrier()
            t0 = time.perf_counter()
            fn(x).sum().backward()
            t = torch.tensor([time.perf_counter() - t0], dtype=torch.float64)
            dist.all_reduce(t, op=dist.ReduceOp.MAX)  # a step ends when its last rank ends
            return float(t)

        for module, fn in variants.values():  # one untimed step: lazy init, first-call costs
            step(module, fn)
        dist.barrier()
        if rank == 0:
            _touch(os.path.join(d, f"{impl}.meta.json"), json.dumps(meta))
            _touch(os.path.join(d, f"{impl}.ready"))
        for r in range(c["rounds"]):
            _wait_file(os.path.join(d, f"go.{impl}.{r}"))
            for name, make in deferred.items():  # in our turn: the others are idle
                built = make()
                if built is not None:
                    variants[name] = built
                    step(*built)
            if deferred and rank == 0:
                _touch(os.path.join(d, f"{impl}.meta.json"), json.dumps(meta))
            deferred = {}
            times = {}
            items = list(variants.items())  # the variants take turns too (rotating order)
            items = items[r % len(items) :] + items[: r % len(items)]
            for name, (module, fn) in items:
                n = c["steps"] + (c["warmup"] if r == 0 else 0)
                ts = [step(module, fn) for _ in range(n)]
                times[name] = ts[c["warmup"] :] if r == 0 else ts
            if rank == 0:
                _touch(os.path.join(d, f"{impl}.r{r}.json"), json.dumps(times))
                _touch(os.path.join(d, f"done.{impl}.{r}"))
        if c.get("breakdown"):
            _wait_file(os.path.join(d, f"go.{impl}.breakdown"))
            prof = _breakdown(variants, step, rank)
            if rank == 0:
                _touch(os.path.join(d, f"{impl}.breakdown.json"), json.dumps(prof))
                _touch(os.path.join(d, f"done.{impl}.breakdown"))
        dist.barrier()
    except BaseException as e:  # noqa: BLE001 - the driver reports it
        _touch(
            os.path.join(d, f"{impl}.error.{rank}"),
            f"{type(e).__name__}: {e}\n{traceback.format_exc()}",
        )
        sys.stdout.flush()
        os._exit(1)
    sys.stdout.flush()
    sys.stderr.flush()
    # skip interpreter teardown: Tutel's extension aborts in a static destructor at exit
    os._exit(0)


BREAKDOWN_STEPS = 2


def _breakdown(variants: dict, step, rank: int, steps: int = BREAKDOWN_STEPS) -> dict:
    """torch.profiler over ``steps`` steps of each variant: where the time goes, by operator.

    Self CPU time of the top operators on rank 0, and the share of the step spent waiting
    in collectives (gloo ops), the router, the expert GEMMs and the permutations.
    """
    from torch.profiler import ProfilerActivity, profile

    out = {}
    for name, (module, fn) in variants.items():
        step(module, fn)
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            wall = sum(step(module, fn) for _ in range(steps))
        rows = []
        for ev in prof.key_averages():
            rows.append((ev.key, ev.self_cpu_time_total / 1e3 / steps, ev.count // steps))
        rows.sort(key=lambda r: -r[1])
        out[name] = {
            "step_ms": wall * 1e3 / steps,
            "top": [[k, round(ms, 3), n] for k, ms, n in rows[:14]],
        }
    return out


# ============================================================================================
# driver side
# ============================================================================================
PROBES = {
    "deepspeed": "import deepspeed.moe.layer",
    "tutel": "import torch, tutel_custom_kernel; from tutel import moe",
    "torchtitan": "import torchtitan.models.common.moe, torchtitan.models.common.token_dispatcher",
    "moeflow": "import moeflow.parallel",
}


def probe(python: str, impls) -> dict:
    """``{impl: None}`` when ``impl`` imports under ``python``, else why not (the error line).

    The imports run in parallel, one interpreter each.
    """
    if not os.path.exists(python):
        return {i: f"interpreter {python} does not exist" for i in impls}
    env = {**os.environ, "DS_ACCELERATOR": "cpu"}
    procs = {
        i: subprocess.Popen(
            [python, "-c", PROBES[i]],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )
        for i in impls
    }
    out = {}
    for i, p in procs.items():
        _, err = p.communicate(timeout=300)
        lines = [ln for ln in err.strip().splitlines() if ln.strip()]
        out[i] = (
            None if p.returncode == 0 else (lines[-1] if lines else f"exit code {p.returncode}")
        )
    return out


def _free_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def _launch_cmds(cell: Cell, impl: str, python: str, d: str, port: int, master: str) -> list:
    cmds = []
    for i in range(cell.nodes):
        cmds.append(
            [
                python,
                "-m",
                "torch.distributed.run",
                "--nnodes",
                str(cell.nodes),
                "--node-rank",
                str(i),
                "--nproc-per-node",
                str(cell.ranks_per_node),
                "--master-addr",
                master,
                "--master-port",
                str(port),
                os.path.abspath(__file__),
                "worker",
                "--impl",
                impl,
                "--dir",
                d,
            ]
        )
    return cmds


def _reason(d: str, impl: str, procs) -> str | None:
    errs = sorted(f for f in os.listdir(d) if f.startswith(f"{impl}.error."))
    if errs:
        with open(os.path.join(d, errs[0])) as f:
            return f.readline().strip()
    for p, log in procs:
        if p.poll() not in (None, 0):
            try:
                with open(log) as f:
                    tail = [ln.strip() for ln in f.read().splitlines() if ln.strip()]
            except OSError:
                tail = []
            return f"launcher exit {p.returncode}: " + (tail[-1] if tail else "no output")
    return None


def _wait(d: str, impl: str, name: str, procs, timeout_s: float) -> str | None:
    """Wait for ``name`` in ``d``; None when it came, else the failure reason."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if os.path.exists(os.path.join(d, name)):
            return None
        reason = _reason(d, impl, procs)
        if reason:
            return reason
        time.sleep(0.02)
    return f"timed out after {timeout_s:g} s waiting for {name}"


def _kill(procs) -> None:
    for p, _ in procs:
        if p.poll() is None:
            p.terminate()
    for p, _ in procs:
        try:
            p.wait(20)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait(5)


def run_cell(cell: Cell, impls: list, args, status: dict) -> dict:
    """Launch every available implementation of ``cell``; rounds in turn; raw results."""
    import emulated_cluster as ec

    out = {"cell": dataclasses.asdict(cell), "world": cell.world, "impls": {}, "commands": {}}
    if cell.rate is not None:
        reason = ec.unavailable()
        if reason:
            out["skipped"] = f"emulated cluster unavailable: {reason}"
            return out
    cores = os.cpu_count() or 1
    c = {
        "dim": args.dim,
        "ffn": args.ffn,
        "experts": args.experts,
        "top_k": args.top_k,
        "capacity_factor": args.capacity_factor,
        "tokens": args.tokens,
        "rounds": args.rounds,
        "steps": args.steps,
        "warmup": args.warmup,
        "threads": args.threads or max(1, cores // cell.world),
        "nodes": cell.nodes,
        "breakdown": cell.name in (args.breakdown or []),
    }
    out["threads_per_rank"] = c["threads"]
    d = tempfile.mkdtemp(prefix=f"peers_ep_{cell.name}_")
    with open(os.path.join(d, "config.json"), "w") as f:
        json.dump(c, f)
    launched = {}
    try:
        if cell.rate is not None:
            ec.up(cell.nodes, cell.rate)
            out["link"] = f"tc tbf rate {cell.rate} burst 256kb latency 50ms, both directions"
        master = ec.addr(0) if cell.rate is not None else "127.0.0.1"
        for k, impl in enumerate(impls):
            if status[impl] is not None:
                out["impls"][impl] = {"status": f"not installed: {status[impl]}"}
                continue
            port = 29600 + k if cell.rate is not None else _free_port()
            env = {
                "OMP_NUM_THREADS": str(c["threads"]),
                "DS_ACCELERATOR": "cpu",
                "PYTHONUNBUFFERED": "1",
            }
            procs = []
            cmds = _launch_cmds(cell, impl, args.python, d, port, master)
            out["commands"][impl] = [
                _scrub(" ".join(ec.node_command(i, cm, env) if cell.rate is not None else cm), d)
                for i, cm in enumerate(cmds)
            ]
            for i, cmd in enumerate(cmds):
                if cell.rate is not None:
                    cmd = ec.node_command(i, cmd, env)
                    penv = os.environ.copy()
                else:
                    penv = {**os.environ, **env, "GLOO_SOCKET_IFNAME": "lo"}
                log = os.path.join(d, f"{impl}.node{i}.log")
                with open(log, "w") as lf:
                    procs.append(
                        (
                            subprocess.Popen(
                                cmd, stdout=lf, stderr=subprocess.STDOUT, env=penv, cwd=REPO
                            ),
                            log,
                        )
                    )
            launched[impl] = procs
        ready = []
        for impl, procs in launched.items():
            reason = _wait(d, impl, f"{impl}.ready", procs, args.start_timeout)
            if reason:
                out["impls"][impl] = {"status": f"failed: {reason}"}
                _kill(procs)
            else:
                with open(os.path.join(d, f"{impl}.meta.json")) as f:
                    out["impls"][impl] = {"status": "ok", "meta": json.load(f), "times": {}}
                ready.append(impl)
        for r in range(args.rounds):
            order = ready[r % len(ready) :] + ready[: r % len(ready)] if ready else []
            for impl in order:
                if out["impls"][impl]["status"] != "ok":
                    continue
                _touch(os.path.join(d, f"go.{impl}.{r}"))
                reason = _wait(d, impl, f"done.{impl}.{r}", launched[impl], args.round_timeout)
                if reason:
                    out["impls"][impl]["status"] = f"failed in round {r}: {reason}"
                    _kill(launched[impl])
                    continue
                with open(os.path.join(d, f"{impl}.r{r}.json")) as f:
                    for name, ts in json.load(f).items():
                        out["impls"][impl]["times"].setdefault(name, []).extend(ts)
        if c["breakdown"]:
            for impl in ready:
                if out["impls"][impl]["status"] != "ok":
                    continue
                _touch(os.path.join(d, f"go.{impl}.breakdown"))
                if (
                    _wait(d, impl, f"done.{impl}.breakdown", launched[impl], args.round_timeout)
                    is None
                ):
                    with open(os.path.join(d, f"{impl}.breakdown.json")) as f:
                        out["impls"][impl]["breakdown"] = json.load(f)
        for impl in ready:
            with open(os.path.join(d, f"{impl}.meta.json")) as f:  # updated in round 0
                out["impls"][impl]["meta"] = json.load(f)
            for p, _ in launched[impl]:
                try:
                    p.wait(60)
                except subprocess.TimeoutExpired:
                    pass
    finally:
        for procs in launched.values():
            _kill(procs)
        if cell.rate is not None:
            ec.down()
        if args.keep_dir:
            out["dir"] = d
        else:
            shutil.rmtree(d, ignore_errors=True)
    return out


def _scrub(obj, rundir: str = ""):
    """Paths of this machine out of what the record keeps: the repository becomes ``.``, the
    rendezvous directory ``$RUNDIR``, the temp directory ``$TMPDIR``."""
    if isinstance(obj, str):
        if rundir:
            obj = obj.replace(rundir, "$RUNDIR")
        return (
            obj.replace(REPO + os.sep, "")
            .replace(REPO, ".")
            .replace(tempfile.gettempdir() + os.sep, "$TMPDIR/")
        )
    if isinstance(obj, dict):
        return {k: _scrub(v, rundir) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_scrub(v, rundir) for v in obj]
    return obj


def summarize(res: dict, tokens: int, steps: int) -> list:
    """Rows of one cell: per variant the median, min and max step over every round, the
    median of each round (``steps`` steps), and tokens/s at the median."""
    rows = []
    for impl, v in res.get("impls", {}).items():
        for name, ts in v.get("times", {}).items():
            if ts:
                med = statistics.median(ts)
                rounds = [ts[i : i + steps] for i in range(0, len(ts), steps)]
                rows.append(
                    {
                        "variant": name,
                        "impl": impl,
                        "round_median_ms": [statistics.median(x) * 1e3 for x in rounds],
                        "median_ms": med * 1e3,
                        "min_ms": min(ts) * 1e3,
                        "max_ms": max(ts) * 1e3,
                        "steps": len(ts),
                        "tokens_per_s": res["world"] * tokens / med,
                    }
                )
    return rows


def ratios(rows: list) -> dict:
    """``{(moeflow variant, peer): moeflow tokens/s / peer tokens/s}`` for matching pairs."""
    tps = {r["variant"]: r["tokens_per_s"] for r in rows}
    out = {}
    for peer, mine in PAIRS.items():
        if peer not in tps:
            continue
        for v in mine:
            if v in tps:
                out[(v, peer)] = tps[v] / tps[peer]
    return out


#: the issue's targets: (label, moeflow variant, reference, minimum ratio); the reference
#: ``best-fixed`` is the fastest of FIXED_VARIANTS in the same cell
TARGETS = (
    ("capacity / DeepSpeed-MoE", "capacity", "deepspeed", 1.1),
    ("capacity / Tutel", "capacity", "tutel", 1.1),
    ("bf16 dropless / torchtitan", DROPLESS_BF16, "torchtitan", 1.2),
    ("planned / best fixed degree", "moeflow-planned", "best-fixed", 0.97),
)


def targets(rows: list) -> list:
    """The target ratios of one cell (tokens/s at the median, so reference step / ours), with
    the spread of the same ratio taken round by round (rounds are interleaved)."""
    by = {r["variant"]: r for r in rows}
    out = []
    for label, mine, ref, goal in TARGETS:
        if mine == "capacity":  # one process has no dispatcher: the layer itself
            mine = "moeflow-capacity" if "moeflow-capacity" in by else "moeflow"
        if ref == "best-fixed":
            fixed = [by[v] for v in FIXED_VARIANTS if v in by]
            ref = min(fixed, key=lambda r: r["median_ms"])["variant"] if fixed else None
        if mine not in by or ref not in by:
            continue
        a, b = by[mine], by[ref]
        per_round = [x / y for x, y in zip(b["round_median_ms"], a["round_median_ms"])]
        out.append(
            {
                "target": label,
                "mine": mine,
                "ref": ref,
                "ratio": b["median_ms"] / a["median_ms"],
                "round_ratios": per_round,
                "goal": goal,
                "met": b["median_ms"] / a["median_ms"] >= goal,
            }
        )
    return out


def run(args) -> dict:
    sys.path.insert(0, HERE)
    impls = [i for i in args.impls]
    status = probe(args.python, impls)
    results = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "config": {
            k: getattr(args, k)
            for k in (
                "tokens",
                "dim",
                "ffn",
                "experts",
                "top_k",
                "capacity_factor",
                "rounds",
                "steps",
                "warmup",
            )
        },
        "python": args.python,
        "probe": status,
        "cells": {},
        "load_before": os.getloadavg(),
    }
    for name in args.cells:
        t0 = time.perf_counter()
        res = run_cell(CELLS[name], impls, args, status)
        res["wall_s"] = time.perf_counter() - t0
        res["rows"] = summarize(res, args.tokens, args.steps)
        res["ratios"] = {f"{a}|{b}": x for (a, b), x in ratios(res["rows"]).items()}
        res["targets"] = targets(res["rows"])
        results["cells"][name] = res
        if not args.quiet:
            print(format_cell(name, res), flush=True)
    results["load_after"] = os.getloadavg()
    return results


def format_cell(name: str, res: dict) -> str:
    lines = [f"== {name} ({res['world']} ranks, {res.get('wall_s', 0):.0f} s)"]
    if "skipped" in res:
        return lines[0] + f": skipped: {res['skipped']}"
    for impl, v in res["impls"].items():
        if v["status"] != "ok":
            lines.append(f"  {impl}: {v['status']}")
    for r in res["rows"]:
        lines.append(
            f"  {r['variant']:<26} {r['tokens_per_s']:>10.0f} tok/s  "
            f"median {r['median_ms']:.1f} ms  min-max {r['min_ms']:.1f}-{r['max_ms']:.1f} ms"
            f"  n={r['steps']}"
        )
    for k, x in res["ratios"].items():
        lines.append(f"  {k.replace('|', ' / ')}: {x:.2f}x")
    for t in res["targets"]:
        lines.append(
            f"  target {t['target']} ({t['mine']} / {t['ref']}): {t['ratio']:.2f}x "
            f"(>= {t['goal']}: {'met' if t['met'] else 'MISSED'})"
        )
    return "\n".join(lines)


# ---- record ----------------------------------------------------------------------------------
def _git_commit() -> str:
    r = subprocess.run(
        ["git", "-C", REPO, "rev-parse", "--short", "HEAD"], capture_output=True, text=True
    )
    return r.stdout.strip() or "unknown"


def _cpu_flags() -> str:
    """Which of AVX-512 BF16 / AVX2 the CPU has (lscpu), for the machine line."""
    r = subprocess.run(["lscpu"], capture_output=True, text=True)
    flags = set(r.stdout.split())
    have = [f for f in ("avx512_bf16", "avx2") if f in flags]
    return ", ".join(have) if have else "neither avx512_bf16 nor avx2"


def record_markdown(results: dict, argv: list) -> str:
    from _common import cpu_name

    c = results["config"]
    versions = {}
    for res in results["cells"].values():
        for v in res.get("impls", {}).values():
            if "meta" in v:
                versions.update(v["meta"]["versions"])
    cf = c["capacity_factor"]
    L = [
        "# moeflow expert parallelism vs DeepSpeed-MoE, Tutel, torchtitan (CPU, gloo)",
        "",
        f"date {results['date']}; machine: {os.cpu_count()} cores, {cpu_name()} "
        f"({_cpu_flags()}), no GPU; "
        f"moeflow commit {_git_commit()}; load average before {results['load_before'][0]:.2f}"
        f", after {results['load_after'][0]:.2f}",
        "",
        "Versions: " + ", ".join(f"{k} {v}" for k, v in sorted(versions.items())),
        "",
        f"Configuration: D={c['dim']}, F={c['ffn']}, E={c['experts']}, top-{c['top_k']} softmax "
        f"(renormalised), T={c['tokens']} tokens per rank, fp32, capacity factor {cf} "
        f"(capacity ceil({cf}*{c['top_k']}*T/E) per expert and rank) for DeepSpeed, Tutel and "
        f"moeflow's GELU layer; dropless for torchtitan and moeflow's SwiGLU layer. fwd+bwd "
        f"of `y.sum()`, all parameter gradients; {c['warmup']} warm-up steps, then "
        f"{c['rounds']} rounds x {c['steps']} steps, implementations in turn and each "
        f"implementation's variants in turn (both orders rotating every round); median step "
        f"(slowest rank) over all rounds, spread min-max over every step. tokens/s = world x T "
        f"/ median. The machine is shared (2 cores, other jobs running: see the load "
        f"averages): absolute times are noisy, the interleaved ratios less so.",
        "",
        "Command: `python benchmarks/peers_ep.py " + " ".join(argv) + "`",
        "",
    ]
    L += [
        "How the layers compare:",
        "",
        "- DeepSpeed-MoE: `deepspeed.moe.layer.MoE(ep_size=W, k=2, capacity_factor=f, "
        "drop_tokens=True, use_rts=False, top2_2nd_expert_sampling=False)`: plain top-2 "
        "(the default draws the second expert with Gumbel noise); softmax, the two kept gates "
        "renormalised after dropping); expert `Linear(D,F) -> GELU(tanh) -> Linear(F,D)` "
        "without biases, one module per local expert run in a loop; all-to-all of E x C "
        "zero-padded slots (fixed size, no count exchange); the layer's own init.",
        "- Tutel: `tutel.moe.moe_layer` with the top-2 gate (`capacity_factor=f`, no "
        "noise, `normalize_gate=True`), built-in `ffn` experts with GELU(tanh), no biases "
        "(`has_fc1_bias=False, has_fc2_bias=False`): one batched GEMM over E x C padded "
        "slots; its C++ CPU kernels encode/decode; all-to-all of the padded slots; capacity "
        "`k * int(f * T / E)` (equal to ceil(f k T / E) here).",
        "- torchtitan: its `MoE` module (softmax top-2 with `route_norm`, `GroupedExperts`, "
        "`AllToAllTokenDispatcher` on a 1-D `ep` device mesh, parameters as plain local "
        "shards instead of DTensors, `partial_dtensor` SPMD backend). Dropless, SwiGLU, "
        "and the grouped GEMMs always run in bf16 (the module casts); tokens travel in fp32. "
        "Compared with moeflow's dropless SwiGLU layer in fp32 and in bf16 (bf16 parameters "
        "and activations, so its all-to-all moves half the bytes).",
        '- moeflow: `MoELayer` (`router="softmax_topk"`, `norm_topk_prob=True`, '
        '`expert_type="gelu"`, `capacity_factor=f`: same drop rule as GShard/DeepSpeed/Tutel, '
        "first choices first, then token order) under `ExpertParallel`: `a2a` (counts first, "
        "then only the kept rows), `capacity` (GShard's E x C zero-padded slots, equal "
        "splits, no count exchange before the rows move; the experts compute only the real "
        "rows, whose counts travel beside the first chunk), `2dh` (intra-node then "
        "inter-node), `a2a` at fixed pipeline degrees r_fwd = r_bwd = r "
        f"(r in {', '.join(map(str, FIXED_DEGREES))}), and `a2a` with the FSMoE planner's "
        "degrees (ASPLOS'25) from a `moeflow.perf.profile` of the same ranks at start-up. "
        "Single device: `MoELayer` itself.",
        "- Routers and experts are initialised by each library; the inputs are the same "
        "(seeded per rank); there is no optimizer step, so every step routes alike.",
        "",
    ]
    L += [
        "Launch (every implementation alike; shown for moeflow, `--impl` names the others; "
        "the emulated cells run each node's launcher inside its namespace):",
        "",
    ]
    for name, res in results["cells"].items():
        cm = res.get("commands", {}).get("moeflow")
        if cm:
            L += [f"- {name}: " + " ; ".join(f"`{x}`" for x in cm)]
    L += [
        "",
        "Emulated cluster: `python benchmarks/emulated_cluster.py up 2 RATE` (namespaces "
        "joined through a bridge, `tc qdisc add dev IF root tbf rate RATE burst 256kb latency "
        "50ms` on both ends of each node's veth link), `... down` after the cell.",
        "",
    ]
    L += [
        "## Targets",
        "",
        "Each ratio is tokens/s of the moeflow variant over the reference's at the median step "
        "(equal to the reference's median step over ours); the range is the same ratio taken "
        "round by round (each round times every variant once, in rotating order). The "
        "planned row's reference is the fastest fixed degree r_fwd = r_bwd = r in the same "
        f"cell, r in (1, {', '.join(map(str, FIXED_DEGREES))}). One process has no dispatcher: "
        "its capacity row is the drop layer itself (`moeflow`).",
        "",
        "| cell | target | moeflow / reference | ratio | per-round range | goal | met |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, res in results["cells"].items():
        for t in res.get("targets", []):
            rr = t["round_ratios"]
            L.append(
                f"| {name} | {t['target']} | {t['mine']} / {t['ref']} | {t['ratio']:.2f}x | "
                f"{min(rr):.2f}-{max(rr):.2f}x | >= {t['goal']} | "
                f"{'yes' if t['met'] else '**no**'} |"
            )
    L += [
        "",
        "## Results",
        "",
        "| cell | ranks | implementation | semantics | tokens/s | median ms | min-max ms | "
        "vs DeepSpeed | vs Tutel | vs torchtitan |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    sem = {
        "deepspeed": "f-drop, GELU",
        "tutel": "f-drop, GELU",
        "torchtitan": "dropless, SwiGLU, bf16 GEMMs",
        DROPLESS_VARIANT: "dropless, SwiGLU",
        DROPLESS_BF16: "dropless, SwiGLU, bf16",
    }
    notes = []
    for name, res in results["cells"].items():
        if "skipped" in res:
            L.append(f"| {name} | {res['world']} | - | - | skipped: {res['skipped']} | | | | | |")
            continue
        for impl, v in res["impls"].items():
            if v["status"] != "ok":
                L.append(f"| {name} | {res['world']} | {impl} | - | {v['status']} | | | | | |")
        rat = res["ratios"]
        for r in res["rows"]:
            vname = r["variant"]
            cells = []
            for peer in PEERS:
                x = rat.get(f"{vname}|{peer}")
                cells.append(f"{x:.2f}x" if x is not None else "")
            s = sem.get(vname, "f-drop, GELU")
            if vname == "moeflow-planned":
                p = res["impls"]["moeflow"]["meta"].get("planned", {})
                s += f", r_fwd={p.get('r_fwd')}, r_bwd={p.get('r_bwd')}"
            L.append(
                f"| {name} | {res['world']} | {vname} | {s} | {r['tokens_per_s']:.0f} | "
                f"{r['median_ms']:.1f} | {r['min_ms']:.1f}-{r['max_ms']:.1f} | "
                + " | ".join(cells)
                + " |"
            )
        if "link" in res:
            notes.append(f"- {name}: {res['link']}; {res['threads_per_rank']} thread(s) per rank")
        else:
            notes.append(f"- {name}: loopback; {res['threads_per_rank']} thread(s) per rank")
    L += ["", "Every ratio (moeflow / peer, same semantics), per cell:", ""]
    for name, res in results["cells"].items():
        if res.get("ratios"):
            L.append(
                f"- {name}: "
                + ", ".join(
                    f"{k.split('|')[0]} / {k.split('|')[1]} {x:.2f}x"
                    for k, x in res["ratios"].items()
                )
            )
    L += [
        "",
        "Ratios are moeflow tokens/s over the peer's, for pairs with the same semantics "
        "(the f-drop GELU variants against DeepSpeed and Tutel, the dropless SwiGLU layer "
        "against torchtitan); above 1 means moeflow is faster.",
        "",
        *notes,
        "",
    ]
    prof = [
        (n, r)
        for n, r in results["cells"].items()
        if any("breakdown" in v for v in r.get("impls", {}).values())
    ]
    if prof:
        L += [
            "## Where the time goes (torch.profiler, rank 0)",
            "",
            "Self CPU time per step of the heaviest operators (ms, calls per step), "
            f"{BREAKDOWN_STEPS} profiled steps per variant after the timed rounds. Time "
            "spent waiting for a collective shows up as the self time of the op or autograd "
            "function that waits (gloo's `wait_tensor`, DeepSpeed's `_AllToAll`, moeflow's "
            "`PipelinedExperts`).",
            "",
        ]
        for name, res in prof:
            L += [
                f"### {name}",
                "",
                "| variant | step ms (profiled) | top operators |",
                "|---|---|---|",
            ]
            for v in res["impls"].values():
                for vname, b in v.get("breakdown", {}).items():
                    ops = "; ".join(f"`{k}` {ms:.1f} ({n})" for k, ms, n in b["top"][:6])
                    L.append(f"| {vname} | {b['step_ms']:.1f} | {ops} |")
            L.append("")
    L += ["## Not run", ""]
    for name, res in results["cells"].items():
        err = res.get("impls", {}).get("moeflow", {}).get("meta", {}).get("planned_error")
        if err:
            L.append(f"- {name}, moeflow-planned: planning failed twice: {err[-1]}")
    for impl, st in results["probe"].items():
        if st is not None:
            L.append(f"- {impl}: not installed under `{results['python']}`: {st}")
    L.append(
        "- Megatron-Core: needs CUDA (its MoE token dispatchers and grouped GEMMs have no "
        "CPU path); left to the GPU benchmarks."
    )
    L.append("")
    return "\n".join(L)


def default_python() -> str:
    p = os.path.join(REPO, ".venv-peers", "bin", "python")
    return p if os.path.exists(p) else sys.executable


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    w = sub.add_parser("worker", help="(internal) one rank under torchrun")
    w.add_argument("--impl", choices=IMPLS, required=True)
    w.add_argument("--dir", required=True)
    r = sub.add_parser("run", help="run the cells and write the record")
    r.add_argument("--cells", nargs="+", default=list(CELLS), choices=list(CELLS))
    r.add_argument("--impls", nargs="+", default=list(IMPLS), choices=IMPLS)
    r.add_argument(
        "--python",
        default=default_python(),
        help="interpreter with the peers installed (default: .venv-peers)",
    )
    r.add_argument("--tokens", type=int, default=1024, help="tokens per rank")
    r.add_argument("--dim", type=int, default=256)
    r.add_argument("--ffn", type=int, default=512)
    r.add_argument("--experts", type=int, default=8)
    r.add_argument("--top-k", type=int, default=2)
    r.add_argument("--capacity-factor", type=float, default=1.25)
    r.add_argument("--rounds", type=int, default=3)
    r.add_argument("--steps", type=int, default=3, help="timed steps per round")
    r.add_argument("--warmup", type=int, default=2)
    r.add_argument("--threads", type=int, default=0, help="threads per rank (0: cores/world)")
    r.add_argument(
        "--breakdown",
        nargs="*",
        default=[],
        choices=list(CELLS),
        help="cells where every variant is also run under torch.profiler "
        "(loopback cells: inside the network namespaces the profiler hung "
        "DeepSpeed and Tutel ranks)",
    )
    r.add_argument("--start-timeout", type=float, default=600.0)
    r.add_argument("--round-timeout", type=float, default=600.0)
    r.add_argument("--keep-dir", action="store_true", help="keep the rendezvous dir and logs")
    r.add_argument("--out", default=None, help="record path (.md; .json beside it)")
    r.add_argument("--no-record", action="store_true")
    r.add_argument("--quiet", action="store_true")
    return p


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    if args.cmd == "worker":
        return worker(args)
    results = _scrub(run(args))
    if not args.no_record:
        date = datetime.date.today().isoformat()
        path = args.out or os.path.join(HERE, "results", f"peers_ep_cpu_2cpu-x86_{date}.md")
        with open(path, "w") as f:
            f.write(_scrub(record_markdown(results, argv)))
        with open(os.path.splitext(path)[0] + ".json", "w") as f:
            json.dump(results, f, indent=1, default=str)
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
