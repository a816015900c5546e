"""The wavefront schedule: issue order (FSMoE overlap) and real concurrency with async work."""

from __future__ import annotations

import threading
import time

from moeflow.comm.timeouts import Pending
from moeflow.parallel.pipeline import run_wavefront


class _SleepWork:
    """A fake async collective: finishes ``seconds`` after it is issued (like a DMA link)."""

    def __init__(self, seconds: float, link: dict):
        start = max(time.perf_counter(), link.get("busy", 0.0))  # one link: serialised
        link["busy"] = self.done_at = start + seconds
        self._event = threading.Event()
        threading.Timer(max(0.0, self.done_at - time.perf_counter()), self._event.set).start()

    def wait(self, timeout=None):
        return self._event.wait(None if timeout is None else timeout.total_seconds())


def _stages(log, link, comm_s, compute_s):
    def dispatch(c, _):
        log.append(("issue dispatch", c))
        return Pending(_SleepWork(comm_s, link), "d", 5.0, lambda: c)

    def experts(c, v):
        assert v == c
        log.append(("compute", c))
        time.sleep(compute_s)  # the GEMMs (sleep: the test must not depend on CPU load)
        log.append(("issue combine", c))
        return Pending(_SleepWork(comm_s, link), "c", 5.0, lambda: c)

    def place(c, v):
        log.append(("done", c))
        return v

    return [dispatch, experts, place]


def test_issue_order_overlaps_neighbouring_chunks():
    log: list = []
    out = run_wavefront(4, _stages(log, {}, 0.0, 0.0))
    assert out == [0, 1, 2, 3]
    pos = {e: i for i, e in enumerate(log)}
    for c in range(3):
        # chunk c+1's dispatch is on the wire before chunk c's GEMMs start ...
        assert pos[("issue dispatch", c + 1)] < pos[("compute", c)]
    for c in range(1, 4):
        # ... and chunk c-1's combine is issued before chunk c's GEMMs start
        assert pos[("issue combine", c - 1)] < pos[("compute", c)]


def test_pipelining_hides_link_time_behind_compute():
    comm, compute, r = 0.03, 0.03, 6
    t0 = time.perf_counter()
    run_wavefront(1, _stages([], {}, comm * r, compute * r))
    serial = time.perf_counter() - t0  # r = 1: nothing to overlap
    t0 = time.perf_counter()
    run_wavefront(r, _stages([], {}, comm, compute))
    piped = time.perf_counter() - t0
    # serial = 2*comm*r + compute*r = 0.54 s; ideal pipelined ~ max(2*comm*r, compute*r) + 2 stages
    assert serial > 0.5
    assert piped < 0.75 * serial, (serial, piped)
