"""SEED: self-supervised distillation by matching similarity distributions over a teacher queue.

Fang et al., "SEED: Self-supervised Distillation for Visual Representation", ICLR 2021
(arXiv 2101.04731); official code jacobswan1/SEED seed/builder.py. One view goes to both nets:

    z_S = norm(h_S(f_S(x)))   z_T = norm(g_T(f_T(x)))   Q = [q_1..q_K], a FIFO queue of past z_T
    a_S = [z_S.z_T, z_S.q_1, ..., z_S.q_K] / tau_student
    p_T = softmax([z_T.z_T, z_T.q_1, ..., z_T.q_K] / tau_teacher)
    L   = -sum_j p_T[j] * log_softmax(a_S)[j], averaged over the batch

The current teacher embedding is column 0 on both sides. The queue is updated after the loss with
the teacher embeddings of the whole global batch (gathered across processes). Similarities and
softmax run in fp32: with tau_teacher = 1e-4 a bf16/fp16 error is multiplied by 1e4.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Mapping

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import UsageError
from ..features import FeatureRequest, Features
from ..roles import PRIMARY_TEACHER
from .base import Gather, StepInputs, Strategy
from .registry import register_strategy
from .summaries import SUMMARIES
from .toolbox import (
    TeacherEmbed,
    check_positive,
    check_teacher_embed,
    embedding_request,
    fp32,
    mlp_head,
    teacher_vector,
)


@dataclass
class SeedConfig:
    weight: float = 1.0
    queue_size: int = 65536  # K
    tau_student: float = 0.2
    tau_teacher: float = 1e-4
    embed_dim: int | None = None  # student head output; must equal the teacher embedding dim (None = it)
    head_hidden_dim: int | None = None  # None = the student's feature width (official default)
    teacher_embed: TeacherEmbed = "auto"  # auto = projection if any

    def __post_init__(self):  # runs while the recipe is validated, before anything loads
        check_positive("seed", self, ("queue_size", "tau_student", "tau_teacher", "embed_dim", "head_hidden_dim"))


def seed_loss(
    student_embed: Tensor, teacher_embed: Tensor, queue: Tensor, tau_student: float, tau_teacher: float
) -> Tensor:
    """The SEED soft cross-entropy for l2-normalised (B, D) embeddings and a (K, D) queue."""
    with torch.autocast(device_type=student_embed.device.type, enabled=False):  # fp32 even under autocast
        z_s, z_t, queue = fp32(student_embed), fp32(teacher_embed), fp32(queue)
        student_logits = torch.cat([(z_s * z_t).sum(1, keepdim=True), z_s @ queue.T], dim=1) / tau_student
        teacher_logits = torch.cat([(z_t * z_t).sum(1, keepdim=True), z_t @ queue.T], dim=1) / tau_teacher
        target = F.softmax(teacher_logits, dim=1)
        return -(target * F.log_softmax(student_logits, dim=1)).sum(1).mean()


class EmbeddingQueue(nn.Module):
    """A FIFO ring buffer of l2-normalised embeddings, (size, dim), oldest overwritten first."""

    def __init__(self, size: int, dim: int):
        super().__init__()
        self.register_buffer("embeddings", F.normalize(torch.randn(size, dim), dim=1))
        self.register_buffer("pointer", torch.zeros((), dtype=torch.long))

    @torch.no_grad()
    def push(self, batch: Tensor) -> None:
        size = self.embeddings.shape[0]
        batch = batch.detach().to(self.embeddings.dtype)
        if batch.shape[0] > size:  # only the newest `size` rows can stay
            self.pointer.add_(batch.shape[0] - size).remainder_(size)
            batch = batch[-size:]
        # the pointer stays on the device: no host read in the training step
        positions = (torch.arange(batch.shape[0], device=batch.device) + self.pointer) % size
        self.embeddings.index_copy_(0, positions, batch)
        self.pointer.add_(batch.shape[0]).remainder_(size)


@register_strategy
class Seed(Strategy):
    name = "seed"
    Config = SeedConfig
    summary = SUMMARIES["seed"]

    def __init__(self, config: SeedConfig, teacher_probe: Features, student_probe: Features):
        super().__init__(config)
        self.use_projection = teacher_probe.projection is not None
        teacher_dim = teacher_vector(teacher_probe, self.use_projection).shape[1]
        if config.embed_dim is not None and config.embed_dim != teacher_dim:
            raise UsageError(
                f"strategy.seed.embed_dim = {config.embed_dim}, but the teacher embedding SEED distils "
                f"has {teacher_dim} dims; the two must match: set it to {teacher_dim} or null"
            )
        student_dim = student_probe.embedding.shape[1]
        self.head = mlp_head(student_dim, config.head_hidden_dim or student_dim, teacher_dim)
        self.queue = EmbeddingQueue(config.queue_size, teacher_dim)

    @classmethod
    def build(
        cls,
        config: SeedConfig,
        teachers: Mapping,
        teacher_probes: Mapping[str, Features],
        student: nn.Module,
        student_probe: Features,
    ) -> "Seed":
        return cls(config, teacher_probes[PRIMARY_TEACHER], student_probe)

    @classmethod
    def teacher_requests(cls, config: SeedConfig, teachers: Mapping, student: nn.Module) -> dict[str, FeatureRequest]:
        return {PRIMARY_TEACHER: embedding_request(config.teacher_embed, teachers[PRIMARY_TEACHER])}

    @classmethod
    def student_request(cls, config: SeedConfig) -> FeatureRequest:
        return FeatureRequest(embedding=True)

    @classmethod
    def fit_to_data(cls, config: SeedConfig, num_images: int, batch_size: int) -> tuple[SeedConfig, str | None]:
        """A queue must hold other images than the batch's: at most num_images - batch_size embeddings.
        A longer one would hold every image, some twice (earlier views of the batch's own images)."""
        largest = num_images - batch_size
        if config.queue_size <= largest:
            return config, None
        if largest < 1:
            raise UsageError(
                f"strategy.seed needs more training images than one batch ({num_images} images, "
                f"batch {batch_size}); use more images or a smaller --batch-size"
            )
        note = (
            f"strategy.seed.queue_size {config.queue_size} is more than the {num_images} training images "
            f"minus one batch; using {largest}"
        )
        return replace(config, queue_size=largest), note

    @classmethod
    def check_teachers(cls, config: SeedConfig, teachers: Mapping) -> None:
        check_teacher_embed(cls.name, config.teacher_embed, teachers[PRIMARY_TEACHER])

    def forward(self, step: StepInputs) -> dict[str, Tensor]:
        z_t = F.normalize(fp32(teacher_vector(step.teacher, self.use_projection)), dim=1)
        z_s = F.normalize(fp32(self.head(step.student.embedding)), dim=1)
        loss = seed_loss(z_s, z_t, self.queue.embeddings, self.config.tau_student, self.config.tau_teacher)
        return {self.name: loss}

    def after_step(self, step: StepInputs, gather: Gather) -> None:
        z_t = F.normalize(fp32(teacher_vector(step.teacher, self.use_projection)), dim=1)
        self.queue.push(gather(z_t))
