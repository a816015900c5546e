"""AdaTopK's convergence on the pipeline itself: the 4-stage even split of the demo model
(dim 128, 4 layers; bounds [0, 18, 37, 54, 76]), the mid-model link 1 sparsified, 300 steps,
against the 1-process exact curve (4 local gloo ranks).

    python benchmarks/geo_adatopk_pipeline.py [--densities 0.25,0.1] [--steps 300]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from geo_diloco import MICROBATCHES, MODEL  # noqa: E402

BOUNDS = (0, 18, 37, 54, 76)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--densities", default="0.25,0.1")
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--json")
    args = ap.parse_args(argv)
    from moeflow.geo import pipeline as geo

    base = dict(MODEL, microbatches=MICROBATCHES, steps=args.steps, timeout_s=1800.0)
    exact = geo.reference_losses(geo.GeoJob(**base))
    out = {"bounds": BOUNDS, "exact": exact}
    e = statistics.mean(exact[-20:])
    for d in (float(x) for x in args.densities.split(",")):
        job = geo.GeoJob(**base, bounds=BOUNDS, densities=(1.0, d, 1.0))
        r = geo.train(job, progress=False)
        out[str(d)] = {"losses": r.losses, "wire_bytes": r.wire_bytes}
        s = statistics.mean(r.losses[-20:])
        mb = [round(w / 1e6, 1) for w in r.wire_bytes]
        print(
            f"link 1 at {d}: last-20 mean exact {e:.4f}, AdaTopK {s:.4f} ({s / e - 1:+.2%}); "
            f"MB on the links {mb}",
            flush=True,
        )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f)
    return 0


if __name__ == "__main__":
    sys.exit(main())
