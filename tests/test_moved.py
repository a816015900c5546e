"""Names moved by the 0.2 layout still import from their old packages, with a warning."""

import importlib

import pytest

MOVED = [
    ("moeflow.runtime", "ExpertParallel", "moeflow.parallel"),
    ("moeflow.runtime", "parallelize", "moeflow.parallel"),
    ("moeflow.runtime", "sync_gradients", "moeflow.parallel"),
    ("moeflow.comm", "make_dispatcher", "moeflow.parallel.dispatch"),
    ("moeflow.comm", "TokenDispatcher", "moeflow.parallel.dispatch"),
    ("moeflow.models", "load_pretrained", "moeflow.checkpoint"),
    ("moeflow.bench", "bench", "moeflow.apps.bench"),
    ("moeflow.perf", "profile", "moeflow.apps.profile"),
]


def test_a_renamed_name_resolves_to_its_new_name():
    import moeflow.runtime
    from moeflow.parallel import load_pretrained_weights

    with pytest.warns(DeprecationWarning, match="parallelize.load_pretrained_weights"):
        assert moeflow.runtime.load_checkpoint is load_pretrained_weights


@pytest.mark.parametrize("old, name, new", MOVED)
def test_old_location_warns_and_gives_the_same_object(old, name, new):
    with pytest.warns(DeprecationWarning, match=f"{old}.{name} moved to {new}"):
        value = getattr(importlib.import_module(old), name)
    assert value is getattr(importlib.import_module(new), name)


def test_unknown_name_is_still_an_attribute_error():
    import moeflow.runtime

    with pytest.raises(AttributeError, match="no_such_name"):
        moeflow.runtime.no_such_name  # noqa: B018


def test_current_names_do_not_warn(recwarn):
    import moeflow as mf
    from moeflow.checkpoint import load_pretrained  # noqa: F401
    from moeflow.parallel import ExpertParallel, parallelize  # noqa: F401

    assert mf.ExpertParallel is ExpertParallel and mf.parallelize is parallelize
    assert not [w for w in recwarn if issubclass(w.category, DeprecationWarning)]
