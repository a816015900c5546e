"""PerfModel presets for the clusters in :mod:`moeflow.clusters`.

Every cost carries ``source``: ``published`` (a paper's fit), ``measured`` (derived from a figure
measured on real hardware; the measurement is stated where it is used), ``derived`` (computed
from datasheet rates in :mod:`moeflow.clusters`) or ``assumed`` (a latency we had to pick; the
reason is in ``note``).

Bandwidth-to-beta conversions (``n`` = per-rank bytes, ``p`` ranks in the group, ``bw`` per-GPU
per-direction bandwidth in bytes/s, result in ms/byte):
  * a2a:   ``(p-1)/p / bw``  (the local share never leaves the GPU)
  * ag/rs: ``(p-1)/p / bw``  (ring)
  * ar:    ``2(p-1)/p / bw`` (ring reduce-scatter + all-gather)
"""

from __future__ import annotations

from moeflow.clusters import cluster_preset
from moeflow.errors import ConfigError
from moeflow.perf.cost import LinearCost, PerfModel


def _beta_ms_per_byte(bw_GBps: float, factor: float) -> float:
    return factor / (bw_GBps * 1e9) * 1e3


def testbed_a() -> PerfModel:
    """FSMoE testbed A (6 x 8 RTX A6000, NVLink, 200 Gb/s IB): the published fits.

    FSMoE (ASPLOS'25) publishes alpha-beta fits (ms, bytes; FLOPs for the GEMM) of gemm, a2a,
    ag, rs and ar on this testbed, with R^2 >= 0.997 (GEMM) and >= 0.9999 (NCCL collectives).
    The published a2a is the layer's
    expert-parallel a2a across nodes, so it also serves as ``a2a@inter``. ``a2a@intra`` is not
    published; it is derived from the NVLink datasheet rate (8 ranks).

    Caveat kept as published: ag's beta (2.32e-6 ms/B, about 0.43 GB/s) is ten times rs's
    (2.34e-7); we do not "correct" a published figure.
    """
    pub = "FSMoE ASPLOS'25 published fit, testbed A"
    c = cluster_preset("fsmoe-testbed-a")
    intra = c.link("intra")
    p = c.gpus_per_node
    costs = {
        "gemm": LinearCost(4.26e-2, 2.29e-11, source="published", note=pub + "; n in FLOPs"),
        "a2a": LinearCost(2.87e-1, 2.21e-7, source="published", note=pub),
        "a2a@inter": LinearCost(2.87e-1, 2.21e-7, source="published", note=pub),
        "ag": LinearCost(3.37e-1, 2.32e-6, source="published", note=pub),
        "rs": LinearCost(3.95e-1, 2.34e-7, source="published", note=pub),
        "ar": LinearCost(5.11e-1, 4.95e-6, source="published", note=pub),
        "a2a@intra": LinearCost(
            intra.latency_us * 1e-3,
            _beta_ms_per_byte(intra.bandwidth_GBps, (p - 1) / p),
            source="derived",
            note=f"NVLink {intra.bandwidth_GBps} GB/s per direction, p={p}",
        ),
    }
    return PerfModel(
        name="fsmoe-testbed-a",
        costs=costs,
        bytes_per_element=2,
        notes="published fits of FSMoE testbed A; a2a@intra derived",
        meta={"cluster": c.name},
    )


def testbed_b() -> PerfModel:
    """FSMoE testbed B (8 x 4 RTX 2080Ti, PCIe 3.0, 100 Gb/s): **derived**, not published.

    FSMoE does not publish testbed B's fits, so each beta is testbed A's published beta scaled by
    the ratio of the hardware rate that bounds it; alphas are kept from testbed A (both testbeds
    use NCCL over similar NICs; no better figure is available):
      * gemm: A6000 154.8 / 2080Ti 53.8 dense fp16-with-fp32-accumulate TFLOPS (x2.88);
      * ag, rs, a2a@intra: NVLink bridge 56.25 / PCIe 3.0 x16 15.75 GB/s per direction (x3.57);
      * a2a (inter), ar: per-GPU network share is 25/8 = 3.125 GB/s on A and 12.5/4 = 3.125 GB/s
        on B, so the beta is unchanged.
    """
    a = testbed_a()
    ca, cb = cluster_preset("fsmoe-testbed-a"), cluster_preset("fsmoe-testbed-b")
    gemm_x = ca.gpu_tflops / cb.gpu_tflops
    intra_x = ca.link("intra").bandwidth_GBps / cb.link("intra").bandwidth_GBps
    inter_x = ca.link("inter").bandwidth_GBps / cb.link("inter").bandwidth_GBps
    scale = {
        "gemm": gemm_x,
        "ag": intra_x,
        "rs": intra_x,
        "a2a@intra": intra_x,
        "a2a": inter_x,
        "a2a@inter": inter_x,
        "ar": inter_x,
    }
    costs = {}
    for k, ca_cost in a.costs.items():
        costs[k] = LinearCost(
            ca_cost.alpha,
            ca_cost.beta * scale[k],
            source="derived",
            note=f"testbed A {k} beta x {scale[k]:.3f} (hardware rate ratio); "
            "alpha kept from testbed A",
        )
    return PerfModel(
        name="fsmoe-testbed-b",
        costs=costs,
        bytes_per_element=2,
        notes="derived from testbed A's published fits and datasheet rate ratios",
        meta={"cluster": cb.name},
    )


def h200_8x_ib(nodes: int | None = None) -> PerfModel:
    """8 x H200 SXM per node, NVLink 4 inside, one 400 Gb/s NDR NIC per GPU between nodes.

    * gemm beta: **measured** - 578 TFLOP/s: the SwiGLU experts of a Mixtral-8x7B layer (bf16)
      through ``torch._grouped_mm`` at T=8192 tokens on one H200 SXM (measured 2026-11-28).
      The dense bf16 cuBLAS GEMM peak measured in the same session was 709 TFLOP/s; MoE expert
      GEMMs are what planners cost, so the grouped rate is used.
    * gemm alpha: **assumed** 10 us kernel launch + tail (no small-GEMM latency was measured).
    * a2a@intra, ag, rs: **derived** from NVLink 4 (450 GB/s per direction), 8 ranks.
    * a2a / a2a@inter: **derived** from 50 GB/s per GPU NDR; with ``q`` nodes the share
      ``(q-1)/q`` of an EP a2a crosses nodes.
    * ar: **derived**, ring over all GPUs, bounded by the NIC.
    * alphas of collectives: **assumed** (NCCL start-up latencies of that order), see notes.
    """
    c = cluster_preset("h200-8x-ib")
    q = c.nodes if nodes is None else nodes
    p = c.gpus_per_node
    intra, inter = c.link("intra"), c.link("inter")
    world = q * p
    inter_frac = (q - 1) / q if q > 1 else (p - 1) / p
    inter_bw = inter.bandwidth_GBps if q > 1 else intra.bandwidth_GBps
    costs = {
        "gemm": LinearCost(
            1.0e-2,
            1e3 / 578e12,
            source="measured",
            note="beta from 578 TFLOP/s measured for grouped_mm SwiGLU experts "
            "(Mixtral-8x7B, T=8192, one H200); alpha assumed 10 us",
        ),
        "a2a@intra": LinearCost(
            0.02,
            _beta_ms_per_byte(intra.bandwidth_GBps, (p - 1) / p),
            source="derived",
            note="NVLink 4 450 GB/s; alpha assumed 20 us",
        ),
        "ag": LinearCost(
            0.02,
            _beta_ms_per_byte(intra.bandwidth_GBps, (p - 1) / p),
            source="derived",
            note="ring over NVLink 4; alpha assumed 20 us",
        ),
        "rs": LinearCost(
            0.02,
            _beta_ms_per_byte(intra.bandwidth_GBps, (p - 1) / p),
            source="derived",
            note="ring over NVLink 4; alpha assumed 20 us",
        ),
        "a2a": LinearCost(
            0.03,
            _beta_ms_per_byte(inter_bw, inter_frac),
            source="derived",
            note=f"NDR 50 GB/s per GPU, {q} nodes; alpha assumed 30 us",
        ),
        "a2a@inter": LinearCost(
            0.03,
            _beta_ms_per_byte(inter_bw, inter_frac),
            source="derived",
            note=f"NDR 50 GB/s per GPU, {q} nodes; alpha assumed 30 us",
        ),
        "ar": LinearCost(
            0.05,
            _beta_ms_per_byte(inter_bw, 2 * (world - 1) / world),
            source="derived",
            note=f"ring over {world} GPUs; alpha assumed 50 us",
        ),
    }
    return PerfModel(
        name="h200-8x-ib",
        costs=costs,
        bytes_per_element=2,
        notes="gemm measured (grouped_mm on one H200); links derived from datasheets; "
        "latencies assumed",
        meta={"cluster": c.name, "nodes": q},
    )


_BUILDERS = {"fsmoe-testbed-a": testbed_a, "fsmoe-testbed-b": testbed_b, "h200-8x-ib": h200_8x_ib}


def perf_preset_names() -> list[str]:
    return sorted(_BUILDERS)


def perf_preset(name: str) -> PerfModel:
    try:
        return _BUILDERS[name]()
    except KeyError:
        raise ConfigError("perf preset", name, f"one of {perf_preset_names()}") from None
