"""The runtime's duration recorder and the refit it feeds (moeflow.perf.record)."""

from __future__ import annotations

import pytest

from moeflow.errors import ConfigError, InputError
from moeflow.perf import LinearCost
from moeflow.perf.record import DurationRecorder, bucket_medians, merge_samples


def test_recorder_keeps_checked_samples_bounded_and_grouped():
    r = DurationRecorder(max_samples=3)
    r.add("a2a", 100, 1.0)
    r.add("expert_fwd@float32", 10, 0.5)
    r.add("a2a", 0, 0.1)  # an empty chunk: kept in the log, not a sample of a size
    r.add("a2a", 200, 2.0)  # the oldest sample goes
    assert len(r) == 3
    assert r.samples() == {"expert_fwd@float32": [(10.0, 0.5)], "a2a": [(200.0, 2.0)]}
    with pytest.raises(ConfigError):
        r.add("bogus", 1, 1.0)
    with pytest.raises(InputError):
        r.add("a2a", 1, -1.0)
    with pytest.raises(InputError):
        r.add("a2a", float("nan"), 1.0)
    r.clear()
    assert len(r) == 0 and r.samples() == {}


def test_merge_is_the_same_for_every_rank_and_keeps_rank_order():
    parts = [{"b": [(1, 1.0)], "a": [(2, 2.0)]}, {"a": [(3, 3.0)]}]
    m = merge_samples(parts)
    assert list(m) == ["a", "b"]
    assert m["a"] == [(2.0, 2.0), (3.0, 3.0)]


def test_bucket_medians_drop_a_stall_that_a_line_would_learn():
    # three chunk sizes (r = 1, 2, 4 of n = 4000), 4 samples each, one stalled sample
    true = LinearCost(0.3, 1e-4)
    pairs = [(n + d, true(n + d)) for n in (1000, 2000, 4000) for d in (0, 8, 16, 24)]
    pairs[0] = (pairs[0][0], 1500.0)
    pts = bucket_medians(pairs)
    assert len(pts) == 3
    fit = LinearCost.fit([n for n, _ in pts], [t for _, t in pts])
    assert fit.alpha == pytest.approx(0.3, abs=0.01)
    assert fit.beta == pytest.approx(1e-4, rel=0.02)
    with pytest.raises(ConfigError):
        bucket_medians(pairs, width=0.5)
