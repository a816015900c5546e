"""Fault-aware waiting: every collective moeflow issues is waited on with a deadline.

A dead peer makes gloo fail fast ("Connection reset by peer"); a stalled peer makes the
wait run into ``timeout_s``. Both surface as :class:`moeflow.errors.CommTimeoutError`
naming the operation, instead of an indefinite hang or an anonymous transport error.

On NCCL, ``Work.wait`` only orders streams; set ``TORCH_NCCL_BLOCKING_WAIT=1`` (or rely on
the process-group timeout and its watchdog) for the host-side deadline to bite.
"""

from __future__ import annotations

import datetime
import time
from collections.abc import Callable

import torch

from moeflow.errors import CommTimeoutError

DEFAULT_TIMEOUT_S = 300.0


def _timedelta(timeout_s: float) -> datetime.timedelta:
    return datetime.timedelta(seconds=float(timeout_s))


def wait_work(work, op: str, timeout_s: float, stream_ordered: bool = False) -> None:
    """Wait for an async ``Work`` or raise CommTimeoutError naming ``op``.

    ``stream_ordered`` (CUDA tensors): make the current stream wait on the collective's
    stream through its event instead of blocking the host, so the host keeps queueing the
    next chunk's kernels; the deadline is then the process group's timeout (moeflow creates
    its sub-groups with ``timeout_s``), enforced by the NCCL watchdog.
    """
    if work is None:
        return
    t0 = time.monotonic()
    try:
        ok = work.wait() if stream_ordered else work.wait(timeout=_timedelta(timeout_s))
    except CommTimeoutError:
        raise
    except Exception as e:  # gloo raises RuntimeError for both timeouts and dead peers
        waited = time.monotonic() - t0
        why = (
            f"did not finish within {timeout_s:g}s: a peer rank stalls or died"
            if waited >= 0.9 * timeout_s
            else f"failed after {waited:.2f}s (deadline {timeout_s:g}s): a peer rank died "
            f"or dropped its connection"
        )
        raise CommTimeoutError(
            f"{op} {why} ({type(e).__name__}: {str(e).splitlines()[0][:200]})"
        ) from e
    if ok is False:
        raise CommTimeoutError(f"{op} did not finish within {timeout_s:g}s")


class Pending:
    """An in-flight collective plus the local step that turns its buffer into the result.

    ``finish`` runs after the wait (e.g. summing reduce-scatter blocks); ``wait()`` is
    idempotent.
    """

    __slots__ = ("work", "op", "timeout_s", "_finish", "_value", "_done", "stream_ordered")

    def __init__(
        self,
        work,
        op: str,
        timeout_s: float,
        finish: Callable[[], torch.Tensor],
        stream_ordered: bool = False,
    ):
        self.work, self.op, self.timeout_s = work, op, timeout_s
        self._finish, self._value, self._done = finish, None, False
        self.stream_ordered = stream_ordered

    @classmethod
    def ready(cls, value: torch.Tensor) -> Pending:
        p = cls(None, "local", 0.0, lambda: value)
        return p

    def wait(self) -> torch.Tensor:
        if not self._done:
            wait_work(self.work, self.op, self.timeout_s, self.stream_ordered)
            self._value = self._finish()
            self._done, self._finish, self.work = True, None, None
        return self._value


def resolve_timeout(timeout_s: float | None) -> float:
    """``timeout_s`` or the default; must be positive."""
    from moeflow.errors import ConfigError

    t = DEFAULT_TIMEOUT_S if timeout_s is None else timeout_s
    if not (isinstance(t, (int, float)) and t > 0):
        raise ConfigError("timeout_s", timeout_s, "a number of seconds > 0")
    return float(t)
