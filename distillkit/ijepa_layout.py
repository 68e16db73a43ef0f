"""A Bootleg pretraining run as an I-JEPA-layout checkpoint (`RUN/bootleg.pth`), the layout of
facebookresearch/ijepa's `save_checkpoint` (src/train.py):

    {"encoder": {"module.<timm ViT key>": ...},           the context encoder (the trained student)
     "predictor": {"module.predictor_embed.weight": ..., "module.mask_token", "module.predictor_pos_embed",
                   "module.predictor_blocks.<i>.<timm Block key>", "module.predictor_norm.*",
                   "module.predictor_proj.*"},             I-JEPA's VisionTransformerPredictor names
     "target_encoder": {"module.<timm ViT key>": ...},    the EMA target encoder: the teacher to distil from
     "epoch", "loss", "batch_size", "world_size", "lr",   as I-JEPA's
     "step",                                              optimiser steps done
     "args": {...}}                                       what rebuilds the encoders (arch, model_kwargs, ...)

The "module." prefix is what I-JEPA's DistributedDataParallel-wrapped modules save; I-JEPA's encoder keys are
timm's VisionTransformer keys. I-JEPA also saves its optimiser and scaler ("opt", "scaler"); a distillkit
run resumes from its own checkpoints/, so they are left out. `args` plays the part of the `args` MAE, MoCo
and DINO checkpoints carry: `distillkit compress --teacher bootleg --teacher-weights RUN/bootleg.pth` reads
the architecture from it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from .io import atomic_path

DDP_PREFIX = "module."
# distillkit's hidden.Predictor names -> I-JEPA's VisionTransformerPredictor names
PREDICTOR_NAMES = {
    "embed.": "predictor_embed.",
    "blocks.": "predictor_blocks.",
    "norm.": "predictor_norm.",
    "proj.": "predictor_proj.",
    "mask_token": "mask_token",
}


def predictor_state(predictor: nn.Module) -> dict[str, Tensor]:
    """The predictor's tensors under I-JEPA's names, its fixed sin-cos positions included
    (I-JEPA keeps them as a frozen parameter, `predictor_pos_embed`)."""
    out = {"predictor_pos_embed": predictor.pos_embed.detach().clone()}
    for key, tensor in predictor.state_dict().items():
        prefix = next(p for p in PREDICTOR_NAMES if key.startswith(p))
        out[PREDICTOR_NAMES[prefix] + key[len(prefix) :]] = tensor
    return out


def with_ddp_prefix(state: dict[str, Tensor]) -> dict[str, Tensor]:
    return {DDP_PREFIX + key: tensor.detach().cpu().clone() for key, tensor in state.items()}


def write_ijepa_checkpoint(
    path: str | Path,
    *,
    encoder: nn.Module,
    target_encoder: nn.Module,
    predictor: nn.Module,
    args: dict[str, Any],
    epoch: int,
    step: int,
    loss: float | None,
    batch_size: int,
    world_size: int,
    lr: float,
) -> Path:
    """Write the checkpoint atomically (a crash never leaves half a file) and return its path."""
    checkpoint = {
        "encoder": with_ddp_prefix(encoder.state_dict()),
        "predictor": with_ddp_prefix(predictor_state(predictor)),
        "target_encoder": with_ddp_prefix(target_encoder.state_dict()),
        "epoch": epoch,
        "step": step,
        "loss": loss,
        "batch_size": batch_size,
        "world_size": world_size,
        "lr": lr,
        "args": args,
    }
    with atomic_path(path) as tmp:
        torch.save(checkpoint, tmp)
    return Path(path)
