"""DiLoCo with changing membership: spares, replicas that leave, devices that join.

FusionAI's broker admits devices at any time and replaces those that leave. For DiLoCo
(:mod:`moeflow.geo.diloco`, mode diloco) the natural point to change the set of replicas is
an outer step, the only moment the replicas talk. The broker is a ``TCPStore`` (the parent's,
or torchrun's agent's); every process beats a counter in it, as in :mod:`moeflow.geo.pipeline`.

* **Generations.** ``gen/<g>`` holds the replicas (process ids, slot = position), the spares,
  the step the generation starts at and where its state comes from. Each generation's replicas
  get their own gloo group; the outer all-reduce runs in it.
* **Joining.** A device that arrives registers (``join/<n>``) and waits. After each outer step
  (and its checkpoint), slot 0 admits every registered device: as a new replica while the job
  has fewer than ``max_replicas``, else as a spare. The next generation starts at the next
  inner step; slot 0 broadcasts the global parameters and the outer momentum to it, a new
  replica starts from them with a fresh inner AdamW, and every replica takes its shard of the
  step's batch by its slot (``ShardBatches`` over the new number of replicas).
* **Leaving** (as the pipeline mode): a replica that vanished fails the outer all-reduce of
  the others (or they see the failure flag); they agree through the store (``compare_set``:
  the first proposal wins) on which process is gone (its counter stopped) and which spare
  takes its slot, and everyone goes back to the last complete checkpoint (step 0, the seeded
  model, when there is none): each slot loads its replica file (a slot the checkpoint did not
  have yet starts from the global state of slot 0's file, with a fresh inner AdamW). With no
  spare left the job stops with :class:`moeflow.geo.pipeline.GeoJobFailed` naming the
  checkpoint to resume from.

    job = ElasticJob(diloco=DilocoJob(replicas=2, inner_steps=10, steps=100,
                                      checkpoint_dir="ck", checkpoint_every=10),
                     backups=1, joins=(30,))   # a device arrives after step 30
    result = train(job)
"""

from __future__ import annotations

import dataclasses
import json
import os
import threading
import time
from dataclasses import dataclass, field

import torch

from moeflow.errors import ConfigError
from moeflow.geo import diloco
from moeflow.geo.pipeline import GeoJobFailed, _beat, _client_store, _Group, _Membership
from moeflow.validate import nonnegative_int, positive_int

_POLL_S = 0.05


@dataclass(frozen=True, kw_only=True)
class ElasticJob:
    """A mode-diloco job whose replicas may change; validated on construction."""

    diloco: diloco.DilocoJob
    #: spare processes started with the job (they wait in the pool)
    backups: int = 0
    #: the most replicas at once; a device that joins beyond it is a spare (None: no limit
    #: but :data:`moeflow.geo.diloco.MAX_REPLICAS`)
    max_replicas: int | None = None
    #: local processes that arrive during the run: each takes part from the first outer step
    #: after the given inner step (``join`` is the entry of a device that comes from
    #: elsewhere: from the next outer step)
    joins: tuple[int, ...] = ()
    #: fault injection: (slot, step) - the process that starts in ``slot`` dies during
    #: ``step`` (its replacement does not)
    kill: tuple[int, int] | None = None

    def __post_init__(self):
        job = self.diloco
        if job.mode != "diloco":
            raise ConfigError("mode", job.mode, "diloco (replicas change at an outer step)")
        nonnegative_int("backups", self.backups)
        mx = self.max_replicas
        if mx is not None:
            positive_int("max_replicas", mx, maximum=diloco.MAX_REPLICAS)
            if mx < job.replicas:
                raise ConfigError("max_replicas", mx, f"at least replicas={job.replicas}")
        object.__setattr__(self, "joins", tuple(int(x) for x in self.joins))
        if any(not 0 <= x < job.steps for x in self.joins):
            raise ConfigError("joins", self.joins, f"inner steps in [0, {job.steps})")
        if self.kill is not None:
            s, k = self.kill
            if not (0 <= s < job.replicas and 0 <= k < job.steps):
                raise ConfigError("kill", self.kill, f"(slot < {job.replicas}, step < {job.steps})")

    @property
    def limit(self) -> int:
        return self.max_replicas or diloco.MAX_REPLICAS

    @property
    def world(self) -> int:
        return self.diloco.replicas + self.backups + len(self.joins)


@dataclass
class ElasticResult:
    #: per inner step, the mean over the replicas of that step (the last run of a step that
    #: was redone after a rollback)
    losses: list[float]
    #: per inner step, the number of replicas that trained it
    replicas: list[int]
    events: list[str] = field(default_factory=list)
    #: the global parameters at the end (slot 0's copy)
    params: list[torch.Tensor] = field(default_factory=list)


def _log(events: list, msg: str, store=None) -> None:
    """Print ``msg``; keep it in ``events`` and in the broker (a process that leaves later
    takes its own list with it)."""
    import sys

    events.append(msg)
    if store is not None:
        store.set(f"event/{int(store.add('events', 1))}", msg)
    print(f"moeflow geo diloco: {msg}", file=sys.stderr, flush=True)


def _gen(store, g: int) -> dict:
    return json.loads(store.get(f"gen/{g}").decode())


def _publish(store, g: int, members: dict) -> dict:
    """``gen/<g>`` := ``members`` unless another process proposed first; the winner."""
    store.compare_set(f"gen/{g}", "", json.dumps(members))
    return _gen(store, g)


def _register(store, uid: int, arrive: int) -> None:
    """Ask the broker for a place from the first outer step after inner step ``arrive``
    (-1: the next outer step)."""
    n = int(store.add("joins", 1))
    store.set(f"join/{n}", json.dumps([uid, arrive]))


def _registered(store, step: int) -> list[int]:
    """The devices registered by now that may take part after inner step ``step``."""
    n = int(store.add("joins", 0))
    out = []
    for i in range(1, n + 1):
        uid, arrive = json.loads(store.get(f"join/{i}"))
        if arrive <= step:
            out.append(uid)
    return out


def _admit(store, g: int, members: dict, job: ElasticJob, step: int, events: list) -> dict:
    """After the outer step ending ``step``: the next generation with every device that
    registered since (replicas up to the limit, then spares), or None."""
    known = set(members["replicas"]) | set(members["spares"]) | set(members.get("gone", []))
    known |= set(members.get("seen", []))
    new = [u for u in _registered(store, step) if u not in known]
    if not new:
        return None
    room = max(0, job.limit - len(members["replicas"]))
    nxt = {
        "replicas": members["replicas"] + new[:room],
        "spares": members["spares"] + new[room:],
        "start": step + 1,
        "resume": -1,
        "admitted": new[:room],
        "gone": members.get("gone", []),
        "seen": sorted(known | set(new)),
    }
    won = _publish(store, g + 1, nxt)
    for u in new[:room]:
        slot = won["replicas"].index(u)
        _log(events, f"device {u} joined: replica {slot} from step {step + 1}", store)
    for u in new[room:]:
        _log(events, f"device {u} joined as a spare (already {job.limit} replicas)", store)
    return won


def _replace(store, g: int, members: dict, job: ElasticJob, events: list) -> dict:
    """Agree on generation ``g + 1`` after a failure: the replica whose heartbeat stopped
    gives its slot to the first spare; everyone goes back to the last checkpoint."""
    from moeflow.geo.pipeline import DEAD_AFTER_S

    key = f"gen/{g + 1}"
    reps = members["replicas"]

    def beats():
        return {u: store.get(f"hb/{u}") if store.check([f"hb/{u}"]) else b"" for u in reps}

    deadline = time.monotonic() + max(10 * DEAD_AFTER_S, 30.0)
    dead: list[int] = []
    while not dead and not store.check([key]):
        if time.monotonic() > deadline:
            raise GeoJobFailed(f"generation {g}: a replica failed but every heartbeat goes on")
        before = beats()
        time.sleep(DEAD_AFTER_S)
        after = beats()
        dead = [u for u in reps if before[u] == after[u]]
    if not store.check([key]):
        pool = [u for u in members["spares"] if u not in dead]
        new_reps, gone = list(reps), []
        for slot, u in enumerate(reps):
            if u in dead:
                gone.append((slot, u))
                new_reps[slot] = pool.pop(0) if pool else -1
        ckpt = -1
        if job.diloco.checkpoint_dir:
            ckpt = diloco.latest_checkpoint(job.diloco.checkpoint_dir)
            ckpt = -1 if ckpt is None else ckpt
        nxt = {
            "replicas": new_reps,
            "spares": pool,
            "start": ckpt + 1,
            "resume": ckpt,
            "admitted": [],
            "lost": gone,
            "gone": members.get("gone", []) + dead,
            "seen": members.get("seen", []),
            "failed_step": int(store.get(f"step/{g}")) if store.check([f"step/{g}"]) else -1,
        }
        _publish(store, g + 1, nxt)
    won = _gen(store, g + 1)
    for slot, u in won["lost"]:
        who = won["replicas"][slot]
        _log(
            events,
            f"replica {slot} (device {u}) left during step {won['failed_step']}"
            + (f"; spare device {who} takes it" if who >= 0 else "; no spare left")
            + f"; resuming after step {won['resume']}",
            store,
        )
    if -1 in won["replicas"]:
        slot = won["replicas"].index(-1)
        where = (
            f"resume from checkpoint step {won['resume']} in {job.diloco.checkpoint_dir}"
            if won["resume"] >= 0
            else "no checkpoint was written (set checkpoint_every)"
        )
        raise GeoJobFailed(f"replica {slot} left and no spare is left; {where}")
    return won


def _flat_state(rep: diloco.Replica) -> torch.Tensor:
    """The global parameters and the outer momentum, one flat tensor (empty momentum: zeros,
    with a flag in the last element)."""
    bufs = [rep.outer.state.get(g, {}).get("momentum_buffer") for g in rep.global_params]
    has = all(b is not None for b in bufs)
    parts = [g.reshape(-1) for g in rep.global_params]
    parts += [
        (b if has else torch.zeros_like(g)).reshape(-1)
        for b, g in zip(bufs, rep.global_params, strict=True)
    ]
    return torch.cat([*parts, torch.tensor([1.0 if has else 0.0])])


@torch.no_grad()
def _load_flat_state(rep: diloco.Replica, flat: torch.Tensor) -> None:
    n = sum(g.numel() for g in rep.global_params)
    params = diloco._unflatten(flat[:n], rep.global_params)
    torch._foreach_copy_(rep.global_params, params)
    torch._foreach_copy_(rep.params, params)
    if flat[-1].item() == 1.0:
        bufs = diloco._unflatten(flat[n : 2 * n], rep.global_params)
        for g, b in zip(rep.global_params, bufs, strict=True):
            rep.outer.state[g]["momentum_buffer"] = b.clone()


def _job_for(job: ElasticJob, replicas: int) -> diloco.DilocoJob:
    return dataclasses.replace(job.diloco, replicas=replicas, resume=False)


def _load_slot(rep: diloco.Replica, root: str, step: int, slot: int) -> None:
    """Slot ``slot``'s replica file of checkpoint ``step``; a slot the checkpoint did not
    have starts from slot 0's global state with a fresh inner AdamW."""
    path = diloco._replica_file(root, step, slot)
    if os.path.isfile(path):
        rep.load_file(path)
        return
    fresh = torch.optim.AdamW(rep.params, lr=rep.job.lr).state_dict()
    rep.load_file(diloco._replica_file(root, step, 0))
    rep.inner.load_state_dict(fresh)


def _rank_main(uid: int, world: int, job: ElasticJob, store_addr) -> dict:
    store = _client_store(store_addr, world)
    stop = threading.Event()
    threading.Thread(target=_beat, args=(store, uid, stop), daemon=True).start()
    events: list[str] = []
    try:
        return _run(uid, job, store, events)
    finally:
        stop.set()


def join(store_addr: tuple[str, int], uid: int, job: ElasticJob) -> dict:
    """Entry of a device that joins a running job: register with the broker at
    ``store_addr`` under process id ``uid`` (unique in the job, at least ``job.world``), then
    take part from the next outer step on (as a replica or a spare) until the job ends."""
    if isinstance(uid, bool) or not isinstance(uid, int) or uid < job.world:
        raise ConfigError("join id", uid, f"an int >= {job.world} (the job's own processes)")
    torch.set_num_threads(job.diloco.threads)
    return _rank_main(uid, 0, job, store_addr)


def _run(uid: int, job: ElasticJob, store, events: list) -> dict:
    dj = job.diloco
    R0 = dj.replicas
    first_joiner = R0 + job.backups
    if uid == 0:
        first = {
            "replicas": list(range(R0)),
            "spares": list(range(R0, first_joiner)),
            "start": 0,
            "resume": -1,
            "admitted": [],
            "seen": list(range(first_joiner)),
        }
        if dj.resume:
            step = diloco.check_resume(dj)
            first.update(start=step + 1, resume=step)
        _publish(store, 0, first)
    if uid >= first_joiner:  # a device that arrives: a local one after its step of `joins`
        local = uid - first_joiner < len(job.joins)
        _register(store, uid, job.joins[uid - first_joiner] if local else -1)
    store.wait(["gen/0"])
    g = 0
    while store.check([f"gen/{g + 1}"]):  # a late arrival starts from the newest generation
        g += 1
    members = _gen(store, g)
    rep, kill = None, job.kill
    out = {"uid": uid, "events": events, "params": []}
    graveyard: list[_Group] = []
    while True:
        if uid not in members["replicas"]:  # a spare, or not admitted yet
            while not (store.check([f"gen/{g + 1}"]) or store.check(["done"])):
                time.sleep(_POLL_S * 4)
            if store.check([f"gen/{g + 1}"]):
                g += 1
                members = _gen(store, g)
                continue
            return out
        slot, R = members["replicas"].index(uid), len(members["replicas"])
        sub = _job_for(job, R)
        fresh = rep is None
        if fresh or members["resume"] >= 0 or members["start"] == 0:
            rep = diloco.Replica(sub, slot, R)  # seeded: the initial model
            if members["resume"] >= 0:
                _load_slot(rep, dj.checkpoint_dir, members["resume"], slot)
        else:  # the same replica goes on; its shard follows the new number of replicas
            rep.job, rep.rank, rep.world = sub, slot, R
        rep.batches = diloco.ShardBatches(sub, slot)
        group = _Group(store, g, slot, R, dj.timeout_s)
        graveyard.append(group)  # a failed group is dropped, never torn down mid-wait
        try:
            if members["admitted"]:  # slot 0 hands the global state to the new replicas
                flat = _flat_state(rep)
                group.wait(group.pg.broadcast(flat, 0))
                if uid in members["admitted"]:
                    _load_flat_state(rep, flat)
            allreduce = _allreduce(group)
            for step in range(members["start"], dj.steps):
                if slot == 0:
                    store.set(f"step/{g}", str(step))
                if kill is not None and (slot, step) == tuple(kill) and uid == kill[0]:
                    from moeflow.geo.pipeline import _die

                    _die()
                loss = rep.inner_step(step)
                store.set(f"loss/{step}/{slot}", repr(loss))
                store.set(f"count/{step}", str(R))
                if (step + 1) % dj.inner_steps:
                    continue
                rep.outer_step(allreduce)
                if dj.checkpoint_every and (step + 1) % dj.checkpoint_every == 0:
                    path = diloco._replica_file(dj.checkpoint_dir, step, slot)
                    os.makedirs(os.path.dirname(path), exist_ok=True)
                    from moeflow.checkpoint.state import save_plain

                    save_plain(rep.state(step), path)
                    group.wait(group.pg.barrier())
                    if slot == 0:
                        diloco._mark_complete(dj.checkpoint_dir, step, R)
                if slot == 0:
                    last = step + 1 >= dj.steps
                    nxt = None if last else _admit(store, g, members, job, step, events)
                    store.set(f"decide/{g}/{step}", "next" if nxt else "same")
                else:
                    store.wait([f"decide/{g}/{step}"])
                if store.get(f"decide/{g}/{step}") == b"next":
                    g += 1
                    members = _gen(store, g)
                    break
            else:
                group.wait(group.pg.barrier())
                if slot == 0:
                    out["params"] = [p.detach().clone() for p in rep.global_params]
                store.set("done", "1")
                return out
        except _Membership as e:
            group.fail(str(e))
            members = _replace(store, g, members, job, events)
            g += 1
            continue


def _allreduce(group: _Group):
    """The outer all-reduce on a generation's group (interrupted by its failure flag)."""

    def run(t: torch.Tensor) -> None:
        group.wait(group.pg.allreduce([t]))

    return run


def train(
    job: ElasticJob, *, force: bool = False, progress: bool = True, store=None
) -> ElasticResult:
    """Run ``job`` on local processes: the replicas, the spares, and one process per entry of
    ``joins`` that arrives during the run. The parent hosts the broker: ``store`` (a server
    ``TCPStore``; devices from elsewhere :func:`join` it), or a new one on 127.0.0.1."""
    from torch.distributed import TCPStore

    from moeflow.launch import RankFailed, launch

    dj = job.diloco
    if dj.resume:
        diloco.check_resume(dj)
    if store is None:
        store = TCPStore("127.0.0.1", 0, None, True, wait_for_workers=False)
    expect = [job.kill[0]] if job.kill else []
    try:
        results = launch(
            _rank_main,
            job.world,
            job,
            (store.host, store.port),
            force=force,
            name="moeflow geo diloco",
            init_group=False,
            threads=dj.threads,
            stall_timeout_s=dj.timeout_s,
            expect_exit=expect,
            progress=progress,
        )
    except RankFailed as e:
        if e.kind == GeoJobFailed.__name__:
            raise GeoJobFailed(str(e).split(": ", 2)[-1]) from None
        raise
    return collect(store, job, [r for r in results if r is not None])


def collect(store, job: ElasticJob, results: list[dict]) -> ElasticResult:
    """The run's result from the broker (losses, replicas per step, events) and the
    processes' reports (slot 0's global parameters)."""
    dj = job.diloco
    losses, counts = [], []
    start = 0
    if dj.resume:
        start = (diloco.latest_checkpoint(dj.checkpoint_dir) or 0) + 1
    for k in range(dj.steps):
        if not store.check([f"count/{k}"]):
            if k >= start:
                raise GeoJobFailed(f"the run ended without a loss for step {k}")
            losses.append(float("nan"))
            counts.append(0)
            continue
        n = int(store.get(f"count/{k}"))
        vals = [float(store.get(f"loss/{k}/{s}")) for s in range(n)]
        losses.append(sum(vals) / n)
        counts.append(n)
    r0 = next((r for r in results if r["params"]), None)
    n = int(store.add("events", 0))
    events = [store.get(f"event/{i}").decode() for i in range(1, n + 1)]
    for r in results:
        events += r.get("events", [])
    return ElasticResult(
        losses=losses,
        replicas=counts,
        events=list(dict.fromkeys(events)),
        params=r0["params"] if r0 else [],
    )
