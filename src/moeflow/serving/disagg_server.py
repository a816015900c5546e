"""The engine behind ``moeflow serve MODEL_DIR --ag N --eg M``: continuous batching on
attention ranks whose routed experts live on expert ranks.

Layout (:mod:`moeflow.serving.disaggregated`): ranks ``0 .. N-1`` are the attention group
(AG), ``N .. N+M-1`` the expert group (EG), one gloo process group over 127.0.0.1. The
serving process (HTTP, tokenizer) holds no weight; it forks the ranks and talks to each over
a pipe.

* **AG rank**: loads embeddings, attention, norms, router, shared experts and LM head
  (:func:`~moeflow.serving.disagg_weights.load_attention_part`) and runs an
  :class:`~moeflow.serving.engine.Engine` (the same continuous batching, block KV cache and
  scheduling rule as colocated serving) whose forward pass is a
  :class:`~moeflow.serving.disaggregated.DisaggregatedForward` over the engine's cache.
* **EG rank**: loads only its ``E / M`` experts of every layer
  (:func:`~moeflow.serving.disagg_weights.load_expert_part`) and runs an
  :class:`~moeflow.serving.disaggregated.ExpertServer` until every AG rank has stopped.
* **Schedule** (``schedule="findep"`` or ``"pppipe"``): once loaded, attention rank 0 and
  expert rank ``N`` time gloo round trips over the ranks' own group (the link), attention
  rank 0 times the expert GEMM, the attention half of a layer and the LM head on one thread
  (:mod:`moeflow.serving.host_costs`) and sends the costs to every rank, unless ``costs``
  were given; each AG rank's forward pass then asks a
  :class:`~moeflow.plan.findep.StepPlanner` for every step's ``(r1, r2, order)`` (cached by
  the step's shape) and counts the steps of each shape and plan, which ``/health`` shows.
  Start-up costs misread a loaded host (a link latency of 0.1 or 8 ms per message), and a
  host with no spare core does not overlap what the closed form overlaps, so after every
  ``refit_every`` steps the rank refits the planner to the last :data:`REFIT_WINDOW` steps
  it timed (:meth:`~moeflow.plan.findep.StepPlanner.refit`: the costs by least squares on
  the predicted step times, and the closed form or ``serial_time`` by which misses the split
  steps less), between two steps on the step thread; the plans are then solved again.
* **Serving process**: :class:`DisaggregatedEngine` has the interface
  :class:`~moeflow.serving.openai_api.OpenAIServer` uses (``submit``, ``context``,
  ``health``, ``start``, ``shutdown``). A request goes to the AG rank with the fewest requests
  in flight; its tokens come back one message each.

Failures: the serving process watches every rank's process. When one dies, every request in
flight ends at once with :class:`~moeflow.serving.engine.RankDiedError` naming the rank
(HTTP 503), ``/health`` turns 503 listing the dead ranks, and new requests are refused with
the same error; an AG rank blocked on a dead peer gives up at its transfer deadline
(``timeout_s``, :func:`moeflow.comm.timeouts.wait_work`). Shutdown (SIGTERM) drains the
requests in flight, stops the AG ranks (which release the EG ranks), and ends any rank that
has not exited within a grace period, so the server never hangs on a dead rank.
"""

from __future__ import annotations

import datetime
import itertools
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Sequence
from multiprocessing.connection import wait as _wait_any

import torch

from moeflow.errors import CommTimeoutError, ConfigError, InputError, MoeflowError
from moeflow.models import Request, SamplingParams, validate_request
from moeflow.serving.engine import (
    EngineClosedError,
    EngineConfig,
    EngineError,
    RankDiedError,
    RequestHandle,
)

__all__ = ["DisaggregatedEngine", "disaggregated_server"]

_GRACE_S = 10.0  # stop message -> SIGTERM -> SIGKILL
#: the served steps an attention rank refits its step planner to: the last this many
REFIT_WINDOW = 256


def _error_info(e: BaseException) -> tuple[str, str, bool]:
    return type(e).__name__, " ".join(str(e).split())[:500], isinstance(e, ValueError)


def _exit_text(code: int | None) -> str:
    if code is None:
        return "is running"
    if code < 0:
        try:
            return f"was killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"was killed by signal {-code}"
    return f"exited with code {code}"


# ---- the rank side -------------------------------------------------------------------------
class _Sender:
    """One pipe end shared by threads: whole messages, one at a time."""

    def __init__(self, conn):
        self.conn, self.lock = conn, threading.Lock()

    def __call__(self, msg) -> None:
        with self.lock:
            self.conn.send(msg)


_STATUS = {"VmRSS": "rss", "VmHWM": "peak_rss", "RssAnon": "rss_anon", "RssFile": "rss_file"}


def _memory() -> dict:
    """This process's resident set now (``rss``: anonymous ``rss_anon`` + file-backed
    ``rss_file``, i.e. code and mapped files) and its peak (``peak_rss``), in bytes, from
    /proc/self/status; {} where there is none."""
    out = {}
    try:
        with open("/proc/self/status") as f:
            for line in f:
                name = line.split(":", 1)[0]
                if name in _STATUS:
                    out[_STATUS[name]] = int(line.split()[1]) * 1024
    except OSError:
        pass
    return out


def _reset_peak() -> None:
    """Reset VmHWM to the current resident set (Linux >= 4.0), where allowed."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def _watch_parent(parent_pid: int) -> None:
    while True:  # an orphaned rank (the server was killed) exits
        if os.getppid() != parent_pid:
            os._exit(1)
        time.sleep(0.5)


def _rank_main(rank: int, spec: dict, conn, parent_pid: int) -> None:
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the server; it ends us
    for fd in spec["close_fds"]:  # the server's listening socket is not ours to hold
        try:
            os.close(fd)
        except OSError:
            pass
    send = _Sender(conn)
    status = 0
    try:
        if spec["rank_init"] is not None:  # before any thread or socket of ours
            spec["rank_init"](rank)
        threading.Thread(target=_watch_parent, args=(parent_pid,), daemon=True).start()
        import torch.distributed as dist

        torch.set_num_threads(spec["threads"])
        backend = "gloo"
        if spec["device"] == "cuda":
            # one GPU per rank; no device_id: the group connects lazily, and each pair of
            # ranks gets its own NCCL communicator for its point-to-point messages, so an
            # idle attention rank's pending receive holds back no other pair
            torch.cuda.set_device(rank)
            backend = "nccl"
        dist.init_process_group(
            backend,
            init_method=f"tcp://{spec['master_addr']}:{spec['port']}",
            rank=rank,
            world_size=spec["ag"] + spec["eg"],
            timeout=datetime.timedelta(seconds=spec["start_timeout_s"]),
        )
        # the rank's memory before its weights: forked code and data, the gloo group
        _reset_peak()
        baseline = _memory()
        if rank < spec["ag"]:
            _attention_rank(rank, spec, conn, send, baseline)
        else:
            _expert_rank(rank, spec, send, baseline)
        send(("done", rank, {"memory_end": _memory()}))
    except BaseException as e:  # noqa: BLE001 - the server reports it
        status = 1
        try:
            send(("fatal", rank, *_error_info(e)))
        except Exception:
            pass
    finally:
        try:
            import torch.distributed as dist

            if dist.is_initialized():
                dist.destroy_process_group()
        except Exception:
            pass
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(status)  # skip the forked server's atexit handlers


def _rank_device(rank: int, spec: dict) -> torch.device:
    """Where a rank's part lives: the CPU (gloo), or GPU ``rank`` (NCCL)."""
    return torch.device("cuda", rank) if spec["device"] == "cuda" else torch.device("cpu")


def _needs_costs(spec: dict) -> bool:
    return isinstance(spec["schedule"], str) and spec["schedule"] != "naive"


def _host_costs(rank: int, spec: dict, model):
    """The costs the step planner solves from (:mod:`moeflow.serving.host_costs`): those
    given, or measured now, once every rank has loaded its part: the link by round trips
    between attention rank 0 and expert rank ``ag`` over the ranks' own group, the compute
    on attention rank 0 (``model``), which sends them to every rank. None when the schedule
    is fixed or naive (no solver)."""
    if not _needs_costs(spec) or spec["perf"] is not None:
        return None
    if spec["costs"] is not None:
        return spec["costs"]
    import torch.distributed as dist

    from moeflow.serving.host_costs import LINK_SIZES, fit_link, measure_compute, pingpong

    ag, eg = spec["ag"], spec["eg"]
    ms = pingpong(rank, ag + eg, LINK_SIZES, 0, ag)
    out = [None]
    if rank == 0:
        note = f"gloo between attention rank 0 and expert rank {ag}, at server start"
        out = [measure_compute(model, eg, fit_link(LINK_SIZES, ms, note=note))]
    dist.broadcast_object_list(out, src=0)
    return out[0]


def _attention_schedule(spec: dict, cfg, costs):
    """The AG rank's :class:`~moeflow.serving.disaggregated.ServeSchedule`: the one given,
    naive, or ``findep`` / ``pppipe`` solved at every step by a
    :class:`~moeflow.plan.findep.StepPlanner` over ``costs``."""
    from moeflow.serving.disaggregated import ServeSchedule

    name = spec["schedule"]
    if not isinstance(name, str):
        return name
    if name == "naive":
        return ServeSchedule.naive()
    from moeflow.serving.host_costs import perf_planner, step_planner

    if spec["perf"] is not None:
        planner = perf_planner(cfg, spec["ag"], spec["eg"], spec["perf"])
    else:
        planner = step_planner(
            cfg, spec["ag"], spec["eg"], costs.gemm, costs.link, costs.attention, head=costs.head
        )
    return ServeSchedule.per_step(name, planner)


def _attention_rank(rank: int, spec: dict, conn, send: _Sender, baseline) -> None:
    from moeflow.serving.disagg_weights import (
        expert_weight_bytes,
        load_attention_part,
        module_bytes,
    )
    from moeflow.serving.disaggregated import DisaggregatedForward
    from moeflow.serving.engine import Engine

    model, read = load_attention_part(spec["model_dir"], spec["dtype"])
    model.to(_rank_device(rank, spec))
    costs = _host_costs(rank, spec, model)
    schedule = _attention_schedule(spec, model.cfg, costs)
    if costs is None and schedule.planner is not None:  # from --perf
        from moeflow.serving.host_costs import planner_costs

        costs = planner_costs(schedule.planner)
    ag, eg, timeout_s = spec["ag"], spec["eg"], spec["timeout_s"]
    engine = Engine(
        model,
        spec["config"],
        forward=lambda cache: DisaggregatedForward(model, cache, schedule, ag, eg, timeout_s),
    )
    fwd = engine.model_forward
    send(
        (
            "ready",
            rank,
            {
                "num_blocks": engine.cache.pool.num_blocks,
                "block_size": engine.cache.block_size,
                "weight_bytes": module_bytes(model),
                "expert_bytes": expert_weight_bytes(model),
                "bytes_read": read,
                "memory_baseline": baseline,
                "memory_loaded": _memory(),
                "schedule": schedule.name,
                "costs": None if costs is None else costs.to_dict(),
            },
        )
    )
    planner = schedule.planner
    lock = threading.Lock()  # the planner's costs change under a refit
    if planner is not None:
        _refit_hook(rank, spec["refit_every"], planner, fwd, send, lock)
    handles: dict[int, RequestHandle] = {}

    def on_token(h: RequestHandle, tok: int) -> None:
        send(("token", h.request_id, tok))

    def on_finish(h: RequestHandle) -> None:
        handles.pop(h.request_id, None)
        err = None if h.result.error is None else _error_info(h.result.error)
        send(("finish", h.request_id, h.result.finish_reason, err))

    stop = threading.Event()

    def report() -> None:  # the pool's state and the plans used, for /health, when changed
        last, calls = None, (0, 0)
        while not stop.wait(0.25):
            now = (engine.num_running, engine.num_waiting, engine.cache.pool.free)
            if now != last:
                send(("stats", rank, *now))
                last = now
            if (fwd.calls, getattr(planner, "refits", 0)) != calls:
                plans = []
                with lock:  # predicted under the costs in use
                    calls = (fwd.calls, getattr(planner, "refits", 0))
                    for (b, t, r1, r2, order), (n, ms) in dict(fwd.plan_counts).items():
                        pred = None
                        if planner is not None:
                            pred = planner.predict_ms(b, t, r1, r2, order)
                        plans.append((b, t, r1, r2, order, n, ms, pred))
                send(("plans", rank, plans))

    threading.Thread(target=report, daemon=True).start()
    engine.start()
    while True:
        try:
            msg = conn.recv()
        except (EOFError, OSError):  # the server is gone: stop without draining
            engine.shutdown(drain=False, timeout=_GRACE_S)
            return
        if msg[0] == "submit":
            _, key, prompt, params = msg
            try:
                handles[key] = engine.submit(
                    prompt, params, key, on_token=on_token, on_finish=on_finish
                )
            except Exception as e:
                send(("finish", key, "error", _error_info(e)))
        elif msg[0] == "abort":
            h = handles.get(msg[1])
            if h is not None:
                h.abort()
        elif msg[0] == "stop":
            break
    stop.set()
    engine.shutdown(drain=True, timeout=_GRACE_S)
    try:
        fwd.close()  # releases the EG ranks
    except MoeflowError:  # an EG rank is gone; the server ends the others
        pass


def _planner_state(planner, every: int, last: dict | None) -> dict:
    from moeflow.serving.host_costs import planner_costs

    return {
        "costs": planner_costs(planner).to_dict(),
        "serial": planner.serial,
        "refits": planner.refits,
        "refit_every": every,
        "last_refit": last,
    }


def _refit_hook(rank: int, every: int, planner, fwd, send: _Sender, lock) -> None:
    """Refit ``planner`` (:meth:`~moeflow.plan.findep.StepPlanner.refit`) to the last
    :data:`REFIT_WINDOW` steps ``fwd`` served after every ``every`` of them (0: never), on the
    step's own thread between steps, and report its state (costs in use, ``serial``, refits,
    the last refit's errors and time) for ``/health``."""
    from collections import deque

    send(("planner", rank, _planner_state(planner, every, None)))
    if not every:
        return
    window: deque = deque(maxlen=REFIT_WINDOW)

    def on_step(record: dict) -> None:
        window.append(record)
        if fwd.calls % every:
            return
        t0 = time.perf_counter()
        try:
            with lock:
                last = planner.refit(list(window)).to_dict()
        except Exception as e:  # a failed refit keeps the costs; it must not fail the step
            last = {"error": f"{type(e).__name__}: {e}"}
        last.update(ms=1e3 * (time.perf_counter() - t0), at_step=fwd.calls)
        send(("planner", rank, _planner_state(planner, every, last)))

    fwd.on_step = on_step


def _expert_rank(rank: int, spec: dict, send: _Sender, baseline) -> None:
    from moeflow.serving.disagg_weights import load_expert_part, module_bytes
    from moeflow.serving.disaggregated import ExpertServer

    ag, eg = spec["ag"], spec["eg"]
    num_experts = spec["num_experts"]
    e0 = (rank - ag) * (num_experts // eg)
    cfg, experts, read = load_expert_part(
        spec["model_dir"], e0, e0 + num_experts // eg, spec["dtype"]
    )
    experts = [x.to(_rank_device(rank, spec)) for x in experts]
    _host_costs(rank, spec, None)
    server = ExpertServer.from_experts(
        cfg,
        experts,
        rank,
        ag,
        eg,
        spec["timeout_s"],
        idle_timeout_s=spec["idle_timeout_s"],
    )
    held = sum(module_bytes(x) for x in experts)
    info = {"expert_bytes": held, "weight_bytes": held, "bytes_read": read}
    info.update(memory_baseline=baseline, memory_loaded=_memory())
    send(("ready", rank, info))
    server.run()


# ---- the serving process ------------------------------------------------------------------
def check_device(device, world: int, schedule, costs, perf) -> None:
    """Refuse a device the ranks cannot run on, before any rank starts: ``"cpu"`` runs gloo
    ranks; ``"cuda"`` runs NCCL ranks, one GPU each, so it needs NCCL and ``world`` GPUs, and
    a solved schedule (``findep`` / ``pppipe``) needs its costs given (``costs`` or a
    ``moeflow profile`` ``perf`` of the GPU host): the start-up measurement times the
    CPU."""
    from moeflow.errors import DistributedConfigError

    if device not in ("cpu", "cuda"):
        raise ConfigError("device", device, '"cpu" (gloo ranks) or "cuda" (NCCL ranks)')
    if device == "cpu":
        return
    import torch.distributed as dist

    have = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if not dist.is_nccl_available() or have < world:
        raise DistributedConfigError(
            f"device='cuda' runs one NCCL rank per GPU: {world} ranks need {world} GPUs, "
            f"this host has {have}"
            + ("" if dist.is_nccl_available() else " and this torch has no NCCL")
        )
    if isinstance(schedule, str) and schedule != "naive" and costs is None and perf is None:
        raise ConfigError(
            "costs",
            None,
            f"given (costs or perf) for the {schedule!r} schedule on device='cuda': "
            "the costs measured at start time the CPU",
        )


class _RemoteHandle(RequestHandle):
    def __init__(self, engine: DisaggregatedEngine, key: int, rank: int, *args, **kw):
        super().__init__(*args, **kw)
        self._engine, self._key, self.rank = engine, key, rank

    def abort(self) -> None:
        if not self.done and not self._abort:
            self._abort = True
            self._engine._send(self.rank, ("abort", self._key))


class DisaggregatedEngine:
    """``ag`` attention ranks and ``eg`` expert ranks serving one checkpoint (module doc).

    The constructor checks the checkpoint and the layout in this process, forks the ranks,
    and returns once every rank has loaded its part (``start_timeout_s``); a rank that fails
    to start raises :class:`RankDiedError` naming it, after the others are ended.
    ``close_fds``: descriptors of this process the ranks must close (a listening socket).
    ``rank_init(rank)``: called first in each forked rank, before it joins the group (e.g. to
    enter the network namespace of an emulated node and set ``GLOO_SOCKET_IFNAME``, as
    ``benchmarks/serve_disagg_http_cpu.py`` does for its shaped links); ``master_addr``: the
    address rank 0 listens on for the group's rendezvous (default 127.0.0.1).

    ``device``: ``"cpu"`` (gloo ranks) or ``"cuda"`` (NCCL ranks, rank ``r`` on GPU ``r``
    of this host: one GPU per rank; :func:`check_device`).

    ``schedule``: a fixed :class:`~moeflow.serving.disaggregated.ServeSchedule`, or a name:
    ``"naive"`` (``r1 = r2 = 1``), or ``"findep"`` / ``"pppipe"`` solved at every forward
    step for that step's shape (sequences x new tokens) by a
    :class:`~moeflow.plan.findep.StepPlanner` (FinDEP over ``(r1, r2, order)``, PPPipe its
    best ``r1``; plans cached by shape) from ``costs``
    (:class:`~moeflow.serving.host_costs.HostCosts`), or from ``perf`` (a ``moeflow
    profile`` :class:`~moeflow.perf.PerfModel`, read by
    :meth:`~moeflow.plan.findep.StepPlanner.from_perf`; a cost it lacks is a ConfigError
    naming it, raised here), or, with neither, from costs the ranks measure once loaded
    (module doc). Default: naive (``moeflow serve``'s default is
    findep). ``refit_every``: each AG rank refits its planner's costs to the last
    :data:`REFIT_WINDOW` steps it served after every ``refit_every`` steps
    (:meth:`~moeflow.plan.findep.StepPlanner.refit`; 0: never; ConfigError unless an int >=
    0). :meth:`health` reports the costs in use and every plan used.
    """

    def __init__(
        self,
        model_dir,
        config: EngineConfig | None = None,
        *,
        ag: int = 1,
        eg: int = 1,
        dtype: torch.dtype = torch.float32,
        schedule=None,
        costs=None,
        perf=None,
        timeout_s: float = 30.0,
        threads: int = 1,
        start_timeout_s: float = 300.0,
        force: bool = False,
        close_fds: Sequence[int] = (),
        rank_init: Callable[[int], None] | None = None,
        master_addr: str = "127.0.0.1",
        device: str = "cpu",
        refit_every: int = 64,
    ):
        import multiprocessing as mp

        from moeflow.checkpoint.pretrained import check_pretrained
        from moeflow.comm.ports import free_port
        from moeflow.launch import check_nproc
        from moeflow.serving.disaggregated import SCHEDULES, ServeSchedule, check_layout
        from moeflow.serving.host_costs import HostCosts
        from moeflow.validate import positive_float, positive_int

        config = config or EngineConfig()
        config.check()
        if schedule is None:
            schedule = ServeSchedule.naive()
        if isinstance(schedule, str) and schedule not in SCHEDULES:
            raise ConfigError("schedule", schedule, f"one of {SCHEDULES} or a ServeSchedule")
        if not isinstance(schedule, (str, ServeSchedule)):
            raise ConfigError("schedule", schedule, f"one of {SCHEDULES} or a ServeSchedule")
        if costs is not None and not isinstance(costs, HostCosts):
            raise ConfigError("costs", type(costs).__name__, "None or a HostCosts")
        if perf is not None and (costs is not None or schedule not in ("findep", "pppipe")):
            raise ConfigError("perf", "given", 'only without costs, with "findep" or "pppipe"')
        timeout_s = positive_float("timeout_s", timeout_s)
        threads = positive_int("threads", threads)
        if isinstance(refit_every, bool) or not isinstance(refit_every, int) or refit_every < 0:
            raise ConfigError("refit_every", refit_every, "an int >= 0 (0: never refit)")
        cfg, _ = check_pretrained(model_dir)
        check_layout(ag + eg, ag, eg, cfg.moe.num_experts)
        check_nproc(ag + eg, force=force, flag="ag + eg")
        check_device(device, ag + eg, schedule, costs, perf)
        if perf is not None:  # a cost the profile lacks is refused here, by name
            from moeflow.serving.host_costs import perf_planner

            perf_planner(cfg, ag, eg, perf)
        self.cfg, self.ag, self.eg = cfg, ag, eg
        self.context = cfg.max_position_embeddings
        self.config = config
        spec = {
            "model_dir": str(model_dir),
            "config": config,
            "dtype": dtype,
            "schedule": schedule,
            "costs": costs,
            "perf": perf,
            "ag": ag,
            "eg": eg,
            "num_experts": cfg.moe.num_experts,
            "timeout_s": timeout_s,
            # an idle server waits for requests as long as it runs; a dead AG rank still
            # ends an EG rank's wait at once (gloo reports the dropped connection)
            "idle_timeout_s": 10 * 365 * 86400.0,
            "threads": threads,
            "start_timeout_s": start_timeout_s,
            "port": free_port(),
            "close_fds": list(close_fds),
            "rank_init": rank_init,
            "master_addr": str(master_addr),
            "device": device,
            "refit_every": refit_every,
        }
        self._lock = threading.Lock()
        self._inflight: dict[int, _RemoteHandle] = {}
        self._load = [0] * ag
        self._stats: dict[int, tuple[int, int, int]] = {}
        self._plans: dict[int, list] = {}
        self._planner: dict[int, dict] = {}
        self._info: dict[int, dict] = {}
        self._fatal: dict[int, str] = {}
        self._dead: dict[int, str] = {}
        self._keys = itertools.count()
        self._closing = self._stopping = False
        self._ready = threading.Condition(self._lock)
        ctx = mp.get_context("fork")
        self._procs, self._conns, self._senders = [], [], []
        sys.stdout.flush()
        sys.stderr.flush()
        for rank in range(ag + eg):
            mine, theirs = ctx.Pipe(duplex=True)
            p = ctx.Process(target=_rank_main, args=(rank, spec, theirs, os.getpid()), daemon=False)
            p.start()
            theirs.close()
            self._procs.append(p)
            self._conns.append(mine)
            self._senders.append(_Sender(mine))
        self._pump_thread = threading.Thread(target=self._pump, name="moeflow-disagg", daemon=True)
        self._pump_thread.start()
        deadline = time.monotonic() + start_timeout_s
        with self._ready:
            while len(self._info) < ag + eg and not self._dead:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self._ready.wait(min(left, 0.5))
            failed = dict(self._dead)
            waiting = [r for r in range(ag + eg) if r not in self._info]
        if failed or waiting:
            self._end_ranks(0.0)
            if failed:
                raise RankDiedError(next(iter(failed.values())))
            raise RankDiedError(
                f"{self._role(waiting[0])} rank {waiting[0]} did not load its part within "
                f"{start_timeout_s:g} s"
            )
        self.num_blocks = min(self._info[r]["num_blocks"] for r in range(ag))
        self.block_size = self._info[0]["block_size"]

    # -- ranks -------------------------------------------------------------------------------
    def _role(self, rank: int) -> str:
        return "attention" if rank < self.ag else "expert"

    @property
    def pids(self) -> list[int]:
        return [p.pid for p in self._procs]

    @property
    def rank_info(self) -> dict[int, dict]:
        """What each rank reported once loaded: ``weight_bytes`` and ``expert_bytes`` it
        holds, ``bytes_read`` from the checkpoint, the AG ranks' KV pool, and its memory
        (Linux, :func:`_memory`; the peak is reset at the baseline): ``memory_baseline``
        before loading, ``memory_loaded`` once loaded and, after a clean shutdown,
        ``memory_end``."""
        return dict(self._info)

    def _send(self, rank: int, msg) -> None:
        try:
            self._senders[rank](msg)
        except (OSError, ValueError):  # the rank is gone; the pump reports it
            pass

    def _pump(self) -> None:
        """Receive the ranks' messages and notice their exits, until the ranks are ended."""
        conns = {c: r for r, c in enumerate(self._conns)}
        sentinels = {p.sentinel: r for r, p in enumerate(self._procs)}
        while conns or sentinels:
            for obj in _wait_any(list(conns) + list(sentinels), timeout=0.5):
                if obj in conns:
                    try:
                        msg = obj.recv()
                    except (EOFError, OSError):
                        del conns[obj]
                        continue
                    self._on_message(msg)
                else:
                    rank = sentinels.pop(obj)
                    self._on_exit(rank)

    def _on_message(self, msg) -> None:
        kind = msg[0]
        if kind == "token":
            _, key, tok = msg
            h = self._inflight.get(key)
            if h is not None:
                h.result.tokens.append(tok)
                h.result.token_times.append(time.perf_counter())
                self._callback(h._on_token, h, tok)
        elif kind == "finish":
            _, key, reason, err = msg
            error = None if err is None else self._rebuild(*err)
            self._finish(key, reason, error)
        elif kind == "stats":
            self._stats[msg[1]] = tuple(msg[2:])
        elif kind == "plans":
            self._plans[msg[1]] = msg[2]
        elif kind == "planner":
            self._planner[msg[1]] = msg[2]
        elif kind == "ready":
            with self._ready:
                self._info[msg[1]] = {"role": self._role(msg[1]), **msg[2]}
                if msg[1] < self.ag:
                    self._stats[msg[1]] = (0, 0, msg[2]["num_blocks"])
                self._ready.notify_all()
        elif kind == "done":
            with self._lock:
                self._info.setdefault(msg[1], {}).update(msg[2])
        elif kind == "fatal":
            _, rank, name, text, _ = msg
            self._fatal[rank] = f"{name}: {text}"

    def _rebuild(self, name: str, text: str, is_value: bool) -> BaseException:
        if name == "CommTimeoutError":
            # a transfer to a peer failed: when that peer died (gloo may tell the AG rank a
            # moment before the process is reaped), name the dead rank instead
            if not self._dead:
                ended = _wait_any([p.sentinel for p in self._procs], timeout=0.5)
                for p in self._procs:
                    if p.sentinel in ended:
                        p.join(1.0)  # its sentinel closes a moment before it can be reaped
            self._poll_exits()
            if self._dead:
                return RankDiedError(next(iter(self._dead.values())))
            return CommTimeoutError(text)
        if name == "EngineClosedError":
            return EngineClosedError(text)
        if is_value:
            return InputError(text)
        return EngineError(f"{name}: {text}")

    def _poll_exits(self) -> None:
        for r, p in enumerate(self._procs):
            if p.exitcode is not None and r not in self._dead:
                self._on_exit(r)

    @staticmethod
    def _callback(fn: Callable | None, *args) -> None:
        if fn is not None:
            try:
                fn(*args)
            except Exception:  # a listener that went away must not stop the pump
                pass

    def _finish(self, key: int, reason: str, error: BaseException | None) -> None:
        with self._lock:
            h = self._inflight.pop(key, None)
            if h is None:
                return
            self._load[h.rank] -= 1
        h.result.finish_reason = reason
        h.result.error = error
        self._callback(h._on_finish, h)
        h._done.set()

    def _on_exit(self, rank: int) -> None:
        p, conn = self._procs[rank], self._conns[rank]
        p.join(1.0)
        try:  # its last words (a "fatal" message) may still be in the pipe
            while conn.poll():
                self._on_message(conn.recv())
        except (EOFError, OSError):
            pass
        with self._lock:
            if rank in self._dead or self._stopping:
                return
            why = self._fatal.get(rank)
            text = f"{self._role(rank)} rank {rank} (pid {p.pid}) {_exit_text(p.exitcode)}"
            self._dead[rank] = text + (f" after {why}" if why else "")
            first = next(iter(self._dead.values()))
            keys = list(self._inflight)
            self._ready.notify_all()
        for key in keys:  # every request needs every EG rank: none can finish now
            self._finish(key, "error", RankDiedError(f"{first}; the request cannot finish"))

    # -- the engine interface ------------------------------------------------------------------
    def start(self) -> DisaggregatedEngine:
        """The ranks run from the constructor on; nothing to start."""
        return self

    def submit(
        self,
        prompt: Sequence[int],
        params: SamplingParams | None = None,
        request_id=None,
        *,
        on_token: Callable | None = None,
        on_finish: Callable | None = None,
    ) -> RequestHandle:
        """As :meth:`moeflow.serving.engine.Engine.submit`; raises RankDiedError once a rank
        has died."""
        params = params or SamplingParams()
        validate_request(Request(prompt, params, request_id), self.cfg.vocab_size, self.context)
        prompt = [int(t) for t in prompt]
        positions = min(len(prompt) + params.max_new_tokens - 1, self.context)
        need = -(-positions // self.block_size)
        if need > self.num_blocks:
            raise InputError(
                f"request {request_id!r} needs {need} KV blocks of {self.block_size} "
                f"positions (prompt {len(prompt)} + max_new_tokens {params.max_new_tokens}); "
                f"the pool has {self.num_blocks}"
            )
        with self._lock:
            if self._dead:
                raise RankDiedError(next(iter(self._dead.values())))
            if self._closing:
                raise EngineClosedError("the engine is shutting down and takes no new requests")
            rank = min(range(self.ag), key=lambda r: self._load[r])
            key = next(self._keys)
            h = _RemoteHandle(
                self, key, rank, request_id, len(prompt), on_token=on_token, on_finish=on_finish
            )
            self._inflight[key] = h
            self._load[rank] += 1
        self._send(rank, ("submit", key, prompt, params))
        return h

    @property
    def num_running(self) -> int:
        return sum(s[0] for s in self._stats.values())

    @property
    def num_waiting(self) -> int:
        return sum(s[1] for s in self._stats.values())

    def plans(self) -> list[dict]:
        """Every forward step shape the AG ranks ran and the plan each used: ``rank``,
        ``seqs``, ``tokens`` (new per sequence), ``r1``, ``r2``, ``order``, ``steps`` (how
        many), ``ms`` (their total wall time), ``mean_ms`` (``ms / steps``) and
        ``predicted_ms`` (the step planner's time of one such step under the costs in use,
        refitted or not; None without a planner). Updated about every 0.25 s."""
        keys = ("seqs", "tokens", "r1", "r2", "order", "steps", "ms", "predicted_ms")
        out = []
        for r, ps in sorted(dict(self._plans).items()):
            for p in ps:
                d = {"rank": r, **dict(zip(keys, p))}
                d["mean_ms"] = d["ms"] / d["steps"]
                out.append(d)
        return out

    def health(self) -> dict:
        """``status`` "ok", or "error" with ``error`` naming the first dead rank; the AG
        ranks' requests running and waiting and free KV blocks; the ``schedule``, the
        ``costs`` attention rank 0 solves it from now (None when not solved; refitted to the
        served steps every ``refit_every`` steps) and ``start_costs`` (those it started with),
        ``serial`` (steps priced by :func:`~moeflow.plan.findep.serial_time` rather than the
        closed form) and ``refits`` (how many so far), ``planners`` (each AG rank's state:
        ``costs``, ``serial``, ``refits``, ``refit_every`` and ``last_refit``, the
        :class:`~moeflow.plan.findep.RefitResult` with its ``ms`` and ``at_step``) and the
        ``plans`` used (:meth:`plans`: measured vs predicted per step shape); every rank's
        role, pid and state."""
        with self._lock:
            dead = dict(self._dead)
        info0 = self._info.get(0, {})
        planners = dict(self._planner)
        p0 = planners.get(0, {})
        out = {
            "status": "error" if dead else "ok",
            "running": self.num_running,
            "waiting": self.num_waiting,
            "free_kv_blocks": sum(s[2] for s in self._stats.values()),
            "schedule": info0.get("schedule"),
            "costs": p0.get("costs", info0.get("costs")),
            "start_costs": info0.get("costs"),
            "serial": p0.get("serial"),
            "refits": p0.get("refits"),
            "planners": [{"rank": r, **st} for r, st in sorted(planners.items())],
            "plans": self.plans(),
            "ranks": [
                {
                    "rank": r,
                    "role": self._role(r),
                    "pid": p.pid,
                    "alive": r not in dead and p.exitcode is None,
                }
                for r, p in enumerate(self._procs)
            ],
        }
        if dead:
            out["error"] = next(iter(dead.values()))
            out["dead_ranks"] = [{"rank": r, "message": m} for r, m in dead.items()]
        return out

    def shutdown(self, drain: bool = True, timeout: float | None = None) -> None:
        """Take no new requests; with ``drain`` let those in flight finish (else abort
        them); stop the AG ranks, which release the EG ranks; end what has not exited
        within ``timeout`` (default: a grace of 10 s)."""
        with self._lock:
            if self._stopping:
                return
            self._closing = True
        if not drain:
            for h in list(self._inflight.values()):
                h.abort()
        while self._inflight:  # a dead rank fails them all, so this ends
            time.sleep(0.02)
        with self._lock:
            self._stopping = True
        for r in range(self.ag):
            self._send(r, ("stop",))
        self._end_ranks(_GRACE_S if timeout is None else timeout)

    def _end_ranks(self, wait_s: float) -> None:
        with self._lock:
            self._stopping = True
        deadline = time.monotonic() + wait_s
        for p in self._procs:
            p.join(max(0.0, deadline - time.monotonic()))
        for sig_wait, end in ((2.0, "terminate"), (5.0, "kill")):
            live = [p for p in self._procs if p.is_alive()]
            for p in live:
                try:
                    getattr(p, end)()
                except OSError:
                    pass
            for p in live:
                p.join(sig_wait)
        self._pump_thread.join(5.0)  # it ends once every rank's pipe and process closed
        for c in self._conns:
            c.close()


def disaggregated_server(model_dir, engine_config=None, model_name: str | None = None, **engine_kw):
    """An :class:`~moeflow.serving.openai_api.OpenAIServer` over a
    :class:`DisaggregatedEngine` of ``model_dir`` (``engine_kw``: its keywords). The ranks
    are forked before the tokenizer is loaded (its thread pool must not be forked)."""
    from pathlib import Path

    from moeflow.serving.openai_api import OpenAIServer, eos_token_ids, load_tokenizer

    engine = DisaggregatedEngine(model_dir, engine_config, **engine_kw)
    try:
        tokenizer = load_tokenizer(model_dir)
    except BaseException:
        engine.shutdown(drain=False)
        raise
    name = model_name or Path(model_dir).resolve().name
    return OpenAIServer(engine, tokenizer, name, eos_token_ids(model_dir, tokenizer))
