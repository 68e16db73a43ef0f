"""The strategy contract, and the objective that composes several weighted strategies.

A strategy is an `nn.Module` that owns its trainable heads and its state (queues), so they are
optimised and checkpointed with it. It sees only `Features`, never the models:

    teacher_request(config, teacher) -> FeatureRequest   what it needs from the frozen teacher
    student_request(config)          -> FeatureRequest   what it needs from the student
    check_compatible(config, teacher)                    UsageError if the teacher cannot give it
    check_student(config, student)                       UsageError if the student cannot give it
    forward(step: StepInputs)        -> {term: loss}     named, unweighted loss terms
    term_weights()                   -> {term: weight}   how the objective weighs them
    after_step(step, gather)                             state updates after the loss (queues)
    fit_to_data(config, num_images, batch_size) -> (config, note | None)
                                                         shrink data-dependent sizes (a queue larger
                                                         than the data)

Several teachers: a recipe's `teacher:` is the role "teacher"; `teachers:` adds more roles (e.g.
"mim"). A strategy that reads more than one overrides the role-aware forms of the hooks above:
    teacher_requests(config, teachers, student) -> {role: FeatureRequest}
    check_teachers(config, teachers)                     UsageError naming the role and what it lacks
    build(config, teachers, teacher_probes, student, student_probe)
                                                         construct from the networks and their probe Features
and reads `StepInputs.views_of(role)`.

Optional hooks:
    expand_views(views)              -> views            derive more views from the rendered ones
                                                         (e.g. the four rotations of each view)
    student_features(student, x, teachers, request, progress) -> Features | None
                                                         run the student itself (e.g. on kept tokens
                                                         only); `teachers` holds each role's Features of
                                                         the same view. None = the generic extraction. At
                                                         most one strategy of an objective may override it;
                                                         `peer_request` then says what the others need
                                                         from the student, which its Features must hold.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar, Mapping

import torch
from torch import Tensor, nn

from ..errors import UsageError
from ..features import FeatureRequest, Features
from ..roles import PRIMARY_TEACHER


@dataclass
class StepInputs:
    """Everything a strategy sees for one optimisation step (one entry per view)."""

    teacher_views: list[Features]  # the primary teacher's
    student_views: list[Features]
    labels: Tensor | None
    progress: float  # fraction of training done, in [0, 1]
    other_teachers: dict[str, list[Features]] = field(default_factory=dict)  # role -> views

    @property
    def teacher(self) -> Features:
        return self.teacher_views[0]

    def views_of(self, role: str) -> list[Features]:
        return self.teacher_views if role == PRIMARY_TEACHER else self.other_teachers[role]

    @property
    def student(self) -> Features:
        return self.student_views[0]


Gather = Callable[[Tensor], Tensor]


class Strategy(nn.Module):
    name: ClassVar[str]
    Config: ClassVar[type]  # a dataclass; every strategy config has `weight: float`
    num_views: ClassVar[int] = 1
    summary: ClassVar[str] = ""

    def __init__(self, config: Any, teacher_probe: Features, student_probe: Features):
        super().__init__()
        self.config = config

    @classmethod
    def teacher_request(cls, config: Any, teacher: Any) -> FeatureRequest:
        raise NotImplementedError

    @classmethod
    def student_request(cls, config: Any) -> FeatureRequest:
        raise NotImplementedError

    # What the other strategies of the objective need from the student (set by `Objective` on the
    # strategy that runs the student itself); the Features it returns must hold that too.
    peer_request: FeatureRequest = FeatureRequest()

    @classmethod
    def check_compatible(cls, config: Any, teacher: Any) -> None:
        """Raise `UsageError` when the teacher cannot give what this strategy needs."""

    # Role-aware forms: a strategy reading one teacher reads the primary one.
    @classmethod
    def teacher_roles(cls, config: Any) -> tuple[str, ...]:
        return (PRIMARY_TEACHER,)

    @classmethod
    def teacher_requests(cls, config: Any, teachers: Mapping[str, Any],
                         student: nn.Module) -> dict[str, FeatureRequest]:
        return {PRIMARY_TEACHER: cls.teacher_request(config, teachers[PRIMARY_TEACHER])}

    @classmethod
    def check_teachers(cls, config: Any, teachers: Mapping[str, Any]) -> None:
        cls.check_compatible(config, teachers[PRIMARY_TEACHER])

    @classmethod
    def build(cls, config: Any, teachers: Mapping[str, Any], teacher_probes: Mapping[str, Features],
              student: nn.Module, student_probe: Features) -> "Strategy":
        """Construct from the teachers and the student and their probe Features (dry-forward outputs)."""
        return cls(config, teacher_probes[PRIMARY_TEACHER], student_probe)

    @classmethod
    def check_student(cls, config: Any, student: nn.Module) -> None:
        """Raise `UsageError` when the student model cannot give what this strategy needs.

        Called before any forward pass, so a recipe is rejected before training starts."""

    @classmethod
    def fit_to_data(cls, config: Any, num_images: int, batch_size: int) -> tuple[Any, str | None]:
        """Adapt sizes that depend on the training data: the config to train with (a copy) and a sentence
        saying what changed, or None. Default: nothing depends on it."""
        return config, None

    @classmethod
    def runs_student(cls) -> bool:
        """Whether this strategy runs the student itself (overrides `student_features`)."""
        return cls.student_features is not Strategy.student_features

    @classmethod
    def derives_views(cls) -> bool:
        """Whether this strategy derives views of its own (overrides `expand_views`)."""
        return cls.expand_views is not Strategy.expand_views

    def term_weights(self) -> dict[str, float]:
        return {self.name: 1.0}

    def after_step(self, step: StepInputs, gather: Gather) -> None:
        """Update state once the loss is computed (e.g. enqueue teacher embeddings)."""

    def expand_views(self, views: list[Tensor]) -> list[Tensor]:
        return views

    def student_features(self, student: nn.Module, x: Tensor, teachers: Mapping[str, Features],
                         request: FeatureRequest, progress: float) -> Features | None:
        return None


def uses_projection(teacher_embed: str, teacher: Any) -> bool:
    """`teacher_embed` auto | projection | embedding -> whether to distil the teacher's projection."""
    if teacher_embed == "auto":
        return bool(teacher.has_projection)
    return teacher_embed == "projection"


def check_teacher_embed(strategy: str, teacher_embed: str, teacher: Any) -> None:
    if teacher_embed == "projection" and not teacher.has_projection:
        raise UsageError(
            f"strategy.{strategy}.teacher_embed = projection, but teacher {teacher.name!r} has no "
            "projection head; use auto or embedding"
        )


def teacher_vector(features: Features, use_projection: bool) -> Tensor:
    """The teacher's pooled embedding or its projection-head output, (B, D)."""
    return features.projection if use_projection else features.embedding


def as_map(features: Tensor, what: str) -> Tensor:
    """(B, C, H, W) maps stay; (B, N, C) tokens of a square grid become (B, C, sqrt N, sqrt N)."""
    if features.dim() == 4:
        return features
    side = math.isqrt(features.shape[1]) if features.dim() == 3 else 0
    if side == 0 or side * side != features.shape[1]:
        raise UsageError(f"{what} has shape {tuple(features.shape)}; expected (B, C, H, W) maps or the tokens "
                         "of a square patch grid")
    return features.transpose(1, 2).reshape(features.shape[0], features.shape[2], side, side)


def mlp_head(in_dim: int, hidden_dim: int, out_dim: int) -> nn.Sequential:
    """Linear -> ReLU -> Linear, the projection head SEED puts on the student."""
    return nn.Sequential(nn.Linear(in_dim, hidden_dim), nn.ReLU(inplace=True), nn.Linear(hidden_dim, out_dim))


def fp32(t: Tensor) -> Tensor:
    return t.float() if t.dtype != torch.float32 else t
