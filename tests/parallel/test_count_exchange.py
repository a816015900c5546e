"""The count exchange does not block: it is issued right after routing, travels while the
rows are permuted, and is waited on only after the permutation; the layer still equals the
single-device layer."""

from __future__ import annotations

import pytest

from tests._dist import run_ranks
from tests.parallel.ep_cases import Case, run_case

pytestmark = pytest.mark.dist


def _order(rank, world, dispatcher, start_name):
    from moeflow.comm.timeouts import Pending
    from moeflow.layer.moe import MoELayer
    from moeflow.parallel import dispatch

    log: list = []
    start = getattr(dispatch, start_name)
    permute = MoELayer.permute

    def logged_start(*a, **kw):
        p = start(*a, **kw)
        log.append(("issued", p.work is not None))  # a real in-flight collective

        def logged_wait():
            log.append(("waited", None))
            return p.wait()

        return Pending(None, p.op, p.timeout_s, logged_wait)

    def logged_permute(x_TD, routing):
        log.append(("permute", None))
        return permute(x_TD, routing)

    dispatch.__dict__[start_name] = logged_start
    MoELayer.permute = staticmethod(logged_permute)
    try:
        err = run_case(rank, world, Case(dispatcher=dispatcher, ranks_per_node=1, r_fwd=2))
    finally:
        dispatch.__dict__[start_name] = start
        MoELayer.permute = staticmethod(permute)
    return err, [e for e, _ in log], [ok for e, ok in log if e == "issued"]


@pytest.mark.parametrize(
    "dispatcher,start_name",
    [("a2a", "all_to_all_equal_start"), ("2dh", "all_gather_equal_start")],
)
def test_count_exchange_overlaps_the_permutation(dispatcher, start_name):
    for err, events, in_flight in run_ranks(_order, 2, dispatcher, start_name, timeout_s=90):
        assert err < 2e-5
        # the reference layer permutes first; then the one EP forward: issued -> permute ->
        # waited (the wait comes after the local work)
        i = events.index("issued")
        assert events[i:] == ["issued", "permute", "waited"], events
        assert in_flight == [True]
