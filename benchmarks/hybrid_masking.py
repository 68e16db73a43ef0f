"""How much step time Hybrid Distill's token dropping saves: prints one JSON line.

    python benchmarks/hybrid_masking.py [--student vit-tiny] [--size 224] [--batch 32] [--steps 3] [--rounds 3]

One training step of the `hybrid` strategy (two ViT teachers at full image, the student on the kept
tokens, both loss terms, backward, AdamW) is timed at drop ratios 0, 0.25, 0.5 and 0.75 (the schedule
held constant), on synthetic images in memory. Reported per ratio: the student side (student forward
on kept tokens + losses + backward + optimiser step) and the whole step (+ both teachers), in ms, and
the saving against ratio 0. Teachers are random timm ViTs: timing does not depend on their weights.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import time
import warnings

import torch

from distillkit.recipe import resolve_recipe
from distillkit.strategies import Objective
from distillkit.student import Student
from distillkit.teachers import load_teacher
from distillkit.teachers.zoo import RANDOM_WEIGHTS
from distillkit.train.step import DistillModule

RATIOS = (0.0, 0.25, 0.5, 0.75)


def time_step(
    module: DistillModule, teachers: dict, requests: dict, images: torch.Tensor, optimizer, steps: int
) -> tuple[float, float]:
    """Median ms of (whole step, student side) over `steps` steps after one warm-up step."""
    whole, student_side = [], []
    for step in range(steps + 1):
        start = time.perf_counter()
        teacher_views = {role: [teachers[role](images, request)] for role, request in requests.items()}
        middle = time.perf_counter()
        loss, _, _ = module([images], teacher_views, None, 1.0)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        end = time.perf_counter()
        if step:  # the first step warms up allocators and caches
            whole.append(1000 * (end - start))
            student_side.append(1000 * (end - middle))
    return statistics.median(whole), statistics.median(student_side)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--student", default="vit-tiny")
    parser.add_argument("--teacher", default="timm:vit_small_patch16_224", help="both teachers' architecture")
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    torch.manual_seed(0)
    warnings.simplefilter("ignore")  # random teacher weights are announced with a warning
    teachers = {role: load_teacher(args.teacher, RANDOM_WEIGHTS, args.size) for role in ("teacher", "mim")}
    images = torch.rand(args.batch, 3, args.size, args.size)
    setups = {}
    for ratio in RATIOS:
        recipe = resolve_recipe(
            {
                "teachers": {"mim": {"name": args.teacher}},
                "student": {"name": args.student, "input_size": args.size, "channels_last": False},
                "strategy": {"hybrid": {"mask_ratio": ratio, "mask_schedule": "constant"}},
                "train": {"seed": 0},
            }
        )
        student = Student.create(recipe.student, seed=0)
        objective = Objective.build(recipe.strategy, teachers, student.model, args.size)
        requests = objective.teacher_requests(teachers, student.model)
        module = DistillModule(student, objective).train()
        setups[ratio] = (module, requests, torch.optim.AdamW(module.parameters(), lr=1e-4))
    best = {ratio: (math.inf, math.inf) for ratio in RATIOS}
    for _ in range(args.rounds):  # interleaved, the fastest round counts: least disturbed by other processes
        for ratio, (module, requests, optimizer) in setups.items():
            timed = time_step(module, teachers, requests, images, optimizer, args.steps)
            best[ratio] = tuple(min(old, new) for old, new in zip(best[ratio], timed))
    results = {
        ratio: {"step_ms": round(whole, 1), "student_ms": round(student_side, 1)}
        for ratio, (whole, student_side) in best.items()
    }
    base = results[0.0]
    record = {
        "benchmark": "hybrid_masking",
        "student": args.student,
        "teachers": args.teacher,
        "size": args.size,
        "batch": args.batch,
        "tokens": (args.size // 16) ** 2,
        **{
            f"ratio_{r}": v
            | {
                "student_saving": round(1 - v["student_ms"] / base["student_ms"], 3),
                "step_saving": round(1 - v["step_ms"] / base["step_ms"], 3),
            }
            for r, v in results.items()
        },
        "machine": f"{platform.machine()}, {os.cpu_count()} cpus, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads",
    }
    print(json.dumps(record))


if __name__ == "__main__":
    main()
