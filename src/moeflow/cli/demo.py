"""``moeflow demo``: train the demo MoE language model on CPU (:mod:`moeflow.apps.demo`)."""

from moeflow.apps.demo import add_demo_arguments as add_arguments
from moeflow.apps.demo import run_demo as run

__all__ = ["add_arguments", "run"]
