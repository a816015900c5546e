"""Runtime: executes MoE layers across ranks (expert parallelism with pipelined overlap)."""

from moeflow.runtime.expert_parallel import ExpertParallel, PipelinedExperts, resolve_degrees
from moeflow.runtime.pipeline import run_wavefront

__all__ = ["ExpertParallel", "PipelinedExperts", "resolve_degrees", "run_wavefront"]
