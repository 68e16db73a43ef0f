"""Training throughput: distillkit's step loop vs a bare PyTorch loop vs the student alone. One JSON line per pair.

    python benchmarks/throughput.py [--steps 20] [--batch 64] [--rounds 2] [--pairs lite0 vit-s vit-b]
                                    [--precision fp32|bf16] [--vit-size 112] [--size 224]

For each teacher -> student pair, with synthetic uint8 images in memory (no disk, no decoding), the same
SEED objective, batch, precision and views are timed three ways:

  (a) distillkit: `distillkit.train.loop.train` as `compress` runs it (Accelerate, DataLoader, collate,
      view rendering, non-finite checks, loss logging, progress, JSONL, the end-of-run checkpoint);
  (b) bare: a hand-written loop doing the same computation: index a shuffled batch, render the views,
      teacher forward under inference mode, student forward, the objective, backward, SGD step, queue update;
  (c) student alone: (b) without the teacher (the student's forward + the strategy's head, a dummy loss).

Printed: images/s for each and `overhead_ratio` = time(a) / time(b) (target <= 1.05), plus the teacher's
share of a bare step (1 - time(c) / time(b)). Each variant is warmed up, then timed over `--rounds`
rounds of `--steps` steps, interleaved; the fastest round counts (least disturbed by other processes).
Pairs: `lite0` = EfficientNet-Lite0 (real weights, 64 px) -> MobileNetV3-Small (32 px); `vit-s` / `vit-b` = a
ViT-S/16 / ViT-B/16 teacher (random weights: speed does not depend on them) at `--vit-size` px ->
MobileNetV3-Small (32 px). `--size N` puts teacher and student of every pair at N px (224: the GPU check).

Everything runs on the device the run's Accelerator picks (a GPU when there is one): the bare loops move their
networks and batches there as the loop does, timings wait for the device (`torch.cuda.synchronize`) at their
start and end, and `peak_gpu_memory_gb` is `torch.cuda.max_memory_allocated()` over the pair's runs.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import os
import platform
import tempfile
import time
import warnings
from pathlib import Path

import torch
from rich.console import Console

from distillkit.api import training_progress
from distillkit.data import ImageData, ViewConfig, render_views, sample_view_params
from distillkit.data.sources import TensorImages
from distillkit.features import FeatureRequest, extract_features
from distillkit.recipe import resolve_recipe
from distillkit.run import Run
from distillkit.strategies import StepInputs
from distillkit.teachers.zoo import RANDOM_WEIGHTS
from distillkit.train.loop import lr_factor, make_accelerator, train
from distillkit.train.step import DistillModule

PAIRS = {
    "lite0": {"teacher": {"name": "efficientnet-lite0", "input_size": 64}, "student_size": 32},
    "vit-s": {"teacher": {"name": "timm:vit_small_patch16_224", "weights": RANDOM_WEIGHTS}, "student_size": 32},
    "vit-b": {"teacher": {"name": "timm:vit_base_patch16_224", "weights": RANDOM_WEIGHTS}, "student_size": 32},
}


def synchronize(device: torch.device) -> None:
    """Wait for the work queued on `device` (a CUDA GPU runs asynchronously; the CPU needs no wait)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def pair_sizes(pair: str, args) -> tuple[int, int]:
    """(teacher px, student px) of `pair`: `--size` for both when given, else the pair's own (a ViT's
    `--vit-size`)."""
    spec, size = PAIRS[pair], getattr(args, "size", None)
    if size:
        return size, size
    teacher_px = args.vit_size if pair.startswith("vit-") else spec["teacher"]["input_size"]
    return teacher_px, spec["student_size"]


class Setup:
    """One pair's recipe, teacher, student + objective, and in-memory images."""

    def __init__(self, pair: str, args, strategy: str = "seed"):
        spec = PAIRS[pair]
        self.strategy = strategy
        teacher_px, student_px = pair_sizes(pair, args)
        teacher = {**spec["teacher"], "input_size": teacher_px}
        self.recipe = resolve_recipe(
            {
                "teacher": teacher,
                "student": {"name": "mobilenetv3-small", "input_size": student_px},
                "strategy": {"seed": {"queue_size": 4096, "tau_teacher": 0.05}}
                if strategy == "seed"
                else {strategy: {}},
                "data": {"render": getattr(args, "render", "shared")},
                "train": {
                    "batch_size": args.batch,
                    "epochs": 1,
                    "max_steps": args.steps,
                    "lr": 0.05,
                    "precision": args.precision,
                    "checkpoint_every": None,
                    "warmup_fraction": 0.0,
                },
                "eval": {"enabled": False},
            }
        )
        load = int(round(max(teacher_px, student_px) * 1.15))
        generator = torch.Generator().manual_seed(0)
        images = torch.randint(
            0, 256, (args.batch * (args.steps + 1), 3, load, load), dtype=torch.uint8, generator=generator
        )
        self.data = TensorImages(images, torch.zeros(images.shape[0], dtype=torch.int64))
        # the run compress builds, on these images
        self.run = Run.from_recipe(
            self.recipe,
            "unused",
            images=ImageData(train=self.data, train_all=self.data, test=None, num_classes=None, source="random images"),
        )
        self.teacher = self.run.teachers["teacher"]
        self.device = self.run.accelerator.device
        self.teacher_request = self.run.objective.teacher_requests(self.run.teachers, self.run.student.model)["teacher"]

    def fresh_run(self, run_dir: Path, recipe) -> Run:
        """The built run with its own copy of what trains (student and objective together, so the objective's
        references into the student stay), a new accelerator and `recipe`."""
        student, objective = copy.deepcopy((self.run.student, self.run.objective))
        return dataclasses.replace(
            self.run,
            recipe=recipe,
            run_dir=run_dir,
            student=student,
            objective=objective,
            accelerator=make_accelerator(recipe),
        )


def run_distillkit(setup: Setup, steps: int) -> float:
    """(a): the loop `compress` runs; seconds for `steps` optimiser steps."""
    recipe = copy.deepcopy(setup.recipe)
    recipe.train.max_steps = steps
    with tempfile.TemporaryDirectory() as run_dir, training_progress(Console(quiet=True)) as progress:  # compress's
        run = setup.fresh_run(Path(run_dir), recipe)
        synchronize(setup.device)
        start = time.perf_counter()
        result = train(run, progress)
        synchronize(setup.device)
        seconds = time.perf_counter() - start
    assert result.steps == steps, result
    return seconds


def run_bare(setup: Setup, steps: int, with_teacher: bool = True) -> float:
    """(b), or (c) with_teacher=False: the same step written by hand."""
    recipe = setup.recipe
    fresh = setup.fresh_run(Path("unused"), recipe)
    device = setup.device
    module = DistillModule(fresh.student, fresh.objective).to(device)  # what accelerator.prepare does
    setup.teacher.to(device)
    student, objective = module.student, module.objective
    params = [p for p in module.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(
        params, lr=recipe.train.lr, momentum=recipe.train.momentum, weight_decay=recipe.train.weight_decay
    )
    views_config = ViewConfig(
        crop_scale=recipe.data.crop_scale, crop_ratio=recipe.data.crop_ratio, flip=recipe.data.flip
    )
    request = module.student_request if with_teacher else FeatureRequest(embedding=True)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=recipe.train.precision == "bf16")
    order = torch.randperm(len(setup.data), generator=torch.Generator().manual_seed(0))
    batch = recipe.train.batch_size
    module.train()
    synchronize(device)
    start = time.perf_counter()
    for step in range(steps):
        indices = order[step * batch : (step + 1) * batch]
        images = setup.data.images[indices].to(device, non_blocking=True)  # the loop's batch, moved
        params = sample_view_params(indices, images.shape[-2], images.shape[-1], views_config, seed=0, epoch=0, view=0)
        sizes = setup.run.sizes
        shared = render_views(images, params, sizes.student) if recipe.data.render == "shared" else None
        with autocast:
            if with_teacher:  # teacher first, as the loop does
                teacher_view = setup.teacher(
                    shared if shared is not None else render_views(images, params, sizes.teachers["teacher"]),
                    setup.teacher_request,
                )
            x = fresh.student.prepare(shared if shared is not None else render_views(images, params, sizes.student))
            student_view = extract_features(student, x, request)
            if with_teacher:
                step_inputs = StepInputs([teacher_view], [student_view], None, step / steps)
                loss, _ = objective(step_inputs)
            else:
                loss = student_head(objective.strategies[setup.strategy])(student_view.embedding).float().pow(2).mean()
        loss.backward()
        for group in optimizer.param_groups:
            group["lr"] = recipe.train.lr * lr_factor(step, steps, 0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if with_teacher:
            objective.after_step(step_inputs, lambda t: t)
    synchronize(device)
    return time.perf_counter() - start


def student_head(strategy) -> torch.nn.Module:
    """The head a strategy puts on the student's embedding: SEED's MLP, feature's Linear projection."""
    return strategy.head if hasattr(strategy, "head") else strategy.projection


def measure(pair: str, args) -> dict:
    """One pair's JSON record: the three loops interleaved, the fastest of `args.rounds` rounds each."""
    setup = Setup(pair, args)
    if setup.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(setup.device)
    variants = {
        "distillkit": lambda n: run_distillkit(setup, n),
        "bare": lambda n: run_bare(setup, n),
        "student_alone": lambda n: run_bare(setup, n, with_teacher=False),
    }
    for run in variants.values():
        run(getattr(args, "warmup", 3))
    best = {name: float("inf") for name in variants}
    for _ in range(args.rounds):
        for name, run in variants.items():
            best[name] = min(best[name], run(args.steps))
    images = args.steps * args.batch
    return {
        "benchmark": "throughput",
        "pair": pair,
        "teacher": setup.teacher.name,
        "teacher_px": setup.teacher.input_config.size[0],
        "student": setup.recipe.student.name,
        "student_px": setup.recipe.student.input_size,
        "batch": args.batch,
        "steps": args.steps,
        "precision": args.precision,
        "render": args.render,
        **{f"{name}_img_per_s": round(images / seconds, 1) for name, seconds in best.items()},
        "overhead_ratio": round(best["distillkit"] / best["bare"], 3),
        "teacher_share_of_bare_step": round(1 - best["student_alone"] / best["bare"], 3),
        "device": device_name(setup.device),
        "peak_gpu_memory_gb": peak_memory_gb(setup.device),
        "machine": f"{platform.machine()}, {os.cpu_count()} cpus, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads",
    }


def device_name(device: torch.device) -> str:
    """The GPU's name (`cuda: NVIDIA H200`), or the device type."""
    return f"cuda: {torch.cuda.get_device_name(device)}" if device.type == "cuda" else device.type


def peak_memory_gb(device: torch.device) -> float | None:
    """`torch.cuda.max_memory_allocated` since the last reset, in GB; None off CUDA."""
    return round(torch.cuda.max_memory_allocated(device) / 1e9, 2) if device.type == "cuda" else None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pairs", nargs="+", default=["lite0", "vit-s"], choices=list(PAIRS))
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--precision", default="fp32", choices=["fp32", "bf16"])
    parser.add_argument("--vit-size", type=int, default=112, help="ViT teacher input (px); 224 is its native size")
    parser.add_argument("--size", type=int, default=None, help="teacher and student input (px) of every pair")
    parser.add_argument("--render", default="shared", choices=["shared", "per_network"], help="data.render")
    args = parser.parse_args()
    warnings.simplefilter("ignore")  # the ViT-S teacher's random weights are announced with a warning
    for pair in args.pairs:
        print(json.dumps(measure(pair, args)), flush=True)


if __name__ == "__main__":
    main()
