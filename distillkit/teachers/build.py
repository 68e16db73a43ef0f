"""Putting an extracted backbone into a timm model: create it at the input size, fit the position
embeddings, load strictly, and explain a mismatch with the checkpoint's format and a guess."""

from __future__ import annotations

import math
from typing import Any, Mapping

import timm
import torch
from timm.layers import resample_abs_pos_embed
from torch import nn

from ..messages import warn
from .checkpoint import StateDict, load_exact
from .formats import Extracted
from .guess import guess_teacher


def create_backbone(arch: str, input_size: int | None, is_vit: bool, kwargs: Mapping[str, Any]) -> nn.Module:
    """`timm.create_model(arch)` without pretrained weights; ViTs are built for `input_size` pixels."""
    kwargs = dict(kwargs)
    if is_vit and input_size:
        kwargs.setdefault("img_size", input_size)
    model = timm.create_model(arch, pretrained=False, **kwargs)
    if not is_vit:
        fit_input_size(model, input_size)  # a ViT named by file:<path> --arch or timm:<name>
    return model


def fit_input_size(model: nn.Module, input_size: int | None) -> None:
    """Rebuild a fixed-size ViT for `input_size` pixels (timm resamples its position embeddings)."""
    if input_size and hasattr(model, "set_input_size") and hasattr(model, "pos_embed"):
        model.set_input_size(img_size=(input_size, input_size))


def random_model(
    arch: str, input_size: int | None = None, is_vit: bool = False, kwargs: Mapping[str, Any] | None = None
) -> nn.Module:
    """A randomly initialised backbone, with a warning: for smoke tests only. Always the same weights for
    the same arguments (seeded apart from the global RNG), so a run with a random teacher is repeatable
    and its resume meets the teacher it started with."""
    warn(f"teacher {arch} uses random weights: fine for smoke tests, useless for distillation")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return create_backbone(arch, input_size, is_vit, kwargs or {})


def fit_pos_embed(state: StateDict, model: nn.Module) -> StateDict:
    """Resample the checkpoint's absolute position embeddings to the model's patch grid.

    Bicubic, as timm does (`resample_abs_pos_embed`); prefix tokens (class, registers) keep theirs.
    A grid that is not square, or a width that differs, is left for the strict load to report.
    """
    pos = state.get("pos_embed")
    target = getattr(model, "pos_embed", None)
    if pos is None or target is None or pos.shape == target.shape or pos.ndim != 3 or pos.shape[-1] != target.shape[-1]:
        return state
    prefix = 0 if getattr(model, "no_embed_class", False) else getattr(model, "num_prefix_tokens", 0)
    side = math.isqrt(pos.shape[1] - prefix) if pos.shape[1] > prefix else 0
    if side * side != pos.shape[1] - prefix:
        return state
    grid = list(model.patch_embed.grid_size)
    return {
        **state,
        "pos_embed": resample_abs_pos_embed(pos, new_size=grid, old_size=[side, side], num_prefix_tokens=prefix),
    }


def load_backbone(model: nn.Module, extracted: Extracted, source: str, teacher: str, fallback_hint: str) -> None:
    """Strict load of `extracted.backbone` into `model`; a mismatch reports the format and a guess."""
    state = fit_pos_embed(extracted.backbone, model)
    guess = guess_teacher(extracted.kind, extracted.backbone)
    if guess and f"--teacher {teacher}" in guess.split(": use ")[-1].split(" or "):
        guess = None  # the right teacher already: the file itself is off
    load_exact(model, state, source, hint=guess or fallback_hint, file_format=extracted.format_name)
