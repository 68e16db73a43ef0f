"""Logit distillation (Hinton KD): match the teacher's softened class distribution.

Hinton, Vinyals, Dean, "Distilling the Knowledge in a Neural Network", NIPS 2014 DL workshop
(arXiv 1503.02531); the same loss as timm's `LogitDistillationTask` (timm/task/distillation.py) and
SSKD's L_kd (xuguodong03/SSKD student.py:289, docs/methods.md#kdss). For one view:

    s = C f_S(x)              (B, K), C a strategy-owned Linear(D_s, K), K = the teacher's classes
    t = teacher logits        (B, K)
    L_kd = T^2 * (1/B) sum_b KL(softmax(t_b / T) || softmax(s_b / T))            T = 4
    L_ce = CE(s_b, y_b) averaged over the labelled images (y = -1 means unlabelled)  weight 0 by default

The classifier C belongs to the strategy, not to the student: the exported student has no classifier.
L_ce uses C itself when the data's labels are the teacher's classes (`ce_classes: null`), or a separate
Linear(D_s, ce_classes) when they are not (say Fashion-MNIST labels under an ImageNet teacher).
Softmaxes run in fp32.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

from torch import Tensor, nn

from ..errors import UsageError
from ..features import FeatureRequest, Features
from ..roles import PRIMARY_TEACHER
from .base import StepInputs, Strategy
from .registry import register_strategy
from .summaries import SUMMARIES
from .toolbox import check_non_negative, check_positive, kd_loss, labelled_ce


@dataclass
class LogitsConfig:
    weight: float = 1.0
    temperature: float = 4.0  # T
    kd_weight: float = 1.0
    ce_weight: float = 0.0  # cross-entropy on labelled images
    ce_classes: int | None = None  # None = the labels are the teacher's classes; else a separate head

    def __post_init__(self):
        check_positive("logits", self, ("temperature", "ce_classes"))
        check_non_negative("logits", self, ("kd_weight", "ce_weight"))


@register_strategy
class Logits(Strategy):
    name = "logits"
    Config = LogitsConfig
    summary = SUMMARIES["logits"]

    def __init__(self, config: LogitsConfig, teacher_probe: Features, student_probe: Features):
        super().__init__(config)
        if teacher_probe.logits is None:
            raise UsageError("strategy 'logits' needs the teacher's class logits, and the teacher gave none")
        student_dim = student_probe.embedding.shape[1]
        self.ce_head = (
            nn.Linear(student_dim, config.ce_classes)
            if config.ce_weight > 0 and config.ce_classes is not None
            else None
        )
        # No unused heads: DDP wants a gradient for every parameter in every step.
        uses_classifier = config.kd_weight > 0 or (config.ce_weight > 0 and self.ce_head is None)
        self.classifier = nn.Linear(student_dim, teacher_probe.logits.shape[1]) if uses_classifier else None

    @classmethod
    def build(
        cls,
        config: LogitsConfig,
        teachers: Mapping,
        teacher_probes: Mapping[str, Features],
        student: nn.Module,
        student_probe: Features,
    ) -> "Logits":
        return cls(config, teacher_probes[PRIMARY_TEACHER], student_probe)

    @classmethod
    def teacher_requests(cls, config: LogitsConfig, teachers: Mapping, student: nn.Module) -> dict[str, FeatureRequest]:
        return {PRIMARY_TEACHER: FeatureRequest(logits=True)}

    @classmethod
    def student_request(cls, config: LogitsConfig) -> FeatureRequest:
        return FeatureRequest(embedding=True)

    @classmethod
    def check_teachers(cls, config: LogitsConfig, teachers: Mapping) -> None:
        teacher = teachers[PRIMARY_TEACHER]
        if not teacher.has_logits:
            raise UsageError(
                f"strategy {cls.name!r} needs a teacher with class logits for its KL term, but teacher "
                f"{teacher.name!r} has no classifier (e.g. a self-supervised checkpoint); use a supervised "
                "teacher, or a strategy that distils embeddings (seed, feature)"
            )

    def term_weights(self) -> dict[str, float]:
        return {"kd": self.config.kd_weight, "ce": self.config.ce_weight}

    def forward(self, step: StepInputs) -> dict[str, Tensor]:
        embedding = step.student.embedding
        logits = self.classifier(embedding) if self.classifier is not None else None
        terms = {}
        if self.config.kd_weight > 0:
            terms["kd"] = kd_loss(logits, step.teacher.logits, self.config.temperature)
        if self.config.ce_weight > 0:
            ce = labelled_ce(self.ce_head(embedding) if self.ce_head is not None else logits, step.labels, self.name)
            if ce is not None:
                terms["ce"] = ce
        return terms
