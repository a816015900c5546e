"""The dispatcher registry: names and keyword arguments are checked before anything is built."""

import inspect

import pytest
import torch

from moeflow.errors import ConfigError
from moeflow.parallel import (
    COMMON_ARGS,
    DISPATCHER_CLASSES,
    DISPATCHERS,
    A2ADispatcher,
    CapacityDispatcher,
    HierarchicalDispatcher,
    TokenDispatcher,
    dispatcher_class,
    make_dispatcher,
)
from moeflow.parallel.dedup import DedupDispatcher

# single-rank arguments: constructors only store them, no collective runs
COMMON = dict(
    ep_group=None,
    ep_size=2,
    ep_rank=1,
    esp_group=None,
    esp_size=1,
    esp_rank=0,
    num_local_experts=4,
    timeout_s=5.0,
)


def test_registry_lists_the_dispatchers():
    assert DISPATCHERS == ("a2a", "capacity", "hierarchical", "dedup")
    assert DISPATCHER_CLASSES == {
        "a2a": A2ADispatcher,
        "capacity": CapacityDispatcher,
        "hierarchical": HierarchicalDispatcher,
        "dedup": DedupDispatcher,
    }
    assert dispatcher_class("hierarchical") is HierarchicalDispatcher


def test_the_paper_name_2dh_is_an_alias_of_hierarchical():
    from moeflow.parallel.dispatch import canonical_dispatcher

    assert dispatcher_class("2dh") is HierarchicalDispatcher
    assert canonical_dispatcher("2dh") == "hierarchical"
    assert canonical_dispatcher("a2a") == "a2a"
    d = make_dispatcher("2dh", intra_group=None, inter_group=None, ranks_per_node=1, **COMMON)
    assert isinstance(d, HierarchicalDispatcher) and d.name == "hierarchical"
    assert "2dh" not in DISPATCHERS  # listed once, under its role name


@pytest.mark.parametrize("flag", ["hierarchical", "2dh"])
def test_train_cli_accepts_the_role_name_and_the_alias(flag):
    import argparse

    from moeflow.apps.train import add_train_arguments

    p = argparse.ArgumentParser()
    add_train_arguments(p)
    assert p.parse_args(["--dispatcher", flag]).dispatcher == flag
    assert dispatcher_class(flag) is HierarchicalDispatcher
    with pytest.raises(SystemExit):
        p.parse_args(["--dispatcher", "3dh"])


def test_every_dispatcher_fits_the_one_contract():
    from moeflow.parallel.contract import TokenDispatcher as Contract

    assert TokenDispatcher is Contract
    for name, cls in DISPATCHER_CLASSES.items():
        assert issubclass(cls, TokenDispatcher), name
        assert cls.name == name
        assert isinstance(cls.consumes_tokens, bool), name
    assert DedupDispatcher.consumes_tokens and not A2ADispatcher.consumes_tokens


@pytest.mark.parametrize("cls", list(DISPATCHER_CLASSES.values()))
def test_declared_options_are_the_constructor_keywords(cls):
    # the declaration is what make_dispatcher checks against, so it must match the signature
    params = set()
    for klass in cls.__mro__:
        if klass is object or "__init__" not in vars(klass):
            continue
        params |= {
            n
            for n, p in inspect.signature(klass.__init__).parameters.items()
            if p.kind is inspect.Parameter.KEYWORD_ONLY
        }
    assert params == set(COMMON_ARGS) | set(cls.options)
    assert set(TokenDispatcher.options) == set()


def test_builds_each_dispatcher_with_its_own_arguments():
    d = make_dispatcher("a2a", **COMMON)
    assert isinstance(d, A2ADispatcher) and (d.P, d.p_me, d.E_l) == (2, 1, 4)
    d = make_dispatcher("capacity", world_group=None, **COMMON)
    assert isinstance(d, CapacityDispatcher)
    d = make_dispatcher(
        "hierarchical", intra_group=None, inter_group=None, ranks_per_node=1, **COMMON
    )
    assert isinstance(d, HierarchicalDispatcher) and (d.n, d.a_me, d.j_me) == (2, 1, 0)


@pytest.mark.parametrize("name", ["alltoall", "", None])
def test_unknown_name_names_the_known_ones(name):
    with pytest.raises(ConfigError) as info:
        make_dispatcher(name, **COMMON)
    assert info.value.field == "dispatcher"
    for known in DISPATCHERS:
        assert repr(known) in str(info.value)


@pytest.mark.parametrize(
    "name,extra,bad",
    [
        ("a2a", {"world_group": None}, "world_group"),
        ("capacity", {"ranks_per_node": 2}, "ranks_per_node"),
        (
            "hierarchical",
            {"intra_group": None, "inter_group": None, "ranks_per_node": 1, "world_group": None},
            "world_group",
        ),
    ],
)
def test_argument_of_another_dispatcher_is_an_error(name, extra, bad):
    with pytest.raises(ConfigError) as info:
        make_dispatcher(name, **COMMON, **extra)
    assert info.value.value == [bad]
    msg = str(info.value)
    assert name in msg and "timeout_s" in msg
    for opt in dispatcher_class(name).options:
        assert opt in msg


def test_missing_common_argument_is_named():
    kw = dict(COMMON)
    del kw["timeout_s"]
    with pytest.raises(ConfigError, match=r"missing \['timeout_s'\]"):
        make_dispatcher("a2a", **kw)


@pytest.mark.parametrize("r", [1, 2, 3, 5])
def test_capacity_route_fills_the_send_buffer_as_the_padded_gather(r):
    """The fused send (gather ``send_src`` into the buffer, zero ``pad_slots``) equals the
    gather of the input with one zero row appended, for every chunk; the padding slots are
    exactly the slots whose ``send_index`` names that zero row."""
    from moeflow.parallel.contract import CountExchange

    d = CapacityDispatcher(**{**COMMON, "ep_size": 1, "ep_rank": 0, "num_local_experts": 4})
    counts = torch.tensor([3, 0, 5, 1])
    slots, N = 5, int(counts.sum())
    ex = CountExchange(
        counts_E=counts,
        send_PE=torch.full((1, 4), slots),
        recv_SPE=torch.full((1, 1, 4), slots),
        slots=slots,
        num_rows=N,
    )
    x = torch.randn(N, 6) + 10.0  # no real row is zero
    padded = torch.cat([x, x.new_zeros(1, 6)])
    seen = []
    for c in range(r):
        rt = d.route(ex, r, c)
        buf = torch.full((rt.send_index.numel(), 6), float("nan"))
        torch.index_select(x, 0, rt.send_src, out=buf)
        buf.index_fill_(0, rt.pad_slots, 0)
        assert torch.equal(buf, padded.index_select(0, rt.send_index))
        assert torch.equal(rt.pad_slots, torch.nonzero(rt.send_index == N).view(-1))
        seen.append(rt.send_index[rt.send_index < N])
    # every real row is sent exactly once over the chunks, padding fills the rest
    assert torch.equal(torch.sort(torch.cat(seen)).values, torch.arange(N))
