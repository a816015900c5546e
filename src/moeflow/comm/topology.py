"""Topology: which ranks share a node, and over which link two ranks talk.

A ``Topology`` is plain data about a group of ``world_size`` ranks laid out node-major:
group rank ``g`` lives on node ``g // ranks_per_node`` with local index
``g % ranks_per_node``. Two link levels exist: ``intra_node`` (NVLink / shared memory) and
``inter_node`` (the network). On one CPU machine, tests declare e.g. ranks {0,1} and {2,3}
to be two "nodes" so the hierarchical code paths run for real.

Process groups are built on demand by :meth:`Topology.build_groups`; nothing here touches
torch.distributed until then.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from moeflow.errors import ConfigError, DistributedConfigError
from moeflow.validate import positive_int

LINK_LEVELS = ("self", "intra_node", "inter_node")


@dataclass(frozen=True)
class Topology:
    """``world_size`` ranks on ``world_size // ranks_per_node`` nodes, node-major."""

    world_size: int
    ranks_per_node: int

    def __post_init__(self) -> None:
        for name in ("world_size", "ranks_per_node"):
            try:
                v = positive_int(f"Topology.{name}", getattr(self, name))
            except ConfigError as e:  # a layout error: same message, the distributed type
                raise DistributedConfigError(str(e)) from None
            object.__setattr__(self, name, v)
        if self.world_size % self.ranks_per_node:
            raise DistributedConfigError(
                f"Topology.ranks_per_node={self.ranks_per_node} does not divide "
                f"world_size={self.world_size}: nodes must hold the same number of ranks"
            )

    # -- construction -------------------------------------------------------------------
    @classmethod
    def explicit(cls, world_size: int, ranks_per_node: int) -> Topology:
        """A declared layout, e.g. ``Topology.explicit(world_size=4, ranks_per_node=2)``."""
        return cls(world_size=world_size, ranks_per_node=ranks_per_node)

    @classmethod
    def from_env(cls, group=None, env: dict | None = None) -> Topology:
        """Read the layout torchrun exports (``WORLD_SIZE``, ``LOCAL_WORLD_SIZE``).

        Without ``LOCAL_WORLD_SIZE`` all ranks are taken to share one node. When ``group``
        is given (or a default process group exists) its size wins over ``WORLD_SIZE``;
        ``MOEFLOW_RANKS_PER_NODE`` overrides ``LOCAL_WORLD_SIZE`` (single-machine tests
        that pretend to be several nodes).
        """
        env = os.environ if env is None else env
        world = None
        try:
            import torch.distributed as dist

            if dist.is_available() and dist.is_initialized():
                world = dist.get_world_size(group)
        except Exception:  # torch missing or no default group: fall back to the env
            world = None
        if world is None:
            world = int(env.get("WORLD_SIZE", "1"))
        rpn = env.get("MOEFLOW_RANKS_PER_NODE") or env.get("LOCAL_WORLD_SIZE")
        rpn = int(rpn) if rpn else world
        return cls(world_size=world, ranks_per_node=min(rpn, world))

    # -- queries ------------------------------------------------------------------------
    @property
    def num_nodes(self) -> int:
        return self.world_size // self.ranks_per_node

    def _check(self, rank: int) -> None:
        if not 0 <= rank < self.world_size:
            raise DistributedConfigError(
                f"rank={rank!r} is not allowed: an int in [0, {self.world_size})"
            )

    def node_of(self, rank: int) -> int:
        self._check(rank)
        return rank // self.ranks_per_node

    def local_index(self, rank: int) -> int:
        self._check(rank)
        return rank % self.ranks_per_node

    def node_ranks(self, node: int) -> list[int]:
        """Group ranks on ``node`` (an intra-node group)."""
        return list(range(node * self.ranks_per_node, (node + 1) * self.ranks_per_node))

    def peer_ranks(self, local_index: int) -> list[int]:
        """Group ranks with the same local index on every node (an inter-node group)."""
        return [n * self.ranks_per_node + local_index for n in range(self.num_nodes)]

    def link_level(self, a: int, b: int) -> str:
        """``self``, ``intra_node`` or ``inter_node``: the link a message from a to b uses."""
        if a == b:
            self._check(a)
            return "self"
        return "intra_node" if self.node_of(a) == self.node_of(b) else "inter_node"

    def strided(self, stride: int) -> Topology:
        """Topology of a sub-group ``{offset + stride*p}``, e.g. an EP group beside ESP.

        The layout is the same for every offset in ``[0, stride)``, so none is asked for.
        ``stride`` must divide ``ranks_per_node`` so the sub-group stays node-major.
        """
        if self.ranks_per_node % stride or self.world_size % stride:
            raise DistributedConfigError(
                f"stride={stride} must divide ranks_per_node={self.ranks_per_node}"
            )
        return Topology(
            world_size=self.world_size // stride, ranks_per_node=self.ranks_per_node // stride
        )

    # -- process groups -----------------------------------------------------------------
    def build_groups(self, group=None, timeout_s: float | None = None) -> TopologyGroups:
        """Create (or fetch cached) intra-node and inter-node groups for the calling rank.

        ``group`` is the process group this topology describes (None: the default group).
        Every rank of ``group`` must call this (groups are made with local
        synchronisation, so ranks outside ``group`` need not).
        """
        import torch.distributed as dist

        from moeflow.comm.groups import subgroup

        size = dist.get_world_size(group)
        if size != self.world_size:
            raise DistributedConfigError(
                f"Topology.world_size={self.world_size} but the process group has {size} ranks"
            )
        me = dist.get_rank(group)
        node, local = self.node_of(me), self.local_index(me)
        intra = subgroup(group, self.node_ranks(node), timeout_s=timeout_s)
        inter = subgroup(group, self.peer_ranks(local), timeout_s=timeout_s)
        return TopologyGroups(topology=self, rank=me, intra_node=intra, inter_node=inter)


@dataclass(frozen=True)
class TopologyGroups:
    """The calling rank's intra-node and inter-node process groups."""

    topology: Topology
    rank: int
    intra_node: object
    inter_node: object
