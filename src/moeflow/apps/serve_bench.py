"""``moeflow serve-bench``: naive DEP, PPPipe and FinDEP side by side on forked gloo ranks.

One fixed request set (prompt and output lengths drawn uniformly from the given ranges with
``--seed``; prompt tokens uniform over the vocabulary; greedy decoding, no stop tokens, so
every request produces exactly its output length) is served once per schedule by
``--ag`` attention ranks and ``--eg`` expert ranks (:func:`moeflow.serving.disaggregated.serve`).
All requests arrive at once (offline batch, vLLM's ``request_rate=inf``).

Metrics, as vLLM's ``benchmark_serving`` defines them:

* output throughput: generated tokens / duration (first request start to last token);
* TTFT: time from a request's arrival to its first token;
* TPOT: ``(latency - TTFT) / (output tokens - 1)`` per request with more than one token;
* each with mean, median (p50) and p99 (``numpy.percentile``, linear).

Each run forks fresh ranks; before the clock starts they exchange one warm-up token (gloo
connects peers lazily), so TTFT holds no connection set-up. ``--repeat`` runs every schedule
several times, interleaved, and keeps each one's best throughput.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import time
from dataclasses import dataclass
from functools import partial

from moeflow.errors import ConfigError, InputError
from moeflow.files import atomic_file, check_output
from moeflow.validate import positive_float, positive_int

SCHEDULE_CHOICES = ("naive", "pppipe", "findep")
#: upper limits of the size flags, checked before anything is allocated
MAX_REQUESTS = 10_000
MAX_DEMO_LAYERS = 64
MAX_DEMO_HIDDEN = 8192
MAX_DEMO_EXPERTS = 256
#: the demo model may have at most this many parameters (2 GB in float32)
MAX_DEMO_PARAMS = 500_000_000
MAX_REPEAT = 100
MAX_DEGREE = 64
DEMO_CONTEXT = 1024
DEMO_VOCAB = 2048


def add_serve_bench_arguments(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The ``serve-bench`` flags (the caller owns the parser)."""
    p.add_argument(
        "--model",
        default="demo",
        help="'demo' (a random MoE model, see --demo-*) or a transformers "
        "checkpoint directory (Qwen3-MoE, Mixtral)",
    )
    p.add_argument("--ag", type=int, default=1, help="attention ranks (default 1)")
    p.add_argument("--eg", type=int, default=1, help="expert ranks (default 1)")
    p.add_argument(
        "--schedules",
        default="naive,pppipe,findep",
        help="comma-separated, measured in this order (default all three)",
    )
    p.add_argument("--requests", type=int, default=16, help="number of requests (16)")
    p.add_argument(
        "--prompt-len", default="32:96", help="prompt length range lo:hi, uniform (default 32:96)"
    )
    p.add_argument(
        "--output-len", default="16:32", help="output length range lo:hi, uniform (default 16:32)"
    )
    p.add_argument("--seed", type=int, default=0, help="request-set seed (0)")
    p.add_argument("--pppipe-r1", type=int, default=2, help="PPPipe micro-batches (2)")
    p.add_argument(
        "--findep",
        default="auto",
        choices=("auto", "manual"),
        help="FinDEP's (r1, r2, order): 'auto' (default) profiles this host's GEMM "
        "and loopback link and solves FinDEP's model for the prefill batch; "
        "'manual' takes --r1/--r2/--order",
    )
    p.add_argument(
        "--r1", type=int, default=2, help="FinDEP micro-batches with --findep manual (2)"
    )
    p.add_argument(
        "--r2", type=int, default=2, help="FinDEP expert chunks with --findep manual (2)"
    )
    p.add_argument(
        "--order",
        default="AASS",
        choices=("ASAS", "AASS"),
        help="FinDEP order of attention and shared experts with --findep manual",
    )
    p.add_argument(
        "--repeat",
        type=int,
        default=1,
        help="runs per schedule, interleaved; the best throughput is kept (1)",
    )
    p.add_argument("--demo-layers", type=int, default=4)
    p.add_argument("--demo-hidden", type=int, default=256)
    p.add_argument("--demo-experts", type=int, default=8)
    p.add_argument(
        "--timeout",
        type=float,
        default=120.0,
        help="seconds any transfer may take before CommTimeoutError (120)",
    )
    p.add_argument(
        "--json",
        default=None,
        metavar="PATH",
        help="write the records as JSON (atomically; refused if it exists, unless --force)",
    )
    p.add_argument(
        "--force", action="store_true", help="replace an existing --json file (never an input)"
    )
    p.add_argument(
        "--force-nproc",
        action="store_true",
        help="allow more ranks (--ag + --eg) than the per-CPU cap",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def demo_params(layers: int, hidden: int, experts: int) -> int:
    """Parameters of the demo model (experts and the shared expert of width ``2 hidden``,
    attention, embeddings), for the size check before it is built."""
    ffn = 3 * hidden * 2 * hidden
    attn = 4 * hidden * hidden
    return layers * ((experts + 1) * ffn + attn + hidden * experts) + 2 * DEMO_VOCAB * hidden


def validate_serve_bench_args(args) -> None:
    """Check every flag before any work (model, profiling, ranks); typed errors name the
    flag. Sizes are bounded (``MAX_*``) so a typo cannot allocate the machine away."""
    from moeflow.launch import check_nproc

    args.ag = positive_int("--ag", args.ag)
    args.eg = positive_int("--eg", args.eg)
    check_nproc(args.ag + args.eg, force=args.force_nproc, flag="--ag + --eg")
    args.repeat = positive_int("--repeat", args.repeat, maximum=MAX_REPEAT)
    args.requests = positive_int("--requests", args.requests, maximum=MAX_REQUESTS)
    args.timeout = positive_float("--timeout", args.timeout)
    for flag in ("--pppipe-r1", "--r1", "--r2"):
        attr = flag[2:].replace("-", "_")
        setattr(args, attr, positive_int(flag, getattr(args, attr), maximum=MAX_DEGREE))
    _schedules(args)
    plo, phi = _range("--prompt-len", args.prompt_len)
    olo, ohi = _range("--output-len", args.output_len)
    if args.model == "demo":
        args.demo_layers = positive_int("--demo-layers", args.demo_layers, maximum=MAX_DEMO_LAYERS)
        args.demo_hidden = positive_int("--demo-hidden", args.demo_hidden, maximum=MAX_DEMO_HIDDEN)
        args.demo_experts = positive_int(
            "--demo-experts", args.demo_experts, maximum=MAX_DEMO_EXPERTS
        )
        n = demo_params(args.demo_layers, args.demo_hidden, args.demo_experts)
        if n > MAX_DEMO_PARAMS:
            raise ConfigError(
                "--demo-layers/--demo-hidden/--demo-experts",
                f"{args.demo_layers}/{args.demo_hidden}/{args.demo_experts}",
                f"a demo model of at most {MAX_DEMO_PARAMS:,} parameters (this one has {n:,})",
            )
        if phi + ohi > DEMO_CONTEXT:
            raise ConfigError(
                "--prompt-len/--output-len",
                f"{phi}+{ohi}",
                f"at most the model's context {DEMO_CONTEXT} together",
            )
    elif not os.path.isfile(os.path.join(args.model, "config.json")):
        raise InputError(
            f"--model {args.model!r} is not a checkpoint directory: no config.json (or 'demo')"
        )
    check_output(
        "--json",
        args.json,
        inputs=[None if args.model == "demo" else args.model],
        force=args.force,
    )


def _range(flag: str, text: str) -> tuple[int, int]:
    try:
        lo, hi = (int(v) for v in str(text).split(":"))
    except ValueError:
        raise ConfigError(flag, text, "lo:hi with integers 1 <= lo <= hi") from None
    if not 1 <= lo <= hi:
        raise ConfigError(flag, text, "lo:hi with integers 1 <= lo <= hi")
    return lo, hi


@dataclass(frozen=True)
class Metrics:
    """One schedule's run (times in ms)."""

    schedule: str
    r1: int
    r2: int
    order: str
    decode: tuple | None
    requests: int
    output_tokens: int
    duration_s: float
    output_tok_s: float
    ttft_ms: tuple[float, float, float]  # mean, p50, p99
    tpot_ms: tuple[float, float, float]
    predicted_prefill_ms: float | None = None  # FinDEP's closed form for the prefill pass

    def to_dict(self) -> dict:
        return {**self.__dict__}


def _stats(xs: list[float]) -> tuple[float, float, float]:
    import numpy as np

    if not xs:
        return (float("nan"),) * 3
    a = np.asarray(xs, dtype=float)
    return float(a.mean()), float(np.percentile(a, 50)), float(np.percentile(a, 99))


def summarize(results, schedule) -> Metrics:
    """vLLM's metrics from :class:`~moeflow.models.generate.GenerationResult` timestamps."""
    ok = [r for r in results if r.ok and r.tokens]
    if not ok:
        raise InputError("no request produced a token: nothing to measure")
    start = min(r.start_time for r in ok)
    end = max(r.token_times[-1] for r in ok)
    ttft = [1e3 * (r.token_times[0] - r.start_time) for r in ok]
    tpot = [
        1e3 * (r.token_times[-1] - r.token_times[0]) / (len(r.tokens) - 1)
        for r in ok
        if len(r.tokens) > 1
    ]
    n_out = sum(len(r.tokens) for r in ok)
    dur = max(end - start, 1e-9)
    return Metrics(
        schedule.name,
        schedule.r1,
        schedule.r2,
        schedule.order,
        schedule.decode,
        len(ok),
        n_out,
        dur,
        n_out / dur,
        _stats(ttft),
        _stats(tpot),
    )


def _model(args):
    import torch

    if args.model == "demo":
        from moeflow.config import MoEConfig
        from moeflow.models import DecoderConfig, MoEDecoder

        d = positive_int("--demo-hidden", args.demo_hidden)
        cfg = DecoderConfig(
            vocab_size=DEMO_VOCAB,
            num_layers=positive_int("--demo-layers", args.demo_layers),
            num_heads=8,
            num_kv_heads=4,
            head_dim=max(2, d // 8 // 2 * 2),
            moe=MoEConfig(
                hidden_size=d,
                ffn_hidden_size=2 * d,
                num_experts=positive_int("--demo-experts", args.demo_experts),
                top_k=2,
                num_shared_experts=1,
            ),
            max_position_embeddings=DEMO_CONTEXT,
        )
        torch.manual_seed(0)
        return MoEDecoder(cfg).eval()
    from moeflow.checkpoint import load_pretrained

    return load_pretrained(args.model)


def request_set(args, vocab_size: int, context: int):
    """The fixed request set: lengths and tokens from ``--seed``."""
    import random

    from moeflow.models import Request, SamplingParams

    plo, phi = _range("--prompt-len", args.prompt_len)
    olo, ohi = _range("--output-len", args.output_len)
    if phi + ohi > context:
        raise ConfigError(
            "--prompt-len/--output-len",
            f"{phi}+{ohi}",
            f"at most the model's context {context} together",
        )
    rng = random.Random(args.seed)
    out = []
    for i in range(positive_int("--requests", args.requests)):
        n, m = rng.randint(plo, phi), rng.randint(olo, ohi)
        prompt = [rng.randrange(1, vocab_size) for _ in range(n)]
        out.append(Request(prompt, SamplingParams(max_new_tokens=m), request_id=i))
    return out


def _schedules(args, plan=None, decode_plan=None):
    from moeflow.serving.disaggregated import ServeSchedule

    names = [s.strip() for s in str(args.schedules).split(",") if s.strip()]
    bad = [s for s in names if s not in SCHEDULE_CHOICES]
    if bad or not names or len(set(names)) != len(names):
        raise ConfigError(
            "--schedules",
            args.schedules,
            f"distinct names from {SCHEDULE_CHOICES}, comma-separated",
        )
    make = {
        "naive": ServeSchedule.naive,
        "pppipe": lambda: ServeSchedule.pppipe(positive_int("--pppipe-r1", args.pppipe_r1)),
        "findep": lambda: (
            ServeSchedule.from_plan(plan, decode_plan)
            if plan is not None
            else ServeSchedule(
                "findep", positive_int("--r1", args.r1), positive_int("--r2", args.r2), args.order
            )
        ),
    }
    return [make[n]() for n in names]


# ---- FinDEP's model of this host ------------------------------------------------------------
def _fit_gemm(cfg, eg: int):
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
            for n in (local * 2, local * 16, local * 64, local * 256, local * 512):
                x = torch.randn(n, moe.hidden_size)
                counts = torch.full((local,), n // local)
                t = time_ms(partial(ex, x, counts), trials=5)
                flops.append(2.0 * (n / local) * moe.hidden_size * moe.ffn_hidden_size)
                ms.append(t / (3 * local))
    finally:
        torch.set_num_threads(n_threads)
    return fit(flops, ms, note="expert FFN of this runtime, 1 thread, per GEMM")


def _fit_attention(cfg):
    """``t_a`` (ms vs FLOPs of projections plus causal core, FinDEP's ``t_a`` terms) of this
    host's attention half of a layer (norm, projections, RoPE, KV-cache write, SDPA; one
    thread), over prefill shapes (sequences x tokens), the median of 5 runs each."""
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
            for b, s in ((1, 16), (4, 32), (4, 128), (8, 128), (4, 256)):
                s = min(s, cfg.max_position_embeddings)
                cache = KVCache(cfg, b, s)
                h = torch.randn(b, s, D)
                pos = torch.arange(s).repeat(b, 1)
                cos, sin = rotary(pos, h.dtype)
                rows = torch.arange(b)
                t = time_ms(partial(layer.attend, h, cos, sin, cache, 0, rows, pos), trials=5)
                flops.append(2.0 * b * s * proj_params + b * H * 2 * d * s * s)
                ms.append(t)
    finally:
        torch.set_num_threads(n_threads)
    return fit(flops, ms, note="attention half of a layer, 1 thread, this host")


def _pingpong(rank, world, sizes):
    import torch
    import torch.distributed as dist

    from moeflow.perf.measure import time_ms

    out = []
    header = torch.zeros(8, dtype=torch.long)
    for n in sizes:
        x = torch.zeros(n // 4)

        def round_trip(x=x):
            if rank == 0:  # an a2e message (header, then rows) and its e2a reply
                dist.send(header, 1)
                dist.send(x, 1)
                dist.recv(x, 1)
            else:
                dist.recv(header, 0)
                dist.recv(x, 0)
                dist.send(x, 0)

        out.append(time_ms(round_trip, trials=14) / 2)
    return out


def _fit_link():
    """``t_c`` (ms, bytes): half the round trip of an a2e message (header and rows) and its
    e2a reply between two forked gloo ranks on 127.0.0.1, 4 KiB to 16 MiB, the median of 14
    round trips each."""
    from moeflow.launch import launch
    from moeflow.perf.measure import fit

    sizes = [4096, 65536, 1 << 20, 4 << 20, 16 << 20]
    ms = launch(_pingpong, 2, sizes, progress=False, timeout_s=120)[0]
    return fit(sizes, ms, note="gloo loopback, this host")


def findep_workload(cfg, ag: int, eg: int, seq_len: int, seqs: int, gemm, link, attention=None):
    """FinDEP's workload of one prefill pass of ``seqs`` sequences of ``seq_len`` tokens per
    AG rank on this host (memory is not the limit here: ``max_seqs`` is)."""
    from moeflow.plan import findep as fd

    D, H, K, d = cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    moe = cfg.moe
    model = fd.FinDEPModel(
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
    tb = fd.Testbed(
        name="loopback",
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
    return fd.Workload(model=model, testbed=tb, seq_len=seq_len, max_seqs=seqs, max_r2=8)


def predicted_prefill_ms(w, schedule, seqs: int) -> float:
    """The closed form's time of the prefill pass of ``seqs`` sequences under ``schedule``."""
    from moeflow.plan import findep as fd

    m_a = -(-seqs // schedule.r1)
    return fd.predicted_time(w, m_a, schedule.r1, schedule.r2, schedule.order)


def format_table(ms: list[Metrics]) -> str:
    base = next((m.output_tok_s for m in ms if m.schedule == "naive"), None)
    head = (
        "| schedule | prefill r1 / r2 / order | decode r1 / r2 / order | output tok/s "
        "| vs naive | TTFT mean / p50 / p99 ms | TPOT mean / p50 / p99 ms "
        "| prefill predicted ms |"
    )
    lines = [head, "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for m in ms:
        rel = f"{m.output_tok_s / base:.2f}x" if base else "-"
        dec = "same" if m.decode is None else " / ".join(str(v) for v in m.decode)
        lines.append(
            f"| {m.schedule} | {m.r1} / {m.r2} / {m.order} | {dec} | "
            f"{m.output_tok_s:.1f} | "
            f"{rel} | {' / '.join(f'{v:.1f}' for v in m.ttft_ms)} | "
            f"{' / '.join(f'{v:.2f}' for v in m.tpot_ms)} | "
            + (f"{m.predicted_prefill_ms:.1f} |" if m.predicted_prefill_ms else "- |")
        )
    return "\n".join(lines)


def run_serve_bench(args) -> int:
    """Run the benchmark; print the table (and write ``--json``). Raises typed errors."""
    from moeflow.progress import Progress
    from moeflow.serving.disaggregated import check_layout, serve

    validate_serve_bench_args(args)  # every flag checked before any work
    ag, eg, repeat = args.ag, args.eg, args.repeat
    model = _model(args)
    check_layout(ag + eg, ag, eg, model.cfg.moe.num_experts)
    reqs = request_set(args, model.cfg.vocab_size, model.cfg.max_position_embeddings)
    seqs = -(-len(reqs) // ag)
    # prefill runs right-padded to the longest prompt, so that is the S the model must see
    padded_prompt = max(len(r.prompt) for r in reqs)
    plan = decode_plan = None
    gemm, link, attn = _fit_gemm(model.cfg, eg), _fit_link(), _fit_attention(model.cfg)
    model_w = findep_workload(model.cfg, ag, eg, padded_prompt, seqs, gemm, link, attn)
    if args.findep == "auto":
        from moeflow.plan import findep as fd

        plan = fd.solve(model_w)
        # a decode step: one token per sequence (FinDEP's model with S = 1)
        decode_plan = fd.solve(findep_workload(model.cfg, ag, eg, 1, seqs, gemm, link, attn))
    print(
        f"serve-bench: this host: gemm {gemm.alpha:.3g} ms + {gemm.beta:.3g} ms/FLOP "
        f"(R^2 {gemm.r2:.3f}), link {link.alpha:.3g} ms + {link.beta:.3g} ms/B "
        f"(R^2 {link.r2:.3f}), attention {attn.alpha:.3g} ms + {attn.beta:.3g} ms/FLOP "
        f"(R^2 {attn.r2:.3f})"
        + (
            f"; FinDEP solver: prefill r1={plan.r1} r2={plan.r2} "
            f"{plan.order}, decode r1={decode_plan.r1} "
            f"r2={decode_plan.r2} {decode_plan.order}"
            if plan
            else ""
        )
    )
    schedules = _schedules(args, plan, decode_plan)
    best: dict[str, Metrics] = {}
    total = repeat * len(schedules)
    with Progress(total, "serve-bench", enabled=not args.no_progress) as bar:
        for _ in range(repeat):
            for s in schedules:  # interleaved, so drift on a shared machine hits all alike
                res = serve(
                    model,
                    reqs,
                    ag=ag,
                    eg=eg,
                    schedule=s,
                    timeout_s=args.timeout,
                    warmup=True,
                    force=args.force_nproc,
                )
                failed = [r for r in res if not r.ok]
                if failed:
                    raise InputError(f"request {failed[0].request_id} failed: {failed[0].error}")
                m = dataclasses.replace(
                    summarize(res, s), predicted_prefill_ms=(predicted_prefill_ms(model_w, s, seqs))
                )
                if s.name not in best or m.output_tok_s > best[s.name].output_tok_s:
                    best[s.name] = m
                bar.update(1, **{s.name: round(m.output_tok_s, 1)})
    ms = [best[s.name] for s in schedules]
    n_out = sum(r.params.max_new_tokens for r in reqs)
    plo, phi = _range("--prompt-len", args.prompt_len)
    olo, ohi = _range("--output-len", args.output_len)
    print(
        f"serve-bench: {len(reqs)} requests, prompt {plo}-{phi}, output {olo}-{ohi} tokens "
        f"(uniform, seed {args.seed}; {n_out} output tokens), ag={ag} eg={eg}, "
        f"best of {repeat}"
    )
    print(format_table(ms))
    if args.json:
        cfg = model.cfg
        rec = {
            "format": "moeflow.serve-bench/1",
            "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "ag": ag,
            "eg": eg,
            "requests": len(reqs),
            "prompt_len": [plo, phi],
            "output_len": [olo, ohi],
            "seed": args.seed,
            "repeat": repeat,
            "model": {
                "source": args.model,
                "layers": cfg.num_layers,
                "hidden": cfg.hidden_size,
                "experts": cfg.moe.num_experts,
                "top_k": cfg.moe.top_k,
                "shared": cfg.moe.num_shared_experts,
            },
            "results": [m.to_dict() for m in ms],
            "median_tok_s": statistics.median(m.output_tok_s for m in ms),
        }
        with atomic_file(args.json, force=args.force) as f:
            json.dump(rec, f, indent=1)
            f.write("\n")
    return 0
