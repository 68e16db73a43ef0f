"""What the teacher-output cache buys: prints one JSON line.

    python benchmarks/cache_speed.py [--limit 10000] [--batch 128] [--strategies feature seed]
                                     [--render shared per_network]

EfficientNet-Lite0 (64 px) -> MobileNetV3-Small (32 px), Fashion-MNIST (`--limit` training images),
one epoch per run, evaluation off, the default float16 cache with `data.view_slots` 4, for each strategy
(`feature`: Linear projection + cosine to the standardised embedding, the workload of
shared/docs/benchmarking.md; `seed`: an MLP head + similarities to a 4096-entry queue):

  uncached   the teacher recomputed every step (no cache)
  fill       the first epoch with the cache: the teacher runs and its outputs are written
  reuse      another student's epoch on the same teacher, views and data: every teacher output is read
  alone      the student trained alone, no teacher (benchmarks/throughput.py's bare loop, same batch,
             the same views and the strategy's own head on the student, a loss that reads no teacher)

Reported: images/s of each, reuse / alone (target >= 0.9), reuse / uncached (target >= 3), the cache's size
per image and view, and the break-even number of epochs of one run (fill K epochs, then read).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import subprocess
import sys
import tempfile
import warnings
from pathlib import Path

import torch

import distillkit

sys.path.insert(0, str(Path(__file__).resolve().parent))
import throughput  # noqa: E402  (the bare student-alone loop)

SLOTS = 4


def epoch_speed(out: Path, args, strategy: str, cache: Path | None, render: str) -> float:
    queue = ["strategy.seed.queue_size=4096"] if strategy == "seed" else []
    result = distillkit.compress(
        teacher="efficientnet-lite0",
        student="mobilenetv3-small",
        strategy=strategy,
        data="builtin:fashion-mnist",
        limit=args.limit,
        batch_size=args.batch,
        epochs=1,
        out=out,
        quiet=True,
        teacher_cache=cache,
        set=[
            "teacher.input_size=64",
            "student.input_size=32",
            "eval.enabled=false",
            *queue,
            f"data.view_slots={SLOTS}",
            "train.checkpoint_every=null",
            f"data.render={render}",
        ],
    )
    return result.steps * args.batch / result.timings["train"]


def student_alone_speed(args, strategy: str, render: str) -> float:
    options = argparse.Namespace(steps=30, batch=args.batch, precision="fp32", vit_size=112, render=render)
    setup = throughput.Setup("lite0", options, strategy)
    throughput.run_bare(setup, 2, with_teacher=False)
    return min(
        options.steps * args.batch / throughput.run_bare(setup, options.steps, with_teacher=False) for _ in range(2)
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--limit", type=int, default=10000)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--strategies", nargs="+", default=["feature", "seed"], choices=["feature", "seed"])
    parser.add_argument(
        "--render",
        nargs="+",
        default=["shared", "per_network"],
        choices=["shared", "per_network"],
        help="data.render settings to measure (the student alone renders as the runs do)",
    )
    args = parser.parse_args()
    warnings.simplefilter("ignore")
    for render in args.render:
        for strategy in args.strategies:
            measure(args, strategy, render)


def measure(args, strategy: str, render: str) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        speeds = {
            "uncached": epoch_speed(tmp / "uncached", args, strategy, None, render),
            "fill": epoch_speed(tmp / "fill", args, strategy, tmp / "cache", render),
            "reuse": epoch_speed(tmp / "reuse", args, strategy, tmp / "cache", render),
        }
        (entry,) = (tmp / "cache").iterdir()
        shapes = json.loads((entry / "meta.json").read_text())["shapes"]
        used = int(
            subprocess.run(["du", "-s", "--block-size=1", str(entry)], capture_output=True, text=True).stdout.split()[0]
        )
    speeds["alone"] = student_alone_speed(args, strategy, render)
    per_view = sum(2 * math.prod(shape) for shape in shapes.values())  # float16
    t_uncached, t_fill, t_reuse = (1 / speeds[k] for k in ("uncached", "fill", "reuse"))
    gain = t_uncached - t_reuse
    break_even = SLOTS + SLOTS * (t_fill - t_uncached) / gain if gain > 0 else None
    print(
        json.dumps(
            {
                "benchmark": "cache_speed",
                "pair": "efficientnet-lite0 64px -> mobilenetv3-small 32px",
                "strategy": strategy,
                "render": render,
                "images": args.limit,
                "batch": args.batch,
                "view_slots": SLOTS,
                "cache_dtype": "float16",
                **{f"{k}_img_per_s": round(v, 1) for k, v in speeds.items()},
                "reuse_vs_alone": round(speeds["reuse"] / speeds["alone"], 3),
                "reuse_vs_uncached": round(speeds["reuse"] / speeds["uncached"], 2),
                "cache_bytes_per_image_view": per_view,
                "cache_disk_bytes_after_fill": used,
                "stored": shapes,
                "break_even_epochs_one_run": round(break_even, 2) if break_even else None,
                "machine": f"{platform.machine()}, {os.cpu_count()} cpus, torch {torch.__version__}, "
                f"{torch.get_num_threads()} threads",
            }
        )
    )


if __name__ == "__main__":
    main()
