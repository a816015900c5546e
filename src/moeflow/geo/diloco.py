"""DiLoCo: data-parallel replicas that talk once every H steps (slow links, no pipeline).

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

Transport: the default gloo group of :func:`moeflow.launch.launch`, whose timeout is the
job's ``timeout_s``: every all-reduce has that deadline, as every send and receive of the
geo pipeline does, and a rank that stalls for that long ends the run.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field

import torch

from moeflow.errors import CommTimeoutError, ConfigError
from moeflow.validate import positive_float, positive_int

MODES = ("diloco", "dp")
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
    #: inner steps in all (a multiple of ``inner_steps`` in mode diloco)
    steps: int = 30
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

    def __post_init__(self):
        if self.mode not in MODES:
            raise ConfigError("mode", self.mode, f"one of {', '.join(MODES)}")
        positive_int("replicas", self.replicas, maximum=MAX_REPLICAS)
        positive_int("inner_steps", self.inner_steps, maximum=1_000_000)
        positive_float("outer_lr", self.outer_lr)
        m = self.outer_momentum
        if isinstance(m, bool) or not isinstance(m, (int, float)) or not 0 <= m < 1:
            raise ConfigError("outer_momentum", m, "a number in [0, 1)")
        if self.mode == "diloco" and self.steps % self.inner_steps:
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
    #: the global parameters at the end (rank 0's copy)
    params: list[torch.Tensor] = field(default_factory=list)

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
    """Sum a tensor over the group in place, and count the bytes handed to each call."""

    def __init__(self, world: int, timeout_s: float | None = None):
        self.world, self.timeout_s = world, timeout_s
        self.calls: list[int] = []  # bytes handed to each call
        self.seconds: list[float] = []  # wall time of each call

    def __call__(self, t: torch.Tensor) -> None:
        nbytes = t.numel() * t.element_size()
        self.calls.append(nbytes)
        t0 = time.perf_counter()
        if self.world > 1:
            import torch.distributed as dist

            try:
                dist.all_reduce(t)  # the default group's timeout is the job's deadline
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


def _unflatten(flat: torch.Tensor, like: list[torch.Tensor]) -> list[torch.Tensor]:
    out, o = [], 0
    for t in like:
        out.append(flat[o : o + t.numel()].view_as(t))
        o += t.numel()
    return out


def run_replica(rank: int, world: int, job: DilocoJob, allreduce=None) -> dict:
    """Replica ``rank``'s whole run (also callable in one process with ``world == 1``)."""
    allreduce = allreduce if allreduce is not None else CountingAllReduce(world, job.timeout_s)
    rep = Replica(job, rank, world)
    losses, times = [], []
    t_start = time.perf_counter()
    for step in range(job.steps):
        t0 = time.perf_counter()
        losses.append(rep.inner_step(step, allreduce if job.mode == "dp" else None))
        if job.mode == "diloco" and (step + 1) % job.inner_steps == 0:
            rep.outer_step(allreduce)
        times.append(time.perf_counter() - t0)
    wall = time.perf_counter() - t_start
    if job.mode == "dp":
        final = [p.detach().clone() for p in rep.params]
    else:
        final = [g.detach().clone() for g in rep.global_params]
    return {
        "rank": rank,
        "losses": losses,
        "times": times,
        "wall_s": wall,
        "allreduce_bytes": list(allreduce.calls),
        "allreduce_s": list(getattr(allreduce, "seconds", [])),
        "param_bytes": rep.param_bytes,
        "params": final if rank == 0 else [],
    }


def merge(results: list[dict], job: DilocoJob) -> DilocoResult:
    per = [r["losses"] for r in sorted(results, key=lambda r: r["rank"])]
    tokens = job.replicas * job.steps * job.microbatch_size * job.microbatches * job.seq_len
    wall = max(r["wall_s"] for r in results)
    r0 = min(results, key=lambda r: r["rank"])
    return DilocoResult(
        losses=[sum(x) / len(x) for x in zip(*per, strict=True)],
        replica_losses=per,
        step_times_s=[max(x) for x in zip(*(r["times"] for r in results), strict=True)],
        allreduce_bytes=r0["allreduce_bytes"],
        allreduce_s=r0["allreduce_s"],
        tokens_per_s=tokens / wall if wall > 0 else float("inf"),
        param_bytes=r0["param_bytes"],
        params=r0["params"],
    )


def train(job: DilocoJob, *, force: bool = False, progress: bool = True) -> DilocoResult:
    """Run ``job`` on ``replicas`` forked gloo ranks (one replica each). A replica that
    stalls for ``timeout_s`` (in an all-reduce, or its heartbeat) ends the run with
    :class:`moeflow.errors.CommTimeoutError` naming the rank."""
    from moeflow.launch import RankFailed, launch

    try:
        results = launch(
            run_replica,
            job.replicas,
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
            raise CommTimeoutError(f"replica {e.rank}: {e.message}") from None
        raise
    return merge(results, job)


def run_torchrun(job: DilocoJob) -> DilocoResult | None:
    """Entry for one rank under torchrun (``RANK``/``WORLD_SIZE``, ``MASTER_ADDR``/``PORT``):
    one replica per rank, the gloo group's timeout is ``job.timeout_s``. Every rank's report
    is gathered after the run (outside the timed loop); rank 0 returns the merged result,
    the others None."""
    import datetime
    import os

    import torch.distributed as dist

    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    if world != job.replicas:
        raise ConfigError("WORLD_SIZE", world, f"replicas = {job.replicas}")
    torch.set_num_threads(job.threads)
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=job.timeout_s))
    try:
        out = run_replica(rank, world, job)
        reports: list = [None] * world
        dist.all_gather_object(reports, {k: v for k, v in out.items() if k != "params"})
        reports[0]["params"] = out["params"] if rank == 0 else []
        return merge(reports, job) if rank == 0 else None
    finally:
        dist.destroy_process_group()


def replicas_from_devices(path: str) -> int:
    """One replica per site of a device file (a device without a site is its own site)."""
    from moeflow.plan.geo import DeviceGraph

    graph = DeviceGraph.load(path)
    return len({d.site or f"device:{d.name}" for d in graph.devices})
