"""ZipCCL where PyTorch users plug communication in: a DDP communication hook, and FSDP2's
custom all-gather / reduce-scatter (``moeflow.comm.compressed``).

    from moeflow.comm.hooks import register_comm_hook
    state = register_comm_hook(ddp_model, compress="auto", perf=PerfModel.load("perf.json"))
    ...                       # train as usual
    state.compression.stats   # decisions and bytes saved

Each bucket is summed by compressed all-to-all -> decode -> fp32 sum in rank order ->
encode -> compressed all-gather, then divided by the group size (DDP's mean). The sum order
is fixed, so gradients are bit-identical whether a bucket was compressed or not; they match
DDP's own all-reduce up to fp32 rounding (its ring sums in another order).

The hook returns at once: the bucket's collectives run on the process group's worker thread
(:func:`moeflow.comm.compressed.all_reduce_start`), so backward goes on computing the next
buckets' gradients while this one is encoded, sent and decoded, and the returned future
completes when it is done (DDP waits for it at the end of backward). The worker issues the
buckets in the order DDP hands them over, the same on every rank.

FSDP2: torch 2.13's ``FSDPModule.set_custom_all_gather`` / ``set_custom_reduce_scatter``
take objects implementing its ``AllGather`` / ``ReduceScatter`` interfaces;
:func:`compress_fsdp` installs ZipCCL's on every ``fully_shard``-ed module (parameters are
all-gathered compressed, gradients reduce-scattered compressed with the fp32 rank-order sum).
The calls complete before returning (FSDP then has no ``Work`` to wait on).
"""

# no ``from __future__ import annotations``: DDP compares the hook's return annotation
# with ``torch.futures.Future[torch.Tensor]`` as an object
from dataclasses import dataclass

import torch
import torch.distributed as dist

from moeflow.comm.compressed import (
    Compression,
    all_reduce_start,
    as_compression,
    check_codec_device,
)


@dataclass
class ZipCCLHookState:
    """What the hook needs: the policy (mode, PerfModel, counters) and the process group."""

    compression: Compression
    group: object = None


def zipccl_hook(state: ZipCCLHookState, bucket) -> torch.futures.Future[torch.Tensor]:
    """DDP comm hook: the mean of ``bucket.buffer()`` over ``state.group``, compressed per the
    policy. Returns before the collective finishes: a future that completes with the mean
    (or with the collective's error) when the worker thread is done."""
    buf = bucket.buffer()
    world = dist.get_world_size(state.group)
    fut: torch.futures.Future[torch.Tensor] = torch.futures.Future()

    def done(job) -> None:
        err = job.exception()
        if err is not None:
            fut.set_exception(err)
        else:
            fut.set_result(job.result().div_(world))

    job = all_reduce_start(buf, state.group, state.compression, op="ddp bucket all-reduce")
    job.add_done_callback(done)
    return fut


def register_comm_hook(
    ddp_model,
    compress="auto",
    perf=None,
    *,
    group=None,
    timeout_s: float | None = None,
    threads: int | None = 1,
) -> "ZipCCLHookState":
    """Install :func:`zipccl_hook` on a ``DistributedDataParallel`` model; returns its state.

    ``compress``: True, False, "auto" (ZipCCL's switch under ``perf``) or a
    :class:`~moeflow.comm.compressed.Compression`. ``group`` must be the DDP model's process
    group (None: the default group)."""
    state = ZipCCLHookState(
        as_compression(compress, perf, timeout_s=timeout_s, threads=threads), group
    )
    # decided at registration, before any bucket travels: the buckets live with the
    # parameters, and ZipCCL's collectives here run on CPU tensors only
    _check_parameters(ddp_model, state.compression, "DDP comm hook")
    ddp_model.register_comm_hook(state, zipccl_hook)
    return state


def _check_parameters(model, compression: Compression, where: str) -> None:
    for p in model.parameters():
        check_codec_device(compression, p.device, where, any_mode=True)


# -- FSDP2 ---------------------------------------------------------------------------------
def _fsdp_api():
    from torch.distributed.fsdp._fully_shard._fsdp_api import AllGather, ReduceScatter

    return AllGather, ReduceScatter


def _make_fsdp_comms(compression: Compression):
    AllGather, ReduceScatter = _fsdp_api()
    from moeflow.comm.compressed import all_gather, reduce_scatter

    floats = (torch.bfloat16, torch.float16, torch.float32)
    plain_ag = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    plain_rs = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor

    class ZipCCLAllGather(AllGather):
        """FSDP2 parameter all-gather through ZipCCL (byte buffers of mixed-dtype groups go
        through the plain collective: they are not floats)."""

        def allocate(self, size, *, dtype, device):
            return torch.empty(*size, dtype=dtype, device=device)

        def __call__(self, output_tensor, input_tensor, group, async_op=False):
            check_codec_device(compression, input_tensor.device, "FSDP all-gather", any_mode=True)
            if input_tensor.dtype not in floats:
                return plain_ag(output_tensor, input_tensor, group=group, async_op=async_op)
            out = all_gather(input_tensor.reshape(-1), group, compression, op="fsdp all-gather")
            output_tensor.copy_(out.view_as(output_tensor))
            return None

    class ZipCCLReduceScatter(ReduceScatter):
        """FSDP2 gradient reduce-scatter through ZipCCL (SUM or AVG)."""

        def allocate(self, size, *, dtype, device):
            return torch.empty(*size, dtype=dtype, device=device)

        def __call__(self, output_tensor, input_tensor, group, op, async_op=False):
            check_codec_device(
                compression, input_tensor.device, "FSDP reduce-scatter", any_mode=True
            )
            avg = op == dist.ReduceOp.AVG
            if input_tensor.dtype not in floats or not (avg or op == dist.ReduceOp.SUM):
                return plain_rs(output_tensor, input_tensor, op=op, group=group, async_op=async_op)
            out = reduce_scatter(
                input_tensor.reshape(-1), group, compression, op="fsdp reduce-scatter"
            )
            if avg:
                out = out.div_(dist.get_world_size(group))
            output_tensor.copy_(out.view_as(output_tensor))
            return None

    return ZipCCLAllGather(), ZipCCLReduceScatter()


def compress_fsdp(
    module, compress="auto", perf=None, *, timeout_s: float | None = None, threads: int | None = 1
) -> Compression:
    """Install ZipCCL's all-gather and reduce-scatter on every ``fully_shard``-ed submodule
    of ``module`` (FSDP2, torch >= 2.13); returns the shared policy (its ``stats`` count the
    decisions and bytes)."""
    from torch.distributed.fsdp import FSDPModule

    compression = as_compression(compress, perf, timeout_s=timeout_s, threads=threads)
    _check_parameters(module, compression, "FSDP collectives")  # before any communication
    ag, rs = _make_fsdp_comms(compression)
    for m in module.modules():
        if isinstance(m, FSDPModule):
            m.set_custom_all_gather(ag)
            m.set_custom_reduce_scatter(rs)
    return compression


__all__ = ["ZipCCLHookState", "compress_fsdp", "register_comm_hook", "zipccl_hook"]
