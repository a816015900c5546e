"""Geo-distributed pipeline planning: a device graph, bandwidth clustering and the DAG partition.

FusionLLM (Tang et al., "FusionLLM: A Decentralized LLM Training System on Geo-distributed GPUs
with Adaptive Compression", arXiv 2410.12707) trains one model over GPUs joined by slow,
uneven links: the model is an operator graph (OP-DAG), devices are clustered by the bandwidth
between them (OP-Fence), the graph is cut into pipeline stages placed on a chain of devices,
and only the slow links carry top-k sparsified tensors (AdaTopK). The paper does not publish
its partition algorithm, its clustering rule or its compression budget; what follows is our
derivation of each, stated where it is used.

Inputs
------
* :class:`DeviceGraph`: per-device compute rate and memory, a bandwidth matrix (bytes/s, 0 = no
  direct link) and a latency matrix (s). JSON schema of :meth:`DeviceGraph.from_dict` /
  :meth:`DeviceGraph.load`::

      {"devices": [{"name": "a0", "tflops": 0.05, "memory_gb": 16, "site": "A"}, ...],
       "bandwidth_mbps": [[...], ...],       # megabits/s, full N x N matrix, diagonal ignored
       "latency_ms": [[...], ...]}           # optional with a matrix (default 0)

  or, instead of the matrices, links per site pair (every pair of devices takes the link of
  its two sites; a site needs an entry in ``sites`` only when it has two or more devices)::

       "sites": {"A": {"bandwidth_mbps": 10000, "latency_ms": 0.1}, ...},
       "site_links": [{"a": "A", "b": "B", "bandwidth_mbps": 10, "latency_ms": 20}, ...]

  A device gives ``flops`` (FLOP/s) or ``tflops``, and ``memory_bytes`` or ``memory_gb``
  (1 GB = 1e9 bytes). A site pair missing from ``site_links`` has no direct link. Validation
  names the offending device: duplicate names, non-positive rates or memory, matrices that are
  not N x N or hold negative entries, a link present in one direction only, and a graph that
  is not connected.
* :func:`device_graph_from_perf`: the device graph of a host profiled by ``moeflow profile``
  (rates and links from its PerfModel; a missing cost is a ConfigError naming it).
* :class:`OpGraph`: operator nodes in topological order with forward FLOPs, output bytes,
  parameter bytes and the earlier nodes each reads. :func:`gpt2_opgraph` builds GPT-2's
  analytically; ``moeflow.geo.opgraph`` builds one from ``torch.fx``.

Cost model (ours)
-----------------
A partition cuts the topological order into contiguous ranges ``[bounds[s], bounds[s+1])``,
one stage per distinct device. The tensors crossing the cut before node ``i`` are the outputs of
nodes ``< i`` read by any node ``>= i`` (:meth:`OpGraph.cut_tensors`); a tensor needed two
stages later is forwarded through the middle stage. Per micro-batch:

* stage compute ``c_s = 3 * sum(flops) / device.flops`` (backward = 2 x forward);
* link time between stages ``s`` and ``s+1`` on devices ``u`` and ``v``:
  ``l_s = lat(u,v) + lat(v,u) + cut_bytes * (x_s / bw(u,v) + y_s / bw(v,u))``, activations
  forward and their gradients backward; ``x_s`` and ``y_s`` are the wire factors of the two
  directions (:func:`wire_factors`), both 1 on exact links. Where AdaTopK sparsifies
  (FusionLLM, arXiv 2410.12707) the forward carries the top-k values with their positions,
  ``x_s = density * (VALUE_BYTES + INDEX_BYTES) / VALUE_BYTES``, and the backward only the
  gradient at those positions (the exact gradient of the sparsified forward; both ends know
  the positions), ``y_s = density``. This is what ``moeflow.geo.pipeline`` sends: fp32 values
  and int32 positions in fixed-size buffers whose length ``k`` both ends derive from the
  tensor's shape and the density, so no size header (k is rounded up per tensor there, taken
  as ``density * numel`` here); the dense tensors are taken to be fp32;
* stage time ``t_s = c_s + l_s`` (the last stage has no link): the device computes and sends;
* bottleneck ``max t_s``; a GPipe step of ``M`` micro-batches takes
  ``sum t_s + (M - 1) * max t_s`` (a flow line of identical items);
* memory of a stage: ``4 * param_bytes`` (weights, gradients, two Adam moments) plus ``M``
  micro-batches of activations (each node's ``act_bytes``, by default its output) must fit the
  device's memory.

Partition (our derivation)
--------------------------
:func:`partition` minimises the GPipe step ``sum t_s + (M - 1) max t_s`` (the closed form that
:mod:`moeflow.plan.geo_sim` checks against the event simulation), not the bottleneck first:
with few micro-batches a plan with a lower bottleneck but more stages and links can take
longer. It orders devices into a chain and solves a dynamic program over (node prefix, chain
state): the value of a state is the smallest sum of the stage times before the stage that
starts at node ``i`` on the state's device, with every stage ``<= cap`` (and, with AdaTopK,
every compute ``<= budget``). For one cap the DP is exact, and its transition is a range
minimum: the stage on device ``u`` from ``i0`` to ``t`` costs ``3 (F[t] - F[i0]) / flops_u +
l(t)`` (prefix sums ``F``), the ``i0`` allowed by memory and the cap form a range ``[lo(t), t -
1]`` (stage compute and memory grow as ``i0`` falls), so the best predecessor is ``min (h[i0] -
3 F[i0] / flops_u)`` over that range, a sparse-table query (numpy, all ``t`` at once). The step
is minimised over caps by branch and bound on the bottleneck: the first cap is the largest
bottleneck a better plan can have (``step >= M max t_s``), and a run capped just below the
bottleneck ``m`` of the plan it found gives the best sum ``S`` among plans with a lower
bottleneck; each of those takes at least ``S + (M - 1) b`` (``b`` a lower bound on
bottlenecks), so the walk down stops when that reaches the best step. States whose sum plus the
remaining compute on the fastest device cannot beat the best step are dropped. Chains:

* exhaustive (default for at most 6 devices): every order of the devices, as a DP over (set of
  devices used, last device) (Held and Karp's subset DP: what follows a stage depends only on
  the devices left and the link from the last one); a plan may use any number of devices, so
  this is the optimum of the cost model over every device order and segmentation;
* otherwise the devices are clustered by bandwidth (:func:`cluster_devices`, our reading of
  OP-Fence), each cluster's devices sorted by decreasing FLOP/s (by decreasing memory when
  that order fits no plan), and the orders of the clusters are searched (every order up to 7
  clusters, as the same subset DP over clusters, else a greedy widest-link order from each
  cluster). A plan uses the fastest devices of each cluster it enters (a prefix of the
  cluster) and may stop at any cluster; it can miss a plan that only an order visiting a
  cluster twice, or skipping a device inside one, would fit (devices with very tight memory).

AdaTopK (our derivation of the budget): only links between bandwidth clusters may be
compressed (inside an OP-Fence cluster every link is fast by construction), and such a link is
slow when its exact transfer time exceeds the budget, the slowest stage's compute time (the pace
the pipeline keeps anyway). A slow link gets the density whose compressed transfer takes the
budget (:func:`adatopk_density`, clamped to ``[min_density, 1]``); every other link stays exact
(:func:`link_densities`). Since the budget depends on the plan, the planner runs the dynamic
program for candidate budgets ``b`` (links at their budget-``b`` times, every stage's compute
``<= b``) and keeps the best plan evaluated at its own budget. A smaller budget only makes
compressed links faster, so the run whose budget is the optimal plan's own slowest compute finds
a plan at least as good. With every stage compute time as a candidate the search is exact;
that is done when there are at most ``ADATOPK_EXACT_MAX`` candidates (small graphs); otherwise
``ADATOPK_BUDGETS`` candidates on a geometric grid are tried, then as many on a finer grid
between the neighbours of the best one. Candidates above ``1/M`` of the best step found are
skipped (the optimal plan's slowest compute is at most its bottleneck, at most ``1/M`` of its
step), and the run at budget ``b`` only looks for plans whose bottleneck is at least ``b`` (the
plan it exists for has a compute of ``b``; on a grid, at least the grid point below). The
exact plan evaluated with its own AdaTopK densities is the first incumbent, so an AdaTopK plan
is never slower (in this model) than the exact one.

Python and numpy (no torch): plans for clusters you do not have run anywhere.
"""

from __future__ import annotations

import itertools
import json
import math
import numbers
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from moeflow.errors import ConfigError, InputError, PlanError
from moeflow.validate import is_int, positive_int

#: bytes of one value and one position on an AdaTopK wire (fp32 values, int32 flat positions,
#: as ``moeflow.geo.pipeline`` sends them); VALUE_BYTES is also a dense value's size
VALUE_BYTES = 4
INDEX_BYTES = 4
#: wire bytes per dense byte at density 1 in each direction of a sparsified link: the forward
#: sends values and positions, the backward values only (the forward's positions)
_FWD_RATE = (VALUE_BYTES + INDEX_BYTES) / VALUE_BYTES
_BWD_RATE = VALUE_BYTES / VALUE_BYTES
#: exhaustive device-order search by default up to this many devices
EXHAUSTIVE_MAX_DEVICES = 6
#: every order of the clusters is searched up to this many clusters
CLUSTER_PERMUTATION_MAX = 7
#: OP-Fence: a link joins two devices when it is at least 1/factor of their fastest links
CLUSTER_FACTOR = 4.0
#: AdaTopK budgets: every candidate up to this many, else two geometric grids of ADATOPK_BUDGETS
ADATOPK_EXACT_MAX = 128
ADATOPK_BUDGETS = 12

_GB = 1e9
_INF = math.inf
#: device files larger than this are refused before reading
MAX_FILE_BYTES = 64 * 2**20


def _gb(x: float) -> str:
    return f"{x / _GB:.3g} GB"


def _real(v) -> bool:
    return isinstance(v, numbers.Real) and not isinstance(v, bool) and math.isfinite(v)


# ---- devices -------------------------------------------------------------------------------
@dataclass(frozen=True)
class Device:
    """One accelerator: sustained training FLOP/s, usable memory (bytes), optional site label."""

    name: str
    flops: float
    memory_bytes: float
    site: str = ""

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name:
            raise ConfigError("Device.name", self.name, "a non-empty string")
        for f in ("flops", "memory_bytes"):
            v = getattr(self, f)
            if not _real(v) or v <= 0:
                raise ConfigError(f"device {self.name!r} {f}", v, "a finite number > 0")
            object.__setattr__(self, f, float(v))


@dataclass(frozen=True)
class DeviceGraph:
    """Devices and the links between them (schema and validation in the module docstring).

    ``bandwidth[i][j]`` is bytes/s from device ``i`` to ``j`` (0: no direct link);
    ``latency[i][j]`` seconds. Diagonals are ignored.
    """

    devices: tuple[Device, ...]
    bandwidth: tuple[tuple[float, ...], ...]
    latency: tuple[tuple[float, ...], ...] = ()

    def __post_init__(self) -> None:
        devs = tuple(self.devices)
        if not devs:
            raise ConfigError("devices", [], "at least one device")
        for d in devs:
            if not isinstance(d, Device):
                raise ConfigError("devices", d, "Device instances")
        seen: set[str] = set()
        for d in devs:
            if d.name in seen:
                raise ConfigError("devices", d.name, f"unique names; {d.name!r} appears twice")
            seen.add(d.name)
        n = len(devs)
        lat = self.latency if len(self.latency) else tuple((0.0,) * n for _ in range(n))
        bw = self._matrix("bandwidth", self.bandwidth, devs)
        lat = self._matrix("latency", lat, devs)
        for i in range(n):
            for j in range(n):
                if i != j and (bw[i][j] > 0) != (bw[j][i] > 0):
                    a, b = (i, j) if bw[i][j] > 0 else (j, i)
                    raise ConfigError(
                        f"bandwidth {devs[b].name!r} -> {devs[a].name!r}",
                        0.0,
                        f"a positive rate: the link {devs[a].name!r} -> {devs[b].name!r} "
                        "exists, and a pipeline needs both directions",
                    )
        object.__setattr__(self, "devices", devs)
        object.__setattr__(self, "bandwidth", bw)
        object.__setattr__(self, "latency", lat)
        comps = self.components()
        if len(comps) > 1:
            names = [[devs[i].name for i in c] for c in comps]
            raise PlanError(
                f"the device graph is not connected: device {names[1][0]!r} has no path of "
                f"links to device {names[0][0]!r}; connected groups: {names}"
            )

    @staticmethod
    def _matrix(what: str, m, devs) -> tuple[tuple[float, ...], ...]:
        n = len(devs)
        rows = list(m)
        if len(rows) != n:
            raise ConfigError(what, f"{len(rows)} rows", f"{n} rows, one per device")
        out = []
        for i, row in enumerate(rows):
            row = list(row)
            if len(row) != n:
                raise ConfigError(
                    f"{what} row {i} (device {devs[i].name!r})",
                    f"{len(row)} entries",
                    f"{n} entries, one per device",
                )
            for j, v in enumerate(row):
                if i != j and (not _real(v) or v < 0):
                    raise ConfigError(
                        f"{what} {devs[i].name!r} -> {devs[j].name!r}", v, "a finite number >= 0"
                    )
            out.append(tuple(0.0 if i == j else float(v) for j, v in enumerate(row)))
        return tuple(out)

    # ---- queries ---------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self.devices)

    def index(self, name: str) -> int:
        for i, d in enumerate(self.devices):
            if d.name == name:
                return i
        raise ConfigError("device", name, f"one of {[d.name for d in self.devices]}")

    def linked(self, i: int, j: int) -> bool:
        return i != j and self.bandwidth[i][j] > 0

    def link_time(self, i: int, j: int, nbytes: float) -> float:
        """Seconds to send ``nbytes`` from device ``i`` to ``j``: latency + bytes / bandwidth
        (``inf`` without a direct link, 0 to itself)."""
        if i == j:
            return 0.0
        bw = self.bandwidth[i][j]
        if bw <= 0:
            return _INF
        return self.latency[i][j] + nbytes / bw

    def components(self) -> list[list[int]]:
        """Connected groups of devices (links with bandwidth > 0), each ascending."""
        n = len(self.devices)
        seen = [False] * n
        out = []
        for s in range(n):
            if seen[s]:
                continue
            seen[s], stack, comp = True, [s], []
            while stack:
                i = stack.pop()
                comp.append(i)
                for j in range(n):
                    if not seen[j] and self.linked(i, j):
                        seen[j] = True
                        stack.append(j)
            out.append(sorted(comp))
        return out

    # ---- JSON ------------------------------------------------------------------------------
    @classmethod
    def from_dict(cls, d: dict) -> DeviceGraph:
        """Build from the JSON schema of the module docstring."""
        if not isinstance(d, dict):
            raise ConfigError("device graph", type(d).__name__, "a JSON object")
        allowed = {"devices", "bandwidth_mbps", "latency_ms", "sites", "site_links"}
        extra = sorted(set(d) - allowed)
        if extra:
            raise ConfigError("device graph key", extra[0], f"one of {sorted(allowed)}")
        raw = d.get("devices")
        if not isinstance(raw, list) or not raw:
            raise ConfigError("devices", raw, "a non-empty list of device objects")
        devs = [_device_from_dict(k, x) for k, x in enumerate(raw)]
        n = len(devs)
        has_matrix = "bandwidth_mbps" in d
        has_sites = "sites" in d or "site_links" in d
        if has_matrix == has_sites:
            raise ConfigError(
                "device graph links",
                sorted(set(d) & (allowed - {"devices"})),
                "either 'bandwidth_mbps' (with optional 'latency_ms') or 'sites' and 'site_links'",
            )
        if has_matrix:
            bw = cls._matrix("bandwidth_mbps", d["bandwidth_mbps"], devs)
            lat = cls._matrix("latency_ms", d.get("latency_ms", [[0.0] * n] * n), devs)
            bw_Bps = [[v * 1e6 / 8 for v in row] for row in bw]
            lat_s = [[v * 1e-3 for v in row] for row in lat]
            return cls(tuple(devs), tuple(map(tuple, bw_Bps)), tuple(map(tuple, lat_s)))
        if "latency_ms" in d:
            raise ConfigError(
                "latency_ms", "matrix", "absent with 'sites' (give latency_ms per site)"
            )
        return cls._from_sites(devs, d.get("sites", {}), d.get("site_links", []))

    @classmethod
    def _from_sites(cls, devs: list[Device], sites, site_links) -> DeviceGraph:
        if not isinstance(sites, dict):
            raise ConfigError("sites", sites, "an object mapping site name to its link")
        if not isinstance(site_links, list):
            raise ConfigError("site_links", site_links, "a list of {a, b, bandwidth_mbps, ...}")
        count: dict[str, int] = {}
        for dv in devs:
            if not dv.site:
                raise ConfigError(
                    f"device {dv.name!r} site", dv.site, "a site name when links are per site"
                )
            count[dv.site] = count.get(dv.site, 0) + 1
        links: dict[tuple[str, str], tuple[float, float]] = {}
        for s, spec in sites.items():
            links[(s, s)] = _link_spec(f"sites[{s!r}]", spec)
        for k, spec in enumerate(site_links):
            if not isinstance(spec, dict) or "a" not in spec or "b" not in spec:
                raise ConfigError(f"site_links[{k}]", spec, "an object with 'a' and 'b' sites")
            a, b = spec["a"], spec["b"]
            for s in (a, b):
                if s not in count:
                    raise ConfigError(f"site_links[{k}] site", s, f"one of {sorted(count)}")
            rest = {x: v for x, v in spec.items() if x not in ("a", "b")}
            links[(a, b)] = links[(b, a)] = _link_spec(f"site_links[{k}]", rest)
        for dv in devs:
            if count[dv.site] > 1 and (dv.site, dv.site) not in links:
                raise ConfigError(
                    f"device {dv.name!r} site",
                    dv.site,
                    f"a site that 'sites' defines (it has {count[dv.site]} devices)",
                )
        n = len(devs)
        bw = [[0.0] * n for _ in range(n)]
        lat = [[0.0] * n for _ in range(n)]
        for i, di in enumerate(devs):
            for j, dj in enumerate(devs):
                if i != j and (di.site, dj.site) in links:
                    bw[i][j], lat[i][j] = links[(di.site, dj.site)]
        return cls(tuple(devs), tuple(map(tuple, bw)), tuple(map(tuple, lat)))

    @classmethod
    def load(cls, path) -> DeviceGraph:
        """Read a device graph from a JSON file (:meth:`from_dict`)."""
        p = Path(path)
        try:
            if p.stat().st_size > MAX_FILE_BYTES:
                raise InputError(
                    f"device file {str(path)!r} is larger than the {MAX_FILE_BYTES} byte limit"
                )
            d = json.loads(p.read_bytes().decode("utf-8"))
        except FileNotFoundError:
            raise InputError(f"device file {str(path)!r} does not exist") from None
        except UnicodeDecodeError as e:
            raise InputError(f"device file {str(path)!r} is not UTF-8 text: {e}") from None
        except json.JSONDecodeError as e:
            raise InputError(f"device file {str(path)!r} is not valid JSON: {e}") from None
        except RecursionError:
            raise InputError(f"device file {str(path)!r} is nested too deeply") from None
        return cls.from_dict(d)

    def to_dict(self) -> dict:
        """The matrix form of the schema (``from_dict(g.to_dict())`` rebuilds ``g``)."""
        return {
            "devices": [
                {"name": d.name, "flops": d.flops, "memory_bytes": d.memory_bytes, "site": d.site}
                for d in self.devices
            ],
            "bandwidth_mbps": [[v * 8 / 1e6 for v in row] for row in self.bandwidth],
            "latency_ms": [[v * 1e3 for v in row] for row in self.latency],
        }


def _device_from_dict(k: int, x) -> Device:
    if not isinstance(x, dict) or not isinstance(x.get("name"), str) or not x["name"]:
        raise ConfigError(f"devices[{k}]", x, "an object with a non-empty 'name'")
    name = x["name"]
    allowed = {"name", "flops", "tflops", "memory_bytes", "memory_gb", "site"}
    extra = sorted(set(x) - allowed)
    if extra:
        raise ConfigError(f"device {name!r} key", extra[0], f"one of {sorted(allowed)}")

    def one_of(a: str, b: str, scale: float) -> float:
        if (a in x) == (b in x):
            raise ConfigError(
                f"device {name!r}", sorted(set(x) & {a, b}), f"exactly one of {a}, {b}"
            )
        v = x[a] if a in x else x[b]
        if not _real(v) or v <= 0:
            raise ConfigError(f"device {name!r} {a if a in x else b}", v, "a finite number > 0")
        return float(v) if a in x else float(v) * scale

    site = x.get("site", "")
    if not isinstance(site, str):
        raise ConfigError(f"device {name!r} site", site, "a string")
    return Device(
        name, one_of("flops", "tflops", 1e12), one_of("memory_bytes", "memory_gb", _GB), site
    )


def _link_spec(where: str, spec) -> tuple[float, float]:
    if not isinstance(spec, dict):
        raise ConfigError(where, spec, "an object with 'bandwidth_mbps' and optional 'latency_ms'")
    extra = sorted(set(spec) - {"bandwidth_mbps", "latency_ms"})
    if extra:
        raise ConfigError(f"{where} key", extra[0], "bandwidth_mbps or latency_ms")
    bw, lat = spec.get("bandwidth_mbps"), spec.get("latency_ms", 0.0)
    if not _real(bw) or bw <= 0:
        raise ConfigError(f"{where}.bandwidth_mbps", bw, "a finite number > 0")
    if not _real(lat) or lat < 0:
        raise ConfigError(f"{where}.latency_ms", lat, "a finite number >= 0")
    return float(bw) * 1e6 / 8, float(lat) * 1e-3


# ---- devices from the one cost model -----------------------------------------------------------
#: the PerfModel costs :func:`device_graph_from_perf` reads (``<dtype>``: the training dtype)
PERF_COSTS = ("gemm@{dtype}", "elementwise@{dtype}", "send")


def graph_seconds(ops: OpGraph, perf, dtype: str = "float32") -> float:
    """Forward time (s) of one micro-batch of ``ops`` on one profiled rank: each node with
    FLOPs priced by ``gemm@<dtype>`` (``alpha + beta * flops``: a kernel's start-up and its
    rate), each node without by ``elementwise@<dtype>`` of its output bytes."""
    perf.require(*(c.format(dtype=dtype) for c in PERF_COSTS[:2]), who="the geo planner")
    g, e = perf.cost(f"gemm@{dtype}"), perf.cost(f"elementwise@{dtype}")
    return 1e-3 * sum(g(nd.flops) if nd.flops > 0 else e(nd.out_bytes) for nd in ops.nodes)


def device_graph_from_perf(
    perf,
    ops: OpGraph,
    *,
    memory_bytes: float,
    dtype: str = "float32",
    names: list[str] | None = None,
) -> DeviceGraph:
    """The :class:`DeviceGraph` of the ranks a ``moeflow profile`` run measured (one device
    per rank, ``perf.meta["world_size"]``), every cost from the one PerfModel (``PERF_COSTS``;
    ConfigError naming a missing one, never measured here):

    * a device's ``flops`` is the rate at which a rank runs ``ops``: its FLOPs over
      :func:`graph_seconds` (the cost model's ``c_s = 3 F_s / flops`` then charges every
      stage the graph's mean per-FLOP time, start-ups included);
    * every pair of devices is linked by the profiled point-to-point ``send`` (bytes one rank
      sends): bandwidth ``1 / beta`` (1e15 bytes/s for a flat fit), latency ``alpha`` (the
      profile times one class of pair, across the declared nodes when there are two);
    * ``memory_bytes`` per device (the profile does not measure memory).
    """
    perf.require(*(c.format(dtype=dtype) for c in PERF_COSTS), who="the geo planner")
    n = int(perf.meta.get("world_size", 2))
    names = list(names) if names is not None else [f"rank{i}" for i in range(n)]
    if len(names) != n:
        raise ConfigError("names", names, f"{n} names, one per profiled rank")
    rate = ops.flops / graph_seconds(ops, perf, dtype)
    link = perf.cost("send")
    # a flat fit (no per-byte cost told apart from the noise, as on loopback) is a link whose
    # bytes cost nothing next to its latency: 1e15 bytes/s
    bw, lat = 1e3 / max(link.beta, 1e-12), max(0.0, link.alpha) * 1e-3
    devs = [Device(nm, rate, memory_bytes) for nm in names]
    return DeviceGraph(
        devices=tuple(devs),
        bandwidth=tuple(tuple(0.0 if i == j else bw for j in range(n)) for i in range(n)),
        latency=tuple(tuple(0.0 if i == j else lat for j in range(n)) for i in range(n)),
    )


# ---- operator graph -----------------------------------------------------------------------
@dataclass(frozen=True)
class OpNode:
    """One operator: forward FLOPs and output bytes for one micro-batch, parameter bytes, and the
    indices of the earlier nodes whose outputs it reads. ``act_bytes`` is what it keeps for the
    backward pass per micro-batch (``None``: its output)."""

    name: str
    flops: float
    out_bytes: float
    param_bytes: float = 0.0
    inputs: tuple[int, ...] = ()
    act_bytes: float | None = None

    @property
    def saved_bytes(self) -> float:
        return self.out_bytes if self.act_bytes is None else self.act_bytes


@dataclass(frozen=True)
class OpGraph:
    """Operator nodes in topological order (each node's inputs come before it)."""

    nodes: tuple[OpNode, ...]
    _cut: tuple[float, ...] = field(init=False, repr=False, compare=False)
    _last_use: tuple[int, ...] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        nodes = tuple(self.nodes)
        if not nodes:
            raise ConfigError("OpGraph.nodes", [], "at least one node")
        last = list(range(len(nodes)))  # last reader of each output (itself: nobody)
        for k, nd in enumerate(nodes):
            if not isinstance(nd, OpNode):
                raise ConfigError(f"OpGraph.nodes[{k}]", nd, "an OpNode")
            for f in ("flops", "out_bytes", "param_bytes", "saved_bytes"):
                v = getattr(nd, f)
                if not _real(v) or v < 0:
                    raise ConfigError(f"node {nd.name!r} {f}", v, "a finite number >= 0")
            ins = tuple(nd.inputs)
            for p in ins:
                if not is_int(p) or not 0 <= p < k:
                    raise ConfigError(
                        f"node {nd.name!r} (index {k}) input",
                        p,
                        f"an index of an earlier node, in [0, {k})",
                    )
                last[p] = max(last[p], k)
        n = len(nodes)
        diff = [0.0] * (n + 2)
        for p, q in enumerate(last):
            if q > p:  # output of p crosses every cut i with p < i <= q
                diff[p + 1] += nodes[p].out_bytes
                diff[q + 1] -= nodes[p].out_bytes
        cut, run = [], 0.0
        for i in range(n + 1):
            run += diff[i]
            cut.append(run if i > 0 else 0.0)
        object.__setattr__(self, "nodes", nodes)
        object.__setattr__(self, "_cut", tuple(cut))
        object.__setattr__(self, "_last_use", tuple(last))

    def __len__(self) -> int:
        return len(self.nodes)

    def _check_cut(self, i: int) -> None:
        if not is_int(i) or not 0 <= i <= len(self.nodes):
            raise ConfigError("cut index", i, f"an int in [0, {len(self.nodes)}]")

    def cut_tensors(self, i: int) -> list[int]:
        """Nodes ``< i`` whose outputs a node ``>= i`` reads (ascending): what crosses a cut
        placed before node ``i``."""
        self._check_cut(i)
        return [p for p in range(i) if self._last_use[p] >= i]

    def cut_bytes(self, i: int) -> float:
        """Bytes of the tensors crossing a cut before node ``i`` (each tensor once, however many
        later nodes read it)."""
        self._check_cut(i)
        return self._cut[i]

    @property
    def param_bytes(self) -> float:
        return sum(nd.param_bytes for nd in self.nodes)

    @property
    def flops(self) -> float:
        return sum(nd.flops for nd in self.nodes)


# ---- plan ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class GeoPlan:
    """A pipeline partition: stage ``s`` runs nodes ``[bounds[s], bounds[s+1])`` on device
    ``devices[s]``; ``densities[s]`` is the AdaTopK density of the link from stage ``s`` to
    ``s + 1`` (1.0: exact). Times are in seconds, for ``microbatches`` micro-batches per step."""

    bounds: tuple[int, ...]
    devices: tuple[int, ...]
    densities: tuple[float, ...]
    stage_times: tuple[float, ...]
    bottleneck_s: float
    step_time_s: float
    microbatches: int
    device_names: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        b = tuple(int(x) for x in self.bounds)
        s = len(b) - 1
        if s < 1 or b[0] != 0 or any(b[k] >= b[k + 1] for k in range(s)):
            raise ConfigError("GeoPlan.bounds", self.bounds, "strictly increasing, from 0")
        if len(self.devices) != s or len(set(self.devices)) != s:
            raise ConfigError("GeoPlan.devices", self.devices, f"{s} distinct device indices")
        if len(self.densities) != s - 1 or any(not 0 < x <= 1 for x in self.densities):
            raise ConfigError("GeoPlan.densities", self.densities, f"{s - 1} values in (0, 1]")
        if len(self.stage_times) != s:
            raise ConfigError("GeoPlan.stage_times", self.stage_times, f"{s} values")
        if self.device_names and len(self.device_names) != s:
            raise ConfigError("GeoPlan.device_names", self.device_names, f"{s} names or none")
        positive_int("GeoPlan.microbatches", self.microbatches)
        object.__setattr__(self, "bounds", b)
        for f in ("devices", "densities", "stage_times", "device_names"):
            object.__setattr__(self, f, tuple(getattr(self, f)))

    @property
    def num_stages(self) -> int:
        return len(self.devices)

    def to_dict(self) -> dict:
        return {
            "format": "moeflow.geo_plan/1",
            "bounds": list(self.bounds),
            "devices": list(self.devices),
            "device_names": list(self.device_names),
            "densities": list(self.densities),
            "stage_times": list(self.stage_times),
            "bottleneck_s": self.bottleneck_s,
            "step_time_s": self.step_time_s,
            "microbatches": self.microbatches,
        }

    @classmethod
    def from_dict(cls, d: dict) -> GeoPlan:
        if not isinstance(d, dict) or d.get("format") != "moeflow.geo_plan/1":
            raise InputError("not a moeflow geo plan (format 'moeflow.geo_plan/1' expected)")
        try:
            return cls(
                bounds=tuple(d["bounds"]),
                devices=tuple(d["devices"]),
                densities=tuple(float(x) for x in d["densities"]),
                stage_times=tuple(float(x) for x in d["stage_times"]),
                bottleneck_s=float(d["bottleneck_s"]),
                step_time_s=float(d["step_time_s"]),
                microbatches=d["microbatches"],
                device_names=tuple(d.get("device_names", ())),
            )
        except KeyError as e:
            raise InputError(f"geo plan lacks the field {e.args[0]!r}") from None


# ---- cost model ---------------------------------------------------------------------------
def wire_factors(density: float) -> tuple[float, float]:
    """Bytes on the wire per dense byte at ``density``, ``(forward, backward)``: the forward
    sends the top-k values and their positions, the backward the gradient at those positions
    only (values without positions); ``(1.0, 1.0)`` on an exact link (density 1)."""
    if density >= 1.0:
        return 1.0, 1.0
    return density * _FWD_RATE, density * _BWD_RATE


def wire_bytes(dense_bytes: float, density: float) -> tuple[float, float]:
    """Bytes a link sends for a cut of ``dense_bytes`` (fp32) at ``density``,
    ``(forward, backward)`` (:func:`wire_factors`)."""
    fwd, bwd = wire_factors(density)
    return dense_bytes * fwd, dense_bytes * bwd


def _transfer(nbytes, density, inv_fwd: float, inv_bwd: float):
    """Seconds of both transfers of a cut of ``nbytes`` (a float or an array of cuts) at
    ``density`` (a float or an array) without latency, given ``1 / bandwidth`` each way: the
    one expression :func:`evaluate` and the search share."""
    if np.ndim(density) == 0:
        fwd, bwd = wire_factors(density)
    else:
        fwd = np.where(density < 1.0, density * _FWD_RATE, 1.0)
        bwd = np.where(density < 1.0, density * _BWD_RATE, 1.0)
    return nbytes * (fwd * inv_fwd + bwd * inv_bwd)


def _solve_density(budget_s, dense_bytes, inv_fwd: float, inv_bwd: float, min_density: float):
    """The density (a float or an array, like ``budget_s`` and ``dense_bytes``) whose two
    transfers take ``budget_s``, clamped to ``[min_density, 1]``; 1.0 where the exact transfers
    fit the budget, or where the clamped density would not be faster than exact (forward values
    and positions outweigh what the backward saves)."""
    rate = _FWD_RATE * inv_fwd + _BWD_RATE * inv_bwd
    exact = inv_fwd + inv_bwd
    budget_s, dense_bytes = np.asarray(budget_s, float), np.asarray(dense_bytes, float)
    with np.errstate(divide="ignore", invalid="ignore"):
        d = np.clip(budget_s / (dense_bytes * rate), min_density, 1.0)
        slow = (dense_bytes > 0) & (dense_bytes * exact > budget_s)
        out = np.where(slow & (d * rate < exact), d, 1.0)
    return float(out) if np.ndim(out) == 0 else out


def adatopk_density(
    forward_Bps: float,
    backward_Bps: float,
    dense_bytes: float,
    budget_s: float,
    *,
    min_density: float = 0.01,
) -> float:
    """The top-k density at which a cut of ``dense_bytes`` goes forward at ``forward_Bps``
    (values and positions) and its gradient comes back at ``backward_Bps`` (values at the
    forward's positions) in ``budget_s`` together (:func:`wire_factors`), clamped to
    ``[min_density, 1]``; 1.0 when the exact transfers fit the budget, and when the clamped
    density would not be faster than the exact link."""
    for name, v in (("forward_Bps", forward_Bps), ("backward_Bps", backward_Bps)):
        if not _real(v) or v <= 0:
            raise ConfigError(name, v, "a finite number > 0")
    if not _real(dense_bytes) or dense_bytes < 0:
        raise ConfigError("dense_bytes", dense_bytes, "a finite number >= 0")
    if not _real(min_density) or not 0 < min_density <= 1:
        raise ConfigError("min_density", min_density, "a number in (0, 1]")
    return _solve_density(
        float(budget_s), float(dense_bytes), 1.0 / forward_Bps, 1.0 / backward_Bps, min_density
    )


def _pair_time(graph: DeviceGraph, u: int, v: int, nbytes: float, density: float) -> float:
    """Forward and backward transfer of a cut between consecutive stages on ``u`` and ``v``."""
    bu, bv = graph.bandwidth[u][v], graph.bandwidth[v][u]
    if bu <= 0 or bv <= 0:
        return _INF
    return (
        graph.latency[u][v]
        + graph.latency[v][u]
        + float(_transfer(nbytes, density, 1.0 / bu, 1.0 / bv))
    )


def _pair_density(
    graph: DeviceGraph, u: int, v: int, nbytes: float, budget: float, min_density: float
) -> float:
    """AdaTopK density of the link ``u <-> v`` for a budget on its two-way time."""
    bu, bv = graph.bandwidth[u][v], graph.bandwidth[v][u]
    if budget == _INF or bu <= 0 or bv <= 0 or nbytes <= 0:
        return 1.0
    lat = graph.latency[u][v] + graph.latency[v][u]
    return adatopk_density(bu, bv, nbytes, budget - lat, min_density=min_density)


class _Prefix:
    """Prefix sums of the op graph, so every range costs O(1) and the search and
    :func:`evaluate` do the same float arithmetic."""

    def __init__(self, ops: OpGraph, microbatches: int):
        self.n = len(ops.nodes)
        self.F = [0.0]
        self.P = [0.0]
        self.A = [0.0]
        for nd in ops.nodes:
            self.F.append(self.F[-1] + nd.flops)
            self.P.append(self.P[-1] + nd.param_bytes)
            self.A.append(self.A[-1] + nd.saved_bytes)
        self.M = microbatches
        self.cut = [ops.cut_bytes(i) for i in range(self.n + 1)]

    def compute(self, lo: int, hi: int, flops: float) -> float:
        return 3.0 * (self.F[hi] - self.F[lo]) / flops

    def memory(self, lo: int, hi: int) -> float:
        return 4.0 * (self.P[hi] - self.P[lo]) + self.M * (self.A[hi] - self.A[lo])


def _check_partition(ops: OpGraph, graph: DeviceGraph, bounds, devices) -> None:
    n, s = len(ops.nodes), len(devices)
    b = list(bounds)
    if len(b) != s + 1 or b[0] != 0 or b[-1] != n or any(b[k] >= b[k + 1] for k in range(s)):
        raise ConfigError("bounds", bounds, f"{s + 1} strictly increasing ints from 0 to {n}")
    if len(set(devices)) != s or any(not is_int(d) or not 0 <= d < len(graph) for d in devices):
        raise ConfigError("devices", devices, f"{s} distinct indices in [0, {len(graph)})")


def evaluate(
    ops: OpGraph,
    graph: DeviceGraph,
    *,
    bounds,
    devices,
    microbatches: int,
    densities=None,
    check_memory: bool = True,
) -> GeoPlan:
    """The :class:`GeoPlan` of a given partition under the cost model of the module docstring.

    Raises PlanError naming the device when a stage does not fit its memory (unless
    ``check_memory`` is False) and when consecutive stages' devices have no direct link.
    """
    m = positive_int("microbatches", microbatches)
    _check_partition(ops, graph, bounds, devices)
    s = len(devices)
    dens = tuple(1.0 for _ in range(s - 1)) if densities is None else tuple(densities)
    if len(dens) != s - 1:
        raise ConfigError("densities", densities, f"{s - 1} values, one per link")
    pre = _Prefix(ops, m)
    times = []
    for k in range(s):
        dv = graph.devices[devices[k]]
        lo, hi = bounds[k], bounds[k + 1]
        need = pre.memory(lo, hi)
        if check_memory and need > dv.memory_bytes:
            raise PlanError(
                f"device {dv.name!r} ({_gb(dv.memory_bytes)}) cannot hold stage {k} "
                f"(nodes {lo}..{hi - 1}): it needs {_gb(need)}"
            )
        t = pre.compute(lo, hi, dv.flops)
        if k < s - 1:
            link = _pair_time(graph, devices[k], devices[k + 1], pre.cut[hi], dens[k])
            if link == _INF:
                raise PlanError(
                    f"devices {dv.name!r} and {graph.devices[devices[k + 1]].name!r} hold "
                    f"stages {k} and {k + 1} but have no direct link"
                )
            t += link
        times.append(t)
    bott = max(times)
    return GeoPlan(
        bounds=tuple(bounds),
        devices=tuple(devices),
        densities=dens,
        stage_times=tuple(times),
        bottleneck_s=bott,
        step_time_s=sum(times) + (m - 1) * bott,
        microbatches=m,
        device_names=tuple(graph.devices[d].name for d in devices),
    )


def stage_costs(
    ops: OpGraph, graph: DeviceGraph, plan: GeoPlan
) -> list[tuple[float, float, float]]:
    """Per stage of ``plan``: (forward compute, forward transfer, backward transfer) seconds per
    micro-batch; the transfers are those of the link to the next stage (0 for the last stage).
    Backward compute is twice the forward."""
    pre = _Prefix(ops, plan.microbatches)
    out = []
    for k, d in enumerate(plan.devices):
        lo, hi = plan.bounds[k], plan.bounds[k + 1]
        fwd = (pre.F[hi] - pre.F[lo]) / graph.devices[d].flops
        if k + 1 < len(plan.devices):
            e = plan.devices[k + 1]
            x, y = wire_bytes(pre.cut[hi], plan.densities[k])
            out.append((fwd, graph.link_time(d, e, x), graph.link_time(e, d, y)))
        else:
            out.append((fwd, 0.0, 0.0))
    return out


# ---- clustering ---------------------------------------------------------------------------
def cluster_devices(graph: DeviceGraph, *, factor: float = CLUSTER_FACTOR) -> list[list[int]]:
    """OP-Fence-style bandwidth clusters (our derivation of the rule).

    Each device's scale is its fastest link (the slower direction of each pair counts). Two
    devices are joined when their link is within ``factor`` of the larger of their two scales,
    and clusters are the connected groups of joined devices (single linkage). A datacenter's
    fast fabric thus forms one cluster and a wide-area link between datacenters joins nothing,
    while a site whose own links are slow still clusters by itself. Clusters are returned by
    their first device, members ascending.
    """
    if not _real(factor) or factor < 1:
        raise ConfigError("factor", factor, "a number >= 1")
    n = len(graph)
    sym = [[min(graph.bandwidth[i][j], graph.bandwidth[j][i]) for j in range(n)] for i in range(n)]
    scale = [max((sym[i][j] for j in range(n) if j != i), default=0.0) for i in range(n)]
    parent = list(range(n))

    def find(x: int) -> int:
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    for i in range(n):
        for j in range(i + 1, n):
            if sym[i][j] > 0 and sym[i][j] * factor >= max(scale[i], scale[j]):
                parent[find(i)] = find(j)
    groups: dict[int, list[int]] = {}
    for i in range(n):
        groups.setdefault(find(i), []).append(i)
    return sorted(groups.values(), key=lambda g: g[0])


def _sym_bw(graph: DeviceGraph, u: int, v: int) -> float:
    return min(graph.bandwidth[u][v], graph.bandwidth[v][u])


def _cluster_orders(graph: DeviceGraph, groups: list[list[int]]) -> list[list[int]] | None:
    """``None`` for 'every order'; else greedy widest-next-link orders, one from each group."""
    if len(groups) <= CLUSTER_PERMUTATION_MAX:
        return None
    orders = []
    for start in range(len(groups)):
        order, left = [start], set(range(len(groups))) - {start}
        while left:
            cur = groups[order[-1]][0]
            nxt = max(sorted(left), key=lambda g: _sym_bw(graph, cur, groups[g][0]))
            order.append(nxt)
            left.remove(nxt)
        orders.append(order)
    return orders


def _cluster_of(graph: DeviceGraph) -> list[int]:
    out = [0] * len(graph)
    for ci, g in enumerate(cluster_devices(graph)):
        for d in g:
            out[d] = ci
    return out


def link_densities(
    ops: OpGraph,
    graph: DeviceGraph,
    *,
    bounds,
    devices,
    microbatches: int,
    min_density: float = 0.01,
) -> tuple[float, ...]:
    """The AdaTopK density of each link of a partition (module docstring): the budget is the
    slowest stage's compute time; a link between two bandwidth clusters whose exact two-way
    transfer exceeds it gets the density that meets it, every other link 1.0."""
    _check_partition(ops, graph, bounds, devices)
    pre = _Prefix(ops, positive_int("microbatches", microbatches))
    cluster = _cluster_of(graph)
    budget = max(
        pre.compute(bounds[k], bounds[k + 1], graph.devices[d].flops) for k, d in enumerate(devices)
    )
    out = []
    for k in range(len(devices) - 1):
        u, v = devices[k], devices[k + 1]
        b = budget if cluster[u] != cluster[v] else _INF
        out.append(_pair_density(graph, u, v, pre.cut[bounds[k + 1]], b, min_density))
    return tuple(out)


# ---- the search ---------------------------------------------------------------------------
class _Col:
    """DP column of one chain device: ``h[c, i]`` is the smallest sum of the stage times before
    the stage that starts at node ``i`` on ``dev`` after ``c`` earlier stages (one row when
    the number of stages is not bounded); ``src[c, i]`` is the column of the previous stage
    (-1: none, the plan starts here). ``table`` is the sparse table of
    ``h - 3 F / flops`` (range minima in O(1))."""

    __slots__ = ("dev", "h", "src", "table")

    def __init__(self, dev: int, h, src):
        self.dev, self.h, self.src, self.table = dev, h, src, None


class _Search:
    """The dynamic program of :func:`partition` over chains of devices (module docstring),
    vectorised over the node index with numpy."""

    def __init__(
        self,
        ops: OpGraph,
        graph: DeviceGraph,
        microbatches: int,
        groups: list[list[int]],
        orders: list[list[int]] | None,
        max_stages: int | None,
        min_density: float,
    ):
        self.g = graph
        self.pre = pre = _Prefix(ops, microbatches)
        self.n = n = pre.n
        self.M = microbatches
        self.groups = groups
        self.orders = orders
        self.max_stages = max_stages
        self.C = 1 if max_stages is None else max_stages
        self.min_density = min_density
        self.flops = [d.flops for d in graph.devices]
        self.F = np.asarray(pre.F, dtype=np.float64)
        self.cut = np.asarray(pre.cut, dtype=np.float64)
        self.budget = _INF
        self.cluster = _cluster_of(graph)
        self._links: dict[tuple[int, int], np.ndarray] = {}
        self._lo_mem: dict[float, np.ndarray] = {}
        # remaining compute on the fastest device: a lower bound on the rest of a plan's sum
        self.rest = 3.0 * (self.F[-1] - self.F) / max(self.flops)
        self.ts = np.arange(1, n, dtype=np.int64)  # where a next stage can start
        self.log2 = np.zeros(n + 2, dtype=np.int64)
        for k in range(2, n + 2):
            self.log2[k] = self.log2[k // 2] + 1
        self.K = int(self.log2[n + 1]) + 1
        # a lower bound on any plan's bottleneck: the dearest node on the fastest device
        self.min_bottleneck = max(
            3.0 * max(nd.flops for nd in ops.nodes) / max(self.flops),
            3.0 * pre.F[-1] / sum(self.flops),
        )

    def set_budget(self, budget: float) -> None:
        self.budget = budget
        self._links = {}

    def link(self, u: int, v: int) -> np.ndarray:
        """Two-way link times of every cut between stages on ``u`` and ``v`` at the budget
        (:func:`_pair_time` at :func:`_pair_density`, elementwise)."""
        key = (u, v)
        got = self._links.get(key)
        if got is None:
            g = self.g
            bu, bv = g.bandwidth[u][v], g.bandwidth[v][u]
            if bu <= 0 or bv <= 0:
                got = np.full(self.n + 1, _INF)
            else:
                lat = g.latency[u][v] + g.latency[v][u]
                inv_f, inv_b = 1.0 / bu, 1.0 / bv
                d = np.ones(self.n + 1)
                bud = self.budget if self.cluster[u] != self.cluster[v] else _INF
                if bud < _INF:
                    d = _solve_density(bud - lat, self.cut, inv_f, inv_b, self.min_density)
                got = lat + _transfer(self.cut, d, inv_f, inv_b)
            self._links[key] = got
        return got

    def lo_mem(self, u: int) -> np.ndarray:
        """``lo[t]``: the first node a stage on ``u`` ending before node ``t`` may start at
        within ``u``'s memory (``t``: none fits)."""
        mem = self.g.devices[u].memory_bytes
        got = self._lo_mem.get(mem)
        if got is None:
            pre, n = self.pre, self.n
            got = np.zeros(n + 1, dtype=np.int64)
            i0 = 0
            for t in range(1, n + 1):
                while i0 < t and pre.memory(i0, t) > mem:
                    i0 += 1
                got[t] = i0
            self._lo_mem[mem] = got
        return got

    def _lo(self, u: int, t: np.ndarray, lim: np.ndarray) -> np.ndarray:
        """First start of a stage on ``u`` ending before each ``t`` that fits memory and
        computes within ``lim`` (with a relative tolerance of 1e-12, so that a stage whose
        compute is a candidate budget or cap, rounded otherwise, is not lost)."""
        thr = self.F[t] - lim * (1 + 1e-12) * (self.flops[u] / 3.0)
        return np.maximum(self.lo_mem(u)[t], np.searchsorted(self.F, thr, "left"))

    def _table(self, col: _Col) -> np.ndarray:
        N = self.n + 1
        T = np.full((self.C, self.K, N), _INF)
        T[:, 0] = col.h - 3.0 * self.F / self.flops[col.dev]
        for k in range(1, self.K):
            w, m = 1 << (k - 1), N - (1 << k) + 1
            np.minimum(T[:, k - 1, :m], T[:, k - 1, w : w + m], out=T[:, k, :m])
        return T

    def _new(self, dev: int) -> _Col:
        N = self.n + 1
        return _Col(dev, np.full((self.C, N), _INF), np.full((self.C, N), -1, dtype=np.int64))

    def _feed(self, col: _Col, cid: int, out: _Col, cap: float) -> None:
        """Stages on ``col.dev`` ending before each node ``t``, then ``out.dev`` from ``t``."""
        u, v = col.dev, out.dev
        L = self.link(u, v)
        t = self.ts
        lim = np.minimum(self.budget, cap - L[t])
        lo = self._lo(u, t, lim)
        ok = lo < t
        if not ok.all():
            t, lo = t[ok], lo[ok]
            if not t.size:
                return
        hi = t - 1
        k = self.log2[hi - lo + 1]
        if col.table is None:
            col.table = self._table(col)
        T = col.table
        best = np.minimum(T[:, k, lo], T[:, k, hi - (1 << k) + 1])
        best += L[t] + 3.0 * self.F[t] / self.flops[u]
        if self.C > 1:
            tgt, src = out.h[1:], out.src[1:]
            best = best[:-1]
        else:
            tgt, src = out.h, out.src
        cur = tgt[:, t]
        better = best < cur
        if better.any():
            tgt[:, t] = np.where(better, best, cur)
            src[:, t] = np.where(better, cid, src[:, t])

    def _end(self, col: _Col, cap: float) -> tuple[float, int, int]:
        """The best sum of a plan whose last stage runs on ``col.dev``: (sum, row, start)."""
        n, u = self.n, col.dev
        lim = min(self.budget, cap)
        lo = int(self._lo(u, np.array([n]), np.array([lim]))[0])
        if lo >= n:
            return _INF, -1, -1
        vals = col.h[:, lo:n] + 3.0 * (self.F[n] - self.F[lo:n]) / self.flops[u]
        j = int(np.argmin(vals))
        c, i0 = divmod(j, n - lo)
        return float(vals[c, i0]), c, lo + i0

    def _prune(self, col: _Col, thr: float) -> bool:
        """Drop states that cannot lead to a plan whose bound is below ``thr``; is any left?"""
        h = col.h
        h[h + self.rest >= thr] = _INF
        return bool(np.isfinite(h).any())

    def run(self, cap: float, thr: float):
        """The smallest sum of stage times of a plan with every stage ``<= cap`` (and compute
        ``<=`` the budget), among those with ``sum + (M - 1) * lower bound < thr`` (states
        whose sum plus :attr:`rest` reaches ``thr`` are dropped); ``None`` when there is
        none, else (sum, bounds, devices) of the plan (the plan's own times:
        :meth:`times`)."""
        cols: list[_Col] = []
        best = [thr, None]

        def add(col: _Col) -> bool:
            if not self._prune(col, thr):
                return False
            cols.append(col)
            s, c, i0 = self._end(col, cap)
            if s < best[0]:
                best[0], best[1] = s, (len(cols) - 1, c, i0)
            return True

        def start(v: int) -> _Col:
            col = self._new(v)
            col.h[0, 0] = 0.0
            return col

        def chain(first: _Col, g: list[int]) -> list[int]:
            """Add ``first`` and the rest of group ``g`` after it; the ids added."""
            ids = []
            if not add(first):
                return ids
            ids.append(len(cols) - 1)
            for v in g[1:]:
                nxt = self._new(v)
                self._feed(cols[ids[-1]], ids[-1], nxt, cap)
                if not add(nxt):
                    break
                ids.append(len(cols) - 1)
            return ids

        groups, G = self.groups, len(self.groups)
        limit = G if self.max_stages is None else self.max_stages
        if self.orders is None:  # every order of the groups: subsets, by their last group
            by_mask: dict[int, list[int]] = {}
            for mask in range(1, 1 << G):
                if bin(mask).count("1") > limit:
                    continue
                ids_here: list[int] = []
                for gi in range(G):
                    bit = 1 << gi
                    if not mask & bit:
                        continue
                    rest = mask ^ bit
                    if rest == 0:
                        first = start(groups[gi][0])
                    else:
                        prev = by_mask.get(rest)
                        if not prev:
                            continue
                        first = self._new(groups[gi][0])
                        for cid in prev:
                            self._feed(cols[cid], cid, first, cap)
                    ids_here += chain(first, groups[gi])
                if ids_here:
                    by_mask[mask] = ids_here
        else:
            for order in self.orders:
                prev: list[int] = []
                for depth, gi in enumerate(order):
                    if depth >= limit:
                        break
                    if depth == 0:
                        first = start(groups[gi][0])
                    else:
                        first = self._new(groups[gi][0])
                        for cid in prev:
                            self._feed(cols[cid], cid, first, cap)
                    prev = chain(first, groups[gi])
                    if not prev:
                        break
        if best[1] is None:
            return None
        return best[0], *self._backtrack(cols, cap, *best[1])

    def _backtrack(self, cols: list[_Col], cap: float, cid: int, c: int, i0: int):
        bounds, devs = [self.n], []
        lim = min(self.budget, cap)
        while True:
            col = cols[cid]
            devs.append(col.dev)
            bounds.append(i0)
            prev = int(col.src[c, i0])
            if prev < 0:
                break
            pc = c - 1 if self.C > 1 else c
            p = cols[prev]
            u, t = p.dev, i0
            L = float(self.link(u, col.dev)[t])
            lo = int(self._lo(u, np.array([t]), np.array([min(lim, cap - L)]))[0])
            w = np.arange(lo, t)
            vals = p.h[pc, w] + (3.0 * (self.F[t] - self.F[w]) / self.flops[u] + L)
            i0 = int(w[int(np.argmin(vals))])
            cid, c = prev, pc
        return bounds[::-1], devs[::-1]

    def times(self, bounds, devs) -> list[float]:
        """Stage times of a plan at the current budget (the DP's links)."""
        out = []
        for k, d in enumerate(devs):
            t = self.pre.compute(bounds[k], bounds[k + 1], self.flops[d])
            if k + 1 < len(devs):
                t += float(self.link(d, devs[k + 1])[bounds[k + 1]])
            out.append(t)
        return out

    def solve(self, bound: float = _INF, floor: float = 0.0) -> tuple[list[int], list[int]] | None:
        """Bounds and devices of the plan with the shortest GPipe step ``sum t_s + (M - 1)
        max t_s`` at the current budget, if that step is below ``bound`` (None otherwise).

        The sum-DP (:meth:`run`) is exact for a cap on every stage; the step is minimised
        over caps by branch and bound on the bottleneck: a run capped just below the
        bottleneck ``m`` of the last plan found gives the best sum ``S`` among plans whose
        bottleneck is lower, and every such plan takes at least ``S + (M - 1) b`` for the
        lower bound ``b`` on bottlenecks, so the walk stops when that reaches the best step.
        Plans whose bottleneck is below ``floor`` may be missed (a caller that knows the plan
        it looks for has a bottleneck of at least ``floor`` prunes harder).
        """
        M1 = self.M - 1
        lo = max(self.min_bottleneck, floor)
        best_step, best = bound, None

        def top() -> float:
            # a better plan has S + (M - 1) m < best with S >= m and S >= rest[0]
            if best_step == _INF:
                return _INF
            top = best_step / self.M
            if M1 > 0:
                top = min(top, (best_step - float(self.rest[0])) / M1)
            return max(top, 0.0) * (1 + 1e-12)

        cap = top()
        while cap >= lo:
            got = self.run(cap, best_step * (1 - 1e-12) - M1 * lo)
            if got is None:
                break
            _, bounds, devs = got
            ts = self.times(bounds, devs)
            m = max(ts)
            step = sum(ts) + M1 * m
            if step < best_step:
                best_step, best = step, (bounds, devs)
            if M1 == 0 or m <= lo:
                break
            cap = min(m * (1 - 1e-9), top())
        return best


def _budget_values(pre: _Prefix, graph: DeviceGraph, lo: float, hi: float) -> list[float]:
    """Every stage compute time in ``[lo, hi]`` of a stage that fits its device, ascending."""
    vals = set()
    for d in graph.devices:
        for a in range(pre.n):
            for b in range(a + 1, pre.n + 1):
                if pre.memory(a, b) > d.memory_bytes:
                    break
                c = pre.compute(a, b, d.flops)
                if lo * (1 - 1e-12) <= c <= hi:
                    vals.add(c)
    return sorted(vals)


def _geometric_picks(vals: list[float], count: int) -> list[float]:
    """About ``count`` of the ascending ``vals``, on a geometric grid from the first to the last
    (each grid point snapped up to a value)."""
    if len(vals) <= count:
        return list(vals)
    lo, hi = max(vals[0], 1e-300), vals[-1]
    picks, k = [], 0
    for q in range(count):
        target = lo * (hi / lo) ** (q / (count - 1))
        while k < len(vals) - 1 and vals[k] < target:
            k += 1
        if not picks or picks[-1] != vals[k]:
            picks.append(vals[k])
    return picks


def partition(
    ops: OpGraph,
    graph: DeviceGraph,
    *,
    microbatches: int,
    adatopk: bool = False,
    min_density: float = 0.01,
    max_stages: int | None = None,
    exhaustive: bool | None = None,
) -> GeoPlan:
    """The pipeline partition with the shortest GPipe step ``sum t_s + (M - 1) max t_s``
    (search and AdaTopK budget in the module docstring).

    Raises PlanError naming the device when a device cannot hold even the smallest stage, and
    naming the devices' memory when no partition fits.
    """
    m = positive_int("microbatches", microbatches)
    if not _real(min_density) or not 0 < min_density <= 1:
        raise ConfigError("min_density", min_density, "a number in (0, 1]")
    max_stages = positive_int("max_stages", max_stages, allow_none=True)
    if max_stages is not None and max_stages >= min(len(graph), len(ops.nodes)):
        max_stages = None
    if exhaustive is None:
        exhaustive = len(graph) <= EXHAUSTIVE_MAX_DEVICES
    pre = _Prefix(ops, m)
    _check_memory(pre, ops, graph)
    dv = graph.devices
    if exhaustive:
        keys = [None]
    else:  # the fastest devices of a cluster first; the largest first when that fits nothing
        keys = [
            lambda i: (-dv[i].flops, -dv[i].memory_bytes, i),
            lambda i: (-dv[i].memory_bytes, -dv[i].flops, i),
        ]
    for key in keys:
        if key is None:
            groups, orders = [[i] for i in range(len(graph))], None
        else:
            groups = [sorted(g, key=key) for g in cluster_devices(graph)]
            orders = _cluster_orders(graph, groups)
        search = _Search(ops, graph, m, groups, orders, max_stages, min_density)
        got = search.solve()
        if got is not None:
            break
    if got is None:
        _raise_infeasible(pre, ops, graph)

    def consistent(bounds, devs) -> GeoPlan:
        dens = None
        if adatopk:
            dens = link_densities(
                ops, graph, bounds=bounds, devices=devs, microbatches=m, min_density=min_density
            )
        return evaluate(ops, graph, bounds=bounds, devices=devs, microbatches=m, densities=dens)

    best = consistent(*got)
    if adatopk:
        lo = 3.0 * pre.F[-1] / sum(d.flops for d in graph.devices)
        vals = _budget_values(pre, graph, lo, best.step_time_s / m)
        best_b = None

        def attempt(b: float, floor: float) -> None:
            """The best plan at budget ``b`` among those whose bottleneck is at least
            ``floor`` (a plan whose slowest compute is above ``floor`` has such a bottleneck)."""
            nonlocal best, best_b
            # c* <= T* / M: a step is at least M times its bottleneck, which is at least the
            # plan's slowest compute (its budget)
            if max(b, floor) * m > best.step_time_s:
                return
            search.set_budget(b)
            # the plan's own budget only makes it faster, so a run that cannot beat the best
            # step at budget b cannot give a better plan
            got = search.solve(bound=best.step_time_s, floor=floor)
            if got is not None:
                p = consistent(*got)
                if _better(p, best):
                    best, best_b = p, b

        if len(vals) <= ADATOPK_EXACT_MAX:
            for b in vals:  # the plan whose slowest compute is b has a bottleneck >= b
                attempt(b, b)
        else:  # a geometric grid, then a finer one between the best point's neighbours
            picks = _geometric_picks(vals, ADATOPK_BUDGETS)
            for k, b in enumerate(picks):
                attempt(b, picks[k - 1] if k else 0.0)
            if best_b is not None:
                k = picks.index(best_b)
                lo_b, hi_b = picks[max(0, k - 1)], picks[min(len(picks) - 1, k + 1)]
                inner = [v for v in vals if lo_b < v < hi_b and v != best_b]
                fine = _geometric_picks(inner, ADATOPK_BUDGETS)
                for j, b in enumerate(fine):
                    attempt(b, fine[j - 1] if j else lo_b)
    return best


def _better(a: GeoPlan, b: GeoPlan) -> bool:
    """A shorter GPipe step, with a relative tolerance for float ties."""
    return a.step_time_s < b.step_time_s * (1 - 1e-12)


def _check_memory(pre: _Prefix, ops: OpGraph, graph: DeviceGraph) -> None:
    need = [pre.memory(k, k + 1) for k in range(pre.n)]
    small = min(range(pre.n), key=lambda k: need[k])
    for d in graph.devices:
        if d.memory_bytes < need[small]:
            raise PlanError(
                f"device {d.name!r} ({_gb(d.memory_bytes)}) cannot hold any stage: the smallest "
                f"stage (node {ops.nodes[small].name!r}) needs {_gb(need[small])} for "
                f"{pre.M} micro-batches"
            )


def _raise_infeasible(pre: _Prefix, ops: OpGraph, graph: DeviceGraph):
    big = max(graph.devices, key=lambda d: d.memory_bytes)
    for k in range(pre.n):
        if pre.memory(k, k + 1) > big.memory_bytes:
            raise PlanError(
                f"node {ops.nodes[k].name!r} alone needs {_gb(pre.memory(k, k + 1))}, more than "
                f"the largest device {big.name!r} holds ({_gb(big.memory_bytes)})"
            )
    total = sum(d.memory_bytes for d in graph.devices)
    held = ", ".join(f"{d.name!r} {_gb(d.memory_bytes)}" for d in graph.devices[:8])
    more = "" if len(graph) <= 8 else f" and {len(graph) - 8} more"
    raise PlanError(
        f"no partition fits: the model needs {_gb(pre.memory(0, pre.n))} (weights, gradients, "
        f"Adam moments and {pre.M} micro-batches of activations) in contiguous stages; the "
        f"devices hold {_gb(total)} together ({held}{more})"
    )


# ---- baselines ----------------------------------------------------------------------------
def even_split(ops: OpGraph, graph: DeviceGraph, *, microbatches: int, devices=None) -> GeoPlan:
    """Baseline: equal numbers of nodes with parameters ("layers") per device, in the given
    device order (indices or names; default: the file's order), exact links. Nodes without
    parameters stay with the layer before them (the first stage takes any leading ones)."""
    devs = _device_list(graph, devices)
    layers = [k for k, nd in enumerate(ops.nodes) if nd.param_bytes > 0] or list(range(len(ops)))
    s = min(len(devs), len(layers))
    q, r = divmod(len(layers), s)
    bounds, k = [0], 0
    for st in range(s - 1):
        k += q + (st < r)
        bounds.append(layers[k])
    bounds.append(len(ops))
    return evaluate(ops, graph, bounds=bounds, devices=devs[:s], microbatches=microbatches)


@dataclass(frozen=True)
class DataParallelCosts:
    """Plain data parallelism: each of the ``N`` taking ``devices`` holds the model and runs
    ``microbatches / N`` of the micro-batches (forward and backward, ``compute_s`` per device,
    in the order of ``devices``), then a ring all-reduce of
    the gradients in ``2 (N - 1)`` steps; ``hop_s[k]`` is one step's transfer of ``1/N`` of the
    gradients from ``ring[k]`` to ``ring[k + 1]`` (cyclic)."""

    devices: tuple[int, ...]
    compute_s: tuple[float, ...]
    ring: tuple[int, ...]
    hop_s: tuple[float, ...]
    steps: int

    @property
    def step_time_s(self) -> float:
        return max(self.compute_s) + self.steps * max(self.hop_s, default=0.0)


def _widest_paths(graph: DeviceGraph) -> tuple[list[list[float]], list[list[float]]]:
    """Bandwidth and latency of the widest path between every pair (a ring hop between devices
    with no direct link is relayed); a direct link is kept unless a relay is wider."""
    n = len(graph)
    bw = [[graph.bandwidth[i][j] if i != j else _INF for j in range(n)] for i in range(n)]
    lat = [list(row) for row in graph.latency]
    for k in range(n):
        bk, lk = bw[k], lat[k]
        for i in range(n):
            bik = bw[i][k]
            if i == k or bik <= 0:
                continue
            bi, li = bw[i], lat[i]
            for j in range(n):
                if j == i or j == k:
                    continue
                w = bik if bik < bk[j] else bk[j]
                if w > bi[j]:
                    bi[j], li[j] = w, li[k] + lk[j]
    return bw, lat


def data_parallel_costs(
    ops: OpGraph, graph: DeviceGraph, *, microbatches: int, devices=None
) -> DataParallelCosts:
    """Costs of the plain data-parallel baseline (:class:`DataParallelCosts`) over ``devices``
    (indices or names; default every device).

    A device runs its share micro-batch by micro-batch, so it holds the weights, gradients and
    Adam moments and one micro-batch of activations (PlanError naming the device otherwise).
    The ring visits the bandwidth clusters one after another; their order is the one whose
    slowest hop is fastest (every order up to 8 clusters, else greedy widest-next-link)."""
    m = positive_int("microbatches", microbatches)
    devs = _device_list(graph, devices)
    pre = _Prefix(ops, 1)
    n = len(devs)
    need = pre.memory(0, pre.n)
    for i in devs:
        d = graph.devices[i]
        if need > d.memory_bytes:
            raise PlanError(
                f"device {d.name!r} ({_gb(d.memory_bytes)}) cannot hold the whole model for data "
                f"parallelism: it needs {_gb(need)}"
            )
    compute = tuple(3.0 * pre.F[-1] * (m / n) / graph.devices[i].flops for i in devs)
    if n == 1:
        return DataParallelCosts(tuple(devs), compute, tuple(devs), (), 0)
    chunk = ops.param_bytes / n
    bw, lat = _widest_paths(graph)
    taking = set(devs)
    groups = [g for g in ([i for i in c if i in taking] for c in cluster_devices(graph)) if g]

    def hops(ring: list[int]) -> list[float]:
        return [lat[a][b] + chunk / bw[a][b] for a, b in zip(ring, ring[1:] + ring[:1])]

    if len(groups) <= CLUSTER_PERMUTATION_MAX + 1:
        orders = ([0, *p] for p in itertools.permutations(range(1, len(groups))))
    else:
        orders = (o for o in _cluster_orders(graph, groups) or [])
    best = None
    for order in orders:
        ring = [d for gi in order for d in groups[gi]]
        h = hops(ring)
        if best is None or max(h) < max(best[1]):
            best = (ring, h)
    return DataParallelCosts(tuple(devs), compute, tuple(best[0]), tuple(best[1]), 2 * (n - 1))


def data_parallel_step_s(
    ops: OpGraph, graph: DeviceGraph, *, microbatches: int, devices=None
) -> float:
    """Baseline step time of plain data parallelism: the slowest device's share of the
    micro-batches, then a ring all-reduce of the gradients paced by the ring's slowest hop
    (:func:`data_parallel_costs`)."""
    return data_parallel_costs(ops, graph, microbatches=microbatches, devices=devices).step_time_s


def _device_list(graph: DeviceGraph, devices) -> list[int]:
    """Device indices from indices or names (default: all, in the graph's order)."""
    if devices is None:
        return list(range(len(graph)))
    devs = [graph.index(d) if isinstance(d, str) else d for d in devices]
    if (
        not devs
        or len(set(devs)) != len(devs)
        or any(not is_int(d) or not 0 <= d < len(graph) for d in devs)
    ):
        raise ConfigError(
            "devices", devices, f"distinct device indices in [0, {len(graph)}) or names"
        )
    return devs


# ---- GPT-2 -------------------------------------------------------------------------------
def gpt2_opgraph(
    *,
    layers: int,
    dim: int,
    seq_len: int,
    vocab: int,
    batch: int,
    bytes_per_value: int = 4,
    heads: int | None = None,
) -> OpGraph:
    """GPT-2's operator graph from its shapes (Radford et al. 2019), one micro-batch of ``batch``
    sequences of ``seq_len`` tokens.

    Nodes: ``embed`` (token and position tables), per layer ``h{l}.attn`` (pre-norm
    self-attention plus its residual add) and ``h{l}.mlp`` (pre-norm 4x MLP plus its residual
    add), each passing on the residual stream ``batch * seq_len * dim`` values, then ``head``
    (final norm and an untied LM head, whose output is the logits). FLOPs count the matmuls, two
    per multiply-add: attention ``8 b s d^2 + 4 b s^2 d``, MLP ``16 b s d^2``, head
    ``2 b s d V`` (norms, softmax and GELU left out). Activation memory per layer follows
    Korthikanti et al. (MLSys'23, section 4.1: ``s b d (34 + 5 a s / d)`` bytes at 16 bits,
    scaled to ``bytes_per_value``); ``heads`` defaults to ``dim // 64`` as in GPT-2.
    """
    for name, v in (
        ("layers", layers),
        ("dim", dim),
        ("seq_len", seq_len),
        ("vocab", vocab),
        ("batch", batch),
    ):
        positive_int(name, v)
    positive_int("bytes_per_value", bytes_per_value)
    a = positive_int("heads", heads if heads is not None else max(1, dim // 64))
    b, s, d, V, by = batch, seq_len, dim, vocab, bytes_per_value
    half = by / 2  # Korthikanti's counts are bytes at 2 bytes per value
    stream = b * s * d * by
    nodes = [OpNode("embed", b * s * d, stream, (V + s) * d * by, ())]
    for l in range(layers):
        prev = len(nodes) - 1
        nodes.append(
            OpNode(
                f"h{l}.attn",
                8 * b * s * d * d + 4 * b * s * s * d,
                stream,
                (4 * d * d + 6 * d) * by,
                (prev,),
                (13 * s * b * d + 5 * a * s * s * b) * half,
            )
        )
        nodes.append(
            OpNode(
                f"h{l}.mlp",
                16 * b * s * d * d,
                stream,
                (8 * d * d + 7 * d) * by,
                (prev + 1,),
                21 * s * b * d * half,
            )
        )
    nodes.append(
        OpNode(
            "head",
            2 * b * s * d * V,
            b * s * V * by,
            (2 * d + d * V) * by,
            (len(nodes) - 1,),
            (s * b * d + 2 * s * b * V) * by,
        )
    )
    return OpGraph(tuple(nodes))
