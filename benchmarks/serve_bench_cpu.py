"""Measured naive DEP vs PPPipe vs FinDEP on this host's loopback (issue 15), two workloads.

    python benchmarks/serve_bench_cpu.py [--repeat 3] [--out benchmarks/results]

AG = 1 and EG = 1 gloo ranks with one thread each, so on a 2-core machine the two groups run
in parallel. Two fixed request sets over the demo MoE model (4 layers, hidden 256, 8 experts
top-2, one shared expert):

* ``prefill-heavy``: 16 requests, prompts 128-256 tokens, 2-4 output tokens;
* ``decode-heavy``: 32 requests, prompts 16-48 tokens, 32-64 output tokens.

Each schedule runs ``--repeat`` times, interleaved with the others, and keeps its best
output throughput (``moeflow serve-bench``). Writes ``serve_bench_cpu_<host>_<date>.md``
and ``.json`` under ``--out``.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import io
import json
import os
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import cpu_name  # noqa: E402

from moeflow.runtime.serve_bench import add_serve_bench_arguments, run_serve_bench  # noqa: E402

WORKLOADS = {
    "prefill-heavy": ["--requests", "16", "--prompt-len", "128:256", "--output-len", "2:4"],
    "decode-heavy": ["--requests", "32", "--prompt-len", "16:48", "--output-len", "32:64"],
}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--out", default="benchmarks/results")
    ap.add_argument("--host", default=f"{os.cpu_count()}cpu-x86")
    args = ap.parse_args(argv)
    date = datetime.date.today().isoformat()
    lines = [f"# serve-bench on loopback ({date}, {args.host})", "",
             f"CPU: {cpu_name()}; AG = 1, EG = 1 gloo ranks, one thread each; best of "
             f"{args.repeat} interleaved runs per schedule; demo model (4 layers, hidden 256, "
             "8 experts top-2, 1 shared expert, fp32).", "",
             "`python benchmarks/serve_bench_cpu.py` (each workload is one `moeflow "
             "serve-bench` run; flags below).", ""]
    records = {}
    for name, flags in WORKLOADS.items():
        with tempfile.TemporaryDirectory() as tmp:
            rec_path = Path(tmp) / "rec.json"
            sb = add_serve_bench_arguments(argparse.ArgumentParser())
            sb_args = sb.parse_args(flags + ["--repeat", str(args.repeat), "--json",
                                             str(rec_path)])
            buf = io.StringIO()
            with contextlib.redirect_stdout(buf):
                run_serve_bench(sb_args)
            out = buf.getvalue()
            print(out, end="")
            records[name] = json.loads(rec_path.read_text())
        lines += [f"## {name}", "", f"flags: `{' '.join(flags)} --repeat {args.repeat}`", "",
                  *[ln for ln in out.splitlines() if ln.startswith(("|", "serve-bench:"))], ""]
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = f"serve_bench_cpu_{args.host}_{date}"
    (out_dir / f"{stem}.md").write_text("\n".join(lines) + "\n")
    (out_dir / f"{stem}.json").write_text(json.dumps(records, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
