"""The default `distillkit compress` run, timed: prints one JSON line of metrics and timings.

    python benchmarks/default_run.py [--out DIR] [extra compress options as --set items...]

Use it to check the spine's promise: the default run finishes in under 10 minutes on 2 CPU cores
and the distilled student beats the same student at random init.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time

import torch

import distillkit


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=None, help="run folder (default: a temporary folder)")
    parser.add_argument("--set", action="append", default=[], help="recipe override, e.g. train.epochs=1")
    args = parser.parse_args()
    out = args.out or tempfile.mkdtemp(prefix="distillkit-default-")
    start = time.perf_counter()
    result = distillkit.compress(out=out, overwrite=True, set=args.set)
    wall = time.perf_counter() - start
    m = result.metrics
    record = {
        "benchmark": "default_run",
        "wall_s": round(wall, 1),
        "timings_s": {k: round(v, 1) for k, v in result.timings.items()},
        "steps": result.steps,
        "data": result.data_source,
        **{f"{name}_{metric}": round(m[name][metric], 4)
           for name in ("teacher", "student", "student_random_init")
           for metric in ("knn_top1", "probe_top1") if metric in m.get(name, {})},
        "student_params": m["student"]["params"],
        "student_latency_ms": m["student"]["latency_ms"],
        "machine": {"cpus": os.cpu_count(), "torch": torch.__version__, "threads": torch.get_num_threads(),
                    "platform": platform.platform()},
        "overrides": args.set,
    }
    print(json.dumps(record))


if __name__ == "__main__":
    main()
