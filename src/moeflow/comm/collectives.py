"""Asynchronous collectives with variable sizes, each returning a :class:`Pending`.

Gloo (torch 2.13) supports ``all_to_all_single`` with uneven splits, checked on this
machine, so the same calls run on gloo and NCCL. Variable-size all-gather and
reduce-scatter are written as an uneven all-to-all: gloo has no uneven all-gather or
reduce-scatter, and this keeps one code path (on NCCL the bytes on the wire are the same
as a direct ring for the ESP group sizes used, 2-8).
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.distributed as dist

from moeflow.comm.timeouts import Pending, wait_work


def all_to_all_v(x_RD: torch.Tensor, in_splits: Sequence[int], out_splits: Sequence[int],
                 group, op: str, timeout_s: float) -> Pending:
    """Send ``x_RD[sum(in_splits[:j]):...]`` to rank j; receive ``out_splits[j]`` rows from j."""
    in_splits = [int(s) for s in in_splits]
    out_splits = [int(s) for s in out_splits]
    if len(in_splits) == 1:  # a group of one: nothing to send
        return Pending.ready(x_RD)
    out = x_RD.new_empty((sum(out_splits),) + tuple(x_RD.shape[1:]))
    work = dist.all_to_all_single(out, x_RD.contiguous(), out_splits, in_splits, group=group,
                                  async_op=True)
    return Pending(work, op, timeout_s, lambda: out, stream_ordered=x_RD.is_cuda)


def all_gather_v(x_RD: torch.Tensor, sizes: Sequence[int], group, op: str,
                 timeout_s: float) -> Pending:
    """Concatenate every rank's rows in rank order; rank j contributes ``sizes[j]`` rows."""
    n = len(sizes)
    if n == 1:
        return Pending.ready(x_RD)
    x_rep = x_RD.repeat((n,) + (1,) * (x_RD.dim() - 1)) if x_RD.shape[0] else x_RD
    in_splits = [x_RD.shape[0]] * n
    return all_to_all_v(x_rep, in_splits, sizes, group, op, timeout_s)


def reduce_scatter_v(x_RD: torch.Tensor, sizes: Sequence[int], group, op: str,
                     timeout_s: float) -> Pending:
    """Rows ``[sum(sizes[:j]), ...)`` of every rank are summed onto rank j."""
    n = len(sizes)
    if n == 1:
        return Pending.ready(x_RD)
    me = dist.get_rank(group)
    mine = int(sizes[me])
    p = all_to_all_v(x_RD, sizes, [mine] * n, group, op, timeout_s)

    def finish() -> torch.Tensor:
        buf = p.wait()
        return buf.view((n, mine) + tuple(buf.shape[1:])).sum(0)

    return Pending(None, op, timeout_s, finish)


def all_gather_equal(x: torch.Tensor, group, op: str, timeout_s: float) -> torch.Tensor:
    """Blocking all-gather of same-shaped tensors -> stacked ``[group_size, *x.shape]``."""
    n = dist.get_world_size(group)
    if n == 1:
        return x.unsqueeze(0)
    outs = [torch.empty_like(x) for _ in range(n)]
    work = dist.all_gather(outs, x.contiguous(), group=group, async_op=True)
    wait_work(work, op, timeout_s)
    return torch.stack(outs)


def all_to_all_equal(x: torch.Tensor, group, op: str, timeout_s: float) -> torch.Tensor:
    """Blocking all-to-all of ``x[j]`` to rank j (first dim = group size)."""
    n = dist.get_world_size(group)
    if n == 1:
        return x
    out = torch.empty_like(x)
    work = dist.all_to_all_single(out, x.contiguous(), group=group, async_op=True)
    wait_work(work, op, timeout_s)
    return out


def all_reduce(x: torch.Tensor, group, op: str, timeout_s: float,
               reduce_op=dist.ReduceOp.SUM) -> torch.Tensor:
    """Blocking in-place all-reduce with a deadline."""
    if dist.get_world_size(group) == 1:
        return x
    work = dist.all_reduce(x, op=reduce_op, group=group, async_op=True)
    wait_work(work, op, timeout_s)
    return x
