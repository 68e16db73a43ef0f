"""How long a run trains: optimiser steps and epochs, from the recipe and the size of the data.

`train.images` is the budget in images seen (optimiser steps x global batch x grad_accum), so a small data
source trains as long as a large one, for more epochs; without it `train.epochs` decides. `train.max_steps`
caps either, and the epochs are then the ones its steps reach.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from ..errors import UsageError
from ..recipe import TrainConfig


@dataclass(frozen=True)
class Budget:
    steps_per_epoch: int
    total_steps: int
    epochs: int  # the epochs total_steps reach (the last may be partial)


def plan_budget(train: TrainConfig, micro_batches: int, grad_accum: int | None = None) -> Budget:
    """`micro_batches`: the loader's batches per epoch (per process). `grad_accum`: the micro-batches k of an
    optimiser step, as Accelerate counts them (`accelerator.gradient_accumulation_steps`; default
    `train.grad_accum`, else 1). Accelerate also steps at an epoch's end: ceil(micro_batches / k) steps."""
    k = grad_accum or train.grad_accum or 1
    if micro_batches < k:
        raise UsageError(f"an epoch has {micro_batches} batches, fewer than train.grad_accum {k}")
    steps_per_epoch = math.ceil(micro_batches / k)
    if train.images is not None:
        total_steps = math.ceil(train.images / (train.batch_size * k))
        epochs = math.ceil(total_steps / steps_per_epoch)
    else:
        epochs = train.epochs
        total_steps = epochs * steps_per_epoch
    if train.max_steps is not None:  # a cap on steps (skipped non-finite steps count)
        total_steps = min(total_steps, train.max_steps)
        # the epochs those steps reach: what view slots and the teacher cache are sized against (a run capped
        # inside its first epoch sees no view twice, so caching the teacher for it would only cost disk)
        epochs = min(epochs, math.ceil(total_steps / steps_per_epoch))
    return Budget(steps_per_epoch=steps_per_epoch, total_steps=total_steps, epochs=epochs)
