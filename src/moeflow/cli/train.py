"""``moeflow train``: train with expert parallelism on gloo ranks, under torchrun, or from a
transformers checkpoint (:mod:`moeflow.apps.train`)."""

from moeflow.apps.train import add_train_arguments as add_arguments
from moeflow.apps.train import run_train as run

__all__ = ["add_arguments", "run"]
