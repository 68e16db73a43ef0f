"""Shared pieces of the strategy tests that build an Objective on tiny random teachers and students and
feed it one hand-made step: the tiny networks, the step, random images, a one-process gather."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import timm
import torch
from PIL import Image
from torch import nn

from distillkit.features import extract_features
from distillkit.recipe import resolve_recipe
from distillkit.strategies import Objective, StepInputs
from distillkit.teachers import InputConfig, prepare_input

IMAGENET = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))


def tiny_vit(size: int, patch: int, width: int = 48, depth: int = 2, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return timm.create_model(
        "vit_tiny_patch16_224",
        pretrained=False,
        num_classes=0,
        img_size=size,
        patch_size=patch,
        depth=depth,
        embed_dim=width,
        num_heads=2,
    ).eval()


def tiny_cnn(seed: int = 0) -> nn.Module:
    """timm's test_efficientnet: 5 feature levels of strides 2 .. 32, channels 16, 24, 32, 48, 64."""
    torch.manual_seed(seed)
    return timm.create_model("test_efficientnet", pretrained=False, num_classes=0).eval()


def build(strategy: str, settings: dict, teachers: dict, student: nn.Module, size: int) -> Objective:
    """The Objective of `strategy` with `settings`, every role of `teachers` declared in the recipe."""
    extra = {role: {"name": "unused-here"} for role in teachers if role != "teacher"}
    recipe = resolve_recipe({"strategy": {strategy: settings}, "teachers": extra})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return Objective.build(recipe.strategy, teachers, student, size)


def step_of(objective: Objective, teachers: dict, student: nn.Module, x: torch.Tensor, size: int) -> StepInputs:
    """One view `x`: what every teacher role the objective asks for and the student (at `size`) give."""
    by_role = {
        role: teachers[role](x, request) for role, request in objective.teacher_requests(teachers, student).items()
    }
    prepared = prepare_input(x, InputConfig((size, size), *IMAGENET), False)
    features = extract_features(student, prepared, objective.student_request())
    return StepInputs(
        [by_role["teacher"]] if "teacher" in by_role else [],
        [features],
        None,
        0.0,
        other_teachers={role: [f] for role, f in by_role.items() if role != "teacher"},
    )


def images(n: int = 6, seed: int = 3, size: int = 32) -> torch.Tensor:
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


def same_rows(t: torch.Tensor) -> torch.Tensor:
    """The gather of one process."""
    return t


def image_folder(folder: Path, count: int = 16, size: int = 40) -> Path:
    """`count` random RGB PNGs of `size` px in `folder` (created)."""
    rng = np.random.default_rng(0)
    folder.mkdir(parents=True)
    for i in range(count):
        Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    return folder
