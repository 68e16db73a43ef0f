"""Feature distillation (timm-style baseline): regress the teacher's pooled embedding.

timm's `FeatureDistillationTask` (timm/task/distillation.py): the student's pooled
pre-logits embedding goes through a Linear projection to the teacher's width and is regressed onto
the teacher's pooled pre-logits embedding. For one view:

    p = W f_S(x) + b                      (B, D_t), W a strategy-owned Linear(D_s, D_t)
    t = f_T(x)                            (B, D_t), or the teacher's projection-head output
    cosine (default): L = mean_b (1 - cos(p_b, t_b))
    mse:              L = mean_{b,d} (p_bd - t_bd)^2      (timm's F.mse_loss)

Differences from timm: the projection always exists (timm skips it when the widths match) and the
default loss is cosine, which ignores the teacher's embedding norm. Cosine runs in fp32.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import UsageError
from ..features import FeatureRequest, Features
from . import register_strategy
from .base import StepInputs, Strategy, check_teacher_embed, fp32, teacher_vector, uses_projection


@dataclass
class FeatureConfig:
    weight: float = 1.0
    loss: Literal["cosine", "mse"] = "cosine"
    teacher_embed: Literal["auto", "projection", "embedding"] = "auto"  # auto = projection if any


def feature_loss(projected: Tensor, target: Tensor, loss: str) -> Tensor:
    """mean(1 - cos) over the batch, or the element-wise mean squared error, both in fp32."""
    with torch.autocast(device_type=projected.device.type, enabled=False):
        projected, target = fp32(projected), fp32(target)
        if loss == "cosine":
            return (1.0 - F.cosine_similarity(projected, target, dim=1)).mean()
        if loss == "mse":
            return F.mse_loss(projected, target)
    raise UsageError(f"strategy.feature.loss = {loss!r} is not allowed; choose cosine or mse")


@register_strategy
class Feature(Strategy):
    name = "feature"
    Config = FeatureConfig
    summary = "timm-style feature distillation: Linear(student embedding) -> teacher embedding, cosine or MSE"

    def __init__(self, config: FeatureConfig, teacher_probe: Features, student_probe: Features):
        super().__init__(config, teacher_probe, student_probe)
        self.use_projection = teacher_probe.projection is not None
        teacher_dim = teacher_vector(teacher_probe, self.use_projection).shape[1]
        self.projection = nn.Linear(student_probe.embedding.shape[1], teacher_dim)

    @classmethod
    def teacher_request(cls, config: FeatureConfig, teacher) -> FeatureRequest:
        use_projection = uses_projection(config.teacher_embed, teacher)
        return FeatureRequest(embedding=not use_projection, projection=use_projection)

    @classmethod
    def student_request(cls, config: FeatureConfig) -> FeatureRequest:
        return FeatureRequest(embedding=True)

    @classmethod
    def check_compatible(cls, config: FeatureConfig, teacher) -> None:
        check_teacher_embed(cls.name, config.teacher_embed, teacher)

    def forward(self, step: StepInputs) -> dict[str, Tensor]:
        target = teacher_vector(step.teacher, self.use_projection)
        return {self.name: feature_loss(self.projection(step.student.embedding), target, self.config.loss)}
