"""Static wavefront scheduler for chunked dispatch / experts / combine (FSMoE overlap).

A chunk's life is a list of stages; each stage waits for the previous stage's collective,
does local work (a reorder, or the expert GEMMs) and issues the next collective
asynchronously. At wavefront step t, chunk c runs stage t - c, newest chunk first, so
chunk i's expert GEMMs run while chunk i+1's dispatch and chunk i-1's combine are on the
wire (gloo runs them on its own threads; NCCL on its own stream, ordered by events).

The order in which collectives are issued depends only on (r, number of stages), never
on timing, so every rank issues them in the same order on each process group - the
condition for collectives not to deadlock.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from moeflow.comm.timeouts import Pending

Stage = Callable[[int, object], object]


def run_wavefront(num_chunks: int, stages: Sequence[Stage]) -> list:
    """Run ``stages`` over ``num_chunks`` chunks; returns each chunk's last stage result."""
    state: list = [None] * num_chunks
    n = len(stages)
    for t in range(num_chunks + n - 1):
        for c in range(min(t, num_chunks - 1), max(-1, t - n), -1):
            value = state[c]
            if isinstance(value, Pending):
                value = value.wait()
            state[c] = stages[t - c](c, value)
    return [v.wait() if isinstance(v, Pending) else v for v in state]
