"""`distillkit pretrain bootleg` with its default recipe (pretrain-bootleg-tiny), timed: one JSON line.

    python benchmarks/pretrain.py [--out DIR] [--set key=value ...]

Checks issue 18's promise for the tiny recipe: it trains in at most 15 minutes on 2 CPU cores and its target
encoder (the teacher it exports) beats the same ViT at random init by at least 5 k-NN points on the held-out
split (the whole Fashion-MNIST test set, a 10,000-image bank). The online k-NN curve (the context encoder, a
1,000-image bank scored on 500 held-out images at every epoch's end) is printed with it.
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from pathlib import Path

import torch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=None, help="run folder (default: a temporary one)")
    parser.add_argument("--set", action="append", default=[], help="recipe override, e.g. train.images=60000")
    args = parser.parse_args()
    from distillkit import pretrain

    out = args.out or tempfile.mkdtemp(prefix="pretrain-bench-")
    start = time.perf_counter()
    result = pretrain(out=out, overwrite=True, set=args.set, quiet=True)
    wall = time.perf_counter() - start
    m = result.metrics
    records = [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]
    row = {
        "wall_s": round(wall, 1),
        "timings_s": {k: round(v, 1) for k, v in result.timings.items()},
        "steps": result.steps,
        "images_seen": result.images_seen,
        "data": result.data_source,
        **{
            f"{name}_{metric}": round(m[name][metric], 4)
            for name in ("target_encoder", "encoder", "random_init")
            for metric in ("knn_top1", "probe_top1")
        },
        "knn_points_over_random_init": round(100 * (m["target_encoder"]["knn_top1"] - m["random_init"]["knn_top1"]), 2),
        "probe_points_over_random_init": round(
            100 * (m["target_encoder"]["probe_top1"] - m["random_init"]["probe_top1"]), 2
        ),
        "params": m["target_encoder"]["params"],
        "online_knn_curve": [r["online_knn_top1"] for r in records if "online_knn_top1" in r],
        "online_random_init": next(
            (r["student_random_init_knn_top1"] for r in records if r.get("online_reference")), None
        ),
        "loss_curve": [round(r["loss"], 4) for r in records if "epoch_end" in r],
        "machine": f"{platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}",
    }
    print(json.dumps(row))


if __name__ == "__main__":
    main()
