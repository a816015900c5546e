"""A DDP communication hook that all-reduces gradient buckets with ZipCCL's compressed
all-reduce (``moeflow.comm.compressed.all_reduce``).

    from moeflow.comm.hooks import register_comm_hook
    state = register_comm_hook(ddp_model, compress="auto", perf=PerfModel.load("perf.json"))
    ...                       # train as usual
    state.compression.stats   # decisions and bytes saved

Each bucket is summed by compressed all-to-all -> decode -> fp32 sum in rank order ->
encode -> compressed all-gather, then divided by the group size (DDP's mean). The sum order
is fixed, so gradients are bit-identical whether a bucket was compressed or not; they match
DDP's own all-reduce up to fp32 rounding (its ring sums in another order).

FSDP2 (``fully_shard``) in torch 2.13 exposes no public hook for a custom all-gather or
reduce-scatter implementation on gloo, so there is no FSDP integration here.
"""

# no ``from __future__ import annotations``: DDP compares the hook's return annotation
# with ``torch.futures.Future[torch.Tensor]`` as an object
from dataclasses import dataclass

import torch
import torch.distributed as dist

from moeflow.comm.compressed import Compression, all_reduce, as_compression


@dataclass
class ZipCCLHookState:
    """What the hook needs: the policy (mode, PerfModel, counters) and the process group."""

    compression: Compression
    group: object = None


def zipccl_hook(state: ZipCCLHookState, bucket) -> torch.futures.Future[torch.Tensor]:
    """DDP comm hook: the mean of ``bucket.buffer()`` over ``state.group``, compressed per the
    policy. Runs the collective to completion before returning (a completed future)."""
    buf = bucket.buffer()
    total = all_reduce(buf, state.group, state.compression, op="ddp bucket all-reduce")
    total.div_(dist.get_world_size(state.group))
    fut = torch.futures.Future()
    fut.set_result(total)
    return fut


def register_comm_hook(ddp_model, compress="auto", perf=None, *, group=None,
                       timeout_s: float | None = None,
                       threads: int | None = 1) -> "ZipCCLHookState":
    """Install :func:`zipccl_hook` on a ``DistributedDataParallel`` model; returns its state.

    ``compress``: True, False, "auto" (ZipCCL's switch under ``perf``) or a
    :class:`~moeflow.comm.compressed.Compression`. ``group`` must be the DDP model's process
    group (None: the default group)."""
    state = ZipCCLHookState(as_compression(compress, perf, timeout_s=timeout_s,
                                           threads=threads), group)
    ddp_model.register_comm_hook(state, zipccl_hook)
    return state


__all__ = ["ZipCCLHookState", "register_comm_hook", "zipccl_hook"]
