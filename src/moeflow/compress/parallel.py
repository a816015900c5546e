"""Worker threads for the numba kernels: a cached pool per size, static ranges or a shared
atomic work counter.

The kernels release the GIL, so Python threads give real parallelism.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from moeflow._deps import require
from moeflow.compress._intrinsics import fetch_add
from moeflow.validate import positive_int

nb = require("numba", "moeflow.compress")


def default_threads() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # pragma: no cover - non-Linux
        return max(1, os.cpu_count() or 1)


_POOLS: dict[int, ThreadPoolExecutor] = {}


def _workers(n_items: int, threads: int | None) -> int:
    """How many workers to run: ``threads`` (default: all cores), at most one per item."""
    threads = default_threads() if threads is None else positive_int("threads", threads)
    return min(threads, max(1, n_items))


def _pool(size: int) -> ThreadPoolExecutor:
    pool = _POOLS.get(size)
    if pool is None:
        pool = _POOLS[size] = ThreadPoolExecutor(size, thread_name_prefix="mfz")
    return pool


def run_parallel(fn, n_items: int, threads: int | None):
    """Run ``fn(lo, hi)`` over contiguous ranges of ``range(n_items)``; returns the results."""
    threads = _workers(n_items, threads)
    if threads == 1:
        return [fn(0, n_items)]
    bounds = np.linspace(0, n_items, threads + 1).astype(np.int64)
    pool = _pool(threads)
    futs = [pool.submit(fn, int(bounds[i]), int(bounds[i + 1])) for i in range(threads)]
    return [f.result() for f in futs]


def run_shared(fn, n_items: int, threads: int | None):
    """Run ``fn(counter)`` on ``min(threads, n_items)`` workers that share one work counter;
    returns their results. A numba kernel takes its next item with ``take(counter)`` until
    that passes ``n_items``, so items are balanced dynamically: a static split waits for
    the slower half, and on a shared machine one core is often slower than the other. The
    calling thread is one of the workers."""
    threads = _workers(n_items, threads)
    counter = np.zeros(1, np.int64)
    if threads == 1:
        return [fn(counter)]
    futs = [_pool(threads - 1).submit(fn, counter) for _ in range(threads - 1)]
    first = fn(counter)
    return [first] + [f.result() for f in futs]


@nb.njit(inline="always")
def take(counter):
    """The next work item of a ``run_shared`` counter (atomic)."""
    return fetch_add(counter, 0, 1)
