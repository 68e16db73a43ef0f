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

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import UsageError
from ..features import FeatureRequest, Features
from .registry import register_strategy
from .base import StepInputs, Strategy, fp32


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


def check_positive(strategy: str, config, keys) -> None:
    for key in keys:
        value = getattr(config, key)
        if value is not None and value <= 0:
            raise UsageError(f"strategy.{strategy}.{key} must be positive, got {value}")


def check_non_negative(strategy: str, config, keys) -> None:
    for key in keys:
        value = getattr(config, key)
        if value < 0:
            raise UsageError(f"strategy.{strategy}.{key} must be 0 or more, got {value}")


def kd_loss(student_logits: Tensor, teacher_logits: Tensor, temperature: float) -> Tensor:
    """T^2 * KL(softmax(t/T) || softmax(s/T)), summed over classes and averaged over rows, in fp32."""
    with torch.autocast(device_type=student_logits.device.type, enabled=False):
        log_p_student = F.log_softmax(fp32(student_logits) / temperature, dim=1)
        p_teacher = F.softmax(fp32(teacher_logits) / temperature, dim=1)
        return F.kl_div(log_p_student, p_teacher, reduction="batchmean") * temperature**2


def labelled_ce(logits: Tensor, labels: Tensor | None, strategy: str) -> Tensor | None:
    """Cross-entropy over the rows with a label (>= 0); None when the step carries no labels at all.

    A batch without any labelled row gives 0 * sum(logits): nothing to learn, but the head stays in
    the autograd graph, which DDP needs (every parameter must get a gradient each step)."""
    if labels is None:
        return None
    labels = labels.to(logits.device)
    keep = labels >= 0
    if not bool(keep.any()):
        return fp32(logits).sum() * 0.0
    kept = labels[keep]
    if int(kept.max()) >= logits.shape[1]:
        raise UsageError(
            f"strategy {strategy!r}: a label is {int(kept.max())} but the classifier has {logits.shape[1]} "
            f"classes; set strategy.{strategy}.ce_classes to the number of classes in the data"
        )
    with torch.autocast(device_type=logits.device.type, enabled=False):
        return F.cross_entropy(fp32(logits[keep]), kept)


def require_logits(strategy: str, what: str, teacher) -> None:
    if not teacher.has_logits:
        raise UsageError(
            f"strategy {strategy!r} needs a teacher with class logits for {what}, but teacher "
            f"{teacher.name!r} has no classifier (e.g. a self-supervised checkpoint); use a supervised "
            "teacher, or a strategy that distils embeddings (seed, feature)"
        )


@register_strategy
class Logits(Strategy):
    name = "logits"
    Config = LogitsConfig
    summary = "Hinton KD: T^2 KL between softened teacher and student class distributions (needs teacher logits)"

    def __init__(self, config: LogitsConfig, teacher_probe: Features, student_probe: Features):
        super().__init__(config, teacher_probe, student_probe)
        if teacher_probe.logits is None:
            raise UsageError("strategy 'logits' needs the teacher's class logits, and the teacher gave none")
        student_dim = student_probe.embedding.shape[1]
        self.ce_head = (nn.Linear(student_dim, config.ce_classes)
                        if config.ce_weight > 0 and config.ce_classes is not None else None)
        # No unused heads: DDP wants a gradient for every parameter in every step.
        uses_classifier = config.kd_weight > 0 or (config.ce_weight > 0 and self.ce_head is None)
        self.classifier = nn.Linear(student_dim, teacher_probe.logits.shape[1]) if uses_classifier else None

    @classmethod
    def teacher_request(cls, config: LogitsConfig, teacher) -> FeatureRequest:
        return FeatureRequest(logits=True)

    @classmethod
    def student_request(cls, config: LogitsConfig) -> FeatureRequest:
        return FeatureRequest(embedding=True)

    @classmethod
    def check_compatible(cls, config: LogitsConfig, teacher) -> None:
        require_logits(cls.name, "its KL term", teacher)

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
