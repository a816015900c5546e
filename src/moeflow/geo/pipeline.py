"""Geo-distributed pipeline training over slow, uneven links (FusionLLM / FusionAI).

FusionLLM (Tang et al., "FusionLLM: A Decentralized LLM Training System on Geo-distributed GPUs
with Adaptive Compression", arXiv 2410.12707) trains a model cut into an operator DAG whose
pieces run on devices joined by links of very different speed; only the slowest links carry
sparsified tensors (AdaTopK). FusionAI adds a broker that keeps a backup pool, so a device that
leaves is replaced and training goes on. This module is the runtime half; the pure planner is
:mod:`moeflow.plan.geo` and the graph is :mod:`moeflow.geo.opgraph`::

    job = GeoJob(model="demo", stages=4, bounds=plan.bounds, densities=plan.densities,
                 steps=30, backups=1, checkpoint_dir="ckpt", checkpoint_every=5)
    result = train(job)              # forks stages + backups local ranks
    result.losses                    # one loss per step, from the last stage

How a run is laid out:

* **Stages.** The training module (model + loss) is traced with ``torch.fx``
  (:func:`moeflow.geo.opgraph.trace`) and split at ``bounds``. Stage ``s`` runs on the
  rank holding it and receives exactly the tensors that cross the cut before it
  (``OpGraph.cut_tensors``), in the order of their graph names.
* **Schedule.** GPipe: every micro-batch's forward, then every backward, then one optimizer
  step per stage (AdamW over the stage's own parameters). Forward sends and backward sends are
  asynchronous (``isend``), so a stage computes the next micro-batch while the previous one
  is on the wire. Gradients of the micro-batches add up in the same order as in one process,
  so an uncompressed run reproduces the single-process loss curve (:func:`reference_losses`).
* **Transport.** ``torch.distributed`` point-to-point on a gloo ``ProcessGroupGloo`` built
  on a ``TCPStore`` (rendezvous, membership and heartbeats live in the store). Nothing else
  carries bytes.
* **AdaTopK.** On a link whose density is below 1 (the plan marks it slow), each floating
  tensor goes forward as its top-k entries (fp32 values, int32 positions)
  (:class:`moeflow.geo.sparsify.TopKFeedback`, plain top-k), and backward as the gradient at
  those same positions only (fp32 values; both ends know the positions): the exact gradient
  of the sparsified forward, ``d top-k(x) / dx`` being the mask of the kept entries. Handing
  the receiver's dense gradient to every entry of the sender's activation (straight
  through), with or without an independent top-k of it, ended 37% above the exact loss on a
  mid-model cut (notes/REJECTED.md). Error feedback on the activations was measured and
  dropped too: it adds one micro-batch's leftovers to the next micro-batch's (other
  samples') activations. Links at density 1 are exact.
* **Membership (FusionAI).** The job starts ``stages + backups`` ranks; backups wait in a
  pool. Every rank beats a counter in the store. A rank whose peer vanished (a failed
  ``send``/``recv``), or that sees the failure flag, stops, the ranks agree through the store
  (``compare_set``: the first proposal wins) on which rank is gone (its counter stopped) and
  which backup takes its stage, and everyone builds a new process group. All stages go back
  to the last complete checkpoint (each stage saved its parameters, optimizer and AdaTopK
  codec state; step 0 is the seeded initial model), so nothing is lost but the steps since
  that checkpoint, and the log says which. With no backup left the job stops with
  :class:`GeoJobFailed` naming the stage, the rank and the checkpoint to resume from
  (``GeoJob(resume=True)``, ``moeflow geo train --resume``).

Why not ``torch.distributed.pipelining``: its stages exchange one dense tensor per output
whose gradient comes back on the same channel with the same shape. AdaTopK sends a top-k of
the activations forward (values and positions) and the gradient at those positions backward
(values only): sizes other than the dense tensor's, different in each direction; and a stage
here may receive several cut tensors (skip connections, the targets). Its schedules also tie a
group to a fixed world, while a replaced rank needs a new group mid-run. The stage runner below
is ~100 lines on the same P2P primitives.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import math
import os
import shutil
import sys
import threading
import time
from dataclasses import dataclass, field

import torch

from moeflow.errors import CommTimeoutError, ConfigError, InputError, MoeflowError
from moeflow.validate import nonnegative_int, positive_float, positive_int

MODELS = ("demo", "gpt2")
#: heartbeat period, and how long a counter must stand still before its rank counts as gone
BEAT_S = 0.2
DEAD_AFTER_S = 2.0
_POLL_S = 0.05


#: upper limits of a job's sizes, checked before anything is built (the command line's
#: flags of the same names)
MAX_SIZES = {
    "dim": 8192,
    "layers": 128,
    "heads": 128,
    "seq_len": 8192,
    "experts": 256,
    "microbatch_size": 1024,
    "microbatches": 1024,
}
#: a model of at most this many parameters (4 GB in float32 per copy)
MAX_PARAMS = 1_000_000_000
#: activation elements of one layer for one micro-batch (hidden states or attention scores)
MAX_ACTIVATION = 2**28


class GeoJobFailed(MoeflowError, RuntimeError):
    """The job cannot go on (a stage's rank left and no backup is left)."""


class _Membership(Exception):
    """Internal: the current group lost a member; leave the step and re-form."""


@dataclass(frozen=True, kw_only=True)
class GeoJob:
    """Everything a geo pipeline run needs; validated on construction (before any fork)."""

    model: str = "demo"
    dim: int = 64
    layers: int = 4
    heads: int = 4
    seq_len: int = 64
    experts: int = 4
    top_k: int = 2
    ffn: int = 128
    microbatch_size: int = 4
    microbatches: int = 4
    steps: int = 30
    lr: float = 3e-3
    seed: int = 0
    #: stage boundaries over the traced graph's nodes (None: even split into ``stages``)
    bounds: tuple[int, ...] | None = None
    stages: int = 2
    #: AdaTopK density per link s -> s+1 (None: every link exact)
    densities: tuple[float, ...] | None = None
    backups: int = 0
    checkpoint_dir: str | None = None
    checkpoint_every: int = 0
    resume: bool = False
    #: fault injection: (stage, step) - the rank holding ``stage`` dies during ``step``
    kill: tuple[int, int] | None = None
    threads: int = 1
    #: deadline of every operation (a stage's send or receive; a rank's heartbeat): a rank
    #: that stops for this long ends the run. There is no deadline on the whole run.
    timeout_s: float = 120.0
    max_bytes: int = 2_000_000

    def __post_init__(self):
        if self.model not in MODELS:
            raise ConfigError("model", self.model, f"one of {', '.join(MODELS)}")
        for name in ("dim", "layers", "heads", "seq_len", "microbatch_size", "microbatches"):
            positive_int(name, getattr(self, name), maximum=MAX_SIZES[name])
        positive_int("experts", self.experts, maximum=MAX_SIZES["experts"])
        positive_int("steps", self.steps, maximum=1_000_000)
        positive_int("stages", self.stages, maximum=64)
        positive_float("lr", self.lr)
        positive_float("timeout_s", self.timeout_s)
        nonnegative_int("backups", self.backups)
        nonnegative_int("checkpoint_every", self.checkpoint_every)
        if self.dim % self.heads:
            raise ConfigError("dim", self.dim, f"a multiple of heads={self.heads}")
        if self.model == "demo":
            positive_int("experts", self.experts)
            positive_int("top_k", self.top_k, maximum=self.experts)
            positive_int("ffn", self.ffn)
        if self.bounds is not None:
            b = tuple(self.bounds)
            if len(b) < 2 or b[0] != 0 or any(x >= y for x, y in zip(b, b[1:])):
                raise ConfigError("bounds", b, "strictly increasing node indices starting at 0")
            object.__setattr__(self, "bounds", b)
            object.__setattr__(self, "stages", len(b) - 1)
        if self.stages < 2:
            raise ConfigError("stages", self.stages, "at least 2 (a pipeline)")
        if self.densities is not None:
            d = tuple(float(x) for x in self.densities)
            if len(d) != self.stages - 1:
                raise ConfigError(
                    "densities", d, f"one density per link ({self.stages - 1} for this plan)"
                )
            if not all(0.0 < x <= 1.0 for x in d):
                raise ConfigError("densities", d, "values in (0, 1]")
            object.__setattr__(self, "densities", d)
        if (self.checkpoint_every or self.resume) and not self.checkpoint_dir:
            raise ConfigError("checkpoint_dir", None, "a directory when checkpointing or resuming")
        if self.kill is not None:
            s, k = self.kill
            if not (0 <= s < self.stages and 0 <= k < self.steps):
                raise ConfigError(
                    "kill", self.kill, f"(stage < {self.stages}, step < {self.steps})"
                )
        if self.checkpoint_dir is not None and (
            os.path.exists(self.checkpoint_dir) and not os.path.isdir(self.checkpoint_dir)
        ):
            raise ConfigError("checkpoint_dir", self.checkpoint_dir, "a directory (this is a file)")
        params = self.dim * self.dim * 12 * self.layers
        if self.model == "demo":
            params += 3 * self.dim * self.ffn * self.experts * self.layers
        if params > MAX_PARAMS:
            raise ConfigError(
                "dim/layers/experts",
                f"{self.dim}/{self.layers}/{self.experts}",
                f"a model of at most {MAX_PARAMS:,} parameters (this one has ~{params:,})",
            )
        acts = self.microbatch_size * self.seq_len * max(self.dim, self.heads * self.seq_len)
        if acts > MAX_ACTIVATION:
            raise ConfigError(
                "microbatch_size/seq_len",
                f"{self.microbatch_size}/{self.seq_len}",
                f"at most {MAX_ACTIVATION:,} activation elements per layer and micro-batch "
                f"(this one has {acts:,})",
            )

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclass
class GeoResult:
    losses: list[float]
    step_times_s: list[float]
    events: list[str] = field(default_factory=list)
    #: per link s -> s+1, both directions, all steps of the last generation of the group
    wire_bytes: list[int] = field(default_factory=list)
    #: per stage (last generation): wall time of its training loop, and the part of it not
    #: blocked on a transfer (a receive, or a send's completion) - computing
    busy_s: list[float] = field(default_factory=list)
    wall_s: list[float] = field(default_factory=list)
    #: per step: seconds since its rank's loop started when the step ended (the slowest
    #: rank that reported it)
    elapsed_s: list[float] = field(default_factory=list)
    #: per stage (last generation): CPU seconds its process used in the loop
    cpu_s: list[float] = field(default_factory=list)

    @property
    def utilization(self) -> list[float]:
        """Per stage: compute utilization, busy time over wall time."""
        return [b / w if w > 0 else 0.0 for b, w in zip(self.busy_s, self.wall_s, strict=True)]


# ---- model, data, graph -----------------------------------------------------------------
def _demo_config(job: GeoJob):
    from moeflow.models.demo import DemoModelConfig

    return DemoModelConfig(
        dim=job.dim,
        num_layers=job.layers,
        num_heads=job.heads,
        seq_len=job.seq_len,
        num_experts=job.experts,
        top_k=job.top_k,
        ffn_hidden_size=job.ffn,
    )


def build_module(job: GeoJob) -> torch.nn.Module:
    """The seeded training module of ``job``: ``forward(idx, targets) -> loss``."""
    from moeflow.geo import opgraph

    torch.manual_seed(job.seed)
    if job.model == "demo":
        from moeflow.models.demo import build_demo_model

        return opgraph.demo_training_module(build_demo_model(_demo_config(job), seed=job.seed))
    from transformers import GPT2Config

    cfg = GPT2Config(
        vocab_size=256,
        n_positions=job.seq_len,
        n_embd=job.dim,
        n_layer=job.layers,
        n_head=job.heads,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        tie_word_embeddings=False,
    )
    return opgraph.gpt2_training_module(cfg)


class Batches:
    """Micro-batches of step ``k`` are a function of (seed, k) only, so a stage that goes back
    to a checkpoint sees the same data again."""

    def __init__(self, job: GeoJob):
        from moeflow.models.demo import BatchSampler, load_corpus

        n = job.microbatch_size * job.microbatches
        self.sampler = BatchSampler(load_corpus(job.max_bytes), job.seq_len, n)
        self.job = job

    def __call__(self, step: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        j = self.job
        self.sampler.gen.manual_seed(j.seed * 1_000_003 + step)
        idx, tgt = self.sampler()
        return list(zip(idx.split(j.microbatch_size), tgt.split(j.microbatch_size), strict=True))


def trace_job(job: GeoJob, module: torch.nn.Module | None = None, *, device: str = "cpu"):
    """``(module, Traced)`` for ``job`` (the graph the planner sees and the runtime splits).

    ``device="meta"`` builds the module and the example batch on the meta device: no weight
    is initialised and nothing is computed, for a plan only. The graph is then measured on
    fake tensors (:func:`moeflow.geo.opgraph.trace`), which gives the OpGraph of a real
    build when no node depends on data (GPT-2; not the demo model's MoE routing)."""
    from moeflow.geo import opgraph

    if module is None and device == "cpu":
        module = build_module(job)
    elif module is None:
        with torch.device(device):
            module = build_module(job)
    b = job.microbatch_size
    example = (
        torch.zeros(b, job.seq_len, dtype=torch.long, device=device),
        torch.zeros(b, job.seq_len, dtype=torch.long, device=device),
    )
    return module, opgraph.trace(module, example)


def even_bounds(n_nodes: int, stages: int) -> tuple[int, ...]:
    """Equal node counts per stage (the bounds used when a job has no plan)."""
    if stages > n_nodes:
        raise ConfigError("stages", stages, f"at most the graph's {n_nodes} nodes")
    return tuple(round(i * n_nodes / stages) for i in range(stages + 1))


def reference_losses(job: GeoJob) -> list[float]:
    """The single-process loss curve of ``job`` (same data, micro-batching and optimizer)."""
    module = build_module(job)
    batches = Batches(job)
    opt = torch.optim.AdamW(module.parameters(), lr=job.lr)
    out = []
    for step in range(job.steps):
        total = 0.0
        for idx, tgt in batches(step):
            loss = module(idx, tgt) / job.microbatches
            loss.backward()
            total += loss.item()
        opt.step()
        opt.zero_grad(set_to_none=True)
        out.append(total)
    return out


# ---- one generation's process group ------------------------------------------------------
class _Group:
    """A gloo group of the current members; every wait can be interrupted by the failure flag."""

    def __init__(self, store, gen: int, rank: int, size: int, timeout_s: float):
        self.store, self.gen, self.rank, self.size = store, gen, rank, size
        self.pg = torch.distributed.ProcessGroupGloo(
            torch.distributed.PrefixStore(f"pg{gen}", store),
            rank,
            size,
            datetime.timedelta(seconds=timeout_s),
        )
        self.flag = f"fail/{gen}"
        self.wait_s = 0.0  # time this rank spent blocked on a transfer of this group

    def failed(self) -> bool:
        return self.store.check([self.flag])

    def fail(self, why: str) -> None:
        self.store.compare_set(self.flag, "", why)

    def wait(self, work) -> None:
        """``work.wait()`` in a thread; give up when the group is marked failed. (A gloo wait
        with a timeout closes the pair, so the wait itself cannot be polled.)"""
        done, err = threading.Event(), []
        t0 = time.perf_counter()

        def run():
            try:
                work.wait()
            except BaseException as e:  # noqa: BLE001 - handed to the waiting thread
                err.append(e)
            done.set()

        threading.Thread(target=run, daemon=True).start()
        while not done.wait(_POLL_S):
            if self.failed():
                raise _Membership(self.store.get(self.flag).decode())
        self.wait_s += time.perf_counter() - t0
        if err:
            self.fail(f"stage {self.rank}: {type(err[0]).__name__}: {err[0]}")
            raise _Membership(str(err[0]))

    def send(self, tensors: list[torch.Tensor], dst: int, tag: int) -> list:
        return [self.pg.send([t.contiguous()], dst, tag) for t in tensors]

    def recv(self, tensors: list[torch.Tensor], src: int, tag: int) -> None:
        for t in tensors:
            self.wait(self.pg.recv([t], src, tag))


# ---- one stage ---------------------------------------------------------------------------
def _is_float(meta) -> bool:
    return meta[1].is_floating_point


class _StageRunner:
    def __init__(self, job: GeoJob, stage_idx: int, traced, bounds, specs):
        from moeflow.geo.sparsify import TopKFeedback

        self.job, self.s = job, stage_idx
        self.kill_step: int | None = None  # fault injection, armed by the caller
        self.placeholders = list(traced.input_names)
        self.S = len(bounds) - 1
        self.stage = traced.split(bounds)[stage_idx]
        self.params = list(self.stage.parameters())
        # a stage of parameter-free nodes (the loss) has nothing to optimize
        self.opt = torch.optim.AdamW(self.params, lr=job.lr) if self.params else None
        self.specs = specs  # name -> (shape, dtype) of every cut tensor
        self.in_names = sorted(self.stage.input_names)
        self.out_names = sorted(self.stage.output_names)
        dens = job.densities or (1.0,) * (self.S - 1)
        self.d_in = dens[stage_idx - 1] if stage_idx > 0 else 1.0
        self.d_out = dens[stage_idx] if stage_idx < self.S - 1 else 1.0
        # activations go as plain top-k (feedback on activations adds one sample's leftovers
        # to another sample's activations: +41% final loss at density 0.25,
        # notes/REJECTED.md); their gradients go back at the positions sent, no codec
        self.fb_act = {
            n: TopKFeedback(self.d_out, feedback=False) for n in self.out_names if self.d_out < 1
        }
        self.wire = [0, 0]  # bytes sent forward, backward

    # -- wire format: exact tensors, or (values fp32, positions int32) at density < 1
    def _k(self, name: str, density: float) -> int:
        from moeflow.geo.sparsify import topk_count

        return topk_count(density, math.prod(self.specs[name][0]))

    def _encode(self, name, t, density) -> list[torch.Tensor]:
        """Forward: the dense tensor, or its top-k as (fp32 values, int32 positions)."""
        if density >= 1 or not t.is_floating_point():
            return [t.detach()]
        values, positions = self.fb_act[name].compress(t.detach())
        return [values.float(), positions.to(torch.int32)]

    def _buffers(self, name, density) -> list[torch.Tensor]:
        shape, dtype = self.specs[name]
        if density >= 1 or not dtype.is_floating_point:
            return [torch.empty(shape, dtype=dtype)]
        k = self._k(name, density)
        return [torch.empty(k, dtype=torch.float32), torch.empty(k, dtype=torch.int32)]

    def _decode(self, name, bufs, density) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The dense tensor and, for a top-k, its positions (int64, flat)."""
        shape, dtype = self.specs[name]
        if len(bufs) == 1:
            return bufs[0], None
        from moeflow.geo.sparsify import TopKFeedback

        positions = bufs[1].long()
        return TopKFeedback.decompress(bufs[0].to(dtype), positions, shape, dtype), positions

    @staticmethod
    def _encode_grad(g, positions) -> list[torch.Tensor]:
        """Backward: the dense gradient, or (``positions`` of a top-k forward) its fp32 values
        at those positions only, without the positions (the receiver kept them)."""
        if positions is not None:
            g = g.reshape(-1)[positions].float()
        return [g.detach().contiguous()]

    def _grad_buffers(self, name, density) -> list[torch.Tensor]:
        """Backward: the dense gradient, or its values at the forward's positions (fp32)."""
        shape, dtype = self.specs[name]
        if density >= 1:
            return [torch.empty(shape, dtype=dtype)]
        return [torch.empty(self._k(name, density), dtype=torch.float32)]

    def _grad_dense(self, name, bufs, positions) -> torch.Tensor:
        shape, dtype = self.specs[name]
        if positions is None:
            return bufs[0]
        out = torch.zeros(math.prod(shape), dtype=dtype)
        out[positions] = bufs[0].to(dtype)
        return out.view(shape)

    def step(self, group: _Group, batches, step: int) -> float | None:
        first, last = self.s == 0, self.s == self.S - 1
        mbs = batches(step) if first else None
        saved, pending, losses = [], [], []
        for m in range(self.job.microbatches):
            if first:
                given = dict(zip(self.placeholders, mbs[m], strict=True))
                inputs = {n: given[n] for n in self.stage.input_names}
            else:
                inputs, kept_in = {}, {}
                for n in self.in_names:
                    bufs = self._buffers(n, self.d_in)
                    group.recv(bufs, self.s - 1, tag=0)
                    inputs[n], kept_in[n] = self._decode(n, bufs, self.d_in)
                for t in inputs.values():
                    if t.is_floating_point():
                        t.requires_grad_(True)
            if self.kill_step == step and m == min(1, self.job.microbatches - 1):
                _die()
            out = self.stage(inputs)
            kept_out = {}
            if last:
                losses.append(out["output"] / self.job.microbatches)
            else:
                for n in self.out_names:
                    ts = self._encode(n, out[n], self.d_out)
                    kept_out[n] = ts[1].long() if len(ts) == 2 else None
                    self.wire[0] += sum(t.numel() * t.element_size() for t in ts)
                    pending += group.send(ts, self.s + 1, tag=0)
            saved.append((inputs, out, None if first else kept_in, kept_out))
        for m in range(self.job.microbatches):
            inputs, out, kept_in, kept_out = saved[m]
            if last:
                losses[m].backward()
            else:
                outs, grads = [], []
                for n in self.out_names:
                    if not self.specs[n][1].is_floating_point:
                        continue
                    bufs = self._grad_buffers(n, self.d_out)
                    group.recv(bufs, self.s + 1, tag=1)
                    if out[n].requires_grad:
                        outs.append(out[n])
                        # zero where the forward sent nothing: those entries did not reach
                        # the loss, so their gradient is 0 (the mask of top-k)
                        grads.append(self._grad_dense(n, bufs, kept_out[n]))
                if outs:
                    torch.autograd.backward(outs, grads)
            if not first:
                for n in self.in_names:
                    t = inputs[n]
                    if not t.is_floating_point():
                        continue
                    g = t.grad if t.grad is not None else torch.zeros_like(t)
                    ts = self._encode_grad(g, kept_in[n])
                    self.wire[1] += sum(x.numel() * x.element_size() for x in ts)
                    pending += group.send(ts, self.s - 1, tag=1)
        for w in pending:
            group.wait(w)
        if self.opt is not None:
            self.opt.step()
            self.opt.zero_grad(set_to_none=True)
        return sum(x.item() for x in losses) if last else None

    # -- checkpoints: one file per stage and step, written atomically
    def state(self, step: int) -> dict:
        return {
            "step": step,
            "params": [p.detach().clone() for p in self.params],
            "optim": self.opt.state_dict() if self.opt is not None else None,
            "fb_act": {n: f.state_dict() for n, f in self.fb_act.items()},
        }

    def load_file(self, path: str) -> None:
        """:meth:`load` the stage file ``path`` (tensors and plain data only); a typed error
        naming the file when it is damaged or belongs to another job."""
        from moeflow.checkpoint.state import load_plain

        st = load_plain(path)
        try:
            self.load(st)
        except MoeflowError as e:
            raise InputError(f"{path}: {e}") from None
        except (KeyError, TypeError, ValueError, RuntimeError, IndexError) as e:
            text = " ".join(str(e).split())[:300]
            raise InputError(
                f"{path} does not fit stage {self.s} of this job ({type(e).__name__}: {text})"
            ) from None

    def load(self, st: dict) -> None:
        with torch.no_grad():
            for p, v in zip(self.params, st["params"], strict=True):
                p.copy_(v)
        if self.opt is not None:
            self.opt.load_state_dict(st["optim"])
            self.opt.zero_grad(set_to_none=True)  # a step cut short left partial gradients
        for n, f in self.fb_act.items():
            f.load_state_dict(st["fb_act"][n])


def _die() -> None:
    """Fault injection: leave as a crashed device would, without a word to anyone."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(17)


def _stage_file(root: str, step: int, stage: int) -> str:
    return os.path.join(root, f"step{step:07d}", f"stage{stage}.pt")


def _save(root: str, step: int, stage: int, state: dict) -> None:
    from moeflow.checkpoint.state import save_plain

    path = _stage_file(root, step, stage)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    save_plain(state, path)


def latest_checkpoint(root: str) -> int | None:
    """The last step every stage saved (``<root>/latest``), or None."""
    try:
        with open(os.path.join(root, "latest")) as f:
            return int(json.load(f)["step"])
    except FileNotFoundError:
        return None
    except (ValueError, KeyError, TypeError, OSError) as e:
        raise InputError(f"{root}/latest: unreadable checkpoint pointer ({e!r})") from None


def check_resume(job: GeoJob, step: int) -> None:
    """Before any rank starts: every stage file of checkpoint ``step`` loads into its stage
    (tensors and plain data only; a typed error naming the file otherwise). Removes what
    saves cut short left behind: temp files, and step directories after ``step``."""
    root = job.checkpoint_dir
    with open(os.path.join(root, "latest")) as f:
        saved_stages = json.load(f).get("stages", job.stages)
    if saved_stages != job.stages:
        raise InputError(
            f"{root}: checkpoint step {step} holds {saved_stages} stages; this job has "
            f"{job.stages} (resume with the same plan)"
        )
    for name in os.listdir(root):
        full = os.path.join(root, name)
        if name.endswith(".tmp"):
            os.remove(full)
        elif name.startswith("step") and name[4:].isdigit() and int(name[4:]) > step:
            shutil.rmtree(full, ignore_errors=True)
    folder = os.path.dirname(_stage_file(root, step, 0))
    if os.path.isdir(folder):
        for name in os.listdir(folder):
            if name.endswith(".tmp"):
                os.remove(os.path.join(folder, name))
    _, traced = trace_job(job)
    bounds = job.bounds or even_bounds(len(traced.ops.nodes), job.stages)
    specs = _cut_specs(traced, bounds, job)
    for s in range(job.stages):
        _StageRunner(job, s, traced, bounds, specs).load_file(_stage_file(root, step, s))


def _mark_complete(root: str, step: int, stages: int) -> None:
    tmp = os.path.join(root, "latest.tmp")
    with open(tmp, "w") as f:
        json.dump({"step": step, "stages": stages}, f)
    os.replace(tmp, os.path.join(root, "latest"))
    for name in os.listdir(root):  # keep the complete checkpoint and anything newer
        if name.startswith("step") and name[4:].isdigit() and int(name[4:]) < step:
            shutil.rmtree(os.path.join(root, name), ignore_errors=True)


# ---- a rank's life: stage or backup, generation after generation ---------------------------
def _log(events: list, msg: str) -> None:
    events.append(msg)
    print(f"moeflow geo: {msg}", file=sys.stderr, flush=True)


def _beat(store, uid: int, stop: threading.Event) -> None:
    n = 0
    while not stop.wait(BEAT_S):
        n += 1
        try:
            store.set(f"hb/{uid}", str(n))
        except Exception:  # the broker is gone: the run is over
            return


def _members(store, gen: int) -> dict:
    return json.loads(store.get(f"gen/{gen}").decode())


def _propose(store, gen: int, members: dict, job: GeoJob, events: list) -> dict:
    """Agree on generation ``gen + 1``: find the member whose heartbeat stopped and give its
    stage to the first free backup (first proposal wins)."""
    key = f"gen/{gen + 1}"
    stages = members["stages"]

    def beats():
        return {u: store.get(f"hb/{u}") if store.check([f"hb/{u}"]) else b"" for u in stages}

    deadline = time.monotonic() + max(10 * DEAD_AFTER_S, 30.0)
    dead: list[int] = []
    while not dead and not store.check([key]):
        if time.monotonic() > deadline:
            raise CommTimeoutError(
                f"generation {gen}: a member failed but every heartbeat is still going"
            )
        before = beats()
        time.sleep(DEAD_AFTER_S)
        after = beats()
        dead = [u for u in stages if before[u] == after[u]]
    if not store.check([key]):
        pool = [u for u in members["pool"] if u not in dead]
        new_stages, gone = list(stages), []
        for s, u in enumerate(stages):
            if u in dead:
                gone.append((s, u))
                new_stages[s] = pool.pop(0) if pool else -1
        ckpt = int(store.get("ckpt/latest")) if store.check(["ckpt/latest"]) else -1
        proposal = {
            "stages": new_stages,
            "pool": pool,
            "gone": gone,
            "resume": ckpt,
            "failed_step": members.get("step", -1),
        }
        store.compare_set(key, "", json.dumps(proposal))
    return _members(store, gen + 1)


def _rank_main(uid: int, world: int, job: GeoJob, store_addr: tuple[str, int] | None) -> dict:
    store = _client_store(store_addr, world)
    stop = threading.Event()
    threading.Thread(target=_beat, args=(store, uid, stop), daemon=True).start()
    events: list[str] = []
    result = {"uid": uid, "times": {}, "elapsed": {}, "events": events, "wire": None}
    try:
        _run(uid, world, job, store, events, result)
    finally:
        stop.set()
    return result


def _client_store(store_addr, world):
    from torch.distributed import TCPStore

    if store_addr is None:  # under torchrun: the agent's store outlives any worker
        host, port = os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"])
    else:
        host, port = store_addr
    return TCPStore(host, port, None, False, timeout=datetime.timedelta(seconds=300))


def _run(uid, world, job, store, events, result) -> None:
    S = job.stages
    _, traced = trace_job(job)
    bounds = job.bounds or even_bounds(len(traced.ops.nodes), S)
    if bounds[-1] != len(traced.ops.nodes):
        raise ConfigError(
            "bounds", bounds, f"ending at the traced graph's {len(traced.ops.nodes)} nodes"
        )
    specs = _cut_specs(traced, bounds, job)
    batches = Batches(job)
    gen = 0
    graveyard: list[_Group] = []
    if uid == 0:
        first = {"stages": list(range(S)), "pool": list(range(S, world)), "resume": -1}
        if job.resume:
            step = latest_checkpoint(job.checkpoint_dir)
            if step is None:
                raise InputError(f"{job.checkpoint_dir}: no complete checkpoint to resume from")
            first["resume"] = step
            store.set("ckpt/latest", str(step))
        store.compare_set("gen/0", "", json.dumps(first))
    store.wait(["gen/0"])
    members = _members(store, 0)
    runner = None
    while True:
        if uid not in members["stages"]:
            if uid not in members["pool"]:
                raise GeoJobFailed(f"rank {uid} was counted as gone by the other ranks")
            # a backup: wait for a new generation or the end of the job
            while not (store.check([f"gen/{gen + 1}"]) or store.check(["done"])):
                time.sleep(_POLL_S * 4)
            if store.check([f"gen/{gen + 1}"]):
                gen += 1
                members = _members(store, gen)
                _check_abort(members, job)
                continue
            return
        s = members["stages"].index(uid)
        if runner is None or runner.s != s:
            runner = _StageRunner(job, s, traced, bounds, specs)
        start = members["resume"] + 1
        if members["resume"] >= 0:
            runner.load_file(_stage_file(job.checkpoint_dir, members["resume"], s))
        elif gen > 0:  # no checkpoint yet: everyone restarts from the seeded model
            _, traced = trace_job(job)
            runner = _StageRunner(job, s, traced, bounds, specs)
            start = 0
        if job.kill is not None and gen == 0 and job.kill[0] == s:
            runner.kill_step = job.kill[1]
        if gen > 0:
            _log(
                events,
                f"rank {uid} holds stage {s} from "
                + (f"checkpoint step {members['resume']}" if start else "the initial model"),
            )
        group = _Group(store, gen, s, S, job.timeout_s)
        graveyard.append(group)  # a failed group is dropped, never torn down mid-wait
        try:
            t_loop, cpu_loop = time.perf_counter(), time.process_time()
            for step in range(start, job.steps):
                if s == 0:
                    store.set(f"step/{gen}", str(step))
                t0 = time.perf_counter()
                loss = runner.step(group, batches, step)
                result["times"][step] = time.perf_counter() - t0
                if loss is not None:
                    store.set(f"loss/{step}", repr(loss))
                if job.checkpoint_every and (step + 1) % job.checkpoint_every == 0:
                    _save(job.checkpoint_dir, step, s, runner.state(step))
                    if store.add(f"ckpt/{gen}/{step}", 1) == S:
                        _mark_complete(job.checkpoint_dir, step, S)
                        store.set("ckpt/latest", str(step))
                result["elapsed"][step] = time.perf_counter() - t_loop
            wall = time.perf_counter() - t_loop
            store.set(f"wire/{gen}/{s}", json.dumps(runner.wire))
            cpu = time.process_time() - cpu_loop
            store.set(f"util/{gen}/{s}", json.dumps([wall - group.wait_s, wall, cpu]))
            # leave together: nobody tears down while a peer still waits on it
            group.wait(group.pg.barrier())
            result["stage"] = s
            if s == S - 1:  # the last stage reports the whole curve (some of it may be
                # from a rank that has left since) and the bytes of every link
                sent = [json.loads(store.get(f"wire/{gen}/{i}")) for i in range(S)]
                result["wire"] = [sent[i][0] + sent[i + 1][1] for i in range(S - 1)]
                result["util"] = [json.loads(store.get(f"util/{gen}/{i}")) for i in range(S)]
                result["losses"] = {
                    k: float(store.get(f"loss/{k}"))
                    for k in range(job.steps)
                    if store.check([f"loss/{k}"])
                }
            store.set("done", "1")
            return
        except _Membership as e:
            members["step"] = int(store.get(f"step/{gen}")) if store.check([f"step/{gen}"]) else 0
            group.fail(str(e))
            new = _propose(store, gen, members, job, events)
            gen += 1
            for s_gone, u_gone in new["gone"]:
                _log(
                    events,
                    f"rank {u_gone} (stage {s_gone}) left during step {new['failed_step']}"
                    + (
                        f"; rank {new['stages'][s_gone]} from the backup pool takes it"
                        if new["stages"][s_gone] >= 0
                        else "; no backup left"
                    )
                    + f"; resuming after step {new['resume']}"
                    + (
                        f" (steps {new['resume'] + 1}..{new['failed_step']} are redone)"
                        if new["failed_step"] > new["resume"]
                        else ""
                    ),
                )
            _check_abort(new, job)
            members = new


def _check_abort(members: dict, job: GeoJob) -> None:
    if -1 in members["stages"]:
        s = members["stages"].index(-1)
        gone = dict(members["gone"]).get(s, "?")
        where = (
            f"resume from checkpoint step {members['resume']} in {job.checkpoint_dir} "
            "(moeflow geo train --resume)"
            if job.checkpoint_dir and members["resume"] >= 0
            else "no checkpoint was written (set --checkpoint-every)"
        )
        raise GeoJobFailed(f"stage {s}'s rank {gone} left and no backup is left; {where}")


def _cut_specs(traced, bounds, job) -> dict:
    """Shape and dtype of every tensor that crosses a stage boundary (one dry run)."""
    b = job.microbatch_size
    x = torch.zeros(b, job.seq_len, dtype=torch.long)
    values = dict(zip(list(traced.input_names), (x, x), strict=True))
    specs = {n: (tuple(v.shape), v.dtype) for n, v in values.items()}
    with torch.no_grad():
        for st in traced.split(bounds):
            out = st({n: values[n] for n in st.input_names})
            values.update(out)
            specs.update({n: (tuple(v.shape), v.dtype) for n, v in out.items()})
    return specs


# ---- the parent: the broker's store and the local ranks ------------------------------------
def check_bounds(job: GeoJob) -> None:
    """ConfigError unless the job's stage bounds (or its even split) fit the traced graph."""
    _, traced = trace_job(job)
    n = len(traced.ops.nodes)
    bounds = job.bounds or even_bounds(n, job.stages)
    if bounds[-1] != n:
        raise ConfigError("bounds", bounds, f"ending at the traced graph's {n} nodes")


def train(job: GeoJob, *, force: bool = False, progress: bool = True) -> GeoResult:
    """Run ``job`` on ``stages + backups`` local ranks; the parent hosts the store (the
    broker), so membership survives any rank."""
    from torch.distributed import TCPStore

    from moeflow.launch import RankFailed, launch

    world = job.stages + job.backups
    check_bounds(job)  # in the parent: a plan that does not fit fails before any fork
    start = 0
    if job.resume:
        step = latest_checkpoint(job.checkpoint_dir)
        if step is None:
            raise InputError(f"{job.checkpoint_dir}: no complete checkpoint to resume from")
        check_resume(job, step)
        start = step + 1
    store = TCPStore("127.0.0.1", 0, None, True, wait_for_workers=False)
    expect = [job.kill[0]] if job.kill else []
    try:
        results = launch(
            _rank_main,
            world,
            job,
            ("127.0.0.1", store.port),
            force=force,
            name="moeflow geo",
            init_group=False,
            threads=job.threads,
            stall_timeout_s=job.timeout_s,
            expect_exit=expect,
            progress=progress,
        )
    except RankFailed as e:
        if e.kind == GeoJobFailed.__name__:  # the job's own verdict, not a crash
            raise GeoJobFailed(str(e).split(": ", 2)[-1]) from None
        raise
    losses = {
        k: float(store.get(f"loss/{k}")) for k in range(job.steps) if store.check([f"loss/{k}"])
    }
    return merge_results([r for r in results if r is not None], losses, job, start)


def merge_results(results: list[dict], losses: dict, job: GeoJob, start: int = 0) -> GeoResult:
    """One :class:`GeoResult` from the ranks' reports and the losses the last stage stored;
    steps before ``start`` (done before a resumed run) are NaN."""
    times, elapsed = {}, {}
    wire = [0] * (job.stages - 1)
    util: list = []
    events = []
    for r in results:
        for k, v in r["times"].items():
            times[int(k)] = max(times.get(int(k), 0.0), v)
        for k, v in r.get("elapsed", {}).items():
            elapsed[int(k)] = max(elapsed.get(int(k), 0.0), v)
        if r.get("wire") is not None:
            wire = r["wire"]
            util = r.get("util", [])
        events += r["events"]
    missing = [k for k in range(start, job.steps) if k not in losses]
    if missing:
        raise GeoJobFailed(f"the run ended without losses for steps {missing[:5]}")
    return GeoResult(
        losses=[losses.get(k, float("nan")) for k in range(job.steps)],
        step_times_s=[times.get(k, float("nan")) for k in range(job.steps)],
        events=list(dict.fromkeys(events)),
        wire_bytes=wire,
        busy_s=[u[0] for u in util],
        wall_s=[u[1] for u in util],
        cpu_s=[u[2] for u in util],
        elapsed_s=[elapsed.get(k, float("nan")) for k in range(job.steps)],
    )


def run_torchrun(job: GeoJob) -> dict:
    """Entry for one rank under torchrun (``RANK``/``WORLD_SIZE`` and the agent's store)."""
    uid, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    if world != job.stages + job.backups:
        raise ConfigError("WORLD_SIZE", world, f"stages + backups = {job.stages + job.backups}")
    torch.set_num_threads(job.threads)
    return _rank_main(uid, world, job, None)
