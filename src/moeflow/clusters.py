"""Cluster descriptions: nodes, GPUs per node, link levels and GPU rates.

Pure Python (no torch, no numpy) frozen dataclasses, so planners can describe clusters the user
does not have. A :class:`ClusterSpec` says *what the hardware is*; the fitted costs that a
planner uses live in :class:`moeflow.perf.PerfModel` (same preset names).

Presets:
  * ``fsmoe-testbed-a`` - FSMoE testbed A: 6 nodes x 8 RTX A6000, NVLink, 200 Gb/s InfiniBand.
  * ``fsmoe-testbed-b`` - FSMoE testbed B: 8 nodes x 4 RTX 2080Ti, PCIe 3.0, 100 Gb/s.
  * ``h200-8x-ib``      - one or more 8 x H200 SXM nodes, NVLink 4, 8 x 400 Gb/s NDR per node.

Rates are vendor datasheet figures (per direction for links, dense fp16/bf16 with fp32
accumulate for GPUs); they are what the derived PerfModel presets start from.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

from moeflow.errors import ConfigError
from moeflow.validate import positive_int


@dataclass(frozen=True, kw_only=True)
class LinkLevel:
    """One level of the interconnect hierarchy.

    ``bandwidth_GBps`` is the per-GPU, per-direction bandwidth in GB/s (1e9 bytes/s) that one GPU
    can drive on this level; ``latency_us`` is the per-message start-up latency.
    """

    name: str
    bandwidth_GBps: float
    latency_us: float
    description: str = ""

    def __post_init__(self) -> None:
        if not self.name:
            raise ConfigError("LinkLevel.name", self.name, "a non-empty string")
        if not self.bandwidth_GBps > 0:
            raise ConfigError("LinkLevel.bandwidth_GBps", self.bandwidth_GBps, "a float > 0")
        if not self.latency_us >= 0:
            raise ConfigError("LinkLevel.latency_us", self.latency_us, "a float >= 0")


@dataclass(frozen=True, kw_only=True)
class ClusterSpec:
    """A homogeneous GPU cluster.

    ``links`` is ordered from the innermost level (``intra``: inside a node) to the outermost
    (``inter``: between nodes). ``gpu_tflops`` is the dense fp16/bf16 tensor rate with fp32
    accumulate; ``gpu_mem_GBps`` the memory bandwidth.
    """

    name: str
    nodes: int
    gpus_per_node: int
    gpu_name: str
    gpu_tflops: float
    gpu_mem_GBps: float
    gpu_mem_GB: float
    links: tuple[LinkLevel, ...] = field(default_factory=tuple)
    source: str = ""

    def __post_init__(self) -> None:
        for name in ("nodes", "gpus_per_node"):
            object.__setattr__(self, name, positive_int(f"ClusterSpec.{name}", getattr(self, name)))
        for name in ("gpu_tflops", "gpu_mem_GBps", "gpu_mem_GB"):
            v = getattr(self, name)
            if not v > 0:
                raise ConfigError(f"ClusterSpec.{name}", v, "a float > 0")
        names = [lv.name for lv in self.links]
        if len(set(names)) != len(names):
            raise ConfigError("ClusterSpec.links", names, "unique level names")

    @property
    def world_size(self) -> int:
        return self.nodes * self.gpus_per_node

    def link(self, name: str) -> LinkLevel:
        for lv in self.links:
            if lv.name == name:
                return lv
        raise ConfigError("link", name, f"one of {[lv.name for lv in self.links]}")

    def with_nodes(self, nodes: int) -> ClusterSpec:
        """The same hardware with a different node count (plan clusters you do not have)."""
        return replace(self, nodes=nodes)

    def to_dict(self) -> dict:
        return {
            "name": self.name,
            "nodes": self.nodes,
            "gpus_per_node": self.gpus_per_node,
            "gpu_name": self.gpu_name,
            "gpu_tflops": self.gpu_tflops,
            "gpu_mem_GBps": self.gpu_mem_GBps,
            "gpu_mem_GB": self.gpu_mem_GB,
            "links": [
                {
                    "name": lv.name,
                    "bandwidth_GBps": lv.bandwidth_GBps,
                    "latency_us": lv.latency_us,
                    "description": lv.description,
                }
                for lv in self.links
            ],
            "source": self.source,
        }

    @classmethod
    def from_dict(cls, d: dict) -> ClusterSpec:
        d = dict(d)
        d["links"] = tuple(LinkLevel(**lv) for lv in d.get("links", ()))
        return cls(**d)


_CLUSTERS: dict[str, ClusterSpec] = {}


def _add(c: ClusterSpec) -> None:
    _CLUSTERS[c.name] = c


_add(
    ClusterSpec(
        name="fsmoe-testbed-a",
        nodes=6,
        gpus_per_node=8,
        gpu_name="RTX A6000",
        # A6000 datasheet: 154.8 TFLOPS fp16 tensor dense, 768 GB/s GDDR6, 48 GB.
        gpu_tflops=154.8,
        gpu_mem_GBps=768.0,
        gpu_mem_GB=48.0,
        links=(
            # NVLink bridge (pairs of A6000): 112.5 GB/s bidirectional -> 56.25 GB/s per direction.
            LinkLevel(
                name="intra",
                bandwidth_GBps=56.25,
                latency_us=5.0,
                description="NVLink bridge, 112.5 GB/s bidirectional",
            ),
            # 200 Gb/s InfiniBand per node shared by 8 GPUs.
            LinkLevel(
                name="inter",
                bandwidth_GBps=25.0 / 8,
                latency_us=10.0,
                description="200 Gb/s InfiniBand per node, 8 GPUs share it",
            ),
        ),
        source="FSMoE (ASPLOS'25) testbed A; rates from vendor datasheets",
    )
)

_add(
    ClusterSpec(
        name="fsmoe-testbed-b",
        nodes=8,
        gpus_per_node=4,
        gpu_name="RTX 2080Ti",
        # 2080Ti (GeForce): 107.6 TFLOPS fp16 tensor with fp16 accumulate, half that (53.8) with
        # fp32 accumulate; 616 GB/s GDDR6, 11 GB.
        gpu_tflops=53.8,
        gpu_mem_GBps=616.0,
        gpu_mem_GB=11.0,
        links=(
            # PCIe 3.0 x16: 15.75 GB/s per direction.
            LinkLevel(
                name="intra", bandwidth_GBps=15.75, latency_us=10.0, description="PCIe 3.0 x16"
            ),
            # 100 Gb/s per node shared by 4 GPUs.
            LinkLevel(
                name="inter",
                bandwidth_GBps=12.5 / 4,
                latency_us=15.0,
                description="100 Gb/s network per node, 4 GPUs share it",
            ),
        ),
        source="FSMoE (ASPLOS'25) testbed B; rates from vendor datasheets",
    )
)

_add(
    ClusterSpec(
        name="h200-8x-ib",
        nodes=2,
        gpus_per_node=8,
        gpu_name="H200 SXM",
        # H200 SXM datasheet: 989 TFLOPS bf16 dense, 4.8 TB/s HBM3e, 141 GB.
        gpu_tflops=989.0,
        gpu_mem_GBps=4800.0,
        gpu_mem_GB=141.0,
        links=(
            # NVLink 4: 900 GB/s bidirectional per GPU -> 450 GB/s per direction.
            LinkLevel(
                name="intra",
                bandwidth_GBps=450.0,
                latency_us=3.0,
                description="NVLink 4 / NVSwitch, 900 GB/s bidirectional",
            ),
            # One 400 Gb/s NDR ConnectX-7 per GPU.
            LinkLevel(
                name="inter",
                bandwidth_GBps=50.0,
                latency_us=5.0,
                description="8 x 400 Gb/s NDR InfiniBand per node, one per GPU",
            ),
        ),
        source="NVIDIA H200 and ConnectX-7 datasheets; use with_nodes(n) for n nodes",
    )
)


def cluster_names() -> list[str]:
    return sorted(_CLUSTERS)


def cluster_preset(name: str) -> ClusterSpec:
    try:
        return _CLUSTERS[name]
    except KeyError:
        raise ConfigError("cluster", name, f"one of {cluster_names()}") from None
