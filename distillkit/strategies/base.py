"""The strategy contract: `Strategy`, what it sees each step (`StepInputs`) and the `Gather` it is handed.

A strategy is an `nn.Module` that owns its trainable heads and state (queues), so they are optimised and
checkpointed with the student. Its loss sees only `Features`; the networks are seen by the hooks that
size and check it (classmethods, called before any forward pass) and by `student_features`.

    reads                                  teacher roles it reads, a class attribute: ("teacher",) by
                                           default, () for none; `teacher_roles(config)` when configurable
    bind_roles(config, roles)              -> config: given every teacher role of the recipe, before the roles
                                           are checked; the default returns `config` (agglomerate fills its
                                           `teachers: null` with all of them). The bound config is what the
                                           built strategy holds; the recipe keeps the config as written
    teacher_requests(config, teachers, student) -> {role: FeatureRequest}   what it needs from each teacher
    student_request(config)                -> FeatureRequest                 what it needs from the student
    check_teachers(config, teachers)       UsageError naming the role and what it lacks
    check_student(config, student)         UsageError when the student cannot give what it needs
    build(config, teachers, teacher_probes, student, student_probe) -> Strategy
                                           construct, sized by the probe Features (dry forwards)
    forward(step: StepInputs)              -> {term: loss}, named and unweighted
    term_weights()                         -> {term: weight}, how the objective weighs them
    diagnostics                            terms forward() returns that are logged, never weighted (a class
                                           attribute); `health(logged)` -> a warning about them, or None
    after_step(step, gather)               state updates after the loss, `gather` = the loop's all-gather
    fit_to_data(config, num_images, batch_size) -> (config, note | None)   shrink data-dependent sizes

Optional:
    expand_views(views)                    -> views: derive more views (KDSS's rotations)
    student_features(student, x, teachers, request, progress) -> Features | None
                                           run the student itself (masked or token-dropped forwards);
                                           `teachers`: each role's Features of the same view. At most one
                                           strategy of an objective may; its Features must also hold
                                           `peer_request`, what the others need from the student.

Helpers the strategies share live in `toolbox.py`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar, Mapping

from torch import Tensor, nn

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
    optimizer_stepped: bool = True  # False for a micro-batch whose gradients are still being accumulated

    @property
    def teacher(self) -> Features:
        return self.teacher_views[0]

    def views_of(self, role: str) -> list[Features]:
        return self.teacher_views if role == PRIMARY_TEACHER else self.other_teachers[role]

    @property
    def student(self) -> Features:
        return self.student_views[0]


Gather = Callable[[Tensor], Tensor]  # every process's rows, concatenated in rank order


class Strategy(nn.Module):
    name: ClassVar[str]
    Config: ClassVar[type]  # a dataclass; every strategy config has `weight: float`
    num_views: ClassVar[int] = 1
    summary: ClassVar[str] = ""
    reads: ClassVar[tuple[str, ...]] = (PRIMARY_TEACHER,)
    diagnostics: ClassVar[tuple[str, ...]] = ()

    # What the other strategies of the objective need from the student (set by `Objective` on the
    # strategy that runs the student itself); the Features it returns must hold that too.
    peer_request: FeatureRequest = FeatureRequest()

    def __init__(self, config: Any):
        super().__init__()
        self.config = config

    @classmethod
    def bind_roles(cls, config: Any, roles: tuple[str, ...]) -> Any:
        """`config` for a recipe whose teacher roles are `roles` (the primary one first); default: unchanged."""
        return config

    @classmethod
    def teacher_roles(cls, config: Any) -> tuple[str, ...]:
        """The roles `config` reads; `reads` unless a strategy's config names them."""
        return cls.reads

    @classmethod
    def teacher_requests(
        cls, config: Any, teachers: Mapping[str, Any], student: nn.Module
    ) -> dict[str, FeatureRequest]:
        raise NotImplementedError

    @classmethod
    def student_request(cls, config: Any) -> FeatureRequest:
        raise NotImplementedError

    @classmethod
    def check_teachers(cls, config: Any, teachers: Mapping[str, Any]) -> None:
        """Raise `UsageError` when a teacher cannot give what this strategy needs."""

    @classmethod
    def check_student(cls, config: Any, student: nn.Module) -> None:
        """Raise `UsageError` when the student model cannot give what this strategy needs."""

    @classmethod
    def build(
        cls,
        config: Any,
        teachers: Mapping[str, Any],
        teacher_probes: Mapping[str, Features],
        student: nn.Module,
        student_probe: Features,
    ) -> "Strategy":
        """Construct from the teachers and the student and their probe Features (dry-forward outputs)."""
        raise NotImplementedError

    @classmethod
    def fit_to_data(cls, config: Any, num_images: int, batch_size: int) -> tuple[Any, str | None]:
        """The config to train with on `num_images` images (a copy) and a sentence saying what changed, or
        None. Default: nothing depends on the data."""
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

    def health(self, logged: Mapping[str, float]) -> str | None:
        """A warning about the logged values of a logging step (`logged`: "name.term" -> value), or None."""
        return None

    def expand_views(self, views: list[Tensor]) -> list[Tensor]:
        return views

    def student_features(
        self, student: nn.Module, x: Tensor, teachers: Mapping[str, Features], request: FeatureRequest, progress: float
    ) -> Features | None:
        return None
