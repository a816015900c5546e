"""DiLoCo: replicas that talk once every H steps (slow links), whole or pipelined in a site.

DiLoCo (Douillard et al., "DiLoCo: Distributed Low-Communication Training of Language
Models", arXiv 2311.08105, Algorithm 1) keeps one model replica per site. Each replica runs
H *inner* steps of AdamW on its own data shard without communicating; then one *outer* step
turns the replicas' movement into a pseudo-gradient and applies it to the shared (global)
parameters with Nesterov momentum SGD::

    for outer step t:
        every replica i:  theta_i <- theta^(t-1);  H steps of AdamW on shard i  -> theta_i
        Delta^(t)  = 1/R sum_i (theta^(t-1) - theta_i)         # one all-reduce, params' size
        theta^(t)  = OuterOpt(theta^(t-1), Delta^(t))           # SGD, Nesterov, lr 0.7, mu 0.9

The inner AdamW state stays on its replica across outer steps (as in the paper). The outer
momentum is ``torch.optim.SGD(nesterov=True)``: ``b <- mu b + Delta``,
``theta <- theta - lr (Delta + mu b)`` (``b`` starts at the first ``Delta``).

Per inner step a replica all-reduces ``param bytes / H``, against ``param bytes`` (the
gradients) for plain data parallelism, which this module also runs (``mode="dp"``: average
the gradients every step, then AdamW) as the baseline.

    job = DilocoJob(replicas=2, inner_steps=10, steps=30)
    result = train(job)               # forks one gloo rank per replica
    result.losses                     # mean over replicas of each inner step's training loss
    result.allreduce_bytes            # bytes handed to all-reduce at each outer step

**pipeline-diloco** (``mode="pipeline-diloco"``): each of ``replicas`` sites holds one model
replica cut into ``stages`` pipeline stages over its own nodes (fast links): the GPipe stage
runner of :mod:`moeflow.geo.pipeline` (the same micro-batching, AdamW per stage, exact links).
Between the sites nothing moves for H inner steps; then stage ``s`` of every replica averages
its own parameters' delta with stage ``s`` of the others and applies the outer Nesterov step
to them::

    Delta_s = 1/R sum_r (theta_s - theta_{r,s});  theta_s <- OuterOpt(theta_s, Delta_s)

A stage's parameters are a block of the model's and the outer step is elementwise, so a run
equals DiLoCo over whole replicas whatever the cut, and plain training with one replica,
H = 1, outer lr 1 and momentum 0. The slow links carry one all-reduce per stage every H
steps, of that stage's parameters; the S stages of a site all-reduce at the same time, each
over its own pair of nodes. Rank ``r * stages + s`` holds stage ``s`` of replica ``r``; each
replica's pipeline and each stage's all-reduce get their own ``ProcessGroupGloo`` on the
default group's store, with ``timeout_s`` as the deadline of every transfer.

Transport: the default gloo group of :func:`moeflow.launch.launch`, whose timeout is the
job's ``timeout_s``: every all-reduce has that deadline, as every send and receive of the
geo pipeline does, and a rank that stalls for that long ends the run.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import time
from dataclasses import dataclass, field

import torch

from moeflow.checkpoint.state import save_plain
from moeflow.errors import CommTimeoutError, ConfigError, InputError
from moeflow.validate import nonnegative_int, positive_float, positive_int

MODES = ("diloco", "dp", "pipeline-diloco")
#: DiLoCo's published outer optimizer (arXiv 2311.08105, section 3)
OUTER_LR = 0.7
OUTER_MOMENTUM = 0.9
#: the most replicas (local ranks) a job may have
MAX_REPLICAS = 64


@dataclass(frozen=True, kw_only=True)
class DilocoJob:
    """A DiLoCo (or plain data-parallel) run; validated on construction (before any fork)."""

    mode: str = "diloco"
    replicas: int = 2
    #: H: inner steps between two outer steps (the paper uses 500 on its 88k-step runs)
    inner_steps: int = 10
    outer_lr: float = OUTER_LR
    outer_momentum: float = OUTER_MOMENTUM
    #: inner steps in all (a multiple of ``inner_steps`` in modes diloco and pipeline-diloco)
    steps: int = 30
    #: pipeline-diloco: pipeline stages per replica (one rank each; 1: the whole model)
    stages: int = 1
    #: pipeline-diloco: stage bounds over the traced graph (None: even split into ``stages``)
    bounds: tuple[int, ...] | None = None
    lr: float = 3e-3
    seed: int = 0
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
    threads: int = 1
    #: deadline of every all-reduce (and of a rank's heartbeat)
    timeout_s: float = 120.0
    max_bytes: int = 2_000_000
    #: mode diloco: save every replica's state after every ``checkpoint_every`` inner steps
    #: (a multiple of ``inner_steps``: right after an outer step) into ``checkpoint_dir``
    checkpoint_dir: str | None = None
    checkpoint_every: int = 0
    #: start after the last complete checkpoint of ``checkpoint_dir``
    resume: bool = False

    def __post_init__(self):
        if self.mode not in MODES:
            raise ConfigError("mode", self.mode, f"one of {', '.join(MODES)}")
        positive_int("replicas", self.replicas, maximum=MAX_REPLICAS)
        positive_int("inner_steps", self.inner_steps, maximum=1_000_000)
        positive_float("outer_lr", self.outer_lr)
        m = self.outer_momentum
        if isinstance(m, bool) or not isinstance(m, (int, float)) or not 0 <= m < 1:
            raise ConfigError("outer_momentum", m, "a number in [0, 1)")
        positive_int("stages", self.stages, maximum=MAX_REPLICAS)
        if self.bounds is not None:
            b = tuple(self.bounds)
            if len(b) < 2 or b[0] != 0 or any(x >= y for x, y in zip(b, b[1:])):
                raise ConfigError("bounds", b, "strictly increasing node indices starting at 0")
            object.__setattr__(self, "bounds", b)
            object.__setattr__(self, "stages", len(b) - 1)
        if self.mode != "pipeline-diloco" and self.stages != 1:
            raise ConfigError("stages", self.stages, "1 (a pipeline only in mode pipeline-diloco)")
        if self.replicas * self.stages > MAX_REPLICAS:
            raise ConfigError(
                "replicas/stages",
                f"{self.replicas}/{self.stages}",
                f"at most {MAX_REPLICAS} ranks (replicas x stages)",
            )
        nonnegative_int("checkpoint_every", self.checkpoint_every)
        if self.checkpoint_every or self.resume:
            if self.mode != "diloco":
                raise ConfigError("checkpoint_every/resume", self.mode, "mode diloco")
            if not self.checkpoint_dir:
                raise ConfigError(
                    "checkpoint_dir", None, "a directory when checkpointing or resuming"
                )
            if self.checkpoint_every % self.inner_steps:
                raise ConfigError(
                    "checkpoint_every",
                    self.checkpoint_every,
                    f"a multiple of inner_steps={self.inner_steps} (right after an outer step)",
                )
        if self.mode != "dp" and self.steps % self.inner_steps:
            raise ConfigError("steps", self.steps, f"a multiple of inner_steps={self.inner_steps}")
        positive_int("threads", self.threads)
        self.model_job()  # the model, batch, lr and timeout fields, as the pipeline checks them

    def model_job(self):
        """The :class:`moeflow.geo.pipeline.GeoJob` with this job's model, data and inner
        optimizer (one replica's single-process run; ``reference_losses`` of it is plain
        training on shard 0 when ``replicas == 1``)."""
        from moeflow.geo.pipeline import GeoJob

        names = (
            "model dim layers heads seq_len experts top_k ffn microbatch_size microbatches "
            "steps lr seed threads timeout_s max_bytes"
        ).split()
        return GeoJob(**{n: getattr(self, n) for n in names})

    @property
    def world(self) -> int:
        """Ranks of the job: one per replica, times the stages in mode pipeline-diloco."""
        return self.replicas * self.stages

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclass
class DilocoResult:
    #: per inner step, the mean over replicas of each replica's training loss (own shard)
    losses: list[float]
    replica_losses: list[list[float]]
    #: per inner step, the slowest replica's time
    step_times_s: list[float]
    #: bytes handed to all-reduce by one replica at each synchronisation (outer step; in mode
    #: dp every inner step)
    allreduce_bytes: list[int]
    #: rank 0's wall time in each of those all-reduces
    allreduce_s: list[float]
    #: training tokens of all replicas per second of the slowest replica's loop
    tokens_per_s: float
    #: bytes of the model's parameters (one replica)
    param_bytes: int
    #: the global parameters at the end (replica 0's copy; stage after stage in mode
    #: pipeline-diloco)
    params: list[torch.Tensor] = field(default_factory=list)
    #: per rank: wall time of its training loop, and the part of it not blocked on a
    #: transfer (an all-reduce; a pipeline receive or send) - computing
    wall_s: list[float] = field(default_factory=list)
    busy_s: list[float] = field(default_factory=list)
    #: per inner step: seconds since the loop started when the slowest rank ended the step
    elapsed_s: list[float] = field(default_factory=list)
    #: per rank: CPU seconds its process used in the loop (all its threads)
    cpu_s: list[float] = field(default_factory=list)

    @property
    def utilization(self) -> list[float]:
        """Per rank: compute utilization, busy time over wall time."""
        return [b / w if w > 0 else 0.0 for b, w in zip(self.busy_s, self.wall_s, strict=True)]

    @property
    def bytes_per_inner_step(self) -> float:
        return sum(self.allreduce_bytes) / max(1, len(self.losses))


class ShardBatches:
    """Step ``k``'s micro-batches of replica ``rank``: the step's global batch (a function of
    (seed, k) only) is ``replicas`` shards of ``microbatch_size * microbatches`` sequences;
    with one replica it is exactly :class:`moeflow.geo.pipeline.Batches`."""

    def __init__(self, job: DilocoJob, rank: int):
        from moeflow.models.demo import BatchSampler, load_corpus

        self.n = job.microbatch_size * job.microbatches
        self.sampler = BatchSampler(load_corpus(job.max_bytes), job.seq_len, self.n * job.replicas)
        self.job, self.rank = job, rank

    def __call__(self, step: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        j = self.job
        self.sampler.gen.manual_seed(j.seed * 1_000_003 + step)
        idx, tgt = self.sampler()
        lo, hi = self.rank * self.n, (self.rank + 1) * self.n
        return list(
            zip(
                idx[lo:hi].split(j.microbatch_size),
                tgt[lo:hi].split(j.microbatch_size),
                strict=True,
            )
        )


class CountingAllReduce:
    """Sum a tensor in place over the default group, or over ``pg`` (a process group object:
    the same stage of every replica in mode pipeline-diloco), and count the bytes handed to
    each call and its wall time."""

    def __init__(self, world: int, timeout_s: float | None = None, pg=None):
        self.world, self.timeout_s, self.pg = world, timeout_s, pg
        self.calls: list[int] = []  # bytes handed to each call
        self.seconds: list[float] = []  # wall time of each call

    def __call__(self, t: torch.Tensor) -> None:
        nbytes = t.numel() * t.element_size()
        self.calls.append(nbytes)
        t0 = time.perf_counter()
        if self.world > 1:
            import torch.distributed as dist

            try:
                if self.pg is None:
                    dist.all_reduce(t)  # the default group's timeout is the job's deadline
                else:
                    self.pg.allreduce([t]).wait()
            except RuntimeError as e:
                if "timed out" not in str(e).lower():
                    raise
                raise CommTimeoutError(
                    f"all-reduce {len(self.calls)} ({nbytes:,} bytes) got no answer from a "
                    f"peer within timeout_s={self.timeout_s} s"
                ) from None
        self.seconds.append(time.perf_counter() - t0)


class Replica:
    """One replica's model, inner AdamW, global copy and outer Nesterov SGD."""

    def __init__(self, job: DilocoJob, rank: int, world: int):
        from moeflow.geo.pipeline import build_module

        self.job, self.rank, self.world = job, rank, world
        self.module = build_module(job.model_job())  # seeded: every replica starts equal
        self.params = [p for p in self.module.parameters() if p.requires_grad]
        self.inner = torch.optim.AdamW(self.params, lr=job.lr)
        self.global_params = [p.detach().clone() for p in self.params]
        mu = float(job.outer_momentum)
        self.outer = torch.optim.SGD(
            self.global_params, lr=job.outer_lr, momentum=mu, nesterov=mu > 0
        )
        self.batches = ShardBatches(job, rank)

    @property
    def param_bytes(self) -> int:
        return sum(p.numel() * p.element_size() for p in self.params)

    def inner_step(self, step: int, allreduce=None) -> float:
        """One AdamW step on this replica's shard; with ``allreduce`` (mode dp) the gradients
        are averaged over the replicas first. Returns the step's training loss."""
        total = 0.0
        for idx, tgt in self.batches(step):
            loss = self.module(idx, tgt) / self.job.microbatches
            loss.backward()
            total += loss.item()
        if allreduce is not None:
            grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in self.params]
            flat = torch.cat([g.reshape(-1) for g in grads])
            allreduce(flat)
            flat /= self.world
            torch._foreach_copy_(grads, _unflatten(flat, grads))
            for p, g in zip(self.params, grads, strict=True):
                p.grad = g
        self.inner.step()
        self.inner.zero_grad(set_to_none=True)
        return total

    @torch.no_grad()
    def outer_step(self, allreduce) -> None:
        """Average ``global - local`` over the replicas (one all-reduce of the parameters'
        size), step the global parameters with it, and start every replica from them."""
        flat = torch.cat(
            [(g - p).reshape(-1) for g, p in zip(self.global_params, self.params, strict=True)]
        )
        allreduce(flat)
        flat /= self.world
        for g, d in zip(self.global_params, _unflatten(flat, self.global_params), strict=True):
            g.grad = d
        self.outer.step()
        self.outer.zero_grad(set_to_none=True)
        torch._foreach_copy_(self.params, self.global_params)

    def state(self, step: int) -> dict:
        """Right after an outer step (the local parameters are the global ones): what a
        resumed replica needs to go on exactly as this one would."""
        return {
            "step": step,
            "params": [g.detach().clone() for g in self.global_params],
            "inner": self.inner.state_dict(),
            "outer": self.outer.state_dict(),
        }

    def load_file(self, path: str) -> None:
        """:meth:`state` back from ``path`` (tensors and plain data only); a typed error
        naming the file when it is damaged or belongs to another job."""
        from moeflow.checkpoint.state import load_plain

        st = load_plain(path)
        try:
            with torch.no_grad():
                params = list(st["params"])
                if len(params) != len(self.params) or any(
                    p.shape != v.shape for p, v in zip(self.params, params, strict=True)
                ):
                    raise ValueError("its parameters have other shapes than this job's model")
                torch._foreach_copy_(self.params, params)
                torch._foreach_copy_(self.global_params, params)
            self.inner.load_state_dict(st["inner"])
            self.outer.load_state_dict(st["outer"])
        except (KeyError, TypeError, ValueError, RuntimeError, IndexError) as e:
            text = " ".join(str(e).split())[:300]
            raise InputError(
                f"{path} does not fit replica {self.rank} of this job ({type(e).__name__}: {text})"
            ) from None


def _replica_file(root: str, step: int, replica: int) -> str:
    return os.path.join(root, f"step{step:07d}", f"replica{replica}.pt")


def _mark_complete(root: str, step: int, replicas: int) -> None:
    """Point ``<root>/latest`` at ``step`` (atomically) and drop older checkpoints."""
    tmp = os.path.join(root, "latest.tmp")
    with open(tmp, "w") as f:
        json.dump({"step": step, "replicas": replicas}, f)
    os.replace(tmp, os.path.join(root, "latest"))
    for name in os.listdir(root):
        if name.startswith("step") and name[4:].isdigit() and int(name[4:]) < step:
            shutil.rmtree(os.path.join(root, name), ignore_errors=True)


def latest_checkpoint(root: str) -> int | None:
    """The last step every replica saved (``<root>/latest``), or None."""
    from moeflow.geo.pipeline import latest_checkpoint as latest

    return latest(root)


def check_resume(job: DilocoJob) -> int:
    """Before any rank starts: the last complete checkpoint of ``job.checkpoint_dir`` (a
    typed error when there is none, or it holds another number of replicas, or a replica's
    file does not load into this job's model)."""
    root = job.checkpoint_dir
    step = latest_checkpoint(root)
    if step is None:
        raise InputError(f"{root}: no complete checkpoint to resume from")
    with open(os.path.join(root, "latest")) as f:
        saved = json.load(f).get("replicas")
    if saved != job.replicas:
        raise InputError(
            f"{root}: checkpoint step {step} holds {saved} replicas; this job has "
            f"{job.replicas} (resume with the same replicas)"
        )
    if step + 1 >= job.steps:
        raise InputError(f"{root}: checkpoint step {step} is at or past this job's last step")
    for r in range(job.replicas):
        Replica(job, r, job.replicas).load_file(_replica_file(root, step, r))
    return step


def _unflatten(flat: torch.Tensor, like: list[torch.Tensor]) -> list[torch.Tensor]:
    out, o = [], 0
    for t in like:
        out.append(flat[o : o + t.numel()].view_as(t))
        o += t.numel()
    return out


def run_replica(rank: int, world: int, job: DilocoJob, allreduce=None) -> dict:
    """Replica ``rank``'s whole run (also callable in one process with ``world == 1``)."""
    allreduce = allreduce if allreduce is not None else CountingAllReduce(world, job.timeout_s)
    distributed = world > 1 and isinstance(allreduce, CountingAllReduce)
    rep = Replica(job, rank, world)
    start = 0
    if job.resume:
        done = latest_checkpoint(job.checkpoint_dir)
        if done is None:
            raise InputError(f"{job.checkpoint_dir}: no complete checkpoint to resume from")
        rep.load_file(_replica_file(job.checkpoint_dir, done, rank))
        start = done + 1
    nan = float("nan")  # steps done before a resumed run
    losses, times, elapsed = [nan] * start, [0.0] * start, [0.0] * start
    if distributed:
        import torch.distributed as dist

        dist.barrier()  # every rank starts its clock together
    t_start, cpu_start = time.perf_counter(), time.process_time()
    for step in range(start, job.steps):
        t0 = time.perf_counter()
        losses.append(rep.inner_step(step, allreduce if job.mode == "dp" else None))
        if job.mode == "diloco" and (step + 1) % job.inner_steps == 0:
            rep.outer_step(allreduce)
            if job.checkpoint_every and (step + 1) % job.checkpoint_every == 0:
                path = _replica_file(job.checkpoint_dir, step, rank)
                os.makedirs(os.path.dirname(path), exist_ok=True)
                save_plain(rep.state(step), path)
                if distributed:
                    dist.barrier()  # every replica's file is written
                if rank == 0:
                    _mark_complete(job.checkpoint_dir, step, job.replicas)
        times.append(time.perf_counter() - t0)
        elapsed.append(time.perf_counter() - t_start)
    wall, cpu = time.perf_counter() - t_start, time.process_time() - cpu_start
    if job.mode == "dp":
        final = [p.detach().clone() for p in rep.params]
    else:
        final = [g.detach().clone() for g in rep.global_params]
    return {
        "rank": rank,
        "replica": rank,
        "stage": 0,
        "losses": losses,
        "times": times,
        "elapsed": elapsed,
        "wall_s": wall,
        "busy_s": wall - sum(getattr(allreduce, "seconds", [])),
        "cpu_s": cpu,
        "allreduce_bytes": list(allreduce.calls),
        "allreduce_s": list(getattr(allreduce, "seconds", [])),
        "param_bytes": rep.param_bytes,
        "params": final if rank == 0 else [],
    }


# ---- pipeline-diloco: a pipeline inside each site, DiLoCo between the sites ---------------
class _Pipe:
    """A replica's pipeline group, in the interface the stage runner uses; counts the time
    this rank spends blocked on a transfer (``wait_s``)."""

    def __init__(self, pg, rank: int, timeout_s: float):
        self.pg, self.rank, self.timeout_s = pg, rank, timeout_s
        self.wait_s = 0.0

    def wait(self, work) -> None:
        t0 = time.perf_counter()
        try:
            work.wait()
        except RuntimeError as e:
            if "timed out" not in str(e).lower():
                raise
            raise CommTimeoutError(
                f"stage {self.rank}: a pipeline transfer got no answer within "
                f"timeout_s={self.timeout_s} s"
            ) from None
        finally:
            self.wait_s += time.perf_counter() - t0

    def send(self, tensors: list[torch.Tensor], dst: int, tag: int) -> list:
        return [self.pg.send([t.contiguous()], dst, tag) for t in tensors]

    def recv(self, tensors: list[torch.Tensor], src: int, tag: int) -> None:
        for t in tensors:
            self.wait(self.pg.recv([t], src, tag))


def stage_bounds(job, traced) -> tuple[int, ...]:
    """The job's stage bounds over the traced graph (``bounds``, or an even split; one stage
    is the whole graph)."""
    from moeflow.geo.pipeline import even_bounds

    n = len(traced.ops.nodes)
    bounds = job.bounds or even_bounds(n, job.stages)
    if bounds[-1] != n:
        raise ConfigError("bounds", bounds, f"ending at the traced graph's {n} nodes")
    return tuple(bounds)


def _groups(job, r: int, s: int):
    import datetime

    import torch.distributed as dist

    store = dist.distributed_c10d._get_default_store()
    timeout = datetime.timedelta(seconds=job.timeout_s)
    R, S = job.replicas, job.stages
    pipe = stage = None
    if S > 1:
        pg = dist.ProcessGroupGloo(dist.PrefixStore(f"pipe{r}", store), s, S, timeout)
        pipe = _Pipe(pg, s, job.timeout_s)
    if R > 1:
        stage = dist.ProcessGroupGloo(dist.PrefixStore(f"stage{s}", store), r, R, timeout)
    return pipe, stage


class _NoPipe:
    """One stage holds the whole model: nothing to send."""

    wait_s = 0.0


def run_stage(rank: int, world: int, job, groups=None) -> dict:
    """Rank ``rank``'s run: stage ``rank % stages`` of replica ``rank // stages``.

    ``groups``: ``(pipe, stage_allreduce)`` to use instead of gloo groups on the default
    store (a one-process caller passes its own)."""
    import torch.distributed as dist

    from moeflow.geo.pipeline import _cut_specs, _StageRunner, trace_job

    R, S = job.replicas, job.stages
    r, s = divmod(rank, S)
    gj = job.model_job()
    _, traced = trace_job(gj)
    bounds = stage_bounds(job, traced)
    if groups is None:
        pipe, pg = _groups(job, r, s)
        allreduce = CountingAllReduce(R, job.timeout_s, pg)
    else:
        pipe, allreduce = groups
    pipe = pipe or _NoPipe()
    runner = _StageRunner(gj, s, traced, bounds, _cut_specs(traced, bounds, gj))
    params = runner.params
    global_params = [p.detach().clone() for p in params]
    mu = float(job.outer_momentum)
    outer = (
        torch.optim.SGD(global_params, lr=job.outer_lr, momentum=mu, nesterov=mu > 0)
        if params
        else None
    )
    batches = ShardBatches(job, r)
    losses, elapsed = [], []
    if world > 1 and groups is None:
        dist.barrier()  # every rank starts its clock together
    t_start, cpu_start = time.perf_counter(), time.process_time()
    for step in range(job.steps):
        loss = runner.step(pipe, batches, step)
        if loss is not None:
            losses.append(loss)
        if (step + 1) % job.inner_steps == 0 and params:
            _outer_step(params, global_params, outer, allreduce, R)
        elapsed.append(time.perf_counter() - t_start)
    wall, cpu = time.perf_counter() - t_start, time.process_time() - cpu_start
    comm = pipe.wait_s + sum(allreduce.seconds)
    return {
        "rank": rank,
        "replica": r,
        "stage": s,
        "losses": losses,
        "elapsed": elapsed,
        "wall_s": wall,
        "busy_s": wall - comm,
        "cpu_s": cpu,
        "allreduce_bytes": list(allreduce.calls),
        "allreduce_s": list(allreduce.seconds),
        "param_bytes": sum(p.numel() * p.element_size() for p in params),
        "wire": list(runner.wire),
        "params": [g.detach().clone() for g in global_params] if r == 0 else [],
        "param_names": [n for n, p in runner.stage.named_parameters()] if r == 0 else [],
    }


@torch.no_grad()
def _outer_step(params, global_params, outer, allreduce, world: int) -> None:
    """DiLoCo's outer step on one stage's block of the parameters (as
    :meth:`moeflow.geo.diloco.Replica.outer_step`)."""
    flat = torch.cat([(g - p).reshape(-1) for g, p in zip(global_params, params, strict=True)])
    allreduce(flat)
    flat /= world
    for g, d in zip(global_params, _unflatten(flat, global_params), strict=True):
        g.grad = d
    outer.step()
    outer.zero_grad(set_to_none=True)
    torch._foreach_copy_(params, global_params)


def merge(results: list[dict], job: DilocoJob) -> DilocoResult:
    """One result from every rank's report (one rank per replica, or per replica and stage
    in mode pipeline-diloco: the last stage has the losses, each stage its parameters)."""
    results = sorted(results, key=lambda r: r["rank"])
    last = [r for r in results if r.get("stage", 0) == job.stages - 1]
    per = [r["losses"] for r in sorted(last, key=lambda r: r.get("replica", r["rank"]))]
    tokens = job.replicas * job.steps * job.microbatch_size * job.microbatches * job.seq_len
    wall = max(r["wall_s"] for r in results)
    first = [r for r in results if r.get("replica", r["rank"]) == 0]  # replica 0's stages
    elapsed = [max(x) for x in zip(*(r["elapsed"] for r in results), strict=True)]
    return DilocoResult(
        losses=[sum(x) / len(x) for x in zip(*per, strict=True)],
        replica_losses=per,
        step_times_s=[b - a for a, b in zip([0.0, *elapsed], elapsed, strict=False)],
        allreduce_bytes=[sum(x) for x in zip(*(r["allreduce_bytes"] for r in first), strict=True)],
        allreduce_s=[max(x) for x in zip(*(r["allreduce_s"] for r in first), strict=True)],
        tokens_per_s=tokens / wall if wall > 0 else float("inf"),
        param_bytes=sum(r["param_bytes"] for r in first),
        params=[p for r in first for p in r["params"]],
        wall_s=[r["wall_s"] for r in results],
        busy_s=[r["busy_s"] for r in results],
        cpu_s=[r["cpu_s"] for r in results],
        elapsed_s=elapsed,
    )


def _rank_fn(job: DilocoJob):
    if job.mode == "pipeline-diloco":
        return run_stage
    return run_replica


def train(job: DilocoJob, *, force: bool = False, progress: bool = True) -> DilocoResult:
    """Run ``job`` on forked gloo ranks (one per replica; one per replica and stage in mode
    pipeline-diloco). A rank that stalls for ``timeout_s`` (in
    an all-reduce, a pipeline transfer, or its heartbeat) ends the run with
    :class:`moeflow.errors.CommTimeoutError` naming it."""
    from moeflow.launch import RankFailed, launch

    try:
        results = launch(
            _rank_fn(job),
            job.world,
            job,
            force=force,
            name="moeflow geo diloco",
            init_group=True,
            pg_timeout_s=job.timeout_s,
            stall_timeout_s=job.timeout_s,
            threads=job.threads,
            progress=progress,
        )
    except RankFailed as e:
        if e.kind == CommTimeoutError.__name__:
            who = f"replica {e.rank}"
            if job.mode == "pipeline-diloco":
                who = f"replica {e.rank // job.stages} stage {e.rank % job.stages}"
            raise CommTimeoutError(f"{who}: {e.message}") from None
        raise
    return merge(results, job)


def run_torchrun(job: DilocoJob) -> DilocoResult | None:
    """Entry for one rank under torchrun (``RANK``/``WORLD_SIZE``, ``MASTER_ADDR``/``PORT``):
    one replica per rank (one stage of one in mode pipeline-diloco), the gloo group's timeout
    is ``job.timeout_s``. Every rank's report
    is gathered after the run (outside the timed loop); rank 0 returns the merged result,
    the others None."""
    import datetime
    import os

    import torch.distributed as dist

    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    if world != job.world:
        raise ConfigError("WORLD_SIZE", world, f"replicas x stages = {job.world}")
    torch.set_num_threads(job.threads)
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=job.timeout_s))
    try:
        out = _rank_fn(job)(rank, world, job)
        reports: list = [None] * world
        dist.all_gather_object(reports, out)  # only replica 0's ranks carry parameters
        return merge(reports, job) if rank == 0 else None
    finally:
        dist.destroy_process_group()


def sites_from_devices(path: str) -> list[int]:
    """The number of devices of each site of a device file, in order of first appearance
    (a device without a site is its own site): one replica per site."""
    from moeflow.plan.geo import DeviceGraph

    graph = DeviceGraph.load(path)
    count: dict[str, int] = {}
    for d in graph.devices:
        key = d.site or f"device:{d.name}"
        count[key] = count.get(key, 0) + 1
    return list(count.values())
