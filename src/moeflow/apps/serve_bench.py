"""``moeflow serve-bench``: naive DEP, PPPipe and FinDEP side by side on forked gloo ranks.

One fixed request set (prompt and output lengths drawn uniformly from the given ranges with
``--seed``; prompt tokens uniform over the vocabulary; greedy decoding, no stop tokens, so
every request produces exactly its output length) is served once per schedule by
``--ag`` attention ranks and ``--eg`` expert ranks (:func:`moeflow.serving.disaggregated.serve`).
All requests arrive at once (offline batch, vLLM's ``request_rate=inf``).

Plans (``--plan auto``, the default): this host's costs are measured before every round
(:mod:`moeflow.serving.host_costs`: the expert FFN, the attention half of a layer, the gloo link,
the embedding and LM head; a shared host's speed drifts) and every schedule is solved at every
forward call ("step") for that step's shape by one :class:`moeflow.plan.findep.StepPlanner`:
FinDEP over ``(r1, r2, order)``, PPPipe its best ``r1`` (``r2 = 1``, ASAS), naive DEP
``r1 = r2 = 1``. No plan sees the timed run: the costs are micro-benchmarks. With ``--perf``
the costs come from a ``moeflow profile`` file instead, once
(:meth:`~moeflow.plan.findep.StepPlanner.from_perf`; a cost it lacks is a ConfigError naming
it). ``--plan manual`` fixes FinDEP at ``--r1/--r2/--order`` and PPPipe at ``--pppipe-r1``.

Fairness: every run forks fresh ranks, which exchange the same one-token warm-up before the
clock starts (gloo connects peers lazily). Each of ``--repeat`` rounds runs every schedule
once, in a fresh random order (seeded by ``--seed``); the table gives the median and the range
(min-max) of every round, and the JSON every run. Nothing is best-of.

Metrics, as vLLM's ``benchmark_serving`` defines them:

* output throughput: generated tokens / duration (first request start to last token);
* TTFT: time from a request's arrival to its first token;
* TPOT: ``(latency - TTFT) / (output tokens - 1)`` per request with more than one token;
* each with mean, median (p50) and p99 (``numpy.percentile``, linear);
* goodput (with ``--slo-ttft-ms`` and/or ``--slo-tpot-ms``, vLLM's ``--goodput``): requests
  that meet every SLO given, per second of the run's duration.

Every forward call of the AG is timed and set against the closed form's time for its shape and
plan (:meth:`~moeflow.plan.findep.StepPlanner.predict_ms`): the table gives measured /
predicted over the prefill and over the decode steps (sum of measured over sum of predicted).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from dataclasses import dataclass

from moeflow.errors import ConfigError, InputError
from moeflow.files import atomic_file, check_output
from moeflow.serving.host_costs import (
    findep_model,
    fit_attention,
    fit_gemm,
    fit_head,
    host_testbed,
    measure_link,
    step_planner,
)
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
        help="comma-separated (default all three); each round runs them in a random order",
    )
    p.add_argument("--requests", type=int, default=16, help="number of requests (16)")
    p.add_argument(
        "--prompt-len", default="32:96", help="prompt length range lo:hi, uniform (default 32:96)"
    )
    p.add_argument(
        "--output-len", default="16:32", help="output length range lo:hi, uniform (default 16:32)"
    )
    p.add_argument("--seed", type=int, default=0, help="request-set seed (0)")
    p.add_argument(
        "--pppipe-r1", type=int, default=2, help="PPPipe micro-batches with --plan manual (2)"
    )
    p.add_argument(
        "--plan",
        default="auto",
        choices=("auto", "manual"),
        help="'auto' (default): measure this host's costs and solve every schedule per step "
        "(FinDEP over r1, r2 and order, PPPipe its best r1, naive r1 = r2 = 1); "
        "'manual': FinDEP fixed at --r1/--r2/--order, PPPipe at --pppipe-r1",
    )
    p.add_argument("--r1", type=int, default=2, help="FinDEP micro-batches with --plan manual (2)")
    p.add_argument("--r2", type=int, default=2, help="FinDEP expert chunks with --plan manual (2)")
    p.add_argument(
        "--order",
        default="AASS",
        choices=("ASAS", "AASS"),
        help="FinDEP order of attention and shared experts with --plan manual",
    )
    p.add_argument(
        "--repeat",
        type=int,
        default=5,
        help="rounds; each runs every schedule once, in a random order (5)",
    )
    p.add_argument(
        "--slo-ttft-ms",
        type=float,
        default=None,
        help="goodput SLO: time to first token at most this (ms)",
    )
    p.add_argument(
        "--slo-tpot-ms",
        type=float,
        default=None,
        help="goodput SLO: time per output token at most this (ms)",
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
        "--perf",
        default=None,
        metavar="PATH",
        help="plan and predict from this `moeflow profile` PerfModel "
        "(plan.findep.StepPlanner.from_perf) instead of measuring the host before each round",
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
    for flag in ("--slo-ttft-ms", "--slo-tpot-ms"):
        attr = flag[2:].replace("-", "_")
        if getattr(args, attr) is not None:
            setattr(args, attr, positive_float(flag, getattr(args, attr)))
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
        inputs=[None if args.model == "demo" else args.model, getattr(args, "perf", None)],
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
    """One schedule's run (times in ms). ``r1``/``r2``/``order``: the plan of the run's
    prefill steps (the first step's); ``decode``: that of its decode steps, or None when it is
    the same. ``steps``: every AG forward call (shape, plan, measured and predicted ms)."""

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
    good_requests: int | None = None
    goodput_req_s: float | None = None
    steps: tuple = ()
    predicted_prefill_ms: float | None = None  # the closed form's time of the prefill steps
    measured_prefill_ms: float | None = None
    predicted_decode_ms: float | None = None  # the closed form's time of the decode steps
    measured_decode_ms: float | None = None

    def to_dict(self) -> dict:
        return {**self.__dict__, "steps": list(self.steps)}

    @property
    def prefill_ratio(self) -> float | None:
        """Measured / predicted time of the prefill steps."""
        return _ratio(self.measured_prefill_ms, self.predicted_prefill_ms)

    @property
    def decode_ratio(self) -> float | None:
        """Measured / predicted time of the decode steps."""
        return _ratio(self.measured_decode_ms, self.predicted_decode_ms)


def _ratio(a, b):
    return None if a is None or not b else a / b


def _stats(xs: list[float]) -> tuple[float, float, float]:
    import numpy as np

    if not xs:
        return (float("nan"),) * 3
    a = np.asarray(xs, dtype=float)
    return float(a.mean()), float(np.percentile(a, 50)), float(np.percentile(a, 99))


def summarize(
    results,
    schedule,
    slo_ttft_ms: float | None = None,
    slo_tpot_ms: float | None = None,
    steps=(),
    predict=None,
) -> Metrics:
    """vLLM's metrics from :class:`~moeflow.models.generate.GenerationResult` timestamps.

    Goodput (vLLM ``benchmark_serving --goodput``): a request is good when its TTFT is at
    most ``slo_ttft_ms`` and its TPOT (0 for a one-token request) at most ``slo_tpot_ms``
    (each SLO only when given); goodput is good requests per second of the run's duration
    (None without an SLO). ``steps``: the AG's step records (``serve(steps=...)``);
    ``predict(seqs, tokens, r1, r2, order)``: the model's ms for one, to set beside it."""
    ok = [r for r in results if r.ok and r.tokens]
    if not ok:
        raise InputError("no request produced a token: nothing to measure")
    start = min(r.start_time for r in ok)
    end = max(r.token_times[-1] for r in ok)
    ttft = [1e3 * (r.token_times[0] - r.start_time) for r in ok]
    tpot_all = [
        1e3 * (r.token_times[-1] - r.token_times[0]) / (len(r.tokens) - 1)
        if len(r.tokens) > 1
        else 0.0
        for r in ok
    ]
    tpot = [t for t, r in zip(tpot_all, ok) if len(r.tokens) > 1]
    n_out = sum(len(r.tokens) for r in ok)
    dur = max(end - start, 1e-9)
    good = goodput = None
    if slo_ttft_ms is not None or slo_tpot_ms is not None:
        good = sum(
            (slo_ttft_ms is None or a <= slo_ttft_ms) and (slo_tpot_ms is None or b <= slo_tpot_ms)
            for a, b in zip(ttft, tpot_all)
        )
        goodput = good / dur
    steps = tuple(
        {**st, "predicted_ms": predict(st["seqs"], st["tokens"], st["r1"], st["r2"], st["order"])}
        if predict is not None
        else dict(st)
        for st in steps
    )
    pre = [st for st in steps if st["tokens"] > 1]
    dec = [st for st in steps if st["tokens"] == 1]
    first = pre[0] if pre else (steps[0] if steps else None)
    plan = (
        (first["r1"], first["r2"], first["order"])
        if first
        else (schedule.r1, schedule.r2, schedule.order)
    )
    decode = schedule.decode
    if dec:
        decode = (dec[0]["r1"], dec[0]["r2"], dec[0]["order"])
        decode = None if decode == plan else decode

    def total(sts, key):
        return sum(st[key] for st in sts) if sts and key in sts[0] else None

    return Metrics(
        schedule.name,
        *plan,
        decode,
        len(ok),
        n_out,
        dur,
        n_out / dur,
        _stats(ttft),
        _stats(tpot),
        good,
        goodput,
        steps,
        total(pre, "predicted_ms"),
        total(pre, "ms"),
        total(dec, "predicted_ms"),
        total(dec, "ms"),
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


def _schedules(args, planner=None):
    """The schedules of ``--schedules``: solved per step by ``planner`` (``--plan auto``), or
    fixed by the manual flags."""
    from moeflow.serving.disaggregated import ServeSchedule

    names = [s.strip() for s in str(args.schedules).split(",") if s.strip()]
    bad = [s for s in names if s not in SCHEDULE_CHOICES]
    if bad or not names or len(set(names)) != len(names):
        raise ConfigError(
            "--schedules",
            args.schedules,
            f"distinct names from {SCHEDULE_CHOICES}, comma-separated",
        )
    if planner is not None:
        return [ServeSchedule.per_step(n, planner) for n in names]
    make = {
        "naive": ServeSchedule.naive,
        "pppipe": lambda: ServeSchedule.pppipe(positive_int("--pppipe-r1", args.pppipe_r1)),
        "findep": lambda: ServeSchedule(
            "findep", positive_int("--r1", args.r1), positive_int("--r2", args.r2), args.order
        ),
    }
    return [make[n]() for n in names]


def perf_step_planner(cfg, perf_path, ag: int, eg: int):
    """The :class:`~moeflow.plan.findep.StepPlanner` of ``cfg`` (``max_r2 = 8``, the LM head
    priced) with every cost from the PerfModel in ``perf_path``
    (:meth:`~moeflow.plan.findep.StepPlanner.from_perf`): InputError naming the file when it
    is not one, ConfigError naming a cost it lacks."""
    from moeflow.perf import PerfModel
    from moeflow.plan import findep as fd
    from moeflow.plan.io import MAX_JSON_BYTES
    from moeflow.validate import read_json_file

    perf = PerfModel.from_dict(read_json_file(perf_path, "--perf", MAX_JSON_BYTES))
    return fd.StepPlanner.from_perf(
        findep_model(cfg), perf, ag=ag, eg=eg, vocab_size=cfg.vocab_size, max_r2=8
    )


def _r2(c) -> str:
    """A cost's R^2 for the summary line (``-``: a cost derived, not fitted here)."""
    return "-" if c.r2 is None else f"{c.r2:.3f}"


def _fmt_range(xs, digits: int = 1) -> str:
    xs = [x for x in xs if x is not None]
    if not xs:
        return "-"
    med = statistics.median(xs)
    return f"{med:.{digits}f} [{min(xs):.{digits}f}-{max(xs):.{digits}f}]"


def _plans_used(ms: list[Metrics], prefill: bool) -> str:
    from collections import Counter

    c = Counter(
        (st["r1"], st["r2"], st["order"])
        for m in ms
        for st in m.steps
        if (st["tokens"] > 1) == prefill
    )
    if not c:
        return "-"
    return ", ".join(f"{r1}/{r2}/{o}" for (r1, r2, o), _ in c.most_common(2)) + (
        f" (+{len(c) - 2})" if len(c) > 2 else ""
    )


def format_table(runs: dict[str, list[Metrics]]) -> str:
    """Per schedule: the median [min-max] over its runs."""
    head = (
        "| schedule | prefill r1/r2/order | decode r1/r2/order (most used) | output tok/s "
        "| goodput req/s | TTFT p50 ms | TPOT p50 ms | prefill meas/pred | decode meas/pred |"
    )
    lines = [head, "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for name, ms in runs.items():
        lines.append(
            f"| {name} | {_plans_used(ms, True)} | {_plans_used(ms, False)} | "
            f"{_fmt_range([m.output_tok_s for m in ms])} | "
            f"{_fmt_range([m.goodput_req_s for m in ms], 2)} | "
            f"{_fmt_range([m.ttft_ms[1] for m in ms])} | "
            f"{_fmt_range([m.tpot_ms[1] for m in ms], 2)} | "
            f"{_fmt_range([m.prefill_ratio for m in ms], 2)} | "
            f"{_fmt_range([m.decode_ratio for m in ms], 2)} |"
        )
    return "\n".join(lines)


def format_runs(order: list[list[str]], runs: dict[str, list[Metrics]]) -> str:
    """Every run, in the order it ran."""
    lines = [
        "| round | slot | schedule | output tok/s | goodput req/s | TTFT p50 ms | TPOT p50 ms "
        "| prefill meas/pred ms | decode meas/pred ms |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    seen = {n: 0 for n in runs}
    for i, names in enumerate(order):
        for j, n in enumerate(names):
            m = runs[n][seen[n]]
            seen[n] += 1
            gp = "-" if m.goodput_req_s is None else f"{m.goodput_req_s:.2f}"

            def pair(a, b):
                return "-" if a is None or b is None else f"{a:.0f} / {b:.0f}"

            lines.append(
                f"| {i + 1} | {j + 1} | {n} | {m.output_tok_s:.1f} | {gp} | "
                f"{m.ttft_ms[1]:.1f} | {m.tpot_ms[1]:.2f} | "
                f"{pair(m.measured_prefill_ms, m.predicted_prefill_ms)} | "
                f"{pair(m.measured_decode_ms, m.predicted_decode_ms)} |"
            )
    return "\n".join(lines)


def run_rounds(
    serve_once, schedules, repeat: int, seed: int, summarize_run, on_run=None, before_round=None
):
    """``repeat`` rounds of every schedule, each round in a fresh random order
    (``random.Random(seed)``). ``serve_once(schedule) -> (results, steps)``;
    ``summarize_run(results, schedule, steps) -> Metrics``; ``before_round(i)`` runs before
    round ``i`` (serve-bench measures the costs there). Returns (the order of each round,
    {name: [Metrics per round]})."""
    import random

    rng = random.Random(seed)
    runs: dict[str, list[Metrics]] = {s.name: [] for s in schedules}
    order = []
    for i in range(repeat):
        if before_round is not None:
            before_round(i)
        todo = list(schedules)
        rng.shuffle(todo)
        order.append([s.name for s in todo])
        for s in todo:
            res, steps = serve_once(s)
            failed = [r for r in res if not r.ok]
            if failed:
                raise InputError(f"request {failed[0].request_id} failed: {failed[0].error}")
            m = summarize_run(res, s, steps)
            runs[s.name].append(m)
            if on_run is not None:
                on_run(m)
    return order, runs


def speedups(runs: dict[str, list[Metrics]]) -> dict[str, float]:
    """FinDEP's median over the best of the other schedules' medians: goodput (when an SLO
    was given) and output tok/s."""
    out = {}
    if "findep" not in runs or len(runs) < 2:
        return out
    for key, get in (
        ("goodput", lambda m: m.goodput_req_s),
        ("output_tok_s", lambda m: m.output_tok_s),
    ):
        med = {}
        for n, ms in runs.items():
            xs = [get(m) for m in ms if get(m) is not None]
            if xs:
                med[n] = statistics.median(xs)
        others = [v for n, v in med.items() if n != "findep"]
        if "findep" in med and others and max(others) > 0:
            out[key] = med["findep"] / max(others)
    return out


def bench_record(args, cfg, reqs, costs, order, runs) -> dict:
    """The JSON record of a run (``moeflow.serve-bench/2``): flags, the costs measured before
    each round (gemm, link, attention, head), the order of every round and every run's
    metrics."""
    plo, phi = _range("--prompt-len", args.prompt_len)
    olo, ohi = _range("--output-len", args.output_len)
    return {
        "format": "moeflow.serve-bench/2",
        "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "ag": args.ag,
        "eg": args.eg,
        "requests": len(reqs),
        "prompt_len": [plo, phi],
        "output_len": [olo, ohi],
        "seed": args.seed,
        "repeat": args.repeat,
        "plan": args.plan,
        "slo_ttft_ms": args.slo_ttft_ms,
        "slo_tpot_ms": args.slo_tpot_ms,
        "costs": [
            {
                k: {"alpha_ms": c.alpha, "beta_ms": c.beta, "r2": c.r2}
                for k, c in zip(("gemm", "link", "attention", "head"), round_costs)
            }
            for round_costs in costs
        ],
        "model": {
            "source": args.model,
            "layers": cfg.num_layers,
            "hidden": cfg.hidden_size,
            "experts": cfg.moe.num_experts,
            "top_k": cfg.moe.top_k,
            "shared": cfg.moe.num_shared_experts,
        },
        "order": order,
        "runs": {n: [m.to_dict() for m in ms] for n, ms in runs.items()},
        "speedups": speedups(runs),
    }


def metrics_from_dict(d: dict) -> Metrics:
    """A :class:`Metrics` back from its ``to_dict``."""
    d = dict(d)
    for k in ("ttft_ms", "tpot_ms", "steps"):
        d[k] = tuple(d[k])
    if d["decode"] is not None:
        d["decode"] = tuple(d["decode"])
    return Metrics(**d)


def run_serve_bench(args) -> int:
    """Run the benchmark; print the tables (and write ``--json``). Raises typed errors."""
    from moeflow.progress import Progress
    from moeflow.serving.disaggregated import check_layout, serve

    validate_serve_bench_args(args)  # every flag checked before any work
    ag, eg, repeat = args.ag, args.eg, args.repeat
    model = _model(args)
    check_layout(ag + eg, ag, eg, model.cfg.moe.num_experts)
    reqs = request_set(args, model.cfg.vocab_size, model.cfg.max_position_embeddings)

    def measure():
        c = (fit_gemm(model.cfg, eg), measure_link(), fit_attention(model.cfg), fit_head(model))
        costs.append(c)
        return c

    costs: list = []
    if getattr(args, "perf", None) is not None:  # the one cost model: nothing measured here
        planner = perf_step_planner(model.cfg, args.perf, ag, eg)
        tb = planner.testbed
        gemm, link, attn, head = tb.gemm, tb.link, tb.attention, planner.head
        costs.append((gemm, link, attn, head))
    else:
        gemm, link, attn, head = measure()
        planner = step_planner(model.cfg, ag, eg, gemm, link, attn, head=head)
    schedules = _schedules(args, planner if args.plan == "auto" else None)

    def before_round(i):
        # every round plans and predicts with costs measured just before it (this host's
        # speed drifts when it is shared); the first round uses the costs measured above
        if i and getattr(args, "perf", None) is None:
            g, lk, at, hd = measure()
            planner.recost(host_testbed(ag, eg, g, lk, at), hd)

    seqs = -(-len(reqs) // ag)
    width = max(len(r.prompt) for r in reqs)  # prefill runs right-padded to the longest
    solved = {
        n: (planner.plan(n, seqs, width), planner.plan(n, seqs, 1))
        for n in ("naive", "pppipe", "findep")
    }
    print(
        f"serve-bench: this host: gemm {gemm.alpha:.3g} ms + {gemm.beta:.3g} ms/FLOP "
        f"(R^2 {_r2(gemm)}), link {link.alpha:.3g} ms + {link.beta:.3g} ms/B "
        f"(R^2 {_r2(link)}), attention {attn.alpha:.3g} ms + {attn.beta:.3g} ms/FLOP "
        f"(R^2 {_r2(attn)}), head {head.alpha:.3g} ms + {head.beta:.3g} ms/token "
        f"(R^2 {_r2(head)}); step solver ({seqs} x {width} prefill, {seqs} x 1 decode): "
        + "; ".join(
            f"{n} {p.r1}/{p.r2}/{p.order} then {d.r1}/{d.r2}/{d.order}"
            for n, (p, d) in solved.items()
        )
        + f"; FinDEP solver: prefill r1={solved['findep'][0].r1} r2={solved['findep'][0].r2} "
        f"{solved['findep'][0].order}"
    )

    def serve_once(s):
        steps: list = []
        res = serve(
            model,
            reqs,
            ag=ag,
            eg=eg,
            schedule=s,
            timeout_s=args.timeout,
            warmup=True,
            force=args.force_nproc,
            steps=steps,
        )
        return res, steps

    def summarize_run(res, s, steps):
        return summarize(
            res, s, args.slo_ttft_ms, args.slo_tpot_ms, steps=steps, predict=planner.predict_ms
        )

    with Progress(repeat * len(schedules), "serve-bench", enabled=not args.no_progress) as bar:
        order, runs = run_rounds(
            serve_once,
            schedules,
            repeat,
            args.seed,
            summarize_run,
            on_run=lambda m: bar.update(1, **{m.schedule: round(m.output_tok_s, 1)}),
            before_round=before_round,
        )
    n_out = sum(r.params.max_new_tokens for r in reqs)
    plo, phi = _range("--prompt-len", args.prompt_len)
    olo, ohi = _range("--output-len", args.output_len)
    slo = ", ".join(
        f"{k} <= {v:g} ms"
        for k, v in (("TTFT", args.slo_ttft_ms), ("TPOT", args.slo_tpot_ms))
        if v is not None
    )
    print(
        f"serve-bench: {len(reqs)} requests, prompt {plo}-{phi}, output {olo}-{ohi} tokens "
        f"(uniform, seed {args.seed}; {n_out} output tokens), ag={ag} eg={eg}, "
        f"{repeat} rounds in random order, median [min-max]"
        + (f"; goodput SLO {slo}" if slo else "")
    )
    print(format_table(runs))
    sp = speedups(runs)
    if sp:
        print(
            "serve-bench: findep / best other (medians): "
            + ", ".join(f"{k} {v:.2f}x" for k, v in sp.items())
        )
    if args.json:
        rec = bench_record(args, model.cfg, reqs, costs, order, runs)
        with atomic_file(args.json, force=args.force) as f:
            json.dump(rec, f, indent=1)
            f.write("\n")
    return 0
