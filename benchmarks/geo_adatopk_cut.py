"""AdaTopK at one cut of the demo model, in one process: which part of the codec costs loss.

The training module (``geo.pipeline.build_module``) is traced and split at one cut into two
stages that run in this process; every floating tensor crossing the cut goes through a
codec forward (activations) and backward (their gradients), as on a pipeline link, and the
loss curve is compared with the exact one. The demo model of ``benchmarks/geo_diloco.py``
(dim 128, 4 layers, 4 micro-batches of 4), its data and AdamW.

    python benchmarks/geo_adatopk_cut.py --steps 300 --cut 37 --density 0.25 [variants...]

Variants (``act``: the forward's top-k of the activations; ``grad``: a top-k of their
gradients on the way back, with error feedback unless ``noef``):

* ``exact``: no codec.
* ``baseline``: act top-k, the receiver's dense gradient handed to every entry (straight
  through), then a grad top-k with error feedback (the pipeline before the fix).
* ``act``: act top-k straight through, exact gradients; ``grad``: exact activations, grad
  top-k only.
* ``act_mask``: act top-k and its exact gradient (zero where nothing was sent): the
  pipeline now, which sends the gradient at the forward's positions only.
* ``act_rescale``: the kept values scaled to the dense tensor's norm (straight through).
* ``act_pertoken``: top-k per token (last dimension) instead of over the whole tensor.
* ``act_center``: top-k of the deviation from the per-channel mean, the means sent exactly.
* ``both_mask``: ``act_mask`` plus a grad top-k with error feedback on top.
* ``both_noef``: ``baseline`` without the gradient's error feedback.
* ``both_dgc``: ``baseline`` with DGC's momentum correction and factor masking on the
  gradient stream (Lin et al., "Deep Gradient Compression", ICLR 2018, Alg. 1, mu 0.9).

``--warmup W``: the density falls exponentially from 1 to ``--density`` over the first W
steps (DGC's warm-up, sec. 3.3).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402
from geo_diloco import MICROBATCHES, MODEL  # noqa: E402


def topk_mask(x: torch.Tensor, k: int) -> torch.Tensor:
    flat = x.reshape(-1)
    m = torch.zeros_like(flat, dtype=torch.bool)
    m[flat.abs().topk(k, sorted=False).indices] = True
    return m.view_as(x)


class _STE(torch.autograd.Function):
    """forward: ``y``; backward: the gradient of ``y`` handed on unchanged (straight through,
    as the pipeline does: the sender's dense activation gets the receiver's gradient)."""

    @staticmethod
    def forward(ctx, x, y):
        return y

    @staticmethod
    def backward(ctx, g):
        return g, None


class Link:
    """One cut tensor's link: ``fwd(x, step, density)`` -> what the receiver uses (graph
    connected to ``x``); the gradient of that goes back through ``bwd``."""

    def __init__(self, variant: str):
        self.v = variant
        self.residual = None  # gradient error feedback (Stich et al. 2018)
        self.u = None  # DGC momentum (Lin et al., ICLR 2018)

    def fwd(self, x: torch.Tensor, d: float) -> torch.Tensor:
        v = self.v
        if v == "exact" or "act" not in v and "both" not in v and v != "baseline":
            y = x
        else:
            k = max(1, int(round(d * x.numel())))
            if "pertoken" in v:
                kk = max(1, int(round(d * x.shape[-1])))
                idx = x.abs().topk(kk, dim=-1).indices
                m = torch.zeros_like(x, dtype=torch.bool).scatter_(-1, idx, True)
            elif "center" in v:
                # top-k of the deviation from the per-channel mean over the tokens; the means
                # go exactly (dim floats)
                mu = x.detach().mean(dim=tuple(range(x.dim() - 1)), keepdim=True)
                m = topk_mask(x.detach() - mu, k)
                y = torch.where(m, x.detach(), mu.expand_as(x))
                return _STE.apply(x, y) if "mask" not in v else torch.where(m, x, mu)
            else:
                m = topk_mask(x.detach(), k)
            if "mask" in v:  # the true gradient of top-k: only kept entries get one
                y = x * m
            else:
                y = x.detach() * m
                if "rescale" in v:
                    y = y * (x.detach().norm() / y.norm().clamp_min(1e-12))
                y = _STE.apply(x, y)
        if x.numel() > 1 and ("grad" in self.v or "both" in self.v or self.v == "baseline"):
            y = _GradCodec.apply(y, self, d)
        return y


class _GradCodec(torch.autograd.Function):
    @staticmethod
    def forward(ctx, y, link, d):
        ctx.link, ctx.d = link, d
        return y.view_as(y)

    @staticmethod
    def backward(ctx, g):
        link, d, v = ctx.link, ctx.d, ctx.link.v
        k = max(1, int(round(d * g.numel())))
        acc = g
        if "dgc" in v:  # momentum correction + factor masking (Lin et al. 2018, Alg. 1)
            link.u = g.clone() if link.u is None else 0.9 * link.u + g
            acc = link.u
        if "noef" not in v and link.residual is not None:
            acc = acc + link.residual
        m = topk_mask(acc, k)
        sent = acc * m
        if "noef" not in v:
            link.residual = acc - sent
        if "dgc" in v:
            link.u = link.u * ~m
        return sent, None, None


def run(variant: str, cut: int, density: float, steps: int, warmup: int, seed: int = 0):
    from moeflow.geo import pipeline as geo

    job = geo.GeoJob(**MODEL, microbatches=MICROBATCHES, steps=steps, seed=seed)
    module, traced = geo.trace_job(job)
    n = len(traced.ops.nodes)
    st0, st1 = traced.split((0, cut, n))
    params = list(st0.parameters()) + list(st1.parameters())
    opt = torch.optim.AdamW(params, lr=job.lr)
    batches = geo.Batches(job)
    links = {}
    losses = []
    for step in range(steps):
        d = density
        if warmup and step < warmup:  # density warm-up, exponential from 1 (DGC, sec. 3.3)
            d = density ** ((step + 1) / warmup)
        total = 0.0
        for idx, tgt in batches(step):
            given = dict(zip(traced.input_names, (idx, tgt), strict=True))
            out = st0({nm: given[nm] for nm in st0.input_names})
            ins = {}
            for name, t in out.items():
                if t.is_floating_point() and t.numel() > 1:
                    link = links.setdefault(name, Link(variant))
                    ins[name] = link.fwd(t, d)
                else:
                    ins[name] = t
            both = {**given, **ins}
            loss = st1({nm: both[nm] for nm in st1.input_names})["output"] / job.microbatches
            loss.backward()
            total += loss.item()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(total)
    return losses


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("variants", nargs="*", default=["exact", "baseline"])
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--cut", type=int, default=37)
    ap.add_argument("--density", type=float, default=0.25)
    ap.add_argument("--warmup", type=int, default=0)
    ap.add_argument("--json")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    res = {}
    for v in args.variants:
        t = time.perf_counter()
        losses = run(v, args.cut, args.density, args.steps, args.warmup)
        res[v] = losses
        end = statistics.mean(losses[-20:])
        ref = statistics.mean(res["exact"][-20:]) if "exact" in res else float("nan")
        print(
            f"{v:24s} cut {args.cut} d {args.density} warmup {args.warmup}: last-20 mean "
            f"{end:.4f} ({end / ref - 1:+.2%} vs exact)  [{time.perf_counter() - t:.0f} s]",
            flush=True,
        )
    if args.json:
        with open(args.json, "w") as f:
            args_ = {k: v for k, v in vars(args).items() if k != "json"}  # the output path
            json.dump({"args": args_, "losses": res}, f)
    return 0


if __name__ == "__main__":
    sys.exit(main())
