"""torch.distributed plumbing: topology, groups, deadlines on every collective, compressed
collectives and DDP comm hooks. The expert-parallel engine that uses them is
:mod:`moeflow.parallel`."""

from moeflow._moved import moved_names
from moeflow.comm import bytes as bytes  # measured bytes: comm.bytes.count(topology)
from moeflow.comm.timeouts import DEFAULT_TIMEOUT_S, Pending, wait_work
from moeflow.comm.topology import LINK_LEVELS, Topology, TopologyGroups

__getattr__ = moved_names(
    __name__,
    dict.fromkeys(
        (
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
        ),
        "moeflow.parallel.dispatch",
    ),
)

# ``bytes`` stays out of __all__: a star import must not shadow the builtin
__all__ = [
    "Topology",
    "TopologyGroups",
    "LINK_LEVELS",
    "Pending",
    "wait_work",
    "DEFAULT_TIMEOUT_S",
]
