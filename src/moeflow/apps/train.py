"""``moeflow train``: train the demo MoE language model, or fine-tune a transformers MoE
checkpoint directory (``--model PATH``), with expert parallelism.

Two launch paths, same training loop:
  * ``moeflow train --nproc 4`` forks 4 local ranks on gloo/127.0.0.1 with
    :func:`moeflow.launch.launch` (every flag is validated in the parent before forking; a
    failing or stalled rank ends the run with one line naming it);
  * ``torchrun --nproc-per-node 4 -m moeflow.apps.train ...`` (gloo on CPU, NCCL on GPUs).
Every MoE layer of :mod:`moeflow.models.demo`'s model is wrapped in
:class:`moeflow.parallel.ExpertParallel`. All ranks draw the same global batch (same seed)
and each trains on its slice, so the run follows the single-process run of the same
global batch (``--nproc 1``), up to per-rank aux-loss statistics (``--aux-loss global``
removes that difference). Prints loss and tokens/s.

Layout flags: ``--dispatcher`` (a2a, capacity, hierarchical / 2dh, dedup), ``--nodes K``
(the ranks declared as K nodes), ``--esp`` and a Parm ``--schedule`` (the ESP group as the
model-parallel group, whose ranks share their rows), checked against each other before any
rank starts. ``--dtype bfloat16`` trains a bf16 model with fp32 master weights.

With ``--model PATH`` (a transformers checkpoint directory: Qwen3-MoE, Mixtral, DeepSeek, ...)
the model is built on the meta device, patched (:func:`moeflow.integrations.patch_model`) and
:func:`moeflow.parallel.parallelize`-d over a ``(dp, ep, esp)`` mesh, every rank reading only
its experts from the checkpoint; it trains on ``--data FILE`` (a text file, tokenized with the
directory's tokenizer when it has one, else as bytes) or the bundled byte corpus, with a
progress bar, sharded checkpoints every ``--checkpoint-every`` steps in ``--checkpoint-dir``
(:mod:`moeflow.parallel.checkpoint`), ``--resume`` from there, and ``--export DIR`` writing a
transformers directory at the end.
"""

from __future__ import annotations

import argparse
import datetime
import math
import os
import sys
import time

import torch

from moeflow.errors import ConfigError, DistributedConfigError
from moeflow.files import atomic_dir, check_output
from moeflow.validate import nonnegative_int, positive_float, positive_int

#: the demo model's attention heads (DemoModelConfig.num_heads): --dim must be a multiple
NUM_HEADS = 4
#: upper limits of the size flags, checked before anything is allocated
MAX = {
    "--batch-size": 4096,
    "--seq-len": 65536,
    "--dim": 8192,
    "--layers": 128,
    "--experts": 1024,
    "--ffn": 65536,
}
#: the demo model may have at most this many parameters (4 GB in float32 per copy)
MAX_PARAMS = 1_000_000_000
MAX_TUNE_BATCHES = 64
#: tokens in one global batch (--batch-size x --seq-len)
MAX_BATCH_TOKENS = 2**22
#: --dispatcher values (moeflow.parallel.dispatch's registry and its alias)
DISPATCHER_CHOICES = ("a2a", "capacity", "hierarchical", "2dh", "dedup")
#: --schedule values (moeflow.parallel.mp_schedule's schedules and Parm's names)
SCHEDULE_CHOICES = ("plain", "split_tokens", "split_rows", "auto", "s1", "s2")


def add_train_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--nproc",
        type=int,
        default=None,
        help="fork this many local gloo ranks (default: 1, or torchrun's world); "
        "at most a few per CPU unless --force-nproc",
    )
    p.add_argument(
        "--force-nproc",
        action="store_true",
        help="allow more ranks than the per-CPU cap of --nproc",
    )
    p.add_argument(
        "--ranks-per-node",
        type=int,
        default=0,
        help="ranks per (pretend) node for the topology; 0: LOCAL_WORLD_SIZE "
        "under torchrun, else 2 when --nproc is even",
    )
    p.add_argument(
        "--nodes",
        type=int,
        default=0,
        help="declare the ranks as this many nodes (loopback: node-level dispatchers and "
        "Parm schedules run for real); 0: see --ranks-per-node",
    )
    p.add_argument(
        "--dispatcher",
        default="a2a",
        choices=list(DISPATCHER_CHOICES),
        help="token dispatcher: flat a2a, capacity (padded), hierarchical (alias 2dh: "
        "intra-node then inter-node) or dedup (HierMoE token dedup; --esp 1)",
    )
    p.add_argument(
        "--schedule",
        default=None,
        choices=list(SCHEDULE_CHOICES),
        help="a Parm schedule with the ESP group as the model-parallel group (its ranks "
        "train on the same rows; needs --esp > 1): plain, split_tokens (s1), split_rows "
        "(s2) or auto; default: none (every rank its own rows)",
    )
    p.add_argument(
        "--aux-loss",
        default="local",
        choices=["local", "global"],
        help="load-balancing loss over each rank's batch (local) or over the global batch "
        "(global: statistics all-reduced)",
    )
    p.add_argument(
        "--dtype",
        default="float32",
        choices=["float32", "bfloat16"],
        help="bfloat16: forward/backward in bf16 with fp32 master weights and optimizer state",
    )
    p.add_argument("--esp", type=int, default=1, help="expert-sharding group size")
    p.add_argument("--r-fwd", type=int, default=2, help="forward pipeline degree")
    p.add_argument("--r-bwd", type=int, default=2, help="backward pipeline degree")
    p.add_argument("--plan", default=None, help="a moeflow plan JSON (overrides --r-*)")
    p.add_argument(
        "--tune-degrees",
        type=int,
        default=0,
        metavar="K",
        help="after K steps, time forward+backward of those K batches at the current degrees "
        "and r = 1, 2, 4, 8 (every MoE layer alike) and keep the fastest (0: off)",
    )
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--max-seconds", type=float, default=120.0)
    p.add_argument("--batch-size", type=int, default=16, help="global batch (sequences)")
    p.add_argument("--seq-len", type=int, default=64)
    p.add_argument("--dim", type=int, default=64)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--experts", type=int, default=8)
    p.add_argument("--top-k", type=int, default=2)
    p.add_argument("--ffn", type=int, default=128, help="expert FFN width")
    p.add_argument(
        "--router",
        default="softmax_topk",
        choices=["softmax_topk", "switch", "sigmoid", "xmoe", "deepseek"],
    )
    p.add_argument("--capacity-factor", type=float, default=None)
    p.add_argument("--aux-loss-coef", type=float, default=0.01)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--timeout", type=float, default=120.0, help="collective deadline, s")
    p.add_argument("--log-every", type=int, default=10)
    p.add_argument(
        "--corpus-bytes",
        type=int,
        default=1_000_000,
        help="bytes of Python stdlib source to train on",
    )
    p.add_argument("--threads", type=int, default=1, help="torch threads per rank")
    g = p.add_argument_group("transformers checkpoint fine-tuning")
    g.add_argument(
        "--model",
        default=None,
        help="a transformers checkpoint directory to fine-tune (else the demo model)",
    )
    g.add_argument(
        "--data", default=None, help="a text file to train on (default: the bundled byte corpus)"
    )
    g.add_argument(
        "--dp",
        type=int,
        default=1,
        help="data-parallel replicas of each expert shard (ep = world / dp / esp)",
    )
    g.add_argument(
        "--dense",
        default="fsdp",
        choices=["fsdp", "replicate"],
        help="dense parts: FSDP2-sharded over the world, or replicated (DDP-style)",
    )
    g.add_argument("--checkpoint-dir", default=None, help="sharded checkpoints go here")
    g.add_argument(
        "--checkpoint-every",
        type=int,
        default=0,
        help="save every N steps (0: only at the end, when --checkpoint-dir is set)",
    )
    g.add_argument(
        "--resume",
        action="store_true",
        help="continue from the checkpoint in --checkpoint-dir (if there is one)",
    )
    g.add_argument(
        "--export",
        default=None,
        help="write the fine-tuned model here as a transformers directory (atomically; "
        "refused if it exists, unless --force; never the --model directory)",
    )
    g.add_argument(
        "--force",
        action="store_true",
        help="replace an existing --export directory as a whole (never an input)",
    )


def _plan_from_file(path):
    from moeflow.plan.io import load_plan_file

    return load_plan_file(path, "--plan")


def validate_train_args(args: argparse.Namespace, world: int | None = None) -> None:
    """Check every flag (and, for ``world`` > 1 ranks, the parallel layout) before any rank
    starts; raises ConfigError / DistributedConfigError / InputError naming the flag.

    ``world`` defaults to ``--nproc`` (1 when not given). Loads ``--plan`` once and keeps it
    on ``args`` so the ranks do not read the file again.
    """
    if args.nproc is not None:
        from moeflow.launch import check_nproc

        args.nproc = check_nproc(args.nproc, force=getattr(args, "force_nproc", False))
    world = world or args.nproc or 1
    if getattr(args, "model", None):
        validate_hf_args(args, world)
        return
    for flag in ("--export", "--checkpoint-dir", "--data", "--resume"):
        v = getattr(args, flag[2:].replace("-", "_"), None)
        if v:  # the demo model trains on the bundled corpus and writes nothing
            raise ConfigError(flag, v, "only with --model (a checkpoint directory)")
    for flag in (
        "steps",
        "batch_size",
        "seq_len",
        "dim",
        "layers",
        "experts",
        "top_k",
        "ffn",
        "log_every",
        "corpus_bytes",
        "threads",
        "esp",
        "r_fwd",
        "r_bwd",
    ):
        name = "--" + flag.replace("_", "-")
        setattr(args, flag, positive_int(name, getattr(args, flag), maximum=MAX.get(name)))
    _check_batch_tokens(args)
    params = args.layers * (args.experts * 3 * args.dim * args.ffn + 4 * args.dim * args.dim)
    params += 2 * 256 * args.dim
    if params > MAX_PARAMS:
        raise ConfigError(
            "--dim/--layers/--experts/--ffn",
            f"{args.dim}/{args.layers}/{args.experts}/{args.ffn}",
            f"a model of at most {MAX_PARAMS:,} parameters (this one has ~{params:,})",
        )
    args.ranks_per_node = nonnegative_int("--ranks-per-node", args.ranks_per_node)
    args.tune_degrees = nonnegative_int("--tune-degrees", getattr(args, "tune_degrees", 0))
    if args.tune_degrees > MAX_TUNE_BATCHES:
        raise ConfigError("--tune-degrees", args.tune_degrees, f"at most {MAX_TUNE_BATCHES}")
    _check_layout_flags(args, world)
    for flag in ("max_seconds", "lr", "timeout"):
        setattr(args, flag, positive_float("--" + flag.replace("_", "-"), getattr(args, flag)))
    args.aux_loss_coef = positive_float("--aux-loss-coef", args.aux_loss_coef, allow_zero=True)
    if args.capacity_factor is not None:
        args.capacity_factor = positive_float("--capacity-factor", args.capacity_factor)
    if args.dim % NUM_HEADS:
        raise ConfigError("--dim", args.dim, f"a multiple of the {NUM_HEADS} attention heads")
    if args.corpus_bytes < args.seq_len + 2:
        raise ConfigError(
            "--corpus-bytes", args.corpus_bytes, f"at least --seq-len + 2 = {args.seq_len + 2}"
        )
    cfg = _model_config(args).moe_config()  # MoEConfig checks top_k, router, sizes
    if args.capacity_factor is not None:
        cfg = cfg.replace(capacity_factor=args.capacity_factor)
    if args.batch_size % world:
        raise ConfigError("--batch-size", args.batch_size, f"a multiple of the world size {world}")
    if args.plan and getattr(args, "_plan", None) is None:
        args._plan = _plan_from_file(args.plan)
    if world > 1:
        topo = _topology(args, world)  # checks that ranks per node divide the world
        R, S = topo.ranks_per_node, args.esp
        if S > R or R % S:
            raise DistributedConfigError(
                f"--esp {S} must divide the ranks per node ({R}): "
                "an ESP group lives inside one node"
            )
        if cfg.num_experts % (world // S):
            raise DistributedConfigError(
                f"num_experts={cfg.num_experts} (--experts) is not divisible by the "
                f"expert-parallel size {world // S} (= world {world} / --esp {S})"
            )
        if cfg.ffn_hidden_size % S:
            raise DistributedConfigError(
                f"--ffn {cfg.ffn_hidden_size} is not divisible by --esp {S}"
            )


def _check_layout_flags(args, world: int) -> None:
    """--nodes, --dispatcher, --schedule, --aux-loss and --dtype against each other and the
    world (ConfigError / DistributedConfigError naming the flag), for both model paths."""
    from moeflow.parallel.aux_loss import check_aux_loss
    from moeflow.parallel.mp_schedule import canonical_schedule

    args.nodes = nonnegative_int("--nodes", getattr(args, "nodes", 0))
    if args.nodes:
        if world % args.nodes:
            raise DistributedConfigError(
                f"--nodes {args.nodes} does not divide the world size {world}: nodes must "
                "hold the same number of ranks"
            )
        rpn = world // args.nodes
        if args.ranks_per_node and args.ranks_per_node != rpn:
            raise ConfigError(
                "--ranks-per-node",
                args.ranks_per_node,
                f"{rpn} (= world {world} / --nodes {args.nodes}) or left out",
            )
        args.ranks_per_node = rpn
    schedule = getattr(args, "schedule", None)
    if schedule is not None:
        args.schedule = schedule = canonical_schedule(schedule)
        if world == 1 or args.esp == 1:
            raise ConfigError(
                "--schedule",
                schedule,
                "only with --esp > 1 on several ranks (Parm's model-parallel group is the "
                "ESP group, whose ranks train on the same rows)",
            )
    if args.dispatcher == "dedup" and args.esp > 1:
        raise ConfigError(
            "--dispatcher",
            "dedup",
            f"a row dispatcher (a2a, capacity, hierarchical) with --esp {args.esp}: dedup "
            "copies tokens to whole experts after crossing (--esp 1)",
        )
    try:
        check_aux_loss(getattr(args, "aux_loss", "local"), schedule)
    except ConfigError:
        raise ConfigError(
            "--aux-loss", "global", "local with --schedule (its MP ranks route the same rows)"
        ) from None
    if getattr(args, "model", None):
        for flag, value, ok in (
            ("--aux-loss", args.aux_loss, "local"),
            ("--dtype", args.dtype, "float32"),
        ):
            if value != ok:
                raise ConfigError(
                    flag, value, f"{ok} with --model (its loop trains on the LM loss in fp32)"
                )


def data_parallel_rows(world: int, rank: int, args) -> tuple[int, int]:
    """``(distinct batches, this rank's one)``: under a Parm schedule the ranks of an ESP
    group (consecutive ranks) share one."""
    S = args.esp if getattr(args, "schedule", None) else 1
    return world // S, rank // S


def _model_config(args):
    from moeflow.models.demo import DemoModelConfig

    return DemoModelConfig(
        dim=args.dim,
        num_layers=args.layers,
        seq_len=args.seq_len,
        num_experts=args.experts,
        top_k=args.top_k,
        ffn_hidden_size=args.ffn,
        router=args.router,
        aux_loss_coef=args.aux_loss_coef,
    )


def build_model(args, group=None, topology=None):
    """The demo LM; with a process group, every MoE layer becomes ExpertParallel."""
    import torch.distributed as dist

    from moeflow.models.demo import build_demo_model
    from moeflow.parallel import ExpertParallel

    mcfg = _model_config(args)
    model = build_demo_model(mcfg, seed=args.seed)
    if args.capacity_factor is not None:
        for b in model.blocks:  # rebuild each MoE config with the capacity factor
            b.moe.cfg = b.moe.cfg.replace(capacity_factor=args.capacity_factor)
            b.moe.router.cfg = b.moe.cfg
    plan = getattr(args, "_plan", None)
    if plan is None and args.plan:
        plan = args._plan = _plan_from_file(args.plan)
    if dist.is_initialized() and dist.get_world_size(group) > 1:
        from moeflow.comm.groups import subgroup

        schedule = getattr(args, "schedule", None)
        mp_group = None
        if schedule is not None:  # Parm: the MP group is this rank's ESP group
            S = args.esp
            p = dist.get_rank(group) // S
            mp_group = subgroup(group, [p * S + s for s in range(S)], args.timeout)
        for i, b in enumerate(model.blocks):
            b.moe = ExpertParallel(
                b.moe,
                group=group,
                topology=topology,
                dispatcher=args.dispatcher,
                esp_size=args.esp,
                r_fwd=args.r_fwd,
                r_bwd=args.r_bwd,
                plan=plan,
                layer_index=i,
                timeout_s=args.timeout,
                mp_group=mp_group,
                schedule=schedule or "plain",
            )
        if getattr(args, "aux_loss", "local") == "global":
            from moeflow.parallel.aux_loss import use_global_aux_loss

            use_global_aux_loss(model, group, args.timeout)
    return model


def _tune_degrees(model, batches, group, log: bool) -> None:
    """Every MoE layer's (r_fwd, r_bwd) from timing earlier batches (``--tune-degrees``)."""
    from moeflow.parallel.expert_parallel import ExpertParallel
    from moeflow.parallel.tune import degree_candidates, tune_model_degrees

    cur = {(m.r_fwd, m.r_bwd) for m in model.modules() if isinstance(m, ExpertParallel)}
    planned = cur.pop() if len(cur) == 1 else None

    def step(batch):
        _, loss, aux = model(*batch)
        (loss + aux).backward()

    res = tune_model_degrees(
        model, batches, step, group=group, candidates=degree_candidates(planned)
    )
    model.zero_grad(set_to_none=True)
    if log:
        tried = ", ".join(f"({t.r_fwd}, {t.r_bwd}) {t.median_ms:.0f} ms" for t in res.trials)
        print(
            f"tuned (r_fwd, r_bwd) = ({res.r_fwd}, {res.r_bwd}) in {res.seconds:.1f} s: {tried}",
            flush=True,
        )


def train_loop(args, group=None, topology=None, device=None, verbose=True) -> dict:
    """Train; returns ``{"losses": [...], "tokens_per_s": float, "steps": int, "seconds":
    float, "optimizer": ...}`` (and ``"masters"``, the :class:`MasterWeights`, with
    ``args.dtype == "bfloat16"``).

    ``losses`` are global-batch LM losses (mean over ranks of local means). ``args.dtype``
    ``"bfloat16"`` runs forward and backward on a bf16 model with fp32 master weights and
    fp32 AdamW state (:class:`moeflow.parallel.data_parallel.MasterWeights`).
    """
    import torch.distributed as dist

    from moeflow.models.demo import BatchSampler, load_corpus
    from moeflow.parallel.data_parallel import clip_grad_norm_, sync_gradients

    dist_on = dist.is_initialized() and dist.get_world_size(group) > 1
    W = dist.get_world_size(group) if dist_on else 1
    rank = dist.get_rank(group) if dist_on else 0
    if args.batch_size % W:
        raise ConfigError("batch_size", args.batch_size, f"a multiple of the world size {W}")
    device = device or torch.device("cpu")
    model = build_model(args, group, topology).to(device)
    corpus = getattr(args, "_corpus", None) or load_corpus(
        max_bytes=getattr(args, "corpus_bytes", 1_000_000)
    )
    sample = BatchSampler(corpus, args.seq_len, args.batch_size, seed=args.seed)
    masters = None
    if getattr(args, "dtype", "float32") == "bfloat16":
        from moeflow.parallel.data_parallel import MasterWeights

        masters = MasterWeights(model, torch.bfloat16)
        opt = torch.optim.AdamW(masters.parameters(), lr=args.lr, weight_decay=0.01)
    else:
        opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.01)
    batches, row = data_parallel_rows(W, rank, args)
    b = args.batch_size // batches
    losses, tokens = [], 0
    log = verbose and rank == 0
    if log:
        n_local = sum(p.numel() for p in model.parameters())
        degrees = [(m.r_fwd, m.r_bwd) for m in model.modules() if hasattr(m, "dispatcher")]
        print(
            f"moeflow train: world {W}, dispatcher {args.dispatcher}, esp {args.esp}, "
            f"schedule {getattr(args, 'schedule', None) or 'none'}, "
            f"aux loss {getattr(args, 'aux_loss', 'local')}, {getattr(args, 'dtype', 'float32')}, "
            f"(r_fwd, r_bwd) per layer {degrees or 'n/a (1 rank)'}, "
            f"{args.layers} layers x {args.experts} "
            f"experts, {n_local / 1e6:.2f} M params on rank 0, global batch "
            f"{args.batch_size}x{args.seq_len}",
            flush=True,
        )
    tune_k = getattr(args, "tune_degrees", 0) if dist_on else 0
    seen: list = []  # the last tune_k batches, for the degree tuning
    start = time.perf_counter()
    step = 0
    for step in range(1, args.steps + 1):
        lr = args.lr * min(1.0, step / 10)
        for g in opt.param_groups:
            g["lr"] = lr
        x, y = sample()  # the same global batch on every rank
        x, y = x[row * b : (row + 1) * b].to(device), y[row * b : (row + 1) * b].to(device)
        if tune_k and step == tune_k + 1:
            _tune_degrees(model, seen, group, log)
        elif tune_k and step <= tune_k:
            seen.append((x, y))
        _, loss, aux = model(x, y)
        opt.zero_grad(set_to_none=True)
        model.zero_grad(set_to_none=True)
        (loss + aux).backward()
        if dist_on:
            sync_gradients(model, group, "mean", args.timeout)
            clip_grad_norm_(model, 1.0, group, args.timeout)
        else:
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        if masters is not None:  # fp32 step on the masters, then the bf16 copies
            masters.step(opt)
        else:
            opt.step()
        lv = loss.detach().reshape(1).double()
        if dist_on:
            from moeflow.comm.collectives import all_reduce

            all_reduce(lv, group, "loss all-reduce", args.timeout)
            lv /= W
        losses.append(float(lv))
        tokens += args.batch_size * args.seq_len
        elapsed = time.perf_counter() - start
        if log and (step % args.log_every == 0 or step == 1):
            print(
                f"step {step:4d}  loss {losses[-1]:.4f}  {tokens / elapsed:,.0f} tokens/s",
                flush=True,
            )
        stop = torch.tensor([1.0 if elapsed > args.max_seconds else 0.0], device=device)
        if dist_on:  # every rank must stop at the same step
            from moeflow.comm.collectives import all_reduce

            all_reduce(stop, group, "stop all-reduce", args.timeout)
        if stop.item() > 0:
            break
    elapsed = time.perf_counter() - start
    out = {"losses": losses, "tokens_per_s": tokens / elapsed, "steps": step, "seconds": elapsed}
    out["optimizer"] = opt
    if masters is not None:
        out["masters"] = masters
    if log:
        print(
            f"summary: {step} steps, {tokens:,} tokens in {elapsed:.1f} s "
            f"({tokens / elapsed:,.0f} tokens/s over {W} ranks); loss {losses[0]:.3f} -> "
            f"{losses[-1]:.3f} (uniform {math.log(256):.3f})",
            flush=True,
        )
    return out


# --------------------------------------------------------------------------- --model PATH
def _num_experts(config) -> int | None:
    for name in ("num_experts", "num_local_experts", "n_routed_experts"):
        v = getattr(config, name, None)
        if isinstance(v, int) and v > 0:
            return v
    return None


def validate_hf_args(args: argparse.Namespace, world: int) -> None:
    """The ``--model`` flags and the mesh, checked in the parent before any rank starts."""
    for flag in (
        "steps",
        "batch_size",
        "seq_len",
        "log_every",
        "threads",
        "esp",
        "dp",
        "r_fwd",
        "r_bwd",
        "corpus_bytes",
    ):
        name = "--" + flag.replace("_", "-")
        setattr(args, flag, positive_int(name, getattr(args, flag), maximum=MAX.get(name)))
    _check_batch_tokens(args)
    if getattr(args, "tune_degrees", 0):
        raise ConfigError("--tune-degrees", args.tune_degrees, "0 with --model (demo model only)")
    args.checkpoint_every = nonnegative_int("--checkpoint-every", args.checkpoint_every)
    args.ranks_per_node = nonnegative_int("--ranks-per-node", args.ranks_per_node)
    _check_layout_flags(args, world)
    for flag in ("max_seconds", "lr", "timeout"):
        setattr(args, flag, positive_float("--" + flag.replace("_", "-"), getattr(args, flag)))
    if not os.path.isfile(os.path.join(args.model, "config.json")):
        raise ConfigError(
            "--model", args.model, "a transformers checkpoint directory (with config.json)"
        )
    if args.data is not None and not os.path.isfile(args.data):
        raise ConfigError("--data", args.data, "an existing text file")
    if args.data is not None:
        # without a tokenizer every byte is a token; with one, at least the file is not empty
        need = 1 if _has_tokenizer(args.model) else args.seq_len + 2
        size = os.path.getsize(args.data)
        if size < need:
            raise ConfigError(
                "--data",
                args.data,
                f"a text file of at least {need} bytes (--seq-len + 2 tokens; it has {size})",
            )
    if args.resume and not args.checkpoint_dir:
        raise ConfigError("--resume", True, "together with --checkpoint-dir")
    inputs = [args.model, args.data]
    # an existing checkpoint directory is expected (it is replaced, or resumed from)
    check_output("--checkpoint-dir", args.checkpoint_dir, inputs=inputs, force=True, directory=True)
    args.export = check_output(
        "--export",
        args.export,
        inputs=[*inputs, args.checkpoint_dir],
        force=getattr(args, "force", False),
        directory=True,
    )
    from moeflow.parallel.parallelize import check_hf_checkpoint

    # the config, the weights' headers and their shapes, here, before any rank starts
    config = check_hf_checkpoint(args.model, "--model")
    E = _num_experts(config)
    if E is None:
        raise ConfigError(
            "--model", args.model, "a mixture-of-experts model (its config names no experts)"
        )
    if world % (args.dp * args.esp):
        raise DistributedConfigError(
            f"--dp {args.dp} x --esp {args.esp} does not divide the world size {world}"
        )
    ep = world // (args.dp * args.esp)
    if E % ep:
        raise DistributedConfigError(
            f"the model's {E} experts are not divisible by the "
            f"expert-parallel size {ep} (= world {world} / --dp "
            f"{args.dp} / --esp {args.esp})"
        )
    R = args.ranks_per_node
    if R and world > 1:  # the expert group (dp outermost: consecutive ranks) on the nodes
        G = ep * args.esp
        k = R if G >= R else G
        if world % R or (G >= R and G % R) or (G < R and R % G) or k % args.esp:
            raise DistributedConfigError(
                f"--esp {args.esp} x expert-parallel {ep} ranks do not fit nodes of {R} "
                f"ranks (world {world}): an expert group spans whole nodes or lies in one, "
                "and an ESP group lies in one node"
            )
    if args.batch_size % world:
        raise ConfigError("--batch-size", args.batch_size, f"a multiple of the world size {world}")
    args._hf_config = config
    if args.resume:
        from moeflow.parallel.checkpoint import check_checkpoint

        check_checkpoint(
            args.checkpoint_dir, checkpoint_layout(args, world, config), sharded=world > 1
        )


#: the model config fields a checkpoint's tensors depend on
_SHAPE_FIELDS = (
    "model_type",
    "vocab_size",
    "hidden_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "intermediate_size",
    "moe_intermediate_size",
    "tie_word_embeddings",
)


def checkpoint_layout(args, world: int, config) -> dict:
    """What a ``--checkpoint-dir`` checkpoint of this run depends on: the ranks and their mesh,
    the dispatcher and the model's shape (recorded at save, compared at ``--resume``)."""
    shape = {
        k: getattr(config, k)
        for k in _SHAPE_FIELDS
        if isinstance(getattr(config, k, None), (int, str, bool))
    }
    shape["experts"] = _num_experts(config)
    return {
        "nproc": world,
        "dp": args.dp,
        "esp": args.esp,
        "dense": args.dense if world > 1 else None,
        "dispatcher": args.dispatcher,
        "model": shape,
    }


def _has_tokenizer(model_dir: str) -> bool:
    return any(
        os.path.exists(os.path.join(model_dir, n))
        for n in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")
    )


def _check_batch_tokens(args) -> None:
    tokens = args.batch_size * args.seq_len
    if tokens > MAX_BATCH_TOKENS:
        raise ConfigError(
            "--batch-size/--seq-len",
            f"{args.batch_size}/{args.seq_len}",
            f"at most {MAX_BATCH_TOKENS:,} tokens per global batch (this one has {tokens:,})",
        )


def _tokens(args, config) -> torch.Tensor:
    """The training tokens: ``--data`` through the model's tokenizer when the directory has one,
    else bytes (folded into the vocabulary when it is smaller than 256)."""
    from moeflow.models.demo import load_corpus

    if args.data is not None:
        with open(args.data, "rb") as f:
            raw = f.read()
    else:
        raw = getattr(args, "_corpus", None) or load_corpus(max_bytes=args.corpus_bytes)
    tok = None
    if args.data is not None and _has_tokenizer(args.model):
        try:
            import transformers

            tok = transformers.AutoTokenizer.from_pretrained(args.model)
        except Exception:  # no tokenizer files: train on bytes
            tok = None
    if not raw:
        ids = torch.zeros(0, dtype=torch.long)
    elif tok is not None:
        ids = torch.tensor(tok(raw.decode("utf-8", "replace"))["input_ids"], dtype=torch.long)
    else:
        ids = torch.frombuffer(bytearray(raw), dtype=torch.uint8).long() % config.vocab_size
    if ids.numel() < args.seq_len + 2:
        raise ConfigError(
            "--data",
            args.data,
            f"at least --seq-len + 2 = {args.seq_len + 2} tokens (got {ids.numel()})",
        )
    return ids


def hf_train_loop(args, device=None, verbose=True) -> dict:
    """Fine-tune ``--model`` (every rank, process group up; or one process). Returns
    ``{"losses": [...], "first_step": int, "steps": int}`` (global-batch losses)."""
    import torch.distributed as dist
    import transformers

    from moeflow.checkpoint.state import load_single, save_single
    from moeflow.integrations import moeflow_state_dict_keys, patch_model
    from moeflow.parallel import checkpoint as ckpt
    from moeflow.parallel import clip_grad_norm_, export_pretrained, parallelize, sync_gradients
    from moeflow.progress import Progress

    dist_on = dist.is_initialized() and dist.get_world_size() > 1
    W = dist.get_world_size() if dist_on else 1
    rank = dist.get_rank() if dist_on else 0
    device = device or torch.device("cpu")
    config = getattr(args, "_hf_config", None) or transformers.AutoConfig.from_pretrained(
        args.model
    )
    if dist_on:
        from torch.distributed.device_mesh import init_device_mesh

        ep = W // (args.dp * args.esp)
        dims = [
            (n, d)
            for n, d in (("dp", args.dp), ("ep", ep), ("esp", args.esp))
            if d > 1 or n == "ep"
        ]
        mesh = init_device_mesh(
            "cpu", tuple(d for _, d in dims), mesh_dim_names=tuple(n for n, _ in dims)
        )
        with torch.device("meta"):
            model = patch_model(transformers.AutoModelForCausalLM.from_config(config))
        parallelize(
            model,
            mesh,
            checkpoint=args.model,
            dispatcher=args.dispatcher,
            r_fwd=args.r_fwd,
            r_bwd=args.r_bwd,
            timeout_s=args.timeout,
            device=device,
            dense=args.dense,
            topology=_hf_topology(args, W),
            schedule=getattr(args, "schedule", None),
        )
    else:
        model = patch_model(transformers.AutoModelForCausalLM.from_pretrained(args.model))
        model.to(device)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.01)
    data = _tokens(args, config)
    gen = torch.Generator().manual_seed(args.seed)
    first = 1
    layout = checkpoint_layout(args, W, config)
    if args.resume:
        if rank == 0:  # a save cut short left a stale temp dir or the checkpoint aside
            ckpt.recover_checkpoint(args.checkpoint_dir)
        if dist_on:
            dist.barrier()
    if args.resume and ckpt.checkpoint_exists(args.checkpoint_dir):
        if dist_on:
            extra = ckpt.load_checkpoint(args.checkpoint_dir, model, opt, layout=layout)
        else:
            extra = load_single(args.checkpoint_dir, model, opt, layout)
        first, sampler = _resume_point(args.checkpoint_dir, extra)
        gen.set_state(sampler)
    batches, row = data_parallel_rows(W, rank, args)
    b = args.batch_size // batches
    losses = []
    log = verbose and rank == 0

    def save(step: int) -> None:
        extra = {"step": step, "sampler": gen.get_state()}
        if dist_on:
            ckpt.save_checkpoint(args.checkpoint_dir, model, opt, extra=extra, layout=layout)
        else:
            with moeflow_state_dict_keys(model):  # moeflow's own keys, as DCP's save
                save_single(args.checkpoint_dir, model, opt, extra, layout)

    step = first - 1
    with Progress(
        args.steps, f"moeflow train {os.path.basename(os.path.normpath(args.model))}", enabled=log
    ) as bar:
        bar.n = first - 1
        start = time.perf_counter()
        for step in range(first, args.steps + 1):
            # the same global batch on every rank; each takes its rows
            starts = torch.randint(
                0, data.numel() - args.seq_len - 1, (args.batch_size,), generator=gen
            )
            window = data[starts[:, None] + torch.arange(args.seq_len + 1)]
            x = window[row * b : (row + 1) * b, :-1].to(device)
            y = window[row * b : (row + 1) * b, 1:].to(device)
            logits = model(input_ids=x).logits
            loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), y.flatten())
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if dist_on:
                sync_gradients(model)
                clip_grad_norm_(model, 1.0)
            else:
                torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            lv = loss.detach().reshape(1).double()
            stop = torch.tensor([1.0 if time.perf_counter() - start > args.max_seconds else 0.0])
            if dist_on:
                from moeflow.comm.collectives import all_reduce

                all_reduce(lv, None, "loss all-reduce", args.timeout)
                lv /= W
                all_reduce(stop, None, "stop all-reduce", args.timeout)
            losses.append(float(lv))
            bar.update(1, loss=losses[-1])
            if args.checkpoint_dir and args.checkpoint_every and step % args.checkpoint_every == 0:
                save(step)
            if stop.item() > 0:
                break
    if args.checkpoint_dir and (not args.checkpoint_every or step % args.checkpoint_every):
        save(step)
    if args.export:
        force = getattr(args, "force", False)
        if dist_on:
            export_pretrained(model, args.export, overwrite=force)
        else:
            check_output("--export", args.export, inputs=[args.model], force=force, directory=True)
            with atomic_dir(args.export, force=force) as tmp:
                model.save_pretrained(tmp)
    if log:
        print(
            f"summary: steps {first}..{step}, loss "
            f"{losses[0] if losses else float('nan'):.4f} -> "
            f"{losses[-1] if losses else float('nan'):.4f}",
            flush=True,
        )
    return {"losses": losses, "first_step": first, "steps": step}


def _resume_point(path: str, extra) -> tuple[int, torch.Tensor]:
    """The first step to run and the batch sampler's state, from a checkpoint's ``extra``."""
    from moeflow.errors import CorruptDataError

    step = extra.get("step") if isinstance(extra, dict) else None
    sampler = extra.get("sampler") if isinstance(extra, dict) else None
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        raise CorruptDataError(f"checkpoint {path!r}: no step count in its extras")
    if not isinstance(sampler, torch.Tensor) or sampler.dtype != torch.uint8:
        raise CorruptDataError(f"checkpoint {path!r}: no batch sampler state in its extras")
    return step + 1, sampler


def _hf_rank(rank: int, world: int, args) -> dict:
    args._forked = True
    return hf_train_loop(args, verbose=True)


def _topology(args, world: int):
    from moeflow.comm import Topology

    rpn = args.ranks_per_node
    if not rpn:
        if os.environ.get("LOCAL_WORLD_SIZE") and not getattr(args, "_forked", False):
            return Topology.from_env()
        rpn = 2 if world % 2 == 0 and world > 2 else world
    return Topology.explicit(world, rpn)


def _hf_topology(args, world: int):
    """--model: the declared nodes (--nodes / --ranks-per-node), else None (parallelize
    reads LOCAL_WORLD_SIZE, or takes one node)."""
    from moeflow.comm import Topology

    return Topology.explicit(world, args.ranks_per_node) if args.ranks_per_node else None


def _rank(rank: int, world: int, args) -> float:
    """One forked rank (the process group is up): train; return the last global loss."""
    args._forked = True
    out = train_loop(args, topology=_topology(args, world), verbose=True)
    return out["losses"][-1] if out["losses"] else float("nan")


def _spawn(args) -> int:
    from moeflow.launch import launch
    from moeflow.models.demo import load_corpus

    if not getattr(args, "data", None):
        args._corpus = load_corpus(max_bytes=args.corpus_bytes)  # read once, shared by fork
    # a rank whose heartbeat stops for the collective deadline is stalled: end the run
    launch(
        _hf_rank if getattr(args, "model", None) else _rank,
        args.nproc,
        args,
        force=args.force_nproc,
        name="moeflow train",
        stall_timeout_s=args.timeout,
        pg_timeout_s=args.timeout,
        threads=args.threads,
    )
    return 0


def run_train(args: argparse.Namespace) -> int:
    import torch.distributed as dist

    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:  # launched by torchrun
        validate_train_args(args, world=positive_int("WORLD_SIZE", int(os.environ["WORLD_SIZE"])))
        use_cuda = torch.cuda.is_available()
        backend = "nccl" if use_cuda else "gloo"
        device = (
            torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
            if use_cuda
            else torch.device("cpu")
        )
        if use_cuda:
            torch.cuda.set_device(device)
        else:
            torch.set_num_threads(max(1, args.threads))
        dist.init_process_group(backend, timeout=datetime.timedelta(seconds=args.timeout))
        try:
            if getattr(args, "model", None):
                hf_train_loop(args, device=device)
            else:
                train_loop(args, topology=_topology(args, dist.get_world_size()), device=device)
            # gloo aborts a rank ("terminate called without an active exception") that tears
            # its groups down while a slower peer still talks to it: leave together
            dist.barrier()
        finally:
            dist.destroy_process_group()
        return 0
    validate_train_args(args)  # in the parent, before any rank starts
    if args.nproc and args.nproc > 1:
        return _spawn(args)
    torch.set_num_threads(max(1, args.threads))
    if getattr(args, "model", None):
        hf_train_loop(args)
    else:
        train_loop(args)
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="moeflow train", description=__doc__.splitlines()[0])
    add_train_arguments(p)
    return run_train(p.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
