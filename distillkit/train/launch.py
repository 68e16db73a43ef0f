"""What `accelerate launch` and `accelerate config` decide, read the way Accelerate reads them, and merged with
the recipe: precision, gradient accumulation, and whether the processes are CPU ones.

`accelerate launch` passes its settings (its flags, else the `accelerate config` file) to the processes it
starts in environment variables; Accelerate's own `Accelerator()` reads them. distillkit resolves them once,
before the Accelerator exists, so the run records (recipe.yaml, checkpoints) the values it trains with:

    train.precision   an explicit fp32 / bf16 / fp16 wins; auto (the default) = ACCELERATE_MIXED_PRECISION
                      (no -> fp32), else fp32
    train.grad_accum  an explicit N; null (the default) = ACCELERATE_GRADIENT_ACCUMULATION_STEPS, else 1. An
                      explicit value that contradicts the environment's is refused: Accelerate would take the
                      environment's, and the schedule would count the other
"""

from __future__ import annotations

import dataclasses
import os

import torch

from ..errors import UsageError
from ..messages import warn
from ..recipe import Recipe

PRECISION_ENV = "ACCELERATE_MIXED_PRECISION"
GRAD_ACCUM_ENV = "ACCELERATE_GRADIENT_ACCUMULATION_STEPS"
# Accelerate's mixed_precision names -> the recipe's
FROM_ACCELERATE = {"no": "fp32", "bf16": "bf16", "fp16": "fp16"}
TO_ACCELERATE = {v: k for k, v in FROM_ACCELERATE.items()}


def launch_precision(precision: str) -> str:
    """The recipe's `train.precision` resolved: an explicit value, else (auto) the launcher's, else fp32."""
    given = os.environ.get(PRECISION_ENV, "").strip().lower()
    if given and given not in FROM_ACCELERATE:
        raise UsageError(
            f"{PRECISION_ENV}={given} (from accelerate launch --mixed_precision or accelerate config) is not a "
            f"precision distillkit trains in; use one of {', '.join(FROM_ACCELERATE)}"
        )
    if precision != "auto":
        return precision
    return FROM_ACCELERATE[given] if given else "fp32"


def warn_if_precision_overridden(precision: str) -> None:
    """Say so when an explicit `train.precision` overrides a mixed precision `accelerate launch` asked for."""
    given = os.environ.get(PRECISION_ENV, "").strip().lower()
    if precision != "auto" and given in ("bf16", "fp16") and FROM_ACCELERATE[given] != precision:
        warn(
            f"train.precision {precision} (the recipe or --precision) wins over accelerate's mixed precision "
            f"{given}; set train.precision: auto (or --precision auto) to train in accelerate's"
        )


def launch_grad_accum(grad_accum: int | None) -> int:
    """The recipe's `train.grad_accum` resolved: an explicit value, else the launcher's, else 1; refused when
    the two disagree (Accelerate takes the environment's value over the one it is given)."""
    given = os.environ.get(GRAD_ACCUM_ENV, "").strip()
    if given and given != "auto":
        if not given.isdigit() or int(given) < 1:
            raise UsageError(f"{GRAD_ACCUM_ENV}={given} must be a whole number >= 1")
        if grad_accum is not None and grad_accum != int(given):
            raise UsageError(
                f"train.grad_accum {grad_accum} contradicts {GRAD_ACCUM_ENV}={given} (accelerate launch / "
                "accelerate config): remove one of them, or set train.grad_accum: null to take accelerate's"
            )
        return int(given)
    return grad_accum if grad_accum is not None else 1


def resolve_launch(recipe: Recipe) -> Recipe:
    """A copy of `recipe` with `train.precision` and `train.grad_accum` resolved (no auto, no null left)."""
    train = dataclasses.replace(
        recipe.train,
        precision=launch_precision(recipe.train.precision),
        grad_accum=launch_grad_accum(recipe.train.grad_accum),
    )
    return dataclasses.replace(recipe, train=train)


def cpu_processes() -> bool:
    """True for a multi-process launch (torchrun, accelerate launch) without an accelerator that Accelerate
    gives a collective backend (CUDA, XPU with xccl, NPU, MLU, MUSA): only `cpu=True` makes Accelerate set up
    gloo there; without it every process would train alone. One process is never forced onto the CPU, so
    Accelerate picks CUDA, MPS or XPU when present."""
    from accelerate.utils import is_mlu_available, is_musa_available, is_npu_available, is_xpu_available
    from accelerate.utils.imports import is_xccl_available

    world = int(os.environ.get("WORLD_SIZE", "1") or 1)
    if world <= 1 and int(os.environ.get("LOCAL_RANK", "-1") or -1) == -1:
        return False
    xccl = is_xpu_available() and is_xccl_available()
    return not (torch.cuda.is_available() or xccl or is_npu_available() or is_mlu_available() or is_musa_available())
