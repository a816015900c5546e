"""The geo planner's devices from the one PerfModel (pure Python + numpy): rates and links
come from ``moeflow profile``'s costs, a missing cost is refused by name, and the planner's
predicted step on such a graph is the cost model's sum of the priced nodes and links."""

import pytest

from moeflow.errors import ConfigError
from moeflow.perf.cost import LinearCost, PerfModel
from moeflow.plan import geo

OPS = geo.OpGraph(
    (
        geo.OpNode("embed", 0.0, 4096.0, 1000.0),
        geo.OpNode("mm1", 2e6, 4096.0, 4000.0, (0,)),
        geo.OpNode("act", 0.0, 8192.0, 0.0, (1,)),
        geo.OpNode("mm2", 4e6, 4096.0, 4000.0, (2,)),
        geo.OpNode("loss", 0.0, 4.0, 0.0, (3,)),
    )
)


def perf(drop=None, world=2) -> PerfModel:
    costs = {
        "gemm": LinearCost(0.01, 1e-8),
        "gemm@float32": LinearCost(0.02, 2e-8),
        "elementwise@float32": LinearCost(0.005, 1e-6),
        "send": LinearCost(0.5, 8e-6),  # 125 MB/s, 0.5 ms
    }
    costs.pop(drop, None)
    return PerfModel("prof", costs, meta={"world_size": world, "nodes": 2})


def test_graph_seconds_prices_each_node():
    want = 1e-3 * (
        (0.005 + 1e-6 * 4096)
        + (0.02 + 2e-8 * 2e6)
        + (0.005 + 1e-6 * 8192)
        + (0.02 + 2e-8 * 4e6)
        + (0.005 + 1e-6 * 4)
    )
    assert geo.graph_seconds(OPS, perf()) == pytest.approx(want)


def test_device_graph_reads_rates_and_links_from_the_perf_model():
    g = geo.device_graph_from_perf(perf(), OPS, memory_bytes=1e6)
    assert [d.name for d in g.devices] == ["rank0", "rank1"]
    rate = OPS.flops / geo.graph_seconds(OPS, perf())
    assert all(d.flops == pytest.approx(rate) for d in g.devices)
    assert g.bandwidth[0][1] == pytest.approx(1.25e8) and g.latency[1][0] == pytest.approx(5e-4)
    # the plan's predicted step is the cost model on these numbers
    plan = geo.evaluate(OPS, g, bounds=(0, 2, 5), devices=(0, 1), microbatches=2)
    c0 = 3 * (0 + 2e6) / rate
    c1 = 3 * 4e6 / rate
    link = 2 * 5e-4 + 4096 * 2 / 1.25e8
    assert plan.stage_times[0] == pytest.approx(c0 + link)
    assert plan.stage_times[1] == pytest.approx(c1)


@pytest.mark.parametrize("drop", ["send", "elementwise@float32"])
def test_a_missing_cost_is_refused_by_name(drop):
    with pytest.raises(ConfigError, match=drop):
        geo.device_graph_from_perf(perf(drop), OPS, memory_bytes=1e6)


def test_a_dtype_the_profile_did_not_measure_is_refused():
    with pytest.raises(ConfigError, match="elementwise@bfloat16"):
        geo.device_graph_from_perf(perf(), OPS, memory_bytes=1e6, dtype="bfloat16")


def test_names_must_match_the_profiled_ranks():
    with pytest.raises(ConfigError, match="names"):
        geo.device_graph_from_perf(perf(), OPS, memory_bytes=1e6, names=["a"])


def test_a_flat_send_fit_is_a_link_of_free_bytes():
    p = perf()
    flat = PerfModel("flat", {**p.costs, "send": LinearCost(0.2, 0.0)}, meta=p.meta)
    g = geo.device_graph_from_perf(flat, OPS, memory_bytes=1e6)
    assert g.bandwidth[0][1] == pytest.approx(1e15) and g.latency[0][1] == pytest.approx(2e-4)
