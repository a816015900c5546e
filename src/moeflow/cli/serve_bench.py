"""``moeflow serve-bench``: serve the MoE model disaggregated and time it
(:mod:`moeflow.apps.serve_bench`)."""

from moeflow.apps.serve_bench import add_serve_bench_arguments as add_arguments
from moeflow.apps.serve_bench import run_serve_bench as run

__all__ = ["add_arguments", "run"]
