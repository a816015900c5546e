import json
import math
import random

import pytest

from moeflow.errors import ConfigError, InputError
from moeflow.perf import LinearCost, PerfModel, perf_preset, perf_preset_names


def test_fit_recovers_known_alpha_beta_exactly():
    n = [1e3, 1e4, 1e5, 1e6]
    t = [0.25 + 3e-6 * x for x in n]
    c = LinearCost.fit(n, t)
    assert c.alpha == pytest.approx(0.25, rel=1e-9)
    assert c.beta == pytest.approx(3e-6, rel=1e-9)
    assert c.r2 == pytest.approx(1.0)


def test_fit_recovers_alpha_beta_from_noisy_data_and_reports_r2():
    rng = random.Random(0)
    n = [2**p for p in range(10, 24)] * 5
    t = [0.287 + 2.21e-7 * x + rng.gauss(0, 0.01) for x in n]
    c = LinearCost.fit(n, t)
    assert c.beta == pytest.approx(2.21e-7, rel=0.01)
    assert c.alpha == pytest.approx(0.287, abs=0.02)
    assert 0.999 < c.r2 <= 1.0
    # pure noise around a constant has R^2 near 0
    flat = LinearCost.fit(n, [1.0 + rng.gauss(0, 0.1) for _ in n])
    assert flat.r2 < 0.2


def test_fit_rejects_degenerate_input():
    with pytest.raises(InputError):
        LinearCost.fit([1.0], [2.0])
    with pytest.raises(InputError):
        LinearCost.fit([3.0, 3.0], [1.0, 2.0])
    with pytest.raises(InputError):
        LinearCost.fit([1.0, 2.0], [1.0])


def test_chunked_and_inverse():
    c = LinearCost(0.5, 2e-3)
    assert c(1000) == pytest.approx(2.5)
    assert c.chunked(1000, 4) == pytest.approx(0.5 + 0.5)
    assert c.inverse(c(1234.0)) == pytest.approx(1234.0)
    assert c.inverse(0.1) == 0.0


def test_published_testbed_a_fits():
    p = perf_preset("fsmoe-testbed-a")
    assert (p.cost("gemm").alpha, p.cost("gemm").beta) == (4.26e-2, 2.29e-11)
    assert (p.cost("a2a").alpha, p.cost("a2a").beta) == (2.87e-1, 2.21e-7)
    assert (p.cost("ag").alpha, p.cost("ag").beta) == (3.37e-1, 2.32e-6)
    assert (p.cost("rs").alpha, p.cost("rs").beta) == (3.95e-1, 2.34e-7)
    assert (p.cost("ar").alpha, p.cost("ar").beta) == (5.11e-1, 4.95e-6)
    assert p.cost("a2a").source == "published"
    assert p.cost("a2a@intra").source == "derived"


def test_testbed_b_is_derived_and_slower_where_hardware_is():
    a, b = perf_preset("fsmoe-testbed-a"), perf_preset("fsmoe-testbed-b")
    assert all(c.source == "derived" for c in b.costs.values())
    assert b.cost("gemm").beta / a.cost("gemm").beta == pytest.approx(154.8 / 53.8)
    assert b.cost("ag").beta > a.cost("ag").beta  # PCIe 3.0 vs NVLink
    assert b.cost("a2a").beta == pytest.approx(a.cost("a2a").beta)  # same per-GPU network share


def test_h200_preset_marks_measured_and_derived():
    p = perf_preset("h200-8x-ib")
    assert p.cost("gemm").source == "measured"
    # 578 TFLOP/s measured grouped_mm: 1e12 FLOPs take ~1.73 ms
    assert p.cost("gemm").beta * 1e12 == pytest.approx(1e3 / 578, rel=1e-6)
    assert p.cost("a2a@intra").source == "derived"
    assert p.cost("a2a@intra").beta < p.cost("a2a@inter").beta


@pytest.mark.parametrize("name", perf_preset_names())
def test_json_round_trip(name, tmp_path):
    p = perf_preset(name)
    assert PerfModel.from_json(p.to_json()) == p
    p.save(tmp_path / "p.json")
    assert PerfModel.load(tmp_path / "p.json") == p
    d = json.loads(p.to_json())
    assert d["format"] == "moeflow.perf/1"


def test_level_fallback_and_errors():
    p = PerfModel("x", {"gemm": LinearCost(0, 1), "a2a": LinearCost(1, 2)})
    assert p.cost("a2a@inter") == p.cost("a2a")
    with pytest.raises(ConfigError):
        p.cost("ar")
    with pytest.raises(ConfigError):
        PerfModel("x", {"gemm": LinearCost(0, 1), "bogus": LinearCost(0, 1)})
    with pytest.raises(InputError):
        PerfModel.from_json('{"format": "other"}')
    with pytest.raises(ConfigError):
        LinearCost(math.nan, 1.0)


def test_nonneg_alpha_clamps_and_refits_through_origin():
    n = [1.0, 2.0, 3.0, 4.0]
    t = [0.5, 2.5, 4.5, 6.5]  # OLS: alpha = -1.5, beta = 2
    assert LinearCost.fit(n, t).alpha == pytest.approx(-1.5)
    c = LinearCost.fit(n, t, nonneg_alpha=True)
    assert c.alpha == 0.0
    assert c.beta == pytest.approx(sum(x * y for x, y in zip(n, t)) / sum(x * x for x in n))
    ok = LinearCost.fit(n, [1 + 2 * x for x in n], nonneg_alpha=True)
    assert (ok.alpha, ok.beta) == (pytest.approx(1.0), pytest.approx(2.0))


def test_nonneg_fit_clamps_a_negative_slope_to_the_mean():
    n = [1e3, 1e4, 1e5]
    t = [0.30, 0.25, 0.20]  # noise on a loaded machine: time falls as size grows
    assert LinearCost.fit(n, t).beta < 0
    c = LinearCost.fit(n, t, nonneg_alpha=True)
    assert c.beta == 0.0 and c.alpha == pytest.approx(0.25)
    assert c(1e6) == pytest.approx(0.25)  # never a negative task time for the planner


def test_fit_reports_max_relative_residual_and_keeps_points():
    n = [1.0, 2.0, 4.0]
    t = [1.0, 2.2, 3.8]
    c = LinearCost.fit(n, t)
    assert c.points == tuple(zip(n, t))
    assert c.max_rel_err == pytest.approx(max(abs(c(x) - y) / y for x, y in zip(n, t)))
    assert c.max_rel_err > 0
    back = LinearCost.from_dict(json.loads(json.dumps(c.to_dict())))
    assert back == c


def test_update_recovers_a_known_line_from_runtime_samples():
    # the profile's line is wrong (a loaded machine): the runtime's samples of the true
    # line t = 0.4 + 2e-6 n replace it
    stale = LinearCost.fit([1e4, 1e5, 1e6], [1.0, 1.3, 5.0])
    p = PerfModel("x", {"gemm": LinearCost(0, 1), "a2a": stale})
    rng = random.Random(0)
    true = LinearCost(0.4, 2e-6)
    samples = [(n, true(n)) for n in (1e4, 1e5, 1e6) for _ in range(3)]
    rng.shuffle(samples)
    q = p.update({"a2a": samples})
    assert q.cost("a2a").alpha == pytest.approx(0.4, rel=1e-9)
    assert q.cost("a2a").beta == pytest.approx(2e-6, rel=1e-9)
    assert q.cost("a2a").r2 == pytest.approx(1.0)
    assert q.meta["refits"] == {"a2a": 9}
    assert p.cost("a2a") == stale  # pure: the old model is unchanged
    # samples of a size the model never saw are merged with the stored points
    r = q.update({"a2a": [(4e6, true(4e6))]})
    assert r.cost("a2a").beta == pytest.approx(2e-6, rel=1e-9)
    assert len(r.cost("a2a").points) == 10


def test_update_with_one_size_scales_the_line_and_new_keys_need_two_sizes():
    p = PerfModel("x", {"gemm": LinearCost(1.0, 1e-3)})
    q = p.update({"gemm": [(1000.0, 4.0), (1000.0, 4.4), (1000.0, 3.6)]})
    assert q.cost("gemm")(1000.0) == pytest.approx(4.0)  # the median, at that size
    assert q.cost("gemm").alpha / q.cost("gemm").beta == pytest.approx(1000.0)  # same shape
    with pytest.raises(InputError, match="expert_fwd"):
        p.update({"expert_fwd@float32": [(10.0, 1.0)]})
    added = p.update({"expert_fwd@float32": [(10.0, 1.0), (20.0, 1.5)]})
    assert added.cost("expert_fwd@float32")(30.0) == pytest.approx(2.0)
    with pytest.raises(InputError):
        p.update({"gemm": [(1.0, math.nan)]})
    with pytest.raises(ConfigError):
        p.update({"bogus": [(1.0, 1.0), (2.0, 2.0)]})


def test_require_names_every_missing_cost():
    p = PerfModel("box", {"gemm": LinearCost(0, 1), "a2a": LinearCost(1, 2)})
    p.require("gemm", "a2a@inter")  # the level falls back to the plain fit
    with pytest.raises(ConfigError, match=r"zipccl_encode.*send|send.*zipccl_encode") as e:
        p.require("zipccl_encode", "send", "a2a", who="ZipCCL")
    assert "ZipCCL" in str(e.value) and "'box'" in str(e.value)


def test_relative_fit_never_returns_a_falling_line():
    from moeflow.perf.measure import fit

    n = [1e4, 1e5, 1e6]
    c = fit(n, [3.5, 3.2, 1.9], relative=True)  # noise: time falls as the size grows
    assert c.beta == 0.0 and c.alpha == pytest.approx((3.5 + 3.2 + 1.9) / 3)
    ok = fit(n, [0.5 + 2e-6 * x for x in n], relative=True)
    assert (ok.alpha, ok.beta) == (pytest.approx(0.5), pytest.approx(2e-6))
    assert fit(n, [0.0, 1.0, 2.0], relative=True).beta > 0  # a 0 ms point does not divide
