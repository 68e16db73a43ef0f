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

`target_norm` (distillkit's own; default `standardize`) first normalises the target per dimension with
running moments of the teacher embeddings seen so far (an exponential moving average, momentum
`target_momentum` 0.99, bias-corrected as Adam's; the very first step, with no moments yet, uses the
raw target, so every process normalises with the same global statistics):

    center:      t <- t - mu
    standardize: t <- (t - mu) / sqrt(var + 1e-6)
    none:        t as the teacher gives it (timm)

Post-ReLU teacher embeddings are non-negative and share a large mean direction (EfficientNet-Lite0 on
Fashion-MNIST: cosine 0.64 between an image's embedding and the mean one), so the raw cosine target
rewards predicting the mean; centred, the student must reproduce how images differ. The moments are
updated after each step from the teacher embeddings of the whole global batch (gathered across processes).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Mapping

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import UsageError
from ..features import FeatureRequest, Features
from ..roles import PRIMARY_TEACHER
from .base import Gather, StepInputs, Strategy
from .registry import register_strategy
from .summaries import SUMMARIES
from .toolbox import TeacherEmbed, check_fraction, check_teacher_embed, embedding_request, fp32, teacher_vector


@dataclass
class FeatureConfig:
    weight: float = 1.0
    loss: Literal["cosine", "mse"] = "cosine"
    teacher_embed: TeacherEmbed = "auto"  # auto = projection if any
    target_norm: Literal["standardize", "center", "none"] = "standardize"
    target_momentum: float = 0.99  # of the running moments target_norm uses

    def __post_init__(self):
        check_fraction("feature", self, ("target_momentum",), one_allowed=False)


class RunningMoments(nn.Module):
    """Per-dimension mean and variance of a stream of (B, D) batches: a bias-corrected moving average.

    m_t = a m_{t-1} + (1 - a) mean_b(x),  s_t = a s_{t-1} + (1 - a) mean_b(x^2)
    mu = m_t / (1 - a^t),  var = s_t / (1 - a^t) - mu^2
    """

    def __init__(self, dim: int, momentum: float):
        super().__init__()
        self.momentum = momentum
        self.register_buffer("first", torch.zeros(dim, dtype=torch.float64))
        self.register_buffer("second", torch.zeros(dim, dtype=torch.float64))
        self.register_buffer("updates", torch.zeros((), dtype=torch.long))
        self._host_updates: int | None = None  # `updates` as a number, read once (after a load), then counted
        self.register_load_state_dict_post_hook(lambda module, keys: setattr(module, "_host_updates", None))

    @torch.no_grad()
    def update(self, batch: Tensor) -> None:
        seen = self.count()
        batch = batch.detach().double()
        self.first.mul_(self.momentum).add_(batch.mean(0), alpha=1 - self.momentum)
        self.second.mul_(self.momentum).add_(batch.pow(2).mean(0), alpha=1 - self.momentum)
        self.updates.add_(1)
        self._host_updates = seen + 1

    def count(self) -> int:
        """The number of updates, without reading the device in the training step."""
        if self._host_updates is None:
            self._host_updates = int(self.updates)
        return self._host_updates

    def moments(self) -> tuple[Tensor, Tensor] | None:
        """(mu, var) as float32; None before the first update."""
        if self.count() == 0:
            return None
        correction = 1 - self.momentum ** self.count()
        mean = self.first / correction
        return mean.float(), (self.second / correction - mean.pow(2)).clamp_min(0).float()


def normalise_target(target: Tensor, moments: tuple[Tensor, Tensor] | None, mode: str) -> Tensor:
    if mode == "none" or moments is None:
        return target
    mean, var = moments
    centred = target - mean
    return centred / torch.sqrt(var + 1e-6) if mode == "standardize" else centred


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
    summary = SUMMARIES["feature"]

    def __init__(self, config: FeatureConfig, teacher_probe: Features, student_probe: Features):
        super().__init__(config)
        self.use_projection = teacher_probe.projection is not None
        teacher_dim = teacher_vector(teacher_probe, self.use_projection).shape[1]
        self.projection = nn.Linear(student_probe.embedding.shape[1], teacher_dim)
        self.target_moments = RunningMoments(teacher_dim, config.target_momentum)

    @classmethod
    def build(
        cls,
        config: FeatureConfig,
        teachers: Mapping,
        teacher_probes: Mapping[str, Features],
        student: nn.Module,
        student_probe: Features,
    ) -> "Feature":
        return cls(config, teacher_probes[PRIMARY_TEACHER], student_probe)

    @classmethod
    def teacher_requests(
        cls, config: FeatureConfig, teachers: Mapping, student: nn.Module
    ) -> dict[str, FeatureRequest]:
        return {PRIMARY_TEACHER: embedding_request(config.teacher_embed, teachers[PRIMARY_TEACHER])}

    @classmethod
    def student_request(cls, config: FeatureConfig) -> FeatureRequest:
        return FeatureRequest(embedding=True)

    @classmethod
    def check_teachers(cls, config: FeatureConfig, teachers: Mapping) -> None:
        check_teacher_embed(cls.name, config.teacher_embed, teachers[PRIMARY_TEACHER])

    def forward(self, step: StepInputs) -> dict[str, Tensor]:
        target = fp32(teacher_vector(step.teacher, self.use_projection))
        target = normalise_target(target, self.target_moments.moments(), self.config.target_norm)
        return {self.name: feature_loss(self.projection(step.student.embedding), target, self.config.loss)}

    def after_step(self, step: StepInputs, gather: Gather) -> None:
        if self.config.target_norm != "none":
            self.target_moments.update(gather(fp32(teacher_vector(step.teacher, self.use_projection))))
