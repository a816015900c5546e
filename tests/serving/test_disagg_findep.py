"""FinDEP per step inside ``moeflow serve --ag N --eg M``: under every schedule, greedy tokens
over HTTP equal ``generate()``; ``/health`` lists every step shape served with the plan it
ran, and those plans are the step solver's for that shape (so FinDEP's vary with the shape
where the solver's do); costs are measured by the ranks at start, or given."""

import concurrent.futures as cf
import json
import os

import pytest

from moeflow.cli import main
from moeflow.models import Request, SamplingParams, generate
from moeflow.perf.cost import LinearCost
from tests.serving.serving_live import greedy_token_ids

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
httpx = pytest.importorskip("httpx")

#: a slow link: the solver splits a 16-token prefill into r2 = 2 chunks (FinDEP) and four
#: decodes into r1 = 2 micro-batches, and runs a single decode whole
TOY = {
    "gemm": LinearCost(0.01, 1e-7),
    "link": LinearCost(0.5, 1e-3),
    "attention": LinearCost(0.01, 1e-7),
    "head": LinearCost(0.01, 1e-4),
}
PROMPTS = [list(range(5, 21)), [5, 6, 7], [8, 9], [10, 11, 12, 13], [14], [15, 16, 17]]
LENS = [6, 9, 12, 5, 10, 7]


@pytest.fixture(scope="module")
def full(checkpoint):
    from moeflow.checkpoint import load_pretrained

    return load_pretrained(checkpoint[1])


def _server(checkpoint, schedule, costs, perf=None, refit_every=64):
    from moeflow.serving.disagg_server import disaggregated_server
    from moeflow.serving.engine import EngineConfig
    from moeflow.serving.openai_api import build_app
    from tests.serving.serving_live import LiveServer

    server = disaggregated_server(
        checkpoint[1],
        EngineConfig(block_size=4, max_seqs=8, max_prefill_tokens=16),
        "tiny",
        ag=1,
        eg=2,
        schedule=schedule,
        costs=costs,
        perf=perf,
        timeout_s=20,
        refit_every=refit_every,
    )
    return server, LiveServer(build_app(server))


def _serve_all(url):
    """The 16-token prompt alone (a 1 x 16 prefill, then 1 x 1 decodes), then all at once."""
    first = greedy_token_ids(url, PROMPTS[0], LENS[0])
    with cf.ThreadPoolExecutor(len(PROMPTS)) as pool:
        rest = list(
            pool.map(lambda i: greedy_token_ids(url, PROMPTS[i], LENS[i]), range(len(PROMPTS)))
        )
    return [first, *rest]


def _health_when_counted(url, steps_at_least):
    import time

    deadline = time.monotonic() + 10
    while True:  # the rank reports its plan counts every 0.25 s
        h = httpx.get(f"{url}/health").json()
        if sum(p["steps"] for p in h["plans"]) >= steps_at_least:
            return h
        assert time.monotonic() < deadline, h
        time.sleep(0.1)


def _planner(cfg, costs):
    from moeflow.serving.host_costs import step_planner

    return step_planner(cfg, 1, 2, costs.gemm, costs.link, costs.attention, head=costs.head)


@pytest.mark.parametrize("schedule", ["findep", "pppipe", "naive"])
def test_every_schedule_serves_generate_tokens_with_the_solvers_plans(checkpoint, full, schedule):
    from moeflow.serving.host_costs import HostCosts

    costs = HostCosts(**TOY)
    server, live = _server(checkpoint, schedule, None if schedule == "naive" else costs)
    try:
        with live:
            got = _serve_all(live.url)
            ref = generate(full, [Request(p, SamplingParams(n)) for p, n in zip(PROMPTS, LENS)])
            want = [r.tokens for r in ref]
            assert got == [want[0], *want]
            # every token but the first of each request is one step's; the first is its
            # prefill's, which may share a step with others
            h = _health_when_counted(live.url, LENS[0])
    finally:
        server.engine.shutdown(drain=False)
    assert h["schedule"] == schedule
    plans = h["plans"]
    assert plans and all(p["rank"] == 0 and p["steps"] >= 1 and p["ms"] > 0 for p in plans)
    used = {(p["seqs"], p["tokens"]): (p["r1"], p["r2"], p["order"]) for p in plans}
    assert (1, 16) in used and (1, 1) in used  # the lone request's prefill and decodes
    if schedule == "naive":
        assert set(used.values()) == {(1, 1, "ASAS")} and h["costs"] is None
        assert all(p["predicted_ms"] is None for p in plans)
        return
    back = HostCosts.from_dict(h["costs"])
    assert [(c.alpha, c.beta) for c in (back.gemm, back.link, back.attention, back.head)] == [
        (c.alpha, c.beta) for c in TOY.values()
    ]
    planner = _planner(full.cfg, costs)
    for (b, t), plan in used.items():  # what the server ran is what the solver picks
        want = planner.plan(schedule, b, t)
        assert plan == (want.r1, want.r2, want.order), (b, t)
    for p in plans:
        want = planner.predict_ms(p["seqs"], p["tokens"], p["r1"], p["r2"], p["order"])
        assert p["predicted_ms"] == pytest.approx(want)
    if schedule == "findep":  # the solver cuts the lone 16-token prefill, not its decodes
        assert used[(1, 16)] == (1, 2, "ASAS") and used[(1, 1)] == (1, 1, "ASAS")
    else:
        assert all(r2 == 1 and order == "ASAS" for _, r2, order in used.values())


def test_costs_are_measured_at_start_and_solve_every_step(checkpoint, full):
    from moeflow.serving.host_costs import COSTS, HostCosts

    server, live = _server(checkpoint, "findep", None)
    try:
        with live:
            got = greedy_token_ids(live.url, PROMPTS[1], 8)
            h = _health_when_counted(live.url, 8)
    finally:
        server.engine.shutdown(drain=False)
    assert got == generate(full, [Request(PROMPTS[1], SamplingParams(8))])[0].tokens
    assert set(h["costs"]) == set(COSTS)
    for name, c in h["costs"].items():  # measured here: a positive cost per unit of work
        assert c["beta_ms"] > 0 and c["alpha_ms"] >= 0, name
    assert "server start" in h["costs"]["link"]["note"]
    planner = _planner(full.cfg, HostCosts.from_dict(h["costs"]))
    for p in h["plans"]:
        want = planner.plan("findep", p["seqs"], p["tokens"])
        assert (p["r1"], p["r2"], p["order"]) == (want.r1, want.r2, want.order)


def test_bad_schedule_and_costs_are_typed_errors(checkpoint, tmp_path, capsys):
    from moeflow.errors import ConfigError
    from moeflow.serving.disagg_server import DisaggregatedEngine
    from moeflow.serving.host_costs import HostCosts, load_costs

    with pytest.raises(ConfigError, match="schedule"):
        DisaggregatedEngine(checkpoint[1], schedule="fastest")
    with pytest.raises(ConfigError, match="costs"):
        DisaggregatedEngine(checkpoint[1], schedule="findep", costs={"gemm": 1})
    good = HostCosts(**TOY).to_dict()
    f = tmp_path / "costs.json"
    f.write_text(json.dumps({"costs": good}))
    back = load_costs(f)
    assert [(c.alpha, c.beta) for c in (back.gemm, back.link, back.attention, back.head)] == [
        (c.alpha, c.beta) for c in TOY.values()
    ]
    f.write_text(json.dumps({k: v for k, v in good.items() if k != "link"}))
    with pytest.raises(ConfigError, match="the link cost is missing"):
        load_costs(f)
    ckpt = str(checkpoint[1])
    assert main(["serve", ckpt, "--port", "0", "--eg", "2", "--costs", str(f)]) == 2
    assert "the link cost is missing" in capsys.readouterr().err
    assert main(["serve", ckpt, "--port", "0", "--eg", "2", "--r1", "2"]) == 2
    assert "--r1" in capsys.readouterr().err
    for bad in (-1, 2.5, True):
        with pytest.raises(ConfigError, match="refit_every"):
            DisaggregatedEngine(checkpoint[1], schedule="findep", refit_every=bad)
    assert main(["serve", ckpt, "--port", "0", "--eg", "2", "--refit-every", "-1"]) == 2
    assert "--refit-every" in capsys.readouterr().err
    assert main(["serve", ckpt, "--port", "0", "--refit-every", "8"]) == 2  # colocated
    assert "--refit-every" in capsys.readouterr().err
    argv = ["serve", ckpt, "--port", "0", "--eg", "2", "--schedule", "naive", "--refit-every", "8"]
    assert main(argv) == 2
    assert "--refit-every" in capsys.readouterr().err


def _miss(plans, predicted):
    """The step-weighted mean of |predicted / measured - 1| over the plans' step shapes."""
    n = sum(p["steps"] for p in plans)
    return sum(p["steps"] * abs(predicted(p) / p["mean_ms"] - 1) for p in plans) / n


def test_the_planner_is_refitted_to_the_served_steps(checkpoint, full):
    """TOY's link (0.5 ms a message, 1 s a MB) is far slower than loopback: after every 8
    steps the rank refits its costs to the steps it timed, and the predictions of the shapes
    it served move toward their measured times."""
    import time

    from moeflow.serving.host_costs import HostCosts

    costs = HostCosts(**TOY)
    server, live = _server(checkpoint, "findep", costs, refit_every=8)
    try:
        with live:
            got = _serve_all(live.url)
            h = _health_when_counted(live.url, 16)
            time.sleep(0.75)  # the plans' predictions follow the last refit within 0.25 s
            h = httpx.get(f"{live.url}/health").json()
    finally:
        server.engine.shutdown(drain=False)
    ref = generate(full, [Request(p, SamplingParams(n)) for p, n in zip(PROMPTS, LENS)])
    assert got == [ref[0].tokens, *(r.tokens for r in ref)]
    steps = sum(p["steps"] for p in h["plans"])
    assert h["refits"] == steps // 8 >= 2
    (state,) = h["planners"]
    assert state["rank"] == 0 and state["refit_every"] == 8 and state["refits"] == h["refits"]
    last = state["last_refit"]
    assert "error" not in last and last["at_step"] == 8 * h["refits"]
    assert last["records"] == last["at_step"] and last["error_after"] < last["error_before"]
    assert isinstance(h["serial"], bool) and h["serial"] == last["serial"]
    back = HostCosts.from_dict(h["start_costs"])
    assert [(c.alpha, c.beta) for c in (back.gemm, back.link, back.attention, back.head)] == [
        (c.alpha, c.beta) for c in TOY.values()
    ]
    now = HostCosts.from_dict(h["costs"])
    assert now.link.beta < TOY["link"].beta and "refit to" in h["costs"]["link"]["note"]
    start = _planner(full.cfg, costs)
    before = _miss(h["plans"], lambda p: start.predict_ms(*(p[k] for k in _PLAN)))
    after = _miss(h["plans"], lambda p: p["predicted_ms"])
    assert after < before, (after, before)
    # the plans since the last refit are the refitted planner's
    planner = _planner(full.cfg, now)
    planner.serial = h["serial"]
    for p in h["plans"]:
        assert p["predicted_ms"] == pytest.approx(planner.predict_ms(*(p[k] for k in _PLAN)))


_PLAN = ("seqs", "tokens", "r1", "r2", "order")


def test_rank_init_runs_in_every_rank_before_it_joins(checkpoint, tmp_path):
    from moeflow.serving.disagg_server import DisaggregatedEngine

    def mark(rank):  # each forked rank, first thing: its pid under its rank
        (tmp_path / str(rank)).write_text(str(os.getpid()))

    eng = DisaggregatedEngine(checkpoint[1], ag=1, eg=2, rank_init=mark, timeout_s=20)
    try:
        pids = eng.pids
    finally:
        eng.shutdown(drain=False)
    assert [int((tmp_path / str(r)).read_text()) for r in range(3)] == pids


def _perf(drop=None):
    from moeflow.perf.cost import PerfModel

    costs = {  # a slow link, as TOY
        "gemm": LinearCost(0.01, 1e-8),
        "gemm@float32": LinearCost(0.01, 1e-7),
        "expert_fwd@float32": LinearCost(0.03, 1e-7),
        "attention@float32": LinearCost(0.01, 1e-7),
        "send": LinearCost(0.5, 1e-3),
    }
    costs.pop(drop, None)
    return PerfModel("toy", costs, meta={"expert_experts": 3})


def test_costs_from_a_profile_file(checkpoint, full, tmp_path, capsys):
    from moeflow.errors import ConfigError
    from moeflow.serving.disagg_server import DisaggregatedEngine
    from moeflow.serving.host_costs import perf_planner

    with pytest.raises(ConfigError, match="send"):  # refused by name, before any rank starts
        DisaggregatedEngine(checkpoint[1], eg=2, schedule="findep", perf=_perf("send"))
    f = tmp_path / "perf.json"
    f.write_text(json.dumps(_perf("send").to_dict()))
    ckpt = str(checkpoint[1])
    assert main(["serve", ckpt, "--port", "0", "--eg", "2", "--perf", str(f)]) == 2
    assert "send" in capsys.readouterr().err
    server, live = _server(checkpoint, "findep", None, perf=_perf())
    try:
        with live:
            got = greedy_token_ids(live.url, PROMPTS[0], LENS[0])
            h = _health_when_counted(live.url, LENS[0])
    finally:
        server.engine.shutdown(drain=False)
    ref = generate(full, [Request(PROMPTS[0], SamplingParams(LENS[0]))])[0].tokens
    assert got == ref
    planner = perf_planner(full.cfg, 1, 2, _perf())
    assert h["costs"]["link"]["alpha_ms"] == planner.testbed.link.alpha
    for p in h["plans"]:
        want = planner.plan("findep", p["seqs"], p["tokens"])
        assert (p["r1"], p["r2"], p["order"]) == (want.r1, want.r2, want.order)
