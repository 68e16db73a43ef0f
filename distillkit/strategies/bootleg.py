"""Bootleg pretraining: a ViT learns by predicting, from a context block, the normalised hidden states of
several blocks of its own EMA copy at masked target positions (the objective of `distillkit pretrain bootleg`).

Lowe, Fuller, Oore, Shelhamer, Taylor, "Self-Distillation of Hidden Layers" (Bootleg, arXiv 2603.15553; no
official code) extends I-JEPA (Assran et al., CVPR 2023, arXiv 2301.08243; official code
facebookresearch/ijepa src/train.py) by regressing the concatenation of several target-encoder layers instead
of its last one. Strategy `hidden` builds the same targets from a frozen teacher; here the teacher is the
exponential moving average of the student itself (the "target encoder"), as in I-JEPA:

    target encoder  f_bar <- deepcopy(f) at the start, never trained by gradients, kept in eval mode
    h_l   = raw output of target-encoder block l on the *whole* image, prefix tokens removed    (B, N, D)
    y     = concat_l layer_norm(h_l)   per token over channels, no affine, eps 1e-5               (B, N, L*D)
    masks = 4 target blocks (scale 0.15-0.2, aspect 0.75-1.5) and one context block (scale 0.85-1.0) minus the
            targets, on the patch grid (strategies/masks.py, I-JEPA's MaskCollator)
    z     = f(x restricted to the context patches), after f's final norm                         (B, N_ctx, D)
    L     = (1/4) sum_k  SmoothL1_beta(g(z, context, target_k), y[target_k])   (element mean; beta 1; or MSE)

g is I-JEPA's narrow ViT predictor (hidden.Predictor: context tokens + one mask token per target position,
2-D sin-cos positions, Linear(width, L*D) out). After every optimiser step (I-JEPA src/train.py:322-326):

    m_i     = ema[0] + (i / total_steps) * (ema[1] - ema[0])          i = optimiser steps done, 0.996 -> 1.0
    f_bar  <- m_i * f_bar + (1 - m_i) * f                              parameter by parameter

Defaults from I-JEPA where the Bootleg paper is silent (docs/methods.md#bootleg): the masks above,
EMA (0.996, 1.0), Smooth-L1 with beta 1, the predictor narrow (depth 6, width 384 here: I-JEPA's ViT-H run
uses depth 12, width 384). distillkit decisions [D]: the target layers default to every 4th block counted back
from the last (blocks 4, 8, 12 of a 12-block ViT; 2 and 6 of a 6-block one), since the paper does not say
which; `target_std`, the per-dimension standard deviation of y over the batch's tokens averaged over its
dimensions, is logged, and the run warns when it falls below `collapse_std` (every image and position
predicting the same target is the collapse an EMA target can fall into).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Literal, Mapping

import torch
from torch import Tensor, nn

from ..errors import UsageError
from ..features import (
    FeatureRequest,
    Features,
    extract_features,
    forward_kept_tokens,
    patch_grid,
    resolve_layers,
    runs_on_kept_tokens,
)
from .base import StepInputs, Strategy
from .hidden import MaskedFeatures, Predictor, check_predictor_and_masks, masks_for, normalised_targets
from .masks import check_mask_grid
from .registry import register_strategy
from .summaries import SUMMARIES
from .toolbox import check_non_negative, gather_tokens, peer_features, regression_loss

EVERY_NTH_BLOCK = 4  # the default target layers: every 4th block, counted back from the last [D]
# what the masked forward (features.forward_kept_tokens) runs; the rest of a ViT (fc_norm, attention pooling,
# a head) acts after it, gets no gradient and is frozen at its init, so several processes do not wait for it
TRAINED_PARTS = ("patch_embed", "pos_embed", "cls_token", "reg_token", "norm_pre", "blocks", "norm")


@dataclass
class BootlegConfig:
    weight: float = 1.0
    layers: list[int | float] | None = None  # target-encoder blocks; None = every 4th block back from the last
    loss: Literal["smooth_l1", "mse"] = "smooth_l1"
    beta: float = 1.0  # Smooth-L1 beta
    ema: tuple[float, float] = (0.996, 1.0)  # the target encoder's momentum, linear from the first to the last step
    predictor_depth: int = 6
    predictor_width: int = 384
    predictor_heads: int = 6
    num_targets: int = 4
    target_scale: tuple[float, float] = (0.15, 0.2)
    target_aspect: tuple[float, float] = (0.75, 1.5)
    context_scale: tuple[float, float] = (0.85, 1.0)
    mask_min_keep: int = 10
    collapse_std: float = 0.01  # warn when the target's mean per-dimension std over a batch falls below this

    def __post_init__(self):
        check_non_negative("bootleg", self, ("collapse_std",))
        check_predictor_and_masks("bootleg", self)
        if self.layers is not None and not self.layers:
            raise UsageError("strategy.bootleg.layers must name at least one block, e.g. [0.5, 1.0], or be null")
        low, high = self.ema
        if not 0.0 <= low <= high <= 1.0:
            raise UsageError(f"strategy.bootleg.ema must satisfy 0 <= start <= end <= 1, got {[low, high]}")


def default_target_layers(depth: int) -> list[int]:
    """Every 4th block counted back from the last, as 0-based indices: depth 12 -> [3, 7, 11], 6 -> [1, 5]."""
    return sorted(range(depth - 1, -1, -EVERY_NTH_BLOCK))


def ema_momentum(ema: tuple[float, float], progress: float) -> float:
    """I-JEPA's linear momentum schedule at `progress` = optimiser steps done / total steps."""
    return ema[0] + min(1.0, max(0.0, progress)) * (ema[1] - ema[0])


@torch.no_grad()
def ema_update(target: nn.Module, online: nn.Module, momentum: float) -> None:
    """target <- momentum * target + (1 - momentum) * online, for every parameter."""
    target_params = list(target.parameters())
    online_params = [p.detach() for p in online.parameters()]
    torch._foreach_mul_(target_params, momentum)
    torch._foreach_add_(target_params, online_params, alpha=1.0 - momentum)


def target_spread(targets: Tensor) -> Tensor:
    """Mean over dimensions of the standard deviation of each target dimension over the batch's tokens."""
    rows = targets.detach().float().flatten(0, -2)
    return rows.std(dim=0).mean()


@dataclass
class BootlegFeatures(MaskedFeatures):
    """The masked student forward plus the target encoder's normalised targets on the whole image."""

    targets: Tensor | None = None  # (B, N, L*D), fp32


@register_strategy
class Bootleg(Strategy):
    name = "bootleg"
    Config = BootlegConfig
    summary = SUMMARIES["bootleg"]
    reads = ()  # its teacher is its own EMA copy
    diagnostics = ("target_std",)

    def __init__(self, config: BootlegConfig, student: nn.Module):
        super().__init__(config)
        self.layers = list(target_layers(config, student))
        self.grid = patch_grid(student)
        self.target_encoder = copy.deepcopy(student).requires_grad_(False).eval()
        object.__setattr__(self, "_online", student)  # not a submodule: the student is trained and saved as such
        for name, param in student.named_parameters():
            if name.split(".")[0] not in TRAINED_PARTS:
                param.requires_grad_(False)
        width = student.num_features
        self.predictor = Predictor(
            width,
            width * len(self.layers),
            self.grid,
            config.predictor_width,
            config.predictor_depth,
            config.predictor_heads,
        )

    @classmethod
    def build(cls, config, teachers, teacher_probes, student, student_probe) -> "Bootleg":
        return cls(config, student)

    @classmethod
    def teacher_requests(cls, config, teachers, student) -> dict[str, FeatureRequest]:
        return {}

    @classmethod
    def student_request(cls, config) -> FeatureRequest:
        return FeatureRequest()

    @classmethod
    def check_student(cls, config: BootlegConfig, student: nn.Module) -> None:
        if not runs_on_kept_tokens(student):
            raise UsageError(
                f"strategy bootleg pretrains a ViT (a timm VisionTransformer: patch_embed, blocks, norm); "
                f"{type(student).__name__} is not one: pass a ViT, e.g. --arch vit_small_patch16_224"
            )
        try:
            check_mask_grid(patch_grid(student), config.context_scale, config.mask_min_keep)
        except UsageError as e:
            raise UsageError(f"strategy bootleg: {e}") from None
        try:
            target_layers(config, student)
        except UsageError as e:
            raise UsageError(
                f"strategy bootleg regresses blocks {config.layers} of the ViT, but {e}; change "
                "strategy.bootleg.layers (null = every 4th block back from the last)"
            ) from None

    def train(self, mode: bool = True) -> "Bootleg":
        super().train(mode)
        self.target_encoder.eval()  # no dropout or drop-path in the targets
        return self

    def student_features(
        self, student: nn.Module, x: Tensor, teachers: Mapping[str, Features], request: FeatureRequest, progress: float
    ) -> Features:
        context_index, target_index = masks_for(self.config, x.shape[0], self.grid, x.device)
        with torch.no_grad():
            hidden = extract_features(self.target_encoder, x, FeatureRequest(layers=tuple(self.layers))).layers
            targets = normalised_targets([hidden[i] for i in self.layers], self.grid)
        shared = peer_features(student, x, self.peer_request)
        context_tokens, _ = forward_kept_tokens(student, x, context_index)
        return BootlegFeatures(
            **shared,
            context_tokens=context_tokens,
            context_index=context_index,
            target_index=target_index,
            targets=targets,
        )

    def forward(self, step: StepInputs) -> dict[str, Tensor]:
        student = step.student
        if not isinstance(student, BootlegFeatures) or student.targets is None:
            raise UsageError("strategy bootleg needs its own masked student forward (student_features); got others")
        predictions = self.predictor(student.context_tokens, student.context_index, student.target_index)
        losses = [
            regression_loss(p, gather_tokens(student.targets, index), self.config.loss, self.config.beta)
            for p, index in zip(predictions, student.target_index)
        ]
        return {self.name: torch.stack(losses).mean(), "target_std": target_spread(student.targets)}

    def after_step(self, step: StepInputs, gather) -> None:
        if step.optimizer_stepped:  # once per optimiser step, not per accumulated micro-batch
            ema_update(self.target_encoder, self._online, ema_momentum(self.config.ema, step.progress))

    def health(self, logged: Mapping[str, float]) -> str | None:
        spread = logged.get(f"{self.name}.target_std")
        if spread is None or spread >= self.config.collapse_std:
            return None
        return (
            f"bootleg: the targets' spread over the batch fell to {spread:.4g} (below strategy.bootleg.collapse_std "
            f"{self.config.collapse_std}): the target encoder may be collapsing to one output for every image. "
            "Try a lower --lr, a longer warm-up (train.warmup_fraction) or an EMA closer to 1 (strategy.bootleg.ema)"
        )


def target_layers(config: BootlegConfig, student: nn.Module) -> tuple[int, ...]:
    """The target-encoder blocks regressed, as 0-based indices."""
    depth = len(student.blocks)
    if config.layers is None:
        return tuple(default_target_layers(depth))
    return tuple(sorted(resolve_layers(tuple(config.layers), depth)))
