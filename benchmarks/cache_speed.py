"""What the teacher-output cache buys: prints one JSON line.

    python benchmarks/cache_speed.py [--limit 10000] [--batch 128] [--strategies feature seed]
                                     [--render shared per_network] [--size 224] [--precision bf16]

EfficientNet-Lite0 (64 px, or `--size`) -> MobileNetV3-Small (32 px, or `--size`), Fashion-MNIST (`--limit`
training images), on the device Accelerate picks (a GPU when there is one), in `--precision` (default fp32),
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


def sizes(args) -> tuple[int, int]:
    """(teacher px, student px): `--size` for both, else 64 and 32."""
    return (args.size, args.size) if getattr(args, "size", None) else (64, 32)


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
        precision=getattr(args, "precision", "fp32"),
        set=[
            f"teacher.input_size={sizes(args)[0]}",
            f"student.input_size={sizes(args)[1]}",
            "eval.enabled=false",
            *queue,
            f"data.view_slots={SLOTS}",
            "train.checkpoint_every=null",
            f"data.render={render}",
        ],
    )
    return result.steps * args.batch / result.timings["train"]


def student_alone_speed(args, strategy: str, render: str) -> float:
    options = argparse.Namespace(
        steps=getattr(args, "alone_steps", 30),
        batch=args.batch,
        precision=getattr(args, "precision", "fp32"),
        vit_size=112,
        size=getattr(args, "size", None),
        render=render,
    )
    setup = throughput.Setup("lite0", options, strategy)
    throughput.run_bare(setup, 3, with_teacher=False)
    return max(
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
    parser.add_argument("--size", type=int, default=None, help="teacher and student input (px); default 64 / 32")
    parser.add_argument("--precision", default="fp32", choices=["fp32", "bf16"])
    args = parser.parse_args()
    warnings.simplefilter("ignore")
    for render in args.render:
        for strategy in args.strategies:
            print(json.dumps(measure(args, strategy, render)), flush=True)


def measure(args, strategy: str, render: str) -> dict:
    """One strategy and render setting: the uncached, filling and reusing epochs, the student alone, the
    ratios, the cache's size."""
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
    teacher_px, student_px = sizes(args)
    return {
        "benchmark": "cache_speed",
        "pair": f"efficientnet-lite0 {teacher_px}px -> mobilenetv3-small {student_px}px",
        "precision": getattr(args, "precision", "fp32"),
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


if __name__ == "__main__":
    main()
