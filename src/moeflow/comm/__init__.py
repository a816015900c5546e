"""torch.distributed plumbing: topology, token dispatchers, deadlines on every collective."""

from moeflow.comm.dispatch import (
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
from moeflow.comm.timeouts import DEFAULT_TIMEOUT_S, Pending, wait_work
from moeflow.comm.topology import LINK_LEVELS, Topology, TopologyGroups

__all__ = [
    "Topology",
    "TopologyGroups",
    "LINK_LEVELS",
    "TokenDispatcher",
    "A2ADispatcher",
    "CapacityDispatcher",
    "HierarchicalDispatcher",
    "make_dispatcher",
    "dispatcher_class",
    "DISPATCHERS",
    "DISPATCHER_CLASSES",
    "COMMON_ARGS",
    "CountExchange",
    "ChunkRoute",
    "CommStep",
    "Pending",
    "wait_work",
    "DEFAULT_TIMEOUT_S",
]
