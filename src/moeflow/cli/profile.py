"""``moeflow profile``: time GEMMs, collectives and the codec; fit one PerfModel
(:mod:`moeflow.apps.profile`)."""

from moeflow.apps.profile import add_profile_arguments as add_arguments
from moeflow.apps.profile import run_profile as run

__all__ = ["add_arguments", "run"]
