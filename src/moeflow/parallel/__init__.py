"""The expert-parallel engine: token dispatchers behind one contract, one chunked pipeline
(wavefront + autograd) that overlaps them with expert compute, :class:`ExpertParallel`,
model-parallel schedules, expert placement, and :func:`parallelize` for whole models.

Usage (every rank, after ``torch.distributed.init_process_group``)::

    import moeflow as mf
    from moeflow.comm import Topology
    from moeflow.parallel import ExpertParallel

    torch.manual_seed(0)                         # the same full layer on every rank
    layer = mf.MoELayer(cfg)
    ep = ExpertParallel(layer, group=None,       # None: the default group
                        topology=Topology.from_env(),   # or Topology.explicit(4, 2)
                        dispatcher="hierarchical",  # "a2a" | "capacity" | "dedup"
                        esp_size=1, r_fwd=2, r_bwd=4,    # or plan=moeflow.plan.Plan
                        timeout_s=120)
    y = ep(x_local)                              # this rank's tokens, any [..., D] shape
    (loss(y) + ep.aux_loss).backward()
    ep.sync_gradients("mean")                    # or moeflow.parallel.sync_gradients(model)

For a whole model, :func:`parallelize` (``moeflow.parallel.parallelize``) does all of it on a
``DeviceMesh``: every MoE layer expert parallel, sharded from the start from a transformers
checkpoint directory, dense parts data parallel (:func:`sync_gradients`), and
:func:`export_pretrained` writes a transformers directory back. One gradient path serves both
(:mod:`moeflow.parallel.data_parallel`): :func:`sync_gradients` and :func:`clip_grad_norm_`
know which parameters are expert slices, whether the model came from :func:`parallelize` or
was built by hand. ``moeflow train`` is a complete example.
"""

from moeflow.parallel.checkpoint import load_checkpoint, save_checkpoint
from moeflow.parallel.dispatch import (
    COMMON_ARGS,
    DISPATCHER_CLASSES,
    DISPATCHERS,
    A2ADispatcher,
    CapacityDispatcher,
    ChunkRoute,
    CommStep,
    CountExchange,
    HierarchicalDispatcher,
    TokenDispatcher,
    dispatcher_class,
    make_dispatcher,
)
from moeflow.parallel.expert_parallel import ExpertParallel, PipelinedExperts, resolve_degrees
from moeflow.parallel.parallelize import (
    clip_grad_norm_,
    export_pretrained,
    load_balancing_loss,
    load_pretrained_weights,
    parallelize,
    sync_gradients,
)
from moeflow.parallel.pipeline import run_wavefront
from moeflow.parallel.tune import (
    DegreeTuning,
    degree_candidates,
    tune_degrees,
    tune_model_degrees,
)

__all__ = [
    "DegreeTuning",
    "degree_candidates",
    "tune_degrees",
    "tune_model_degrees",
    "COMMON_ARGS",
    "DISPATCHER_CLASSES",
    "DISPATCHERS",
    "A2ADispatcher",
    "CapacityDispatcher",
    "ChunkRoute",
    "CommStep",
    "CountExchange",
    "HierarchicalDispatcher",
    "TokenDispatcher",
    "dispatcher_class",
    "make_dispatcher",
    "ExpertParallel",
    "PipelinedExperts",
    "resolve_degrees",
    "run_wavefront",
    "parallelize",
    "sync_gradients",
    "load_pretrained_weights",
    "save_checkpoint",
    "load_checkpoint",
    "export_pretrained",
    "load_balancing_loss",
    "clip_grad_norm_",
]
