"""SimCLR: the student trained alone, contrasting two views of each image (no teacher in the loss).

Chen, Kornblith, Norouzi, Hinton, "A Simple Framework for Contrastive Learning of Visual
Representations", ICML 2020 (arXiv 2002.05709); official code google-research/simclr: NT-Xent
tf2/objective.py `add_contrastive_loss`, projection head tf2/model.py `ProjectionHead`. This is the
self-supervised baseline distillation is compared against (SEED's own comparison: the same student
trained with a contrastive objective at the same number of steps); it reads no teacher, so the
training loop never runs one for it (the primary teacher is still loaded for the evaluation table).

For a batch of N images, views a and b, the student's pooled embedding f and a projection head g:

    z_k = g(f(x_k)) / |g(f(x_k))|                    for the 2N views x_1..x_2N (a_1..a_N, b_1..b_N)
    l(i, j) = -log( exp(z_i.z_j / tau) / sum_{k != i} exp(z_i.z_k / tau) )
    L = 1/N sum_{n=1..N} [ l(a_n, b_n) + l(b_n, a_n) ]

Each anchor has one positive (the other view of its image) and 2N - 2 negatives (both views of every
other image); tau = `temperature`. L is the official code's `reduce_mean(loss_a + loss_b)`, twice the
paper's 1/(2N) sum over all 2N anchors. Similarities and the softmax run in fp32.

Several processes: as the official `tpu_cross_replica_concat`, each process's projections of both
views are gathered from every process in rank order (N = the global batch, so 2N - 2 negatives over
the global batch), with gradients: the backward all-reduces the gradient of the gathered keys and
keeps this process's rows, so with DDP's gradient mean the update is the one of a single process
holding the global batch. Anchors are this process's rows; its positives sit at offset
B * rank in the gathered other view.

g = Linear(no bias) -> BatchNorm1d -> ReLU -> Linear, SimCLR v1's 2-layer head (v2's official head adds
a BN after the last Linear and a third layer), run on both views as one batch as the official code does
(its BN statistics cover the 2B local views; the student itself runs each view separately here).
Official widths (ResNet-50): hidden 2048 = the encoder width, out 128; here hidden defaults to the
student's embedding width and out to 128.

`temperature` 0.5: the paper uses 0.1 for ImageNet at batch 4096 with LARS and 0.5 in its CIFAR-10
experiments (appendix B.9); distillkit's recipes train small students on small images at batch 128,
closer to the CIFAR regime, so 0.5 (not tuned here).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import UsageError
from ..features import FeatureRequest, Features
from .base import StepInputs, Strategy
from .registry import register_strategy
from .summaries import SUMMARIES
from .toolbox import all_gather, check_positive, fp32


@dataclass
class SimclrConfig:
    weight: float = 1.0
    temperature: float = 0.5  # tau; the paper: 0.1 (ImageNet, batch 4096) to 0.5 (CIFAR-10)
    projection_hidden_dim: int | None = None  # None = the student's embedding width (official: 2048 = ResNet-50's)
    projection_dim: int = 128  # official 128

    def __post_init__(self):  # runs while the recipe is validated, before anything loads
        check_positive("simclr", self, ("temperature", "projection_hidden_dim", "projection_dim"))


def nt_xent(za: Tensor, zb: Tensor, temperature: float) -> Tensor:
    """SimCLR's NT-Xent for the projections of views a and b, (B, D) each (normalised here), in fp32.

    Negatives are gathered across processes (`all_gather`, with gradients); mean over this process's images of
    l(a_n, b_n) + l(b_n, a_n)."""
    with torch.autocast(device_type=za.device.type, enabled=False):
        za, zb = F.normalize(fp32(za), dim=1), F.normalize(fp32(zb), dim=1)
        keys_a, offset = all_gather(za)
        keys_b, _ = all_gather(zb)
        total = keys_a.shape[0]  # the global batch N
        anchors = torch.cat([za, zb])  # (2B, D)
        keys = torch.cat([keys_a, keys_b])  # (2N, D): a_1..a_N, b_1..b_N
        logits = anchors @ keys.T / temperature
        own = torch.arange(za.shape[0], device=za.device) + offset
        self_columns = torch.cat([own, own + total])  # an anchor is not its own negative
        logits = logits.masked_fill(F.one_hot(self_columns, 2 * total).bool(), float("-inf"))
        positives = torch.cat([own + total, own])  # a_n's positive is b_n and the reverse
        return 2 * F.cross_entropy(logits, positives)


@register_strategy
class Simclr(Strategy):
    name = "simclr"
    Config = SimclrConfig
    num_views = 2
    reads = ()  # no teacher: the loop runs none for it
    summary = SUMMARIES["simclr"]

    def __init__(self, config: SimclrConfig, student_probe: Features):
        super().__init__(config)
        embedding = student_probe.embedding
        if embedding is None or embedding.dim() != 2:
            shape = None if embedding is None else tuple(embedding.shape)
            raise UsageError(
                f"strategy simclr needs one pooled embedding per image from the student, got {shape}; "
                "use a student that pools (for a ViT: global_pool 'token' or 'avg')"
            )
        width = embedding.shape[1]
        hidden = config.projection_hidden_dim or width
        self.head = nn.Sequential(
            nn.Linear(width, hidden, bias=False),
            nn.BatchNorm1d(hidden),
            nn.ReLU(inplace=True),
            nn.Linear(hidden, config.projection_dim),
        )

    @classmethod
    def build(
        cls,
        config: SimclrConfig,
        teachers: Mapping[str, Any],
        teacher_probes: Mapping[str, Features],
        student: nn.Module,
        student_probe: Features,
    ) -> "Simclr":
        return cls(config, student_probe)

    @classmethod
    def teacher_requests(
        cls, config: SimclrConfig, teachers: Mapping[str, Any], student: nn.Module
    ) -> dict[str, FeatureRequest]:
        return {}

    @classmethod
    def student_request(cls, config: SimclrConfig) -> FeatureRequest:
        return FeatureRequest(embedding=True)

    def forward(self, step: StepInputs) -> dict[str, Tensor]:
        if len(step.student_views) < 2:
            raise UsageError(f"strategy simclr needs 2 views, got {len(step.student_views)}")
        a, b = step.student_views[0].embedding, step.student_views[1].embedding
        za, zb = self.head(torch.cat([a, b])).split(a.shape[0])  # one batch, as official: BN over both views
        return {self.name: nt_xent(za, zb, self.config.temperature)}
