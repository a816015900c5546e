"""Spawn N gloo ranks on 127.0.0.1 and run a function on each (test harness).

``run_ranks(fn, world_size, *args)`` runs ``fn(rank, world_size, *args)`` on ``world_size``
forked ranks with :func:`moeflow.launch.launch` (fork: no re-import of torch, ~0.1 s per rank
instead of ~2 s) and returns the per-rank results. An exception in any rank is re-raised in
the caller as :class:`RankFailed` with that rank's traceback; a rank that does not finish
within ``timeout_s`` fails the call (all ranks are ended). ``expect_exit`` lets a test kill a
rank on purpose (fault tests).
"""

from __future__ import annotations

from collections.abc import Callable


class RankFailed(AssertionError):
    """A spawned rank raised, crashed or timed out."""


def _with_faulthandler(rank, world_size, fn, *args):
    import faulthandler

    faulthandler.enable()  # a crashing rank prints where it crashed
    return fn(rank, world_size, *args)


def run_ranks(
    fn: Callable,
    world_size: int,
    *args,
    timeout_s: float = 120.0,
    threads: int = 1,
    pg_timeout_s: float = 60.0,
    expect_exit: set | None = None,
) -> list:
    """Run ``fn(rank, world_size, *args)`` on ``world_size`` gloo ranks; return results.

    Ranks in ``expect_exit`` may die without reporting (their result is None).
    """
    from moeflow.errors import CommTimeoutError
    from moeflow.launch import RankFailed as LaunchFailed
    from moeflow.launch import launch

    try:
        return launch(
            _with_faulthandler,
            world_size,
            fn,
            *args,
            force=True,
            timeout_s=timeout_s,
            stall_timeout_s=timeout_s,
            pg_timeout_s=pg_timeout_s,
            threads=threads,
            expect_exit=sorted(expect_exit or ()),
            progress=False,
        )
    except LaunchFailed as e:
        raise RankFailed(f"{e}\n{e.remote_traceback}") from None
    except CommTimeoutError as e:
        raise RankFailed(str(e)) from None
