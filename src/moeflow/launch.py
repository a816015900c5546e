"""Local process launcher: run a function on N gloo ranks on 127.0.0.1, with a deadline.

    results = launch(fn, nproc, *args, stall_timeout_s=30)   # fn(rank, world, *args)

Used by ``moeflow train --nproc N``, ``moeflow profile --nproc N`` and the CPU benchmarks
that fork ranks. What it guarantees:

* ``nproc`` is checked before anything is forked: ``1 <= nproc <= max_ranks()`` (a few ranks
  per CPU) unless ``force=True`` (``--force-nproc`` on the command line). Callers validate
  their configuration in the parent before calling :func:`launch`, so a bad flag fails once,
  not once per rank after the rendezvous.
* Every rank's exception goes back to the parent through a pipe; the parent ends the other
  ranks and raises ONE :class:`RankFailed` naming the rank and the error (the rank's
  traceback is printed only when ``MOEFLOW_DEBUG`` is set, i.e. ``moeflow --debug``).
* Each rank runs a heartbeat thread. A rank whose heartbeat stops for ``stall_timeout_s``
  (stopped with SIGSTOP, swapped out, frozen) or that exits without a result ends the run:
  the others are terminated, then killed, and :class:`moeflow.errors.CommTimeoutError` (a
  stall) or :class:`RankFailed` (a crash) names the rank. ``timeout_s`` bounds the whole run.
* Progress is printed when ranks start and once they all run, so a big launch never sits
  silent.
"""

from __future__ import annotations

import datetime
import os
import pickle
import signal
import sys
import threading
import time
import traceback
from collections.abc import Callable, Sequence
from multiprocessing.connection import wait as _wait_any

from moeflow.errors import CommTimeoutError, ConfigError, MoeflowError

DEBUG_ENV = "MOEFLOW_DEBUG"
#: ranks allowed per CPU before ``force`` is needed (gloo ranks on CPU share the cores)
RANKS_PER_CPU = 4
_GRACE_S = 2.0  # SIGTERM -> SIGKILL


class RankFailed(MoeflowError, RuntimeError):
    """A launched rank raised or died; ``rank``, ``kind`` (exception class name) and
    ``remote_traceback`` describe it."""

    def __init__(self, rank: int, kind: str, message: str, remote_traceback: str = ""):
        self.rank, self.kind, self.remote_traceback = rank, kind, remote_traceback
        self.message = message
        text = " ".join(message.split())
        super().__init__(
            f"rank {rank} failed: {kind}: {text}" if kind else f"rank {rank} failed: {text}"
        )

    def _reduce_args(self) -> tuple:
        return self.rank, self.kind, self.message, self.remote_traceback


def debug_enabled() -> bool:
    """True when ``moeflow --debug`` (or ``MOEFLOW_DEBUG=1``) asks for full tracebacks."""
    return os.environ.get(DEBUG_ENV, "") not in ("", "0")


def _cpus() -> int:
    try:
        return len(os.sched_getaffinity(0)) or 1
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def max_ranks() -> int:
    """The largest ``nproc`` accepted without ``force``: ``RANKS_PER_CPU`` x usable CPUs."""
    return RANKS_PER_CPU * _cpus()


def check_nproc(nproc, *, force: bool = False, flag: str = "--nproc") -> int:
    """``nproc`` as an int in ``[1, max_ranks()]`` (any positive int with ``force``)."""
    from moeflow.validate import is_int

    cap = max_ranks()
    if not is_int(nproc) or nproc < 1:
        raise ConfigError(flag, nproc, "a positive int (the number of local ranks)")
    if nproc > cap and not force:
        raise ConfigError(
            flag,
            nproc,
            f"at most {cap} ({RANKS_PER_CPU} ranks per CPU x "
            f"{_cpus()} CPUs); pass --force-nproc (force=True) "
            "to run more",
        )
    return int(nproc)


# ---- the rank side ---------------------------------------------------------------------
def _heartbeat(beats, rank: int, every_s: float, parent_pid: int) -> None:
    while True:  # a daemon thread: it stops when the process stops (SIGSTOP) or exits
        if os.getppid() != parent_pid:  # the launcher died (SIGKILL): do not outlive it
            os._exit(1)
        beats[rank] = time.monotonic()
        time.sleep(every_s)


def _rank_main(
    fn, rank, world, port, args, conn, beats, every_s, threads, pg_timeout_s, init_group, parent_pid
):
    # the parent decides when ranks end: default SIGTERM, and Ctrl-C reaches the parent only
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    threading.Thread(
        target=_heartbeat, args=(beats, rank, every_s, parent_pid), daemon=True
    ).start()
    status = 0
    try:
        import torch

        if threads:
            torch.set_num_threads(threads)
        if init_group:
            import torch.distributed as dist

            dist.init_process_group(
                "gloo",
                init_method=f"tcp://127.0.0.1:{port}",
                rank=rank,
                world_size=world,
                timeout=datetime.timedelta(seconds=pg_timeout_s),
            )
        out = fn(rank, world, *args)
        _send(conn, ("ok", out))
        if init_group:  # after the send: a group with a failed peer may block on teardown
            _close_group()
    except BaseException as e:  # noqa: BLE001 - every failure goes back to the parent
        status = 1
        try:
            _send(conn, ("err", type(e).__name__, str(e), traceback.format_exc()))
        except Exception:  # the parent is gone or the pipe broke: the exit code tells
            pass
    finally:
        try:
            conn.close()
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(status)  # skip the forked parent's atexit handlers


def _send(conn, msg) -> None:
    """Send ``msg`` by value. ``Connection.send`` pickles with multiprocessing's pickler, for
    which torch registers tensor reductions that pass shared-memory file descriptors; those
    are fetched from the sender after it may already have exited (the rank exits right after
    sending), which lost results now and then. Plain pickle copies the data into the pipe."""
    conn.send_bytes(pickle.dumps(msg, protocol=pickle.HIGHEST_PROTOCOL))


def _close_group() -> None:
    try:
        from moeflow.comm.groups import clear_cache

        clear_cache()
    except Exception:  # the group cache is optional; the process exits next anyway
        pass
    import torch.distributed as dist

    if dist.is_initialized():
        try:
            dist.destroy_process_group()
        except Exception:  # a peer already left; nothing to tear down cleanly
            pass


# ---- the parent side -------------------------------------------------------------------
def _end(procs, wait_s: float = 0.0) -> None:
    """After ``wait_s`` for ranks to exit on their own, SIGTERM every live rank, then
    SIGKILL what is left after a grace period."""
    deadline = time.monotonic() + wait_s
    for p in procs:
        p.join(max(0.0, deadline - time.monotonic()))
    for p in procs:
        if p.is_alive():
            try:  # a stopped rank cannot act on SIGTERM: kill it at once
                p.kill() if _stopped(p.pid) else p.terminate()
            except OSError:
                pass
    deadline = time.monotonic() + _GRACE_S
    for p in procs:
        p.join(max(0.0, deadline - time.monotonic()))
    for p in procs:
        if p.is_alive():  # stopped ranks (SIGSTOP) only react to SIGKILL
            try:
                p.kill()
            except OSError:
                pass
    for p in procs:
        p.join(5)


def launch(
    fn: Callable,
    nproc: int,
    *args,
    force: bool = False,
    name: str = "moeflow",
    timeout_s: float | None = None,
    stall_timeout_s: float = 60.0,
    pg_timeout_s: float = 120.0,
    threads: int = 1,
    init_group: bool = True,
    expect_exit: Sequence[int] = (),
    progress: bool = True,
) -> list:
    """Run ``fn(rank, nproc, *args)`` on ``nproc`` forked ranks; return their results in rank
    order.

    ``init_group``: initialise a gloo process group on a free 127.0.0.1 port first (timeout
    ``pg_timeout_s``). ``stall_timeout_s``: a live rank whose heartbeat is older than this
    ends the run with CommTimeoutError naming it. ``timeout_s``: deadline for the whole run
    (None: none). ``expect_exit``: ranks that may die without a result (fault tests); their
    result is None. Raises ConfigError for a bad ``nproc`` before forking, RankFailed for a
    rank that raised or died, CommTimeoutError for a stall or the deadline.
    """
    from moeflow.validate import positive_float, positive_int

    nproc = check_nproc(nproc, force=force)  # first: nothing heavy runs for a bad value
    stall_timeout_s = positive_float("stall_timeout_s", stall_timeout_s)
    if timeout_s is not None:
        timeout_s = positive_float("timeout_s", timeout_s)
    threads = positive_int("threads", threads) if threads else 0
    import multiprocessing as mp

    from moeflow.comm.ports import free_port

    expected = set(expect_exit)
    every_s = min(1.0, max(0.02, stall_timeout_s / 10))
    ctx = mp.get_context("fork" if sys.platform.startswith("linux") else "spawn")
    port = free_port() if init_group else 0
    beats = ctx.Array("d", nproc, lock=False)
    say = (
        (lambda msg: print(f"{name}: {msg}", file=sys.stderr, flush=True))
        if progress
        else (lambda msg: None)
    )
    say(
        f"starting {nproc} rank{'s' if nproc > 1 else ''}"
        + (f" (gloo on 127.0.0.1:{port})" if init_group else "")
    )
    procs, conns = [], []
    sys.stdout.flush()  # or the ranks inherit unwritten output and write it again
    sys.stderr.flush()
    t_start = time.monotonic()
    try:
        for rank in range(nproc):
            beats[rank] = time.monotonic()
            parent, child = ctx.Pipe(duplex=False)
            # not daemonic: a rank may start its own workers (data loaders, compilers);
            # the launcher ends every rank itself, and a rank exits when it is orphaned
            p = ctx.Process(
                target=_rank_main,
                args=(
                    fn,
                    rank,
                    nproc,
                    port,
                    args,
                    child,
                    beats,
                    every_s,
                    threads,
                    pg_timeout_s,
                    init_group,
                    os.getpid(),
                ),
            )
            p.start()
            child.close()
            procs.append(p)
            conns.append(parent)
        say(f"{nproc} rank{'s' if nproc > 1 else ''} started in {time.monotonic() - t_start:.1f} s")
        results = _collect(
            procs, conns, beats, expected, stall_timeout_s, timeout_s, t_start, every_s
        )
    except BaseException:
        _end(procs)
        raise
    finally:
        for c in conns:
            c.close()
    _end(procs, wait_s=5.0)  # every rank reported: let them tear down their groups
    return results


def _collect(procs, conns, beats, expected, stall_timeout_s, timeout_s, t_start, every_s) -> list:
    n = len(procs)
    results: list = [None] * n
    pending = set(range(n))
    by_conn = {c: r for r, c in enumerate(conns)}
    while pending:
        ready = _wait_any(
            [conns[r] for r in pending] + [procs[r].sentinel for r in pending],
            timeout=min(0.25, stall_timeout_s / 4),
        )
        now = time.monotonic()
        for obj in ready:
            r = by_conn.get(obj)
            if r is None or r not in pending:
                continue
            try:
                msg = pickle.loads(obj.recv_bytes())
            except (EOFError, OSError, pickle.UnpicklingError):
                msg = None
            pending.discard(r)
            if msg is None:  # the pipe closed without a message: the rank died
                procs[r].join(1.0)
                if r not in expected:
                    raise _died(r, procs[r].exitcode)
                continue
            if msg[0] == "ok":
                results[r] = msg[1]
            else:
                _, kind, text, tb = msg
                if kind == "CommTimeoutError":  # a peer's timeout: blame a stalled rank first
                    _raise_if_stalled(
                        procs,
                        beats,
                        pending,
                        expected,
                        stall_timeout_s,
                        now,
                        exclude=r,
                        limit_s=4 * every_s,
                    )
                if debug_enabled():
                    print(f"---- traceback of rank {r} ----\n{tb}", file=sys.stderr, end="")
                raise RankFailed(r, kind, text, tb)
        for r in sorted(pending):
            p = procs[r]
            if not p.is_alive() and not conns[r].poll(0):
                pending.discard(r)
                if r not in expected:
                    raise _died(r, p.exitcode)
        _raise_if_stalled(procs, beats, pending, expected, stall_timeout_s, now)
        if timeout_s is not None and now - t_start > timeout_s and pending:
            raise CommTimeoutError(f"ranks {sorted(pending)} did not finish within {timeout_s:g} s")
    return results


def _died(rank: int, code) -> RankFailed:
    how = f"killed by signal {-code}" if code is not None and code < 0 else f"exit code {code}"
    return RankFailed(rank, "", f"exited without a result ({how})")


def _stopped(pid: int) -> bool:
    """True when ``pid`` is in the stopped or traced state (Linux ``/proc``; else False)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            state = f.read().rsplit(b")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state in (b"T", b"t")


def _raise_if_stalled(
    procs, beats, pending, expected, stall_timeout_s, now, exclude=None, limit_s=None
):
    # limit_s: a peer already timed out, so a few missed heartbeats are suspect enough
    limit = stall_timeout_s if limit_s is None else limit_s
    for r in sorted(pending):
        if r == exclude or r in expected or not procs[r].is_alive():
            continue
        age = now - beats[r]
        if limit_s is not None and _stopped(procs[r].pid):
            raise CommTimeoutError(
                f"rank {r} is stopped (SIGSTOP) and its peers timed out; the other ranks were ended"
            )
        if age > limit:
            raise CommTimeoutError(
                f"rank {r} made no progress for {age:.1f} s (limit "
                f"{stall_timeout_s:g} s): stopped or hung; the other "
                f"ranks were ended"
            )
