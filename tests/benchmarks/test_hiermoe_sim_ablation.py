"""benchmarks/hiermoe_parm_sim.py: the HierMoE ablation rows run and move as the α-β model says."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[2] / "benchmarks"
sys.path.insert(0, str(BENCH))

import hiermoe_parm_sim as hp  # noqa: E402


@pytest.fixture(scope="module")
def rows():
    return hp.hiermoe_ablation(quick=True)


def _by(rows, label):
    return {a["shape"]: a for a in rows if a["label"] == label}


def test_every_row_runs_for_every_shape(rows):
    assert len(rows) == len(hp.HIER_ABLATIONS) * len(hp.SHAPES)
    for a in rows:
        assert a["flat_ms"] > 0 and a["dedup_ms"] > 0
        assert a["speedup_vs_flat"] == pytest.approx(a["flat_ms"] / a["dedup_ms"])
        assert a["spine_ceiling"] is not None and a["spine_ceiling"] > 1.0


def test_a_slower_spine_raises_dedups_speedup_toward_its_limit(rows):
    # with spine time beta*f (flat) and beta*d (dedup), d < f, the ratio (A + beta f) /
    # (B + beta d) rises with beta while it is below f / d
    labels = [
        lb for lb, factor, _, scale, _, _ in hp.HIER_ABLATIONS if "L4" in scale or factor == "none"
    ]
    assert len(labels) == 3
    for shape in hp.SHAPES:
        seq = [_by(rows, lb)[shape] for lb in labels]
        for a, b in zip(seq, seq[1:]):
            assert b["speedup_vs_flat"] > a["speedup_vs_flat"]
            assert b["speedup_vs_flat"] <= b["spine_ceiling"] + 1e-9
        # the limit depends on the routing only, not on the links
        assert len({round(a["spine_ceiling"], 9) for a in seq}) == 1


def test_the_first_row_is_the_main_tables_setting_without_the_swap(rows):
    ours = _by(rows, hp.HIER_ABLATIONS[0][0])
    assert set(ours) == set(hp.SHAPES)
    for a in ours.values():
        assert a["factor"] == "none" and a["d_star"] in range(4)
        assert a["dedup_ms"] <= a["flat_ms"]


def test_one_alpha_per_message_slows_every_schedule_and_2dh_still_trails(rows):
    ours = _by(rows, hp.HIER_ABLATIONS[0][0])
    (label,) = [a[0] for a in hp.HIER_ABLATIONS if a[1] == "baseline strength"]
    msg = _by(rows, label)
    for shape in hp.SHAPES:
        assert msg[shape]["flat_ms"] > ours[shape]["flat_ms"]
        assert msg[shape]["2dh_ms"] > ours[shape]["2dh_ms"]
        # what the reading says: aggregation does not put Tutel-2DH ahead of flat a2a here
        assert msg[shape]["2dh_ms"] > msg[shape]["flat_ms"]


def test_the_reading_quotes_this_runs_figures(rows):
    txt = hp._hier_why(rows)
    v = [a["speedup_vs_flat"] for a in rows if a["label"] == hp.HIER_ABLATIONS[0][0]]
    assert f"{min(v):.2f}-{max(v):.2f}x" in txt
