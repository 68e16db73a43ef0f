"""A whole new strategy in one file, as README's "Adding a strategy" walks through it.

`cosine`: the student's pooled embedding, through a Linear head to the teacher's width, is pulled towards
the teacher's pooled embedding of the same view:

    L = mean_b (1 - cos(W f_S(x_b) + c, f_T(x_b)))

(a minimal feature distillation, cf. Romero et al. 2015, FitNets, arXiv:1412.6550, on pooled embeddings).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch.nn.functional as F
from torch import nn

from distillkit.features import FeatureRequest
from distillkit.strategies import StepInputs, Strategy, register_strategy
from distillkit.strategies.toolbox import check_positive, fp32


@dataclass
class CosineConfig:
    weight: float = 1.0  # every strategy config has a weight: its share of the objective
    head_scale: float = 1.0  # the head's initial weights are multiplied by this

    def __post_init__(self):
        check_positive("cosine", self, ("head_scale",))


@register_strategy
class Cosine(Strategy):
    name = "cosine"
    Config = CosineConfig
    summary = "cosine between the student's projected embedding and the teacher's"

    def __init__(self, config: CosineConfig, student_width: int, teacher_width: int):
        super().__init__(config)
        self.head = nn.Linear(student_width, teacher_width)
        self.head.weight.data.mul_(config.head_scale)

    @classmethod
    def teacher_requests(cls, config, teachers, student):
        return {"teacher": FeatureRequest(embedding=True)}

    @classmethod
    def student_request(cls, config):
        return FeatureRequest(embedding=True)

    @classmethod
    def build(cls, config, teachers, teacher_probes, student, student_probe):
        """Sized by the dry forwards: the widths of the two embeddings."""
        return cls(config, student_probe.embedding.shape[1], teacher_probes["teacher"].embedding.shape[1])

    def forward(self, step: StepInputs):
        losses = [
            1 - F.cosine_similarity(fp32(self.head(s.embedding)), fp32(t.embedding), dim=1).mean()
            for s, t in zip(step.student_views, step.teacher_views)
        ]
        return {"cosine": sum(losses) / len(losses)}
