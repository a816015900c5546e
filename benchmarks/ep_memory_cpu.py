"""Peak memory per rank of expert parallelism sharded from the start (CPU, gloo).

A Qwen3-MoE-shaped model whose experts dominate its size (default 64 experts, 2 layers,
D=256, expert FFN 512: 201 MB of expert weights in fp32) is written by transformers'
``save_pretrained`` as sharded safetensors + index (in a separate process, so no rank inherits
it). Then, on 4 forked gloo ranks (``moeflow.launch.launch``), each rank builds the model on the
meta device, ``patch_model`` + ``parallelize`` on an ``ep`` mesh load only its 16 experts
(``checkpoint=``), and it trains a few steps. Per rank it records, from ``/proc/self/status``:

* the baseline resident set (after fork: Python, torch, transformers);
* the peak resident set (VmHWM, reset with ``/proc/self/clear_refs``) while loading, and
  while training, both as the increase over the baseline;
* the parameter bytes it holds (experts and dense) and the checkpoint bytes it read.

For comparison a single process loads the whole model with ``from_pretrained`` (peak increase
over its own baseline). Expected: loading peak per rank ~ dense + experts / P, not + experts.

    python benchmarks/ep_memory_cpu.py [--experts 64 --nproc 4 --hidden 256 --ffn 512]
writes benchmarks/results/ep_memory_cpu_<host>_<date>.{json,md}.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
MB = 1 << 20


def _status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def _reset_peak() -> bool:
    """Reset VmHWM to the current RSS (Linux >= 4.0); False where not allowed."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _config(args):
    import transformers

    return transformers.Qwen3MoeConfig(
        vocab_size=args.vocab,
        hidden_size=args.hidden,
        intermediate_size=args.hidden * 2,
        moe_intermediate_size=args.ffn,
        num_experts=args.experts,
        num_experts_per_tok=2,
        num_hidden_layers=args.layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=args.hidden // 4,
        max_position_embeddings=256,
        tie_word_embeddings=False,
    )


def make_checkpoint(args, out_dir: str) -> None:
    import torch
    import transformers

    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(_config(args))
    model.save_pretrained(out_dir, max_shard_size="32MB")


def _import_code() -> None:
    """Import the modeling code before the baseline: importing transformers' model module
    alone adds ~200 MB of resident code and data on this machine, the same for any model
    size, and is not what this benchmark measures."""
    import torch.distributed.device_mesh  # noqa: F401
    import transformers.models.qwen3_moe.modeling_qwen3_moe  # noqa: F401

    import moeflow.integrations.hf  # noqa: F401
    import moeflow.parallel  # noqa: F401


def single_process_load(args, path: str) -> dict:
    import transformers

    _import_code()
    base = _status_kb("VmRSS")
    _reset_peak()
    model = transformers.AutoModelForCausalLM.from_pretrained(path)
    peak = _status_kb("VmHWM")
    n = sum(p.numel() * p.element_size() for p in model.parameters())
    return {
        "baseline_mb": base / 1024,
        "load_peak_increase_mb": (peak - base) / 1024,
        "param_mb": n / MB,
    }


def _rank(rank: int, world: int, args, path: str) -> dict:
    import torch
    import transformers
    from torch.distributed.device_mesh import init_device_mesh

    from moeflow.integrations import patch_model
    from moeflow.parallel import ExpertParallel, parallelize, sync_gradients

    base = _status_kb("VmRSS")
    resettable = _reset_peak()
    config = transformers.AutoConfig.from_pretrained(path)
    with torch.device("meta"):
        model = patch_model(transformers.AutoModelForCausalLM.from_config(config))
    mesh = init_device_mesh("cpu", (world,), mesh_dim_names=("ep",))
    parallelize(model, mesh, checkpoint=path, dense=args.dense)
    load_peak = _status_kb("VmHWM")
    eps = [m for m in model.modules() if isinstance(m, ExpertParallel)]
    expert = sum(p.numel() * p.element_size() for m in eps for p in m.expert_parameters())
    total = sum(p.numel() * p.element_size() for p in model.parameters())
    _reset_peak()
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    g = torch.Generator().manual_seed(rank)
    for _ in range(args.steps):
        ids = torch.randint(0, config.vocab_size, (args.batch, args.seq), generator=g)
        loss = model(input_ids=ids, labels=ids).loss
        opt.zero_grad()
        loss.backward()
        sync_gradients(model)
        opt.step()
    train_peak = _status_kb("VmHWM")
    return {
        "rank": rank,
        "baseline_mb": base / 1024,
        "load_peak_increase_mb": (load_peak - base) / 1024,
        "train_peak_increase_mb": (train_peak - base) / 1024,
        "expert_param_mb": expert / MB,
        "dense_param_mb": (total - expert) / MB,
        "checkpoint_read_mb": model.moeflow_layout.checkpoint_bytes_read / MB,
        "peak_reset_supported": resettable,
    }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--experts", type=int, default=64)
    ap.add_argument("--nproc", type=int, default=4)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--ffn", type=int, default=512, help="expert FFN width")
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--vocab", type=int, default=1024)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument(
        "--dense",
        default="replicate",
        choices=["replicate", "fsdp"],
        help="parallelize(dense=...): the record used replicate",
    )
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--seq", type=int, default=64)
    ap.add_argument("--host", default=f"{os.cpu_count()}cpu-x86", help="machine label")
    ap.add_argument("--out", default=None, help="results path stem (default: results/...)")
    ap.add_argument("--_make", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--_single", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args._make:
        make_checkpoint(args, args._make)
        return 0
    if args._single:
        print(json.dumps(single_process_load(args, args._single)))
        return 0
    import torch

    from moeflow.launch import launch

    _import_code()  # in the parent: every forked rank starts with it
    passthrough = [
        f"--{k}={getattr(args, k)}" for k in ("experts", "hidden", "ffn", "layers", "vocab")
    ]
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "ckpt")
        # separate processes: neither the writer's nor the reference's memory is forked
        subprocess.run([sys.executable, __file__, *passthrough, f"--_make={path}"], check=True)
        single = json.loads(
            subprocess.run(
                [sys.executable, __file__, *passthrough, f"--_single={path}"],
                check=True,
                capture_output=True,
                text=True,
            )
            .stdout.strip()
            .splitlines()[-1]
        )
        ranks = launch(_rank, args.nproc, args, path, timeout_s=600, progress=False)
    cfg = _config(args)
    expert_total = (
        cfg.num_hidden_layers
        * cfg.num_experts
        * 3
        * cfg.hidden_size
        * cfg.moe_intermediate_size
        * 4
        / MB
    )
    date = datetime.date.today().isoformat()
    record = {
        "benchmark": "ep_memory_cpu",
        "date": date,
        "host": args.host,
        "torch": torch.__version__,
        "python": sys.version.split()[0],
        "args": {k: v for k, v in vars(args).items() if not k.startswith("_")},
        "expert_total_mb": expert_total,
        "single_process": single,
        "ranks": ranks,
    }
    stem = args.out or os.path.join(HERE, "results", f"ep_memory_cpu_{args.host}_{date}")
    with open(stem + ".json", "w") as f:
        json.dump(record, f, indent=1)
    rows = [
        "| rank | baseline RSS MB | load peak +MB | train peak +MB | expert params MB | "
        "dense params MB | checkpoint read MB |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in ranks:
        rows.append(
            f"| {r['rank']} | {r['baseline_mb']:.0f} | {r['load_peak_increase_mb']:.1f} "
            f"| {r['train_peak_increase_mb']:.1f} | {r['expert_param_mb']:.1f} | "
            f"{r['dense_param_mb']:.1f} | {r['checkpoint_read_mb']:.1f} |"
        )
    text = "\n".join(
        [
            f"# Expert-parallel memory per rank, sharded from the start (CPU, gloo), {date}",
            "",
            f"Machine: {args.host}, torch {torch.__version__}, Python {sys.version.split()[0]}. "
            "Figures depend on the machine only through allocator behaviour; parameter and read "
            "bytes do not.",
            "",
            f"Model: Qwen3-MoE shape, {args.layers} layers, {args.experts} experts, "
            f"D={args.hidden}, "
            f"expert FFN {args.ffn}, vocab {args.vocab}, fp32: {expert_total:.1f} MB of expert "
            f"weights; {args.nproc} ranks, mesh ep={args.nproc}; {args.steps} AdamW steps of "
            f"{args.batch}x{args.seq} tokens per rank.",
            "",
            f"Command: `python benchmarks/ep_memory_cpu.py --experts {args.experts} --nproc "
            f"{args.nproc} --hidden {args.hidden} --ffn {args.ffn} --layers {args.layers}`",
            "",
            *rows,
            "",
            f"Single process, `from_pretrained` of the whole model: load peak "
            f"+{single['load_peak_increase_mb']:.1f} MB over its baseline "
            f"({single['param_mb']:.1f} MB of parameters).",
            "",
            "Peaks are VmHWM reset with /proc/self/clear_refs at the start of each phase, minus "
            "the rank's resident set at that start. The baseline holds Python, torch, "
            "transformers and the model's modeling module, imported in the parent before the "
            "ranks are forked (and before the single process's baseline): that import alone is "
            "~200 MB on this machine whatever the model size.",
            "",
        ]
    )
    with open(stem + ".md", "w") as f:
        f.write(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
