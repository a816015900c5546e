"""FinDEP's step planner refitted to served steps (pure Python): steps timed under known
costs give those costs' predictions back, whether the host overlaps (the closed form) or not
(``serial_time``), and the fit tells the two apart from the split steps."""

import dataclasses
import random

import pytest

from moeflow.errors import ConfigError, InputError
from moeflow.perf.cost import LinearCost
from moeflow.plan import findep as fd
from tests.plan.test_findep_step import planner

HEAD = LinearCost(0.2, 1e-3)
#: start-up costs far from the truth, as a loaded host's start-up measurement reads
START = {
    "gemm": LinearCost(0.2, 5e-8),
    "link": LinearCost(4.0, 1e-6),
    "attention": LinearCost(0.1, 1e-8),
}


def _truth(serial: bool) -> fd.StepPlanner:
    return planner(head=HEAD, serial=serial)


def _start(truth: fd.StepPlanner) -> fd.StepPlanner:
    tb = dataclasses.replace(truth.testbed, **START)
    return fd.StepPlanner(truth.model, tb, max_r2=8, head=LinearCost(0.05, 3e-3))


def _records(truth, n=300, seed=0, split=True, tokens=(1, 1, 1, 8, 32)):
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        seqs, t = rng.choice([1, 2, 4, 8, 16, 32]), rng.choice(tokens)
        r1 = rng.randint(1, min(seqs, 4)) if split else 1
        r2 = rng.choice([1, 1, 2, 4]) if split else 1
        order = rng.choice(fd.ORDERS)
        ms = truth.predict_ms(seqs, t, r1, r2, order)
        out.append({"seqs": seqs, "tokens": t, "r1": r1, "r2": r2, "order": order, "ms": ms})
    return out


def _worst_miss(p, truth, recs):
    return max(
        abs(p.predict_ms(*(r[k] for k in ("seqs", "tokens", "r1", "r2", "order"))) / r["ms"] - 1)
        for r in recs
    )


@pytest.mark.parametrize("serial", [False, True])
def test_refit_recovers_the_predictions_of_known_costs(serial):
    truth = _truth(serial)
    recs = _records(truth)
    p = _start(truth)
    p.plan("findep", 8, 1)
    assert _worst_miss(p, truth, recs) > 0.5  # the start-up costs are far off
    res = p.refit(recs)
    assert res.serial is serial and p.serial is serial and p.refits == 1
    assert res.records == len(recs) and res.shapes == len({tuple(r.values())[:5] for r in recs})
    assert res.error_after < 0.01 < res.error_before
    assert _worst_miss(p, truth, recs) < 0.03  # every step within a few percent
    # and on shapes it never saw: the same costs, so the same predictions and plans
    fresh = _records(truth, n=60, seed=1, tokens=(2, 4, 16, 64))
    assert _worst_miss(p, truth, fresh) < 0.05
    for seqs, tokens in ((16, 1), (4, 32)):
        got, want = p.plan("findep", seqs, tokens), truth.plan("findep", seqs, tokens)
        assert got.time_ms == pytest.approx(want.time_ms, rel=0.05)
    assert {c.note for c in (p.testbed.gemm, p.testbed.link, p.head)} == {
        "refit to 300 served steps"
    }
    assert p.start_testbed.gemm is START["gemm"]  # the prior stays the start-up costs


def test_serial_steps_switch_serial_on_and_overlapped_steps_keep_it_off():
    serial, closed = _truth(True), _truth(False)
    a, b = _start(serial), _start(serial)
    b.serial = True
    ra = a.refit(_records(serial))
    rb = b.refit(_records(closed))
    assert ra.serial and a.serial and ra.split_error_serial < ra.split_error_closed
    assert not rb.serial and not b.serial and rb.split_error_closed < rb.split_error_serial


def test_unsplit_steps_leave_serial_as_it_was_and_fit_decode_shapes():
    truth = _truth(True)
    recs = _records(truth, split=False, tokens=(1,))  # decode shapes only: nothing to tell
    for was in (False, True):
        p = _start(truth)
        p.serial = was
        res = p.refit(recs)
        assert res.serial is was and res.split_error_closed is None
        assert res.error_after < 0.01
    # what the decode steps leave open stays near the start-up value: the costs stay finite
    # and non-negative
    for c in (p.testbed.gemm, p.testbed.link, p.testbed.attention, p.head):
        assert c.alpha >= 0 and c.beta >= 0


def test_refit_is_deterministic_and_forgets_plans():
    truth = _truth(False)
    recs = _records(truth)
    p, q = _start(truth), _start(truth)
    before = p.plan("findep", 32, 8)
    p.refit(recs)
    q.refit(list(reversed(recs)))
    assert p.testbed == q.testbed and p.head == q.head
    after = p.plan("findep", 32, 8)
    assert after.time_ms != before.time_ms
    assert after.time_ms == pytest.approx(truth.plan("findep", 32, 8).time_ms, rel=0.05)


def test_empty_and_bad_records():
    truth = _truth(False)
    p = _start(truth)
    tb = p.testbed
    res = p.refit([])
    assert (res.records, p.refits, p.testbed) == (0, 0, tb)
    res = p.refit([{"seqs": 1, "tokens": 1, "r1": 1, "r2": 1, "order": "ASAS", "ms": 0.0}])
    assert res.records == 0 and p.testbed is tb  # a step without a time says nothing
    with pytest.raises(InputError, match="needs seqs"):
        p.refit([{"seqs": 1, "tokens": 1}])
    with pytest.raises(InputError, match="order"):
        p.refit([{"seqs": 1, "tokens": 1, "r1": 1, "r2": 1, "order": "SASA", "ms": 1.0}])
    with pytest.raises(ConfigError, match="prior_weight"):
        p.refit([], prior_weight=0)


def test_the_steps_that_take_the_time_set_the_fit():
    """Many short decode steps that ran 80% slower than the costs say (a host's noise), and
    few long prefill steps on time: the fit weights each step shape by its total time, so the
    prefill steps, which take most of the time, keep their predictions, and the predicted
    total time stays close to the measured one."""
    truth = _truth(False)
    recs = _records(truth, n=400, split=False, tokens=(1, 1, 1, 1, 1, 1, 1, 64))
    for r in recs:
        if r["tokens"] == 1:
            r["ms"] *= 1.8
    p = _start(truth)
    p.refit(recs)
    pre = [r for r in recs if r["tokens"] > 1]
    dec = [r for r in recs if r["tokens"] == 1]
    assert len(dec) > 5 * len(pre)
    assert sum(r["ms"] for r in pre) > sum(r["ms"] for r in dec)  # the prefills take the time
    keys = ("seqs", "tokens", "r1", "r2", "order")
    pred = sum(p.predict_ms(*(r[k] for k in keys)) for r in recs)
    assert abs(pred / sum(r["ms"] for r in recs) - 1) < 0.03
