"""Process-group helpers: cached sub-groups made only by their members.

Sub-groups use ``use_local_synchronization=True`` so only member ranks call
``new_group``; that lets an EP group live inside a larger job. Groups are cached by their
global ranks, because a hashed group name can exist only once per process.
"""

from __future__ import annotations

import datetime
from collections.abc import Sequence

import torch.distributed as dist

_CACHE: dict[tuple[int, ...], object] = {}


def global_ranks(group) -> list[int]:
    """Global ranks of ``group`` in group-rank order (None: the default group)."""
    if group is None or group is dist.GroupMember.WORLD:
        return list(range(dist.get_world_size()))
    return list(dist.get_process_group_ranks(group))


def subgroup(parent, member_group_ranks: Sequence[int], timeout_s: float | None = None):
    """The process group of ``member_group_ranks`` (ranks *within* ``parent``).

    Returns ``parent`` itself when the sub-group is all of it, and a cached group otherwise.
    The calling rank must be a member.
    """
    parent_ranks = global_ranks(parent)
    ranks = tuple(parent_ranks[r] for r in member_group_ranks)
    if list(ranks) == parent_ranks:
        return parent
    if dist.get_rank() not in ranks:
        raise ValueError(f"rank {dist.get_rank()} is not in sub-group {ranks}")
    if ranks not in _CACHE:
        kwargs = {}
        if timeout_s is not None:
            kwargs["timeout"] = datetime.timedelta(seconds=float(timeout_s))
        _CACHE[ranks] = dist.new_group(ranks=list(ranks), use_local_synchronization=True, **kwargs)
    return _CACHE[ranks]


def clear_cache() -> None:
    """Forget cached groups (after ``destroy_process_group``)."""
    _CACHE.clear()
