"""Asynchronous collectives with variable sizes, each returning a :class:`Pending`.

Gloo (torch 2.13) supports ``all_to_all_single`` with uneven splits, checked on this
machine, so the same calls run on gloo and NCCL. Variable-size all-gather and
reduce-scatter are written as an uneven all-to-all: gloo has no uneven all-gather or
reduce-scatter, and this keeps one code path (on NCCL the bytes on the wire are the same
as a direct ring for the ESP group sizes used, 2-8).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.distributed as dist

from moeflow.comm import bytes as comm_bytes
from moeflow.comm.timeouts import Pending, wait_work
from moeflow.errors import ConfigError

# Flat gradient buckets are capped at DDP's default size: large enough that the per-call
# latency (alpha) is paid a few times per step, small enough to bound the extra memory.
DEFAULT_BUCKET_BYTES = 25 * 2**20


def _row_bytes(x: torch.Tensor) -> int:
    return (x[0].numel() if x.shape[0] else x[0:1].numel()) * x.element_size()


def _all_to_all_v(x_RD, in_splits, out_splits, group, op, timeout_s, kind):
    in_splits = [int(s) for s in in_splits]
    out_splits = [int(s) for s in out_splits]
    if len(in_splits) == 1:  # a group of one: nothing to send
        return Pending.ready(x_RD)
    out = x_RD.new_empty((sum(out_splits),) + tuple(x_RD.shape[1:]))
    x_RD = x_RD.contiguous()
    if comm_bytes.active():
        row = _row_bytes(x_RD)
        comm_bytes.record(kind, group, [n * row for n in in_splits], op)
    work = dist.all_to_all_single(out, x_RD, out_splits, in_splits, group=group, async_op=True)
    return Pending(work, op, timeout_s, lambda: out, stream_ordered=x_RD.is_cuda)


def all_to_all_v(
    x_RD: torch.Tensor,
    in_splits: Sequence[int],
    out_splits: Sequence[int],
    group,
    op: str,
    timeout_s: float,
) -> Pending:
    """Send ``x_RD[sum(in_splits[:j]):...]`` to rank j; receive ``out_splits[j]`` rows from j."""
    return _all_to_all_v(x_RD, in_splits, out_splits, group, op, timeout_s, "all_to_all_v")


def all_gather_v(
    x_RD: torch.Tensor, sizes: Sequence[int], group, op: str, timeout_s: float
) -> Pending:
    """Concatenate every rank's rows in rank order; rank j contributes ``sizes[j]`` rows."""
    n = len(sizes)
    if n == 1:
        return Pending.ready(x_RD)
    x_rep = x_RD.repeat((n,) + (1,) * (x_RD.dim() - 1)) if x_RD.shape[0] else x_RD
    in_splits = [x_RD.shape[0]] * n
    return _all_to_all_v(x_rep, in_splits, sizes, group, op, timeout_s, "all_gather_v")


def reduce_scatter_v(
    x_RD: torch.Tensor, sizes: Sequence[int], group, op: str, timeout_s: float
) -> Pending:
    """Rows ``[sum(sizes[:j]), ...)`` of every rank are summed onto rank j."""
    n = len(sizes)
    if n == 1:
        return Pending.ready(x_RD)
    me = dist.get_rank(group)
    mine = int(sizes[me])
    p = _all_to_all_v(x_RD, sizes, [mine] * n, group, op, timeout_s, "reduce_scatter_v")

    def finish() -> torch.Tensor:
        buf = p.wait()
        return buf.view((n, mine) + tuple(buf.shape[1:])).sum(0)

    return Pending(None, op, timeout_s, finish)


def all_gather_equal(x: torch.Tensor, group, op: str, timeout_s: float) -> torch.Tensor:
    """Blocking all-gather of same-shaped tensors -> stacked ``[group_size, *x.shape]``."""
    return all_gather_equal_start(x, group, op, timeout_s).wait()


def all_gather_equal_start(x: torch.Tensor, group, op: str, timeout_s: float) -> Pending:
    """:func:`all_gather_equal`, issued now; ``wait()`` gives the stacked result."""
    n = dist.get_world_size(group)
    if n == 1:
        return Pending.ready(x.unsqueeze(0))
    outs = [torch.empty_like(x) for _ in range(n)]
    comm_bytes.record("all_gather_equal", group, [x.numel() * x.element_size()] * n, op)
    work = dist.all_gather(outs, x.contiguous(), group=group, async_op=True)
    return Pending(work, op, timeout_s, lambda: torch.stack(outs), stream_ordered=x.is_cuda)


def all_to_all_equal(x: torch.Tensor, group, op: str, timeout_s: float) -> torch.Tensor:
    """Blocking all-to-all of ``x[j]`` to rank j (first dim = group size)."""
    return all_to_all_equal_start(x, group, op, timeout_s).wait()


def all_to_all_equal_start(x: torch.Tensor, group, op: str, timeout_s: float) -> Pending:
    """:func:`all_to_all_equal`, issued now; ``wait()`` gives the received ``[W, ...]``."""
    n = dist.get_world_size(group)
    if n == 1:
        return Pending.ready(x)
    out = torch.empty_like(x)
    comm_bytes.record("all_to_all_equal", group, [x.numel() * x.element_size() // n] * n, op)
    work = dist.all_to_all_single(out, x.contiguous(), group=group, async_op=True)
    return Pending(work, op, timeout_s, lambda: out, stream_ordered=x.is_cuda)


def all_reduce(
    x: torch.Tensor, group, op: str, timeout_s: float, reduce_op=dist.ReduceOp.SUM
) -> torch.Tensor:
    """Blocking in-place all-reduce with a deadline."""
    all_reduce_start(x, group, op, timeout_s, reduce_op).wait()
    return x


def all_reduce_start(
    x: torch.Tensor, group, op: str, timeout_s: float, reduce_op=dist.ReduceOp.SUM
) -> Pending:
    """In-place all-reduce, issued now; ``wait()`` gives ``x`` (deadline ``timeout_s``)."""
    if dist.get_world_size(group) == 1:
        return Pending.ready(x)
    comm_bytes.record_span("all_reduce", group, x.numel() * x.element_size(), op)
    work = dist.all_reduce(x, op=reduce_op, group=group, async_op=True)
    return Pending(work, op, timeout_s, lambda: x)


def flat_buckets(
    tensors: Sequence[torch.Tensor], bucket_bytes: int = DEFAULT_BUCKET_BYTES
) -> list[list[torch.Tensor]]:
    """Pack ``tensors`` (in order) into buckets of one device and dtype, each at most
    ``bucket_bytes`` unless a single tensor is larger (it then travels alone).

    The packing depends only on the tensors' shapes, dtypes and order, so every rank that
    passes the same parameters gets the same buckets: the condition for the all-reduces of
    :func:`all_reduce_flat` to pair up across ranks.
    """
    if not isinstance(bucket_bytes, int) or isinstance(bucket_bytes, bool) or bucket_bytes < 1:
        raise ConfigError("bucket_bytes", bucket_bytes, "a positive int")
    buckets: list[list[torch.Tensor]] = []
    open_: dict[tuple, tuple[list[torch.Tensor], int]] = {}
    for t in tensors:
        key = (t.device, t.dtype)
        nbytes = t.numel() * t.element_size()
        bucket, used = open_.get(key, (None, 0))
        if bucket is None or used + nbytes > bucket_bytes:
            bucket, used = [], 0
            buckets.append(bucket)
        bucket.append(t)
        open_[key] = (bucket, used + nbytes)
    return buckets


def all_reduce_flat(
    tensors: Sequence[torch.Tensor],
    group,
    op: str,
    timeout_s: float,
    bucket_bytes: int = DEFAULT_BUCKET_BYTES,
) -> None:
    """Sum ``tensors`` in place over ``group``: flatten them into buckets
    (:func:`flat_buckets`) and all-reduce each bucket once.

    All buckets are issued before the first wait, so they share the link; each wait has the
    deadline ``timeout_s``. One collective per bucket instead of one per tensor: a step with
    hundreds of small replicated gradients pays the start-up latency a few times, not hundreds.
    """
    if not tensors or dist.get_world_size(group) == 1:
        return
    issued = []
    for i, bucket in enumerate(flat_buckets(tensors, bucket_bytes)):
        flat = torch.cat([t.reshape(-1) for t in bucket])
        comm_bytes.record_span("all_reduce", group, flat.numel() * flat.element_size(), op)
        work = dist.all_reduce(flat, group=group, async_op=True)
        issued.append((f"{op} (bucket {i + 1})", work, flat, bucket))
    for name, work, flat, bucket in issued:
        wait_work(work, name, timeout_s)
        for t, piece in zip(bucket, flat.split([t.numel() for t in bucket])):
            t.copy_(piece.view_as(t))


@torch.no_grad()
def reduce_gradients(
    params: Sequence[torch.nn.Parameter],
    replicated: Sequence[torch.nn.Parameter],
    group,
    *,
    op: str = "mean",
    timeout_s: float,
    bucket_bytes: int = DEFAULT_BUCKET_BYTES,
) -> None:
    """Turn local gradients into those of the global loss (data-parallel gradient sync).

    ``replicated`` parameters (identical on every rank) have their gradients summed over
    ``group`` with :func:`all_reduce_flat`; one that got no gradient here contributes zeros,
    so every rank packs the same buckets. The other ``params`` (e.g. expert slices, whose
    gradients already hold every rank's tokens) are not communicated. ``op="sum"``: the global
    loss is the sum of the ranks' losses; ``op="mean"``: their mean, so every gradient of
    ``params`` is then divided by the group size (DDP's convention).
    """
    if op not in ("mean", "sum"):
        raise ConfigError("op", op, "'mean' or 'sum'")
    for p in replicated:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    W = dist.get_world_size(group)
    if W == 1:
        return
    all_reduce_flat(
        [p.grad for p in replicated], group, "gradient all-reduce", timeout_s, bucket_bytes
    )
    if op == "mean":
        for p in params:
            if p.grad is not None:
                p.grad.div_(W)
