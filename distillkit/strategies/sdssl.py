"""SDSSL: self-distilled SSL, every student block contrasted with the frozen teacher's final embedding.

Jang, Kim, Yoo, Kong, Kim, Kwak, "Self-Distilled Self-Supervised Representation Learning", WACV 2023
(arXiv 2111.12958); official code hagiss/SDSSL: loss pl_train_moco.py:138-226 (`info_nce_loss`,
`info_nce_loss_layer`, `training_step`), projector / predictor byol_pytorch/byol_pytorch.py:7-91 (`MLP`,
`NetWrapper`), ramp utils.py:154-165 (`cosine_scheduler(0, ratio, ...)`); docs/methods.md#sdssl.
distillkit replaces SD-MoCo v3's momentum encoder by the frozen teacher (docs/methods.md#sdssl-decisions):

    t(v)   = l2norm(the teacher's projection-head embedding of view v, or its pooled embedding), no gradient,
             gathered from every process in rank order (world * B rows)
    f_l(v) = the student's block l pooled as the student pools its output: ViTs the [CLS] token (or the
             patch-token mean for global_pool='avg') after the shared final norm; CNNs the global average
             of the stage map. The last term uses the student's own embedding (for CNNs that includes
             the layers after the last stage, e.g. conv_head), which is f_last for ViTs.
    z_l(v) = l2norm(pred_l(proj_l(f_l(v))))        (pred_l = identity without a predictor)
    NCE(z, t) = 2 tau * CE(z t^T / tau, arange(B) + B * rank)      tau = 0.2, batch mean

    L      = L_out + lambda(p) * L_mid + L_pred
    L_out  = sum_{(a,b)} NCE(z_last(a), t(b))
    L_mid  = sum_{(a,b)} mean_{l in intermediate blocks} NCE(z_l(a), t(b))
    L_pred = sum_{(a,b)} sum_{l incl. last} NCE(l2norm(pred_l(sg(proj_l(f_l(a))))), t(b))   (only with a predictor)

(a, b) runs over (view 1, view 2) and (view 2, view 1) with `views: 2` (the official symmetric loss,
summed, not averaged), or is (view 1, view 1) with `views: 1`. L_pred trains the predictors on detached
projections; the official code writes it 12 * mean over its 12 blocks, i.e. the sum over blocks.
lambda(p) ramps from 0 to `ramp_max` over training (p = StepInputs.progress): cosine
ramp_max * (1 - cos(pi p)) / 2 (official), linear ramp_max * p, or constant ramp_max.

proj_l = Linear(no bias) -> BN -> ReLU -> Linear(no bias) -> BN -> ReLU -> Linear(no bias) -> BN(affine=False)
onto the teacher embedding's width; pred_l = Linear(no bias) -> BN -> ReLU -> Linear(no bias) -> BN(affine=False).
Official widths (ViT-B): projector hidden 2048 (blocks 1-11) / 4096 (block 12), out 256, predictor hidden 4096;
the defaults here are smaller (512 / 1024, predictor 1024) for small students.

One predictor pass: L_pred's value is the block's term itself (pred_l(sg(p)) = pred_l(p) forward), so
its gradient is that term's gradient restricted to the predictor. With w_l the term's weight in L (1 for
the output, lambda(p) / #blocks for each intermediate block), L = sum_l (w_l + 1) NCE(pred_l(g(proj_l)))
with g the identity whose backward scales the gradient by w_l / (w_l + 1): the predictor's gradient is
(w_l + 1) dNCE, the projector's and the student's w_l dNCE, exactly the official two passes' gradients,
with one predictor forward and backward less per block and view pair. (The predictors' batch-norm running statistics,
never used in training, are updated once per step instead of twice.)
Each head runs once per step over both views' rows, its batch norms on each view's rows alone
(`toolbox.heads_per_view`): the numbers of one call per view, one matrix product of 2B rows per layer.

Terms are logged as they enter the loss: `sdssl.mid` is lambda(p) * L_mid, so it reads 0 at the start.
The teacher keys are gathered inside `forward` with torch.distributed (no gradient flows to them), so
N processes see the negatives one process with the global batch sees.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal, Mapping

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import UsageError
from ..features import FeatureRequest, Features, num_layers, pools_blocks, resolve_layers
from ..roles import PRIMARY_TEACHER
from .base import StepInputs, Strategy
from .registry import register_strategy
from .summaries import SUMMARIES
from .toolbox import (
    TeacherEmbed,
    all_gather,
    check_non_negative,
    check_positive,
    check_teacher_embed,
    embedding_request,
    fp32,
    heads_per_view,
    teacher_vector,
)


@dataclass
class SdsslConfig:
    weight: float = 1.0
    blocks: list[int | float] | None = None  # student blocks / stages with a projector; None = all; the last always
    views: Literal[1, 2] = 2  # 2: each view against the other view's teacher embedding (official); 1: same view
    temperature: float = 0.2
    ramp: Literal["cosine", "linear", "constant"] = "cosine"  # lambda(p) of the intermediate blocks
    ramp_max: float = 1.0  # official 1.0 (SD-MoCo v3), 0.8 (SD-SimCLR / SD-BYOL)
    projector_hidden_dim: int = 512  # intermediate blocks; official 2048
    final_projector_hidden_dim: int = 1024  # the last block; official 4096
    embed_dim: int | None = None  # projector output; must equal the teacher embedding's width (None = it)
    predictor: bool = True
    predictor_hidden_dim: int = 1024  # official 4096
    teacher_embed: TeacherEmbed = "auto"  # auto = projection if any

    def __post_init__(self):  # runs while the recipe is validated, before anything loads
        check_positive(
            "sdssl",
            self,
            ("temperature", "projector_hidden_dim", "final_projector_hidden_dim", "embed_dim", "predictor_hidden_dim"),
        )
        check_non_negative("sdssl", self, ("ramp_max",))


def sdssl_mlp(num_layers: int, in_dim: int, hidden_dim: int, out_dim: int) -> nn.Sequential:
    """SDSSL's `MLP`: (Linear no bias, BN, ReLU) x (num_layers - 1), then Linear no bias, BN(affine=False)."""
    dims = [in_dim] + [hidden_dim] * (num_layers - 1) + [out_dim]
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(dims[:-1], dims[1:])):
        layers.append(nn.Linear(a, b, bias=False))
        last = i == num_layers - 1
        layers += [nn.BatchNorm1d(b, affine=False)] if last else [nn.BatchNorm1d(b), nn.ReLU(inplace=True)]
    return nn.Sequential(*layers)


class _ScaleGradient(torch.autograd.Function):
    """The identity forward; the backward multiplies the gradient by `scale`."""

    @staticmethod
    def forward(ctx, x: Tensor, scale: float) -> Tensor:
        ctx.scale = scale
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None]:
        return grad * ctx.scale, None


def scale_gradient(x: Tensor, scale: float) -> Tensor:
    return _ScaleGradient.apply(x, scale)


def info_nce(student: Tensor, keys: Tensor, offset: int, tau: float) -> Tensor:
    """2 tau * CE(l2norm(student) keys^T / tau, arange(B) + offset) for l2-normalised keys, in fp32."""
    with torch.autocast(device_type=student.device.type, enabled=False):
        logits = F.normalize(fp32(student), dim=1) @ keys.T / tau
        labels = torch.arange(student.shape[0], device=student.device) + offset
        return 2 * tau * F.cross_entropy(logits, labels)


def ramp(shape: str, maximum: float, progress: float) -> float:
    """lambda(p) for p = the fraction of training done."""
    p = min(max(progress, 0.0), 1.0)
    if shape == "cosine":
        return maximum * (1.0 - math.cos(math.pi * p)) / 2.0
    if shape == "linear":
        return maximum * p
    return maximum


@register_strategy
class Sdssl(Strategy):
    name = "sdssl"
    Config = SdsslConfig
    summary = SUMMARIES["sdssl"]

    def __init__(self, config: SdsslConfig, teacher_probe: Features, student_probe: Features):
        super().__init__(config)
        self.num_views = config.views
        self.use_projection = teacher_probe.projection is not None
        teacher_dim = teacher_vector(teacher_probe, self.use_projection).shape[1]
        if config.embed_dim is not None and config.embed_dim != teacher_dim:
            raise UsageError(
                f"strategy.sdssl.embed_dim = {config.embed_dim}, but the teacher embedding SDSSL "
                f"contrasts with has {teacher_dim} dims; set it to {teacher_dim} or null"
            )
        self.blocks = sorted(student_probe.block_embeddings)[:-1]  # the last block is the output term
        inputs = [student_probe.block_embeddings[i] for i in self.blocks] + [student_probe.embedding]
        if any(f.dim() != 2 for f in inputs):
            raise UsageError(
                "strategy sdssl needs one embedding per image from each student block, but the "
                "student pools to tokens (a ViT with global_pool=''); use global_pool 'token' or 'avg'"
            )
        hidden = [config.projector_hidden_dim] * len(self.blocks) + [config.final_projector_hidden_dim]
        self.projectors = nn.ModuleList(sdssl_mlp(3, f.shape[1], h, teacher_dim) for f, h in zip(inputs, hidden))
        self.predictors = (
            nn.ModuleList(sdssl_mlp(2, teacher_dim, config.predictor_hidden_dim, teacher_dim) for _ in inputs)
            if config.predictor
            else None
        )

    @classmethod
    def build(
        cls,
        config: SdsslConfig,
        teachers: Mapping,
        teacher_probes: Mapping[str, Features],
        student: nn.Module,
        student_probe: Features,
    ) -> "Sdssl":
        return cls(config, teacher_probes[PRIMARY_TEACHER], student_probe)

    @classmethod
    def teacher_requests(cls, config: SdsslConfig, teachers: Mapping, student: nn.Module) -> dict[str, FeatureRequest]:
        return {PRIMARY_TEACHER: embedding_request(config.teacher_embed, teachers[PRIMARY_TEACHER])}

    @classmethod
    def student_request(cls, config: SdsslConfig) -> FeatureRequest:
        blocks = "all" if config.blocks is None else tuple(config.blocks) + (-1,)
        return FeatureRequest(embedding=True, block_embeddings=blocks)

    @classmethod
    def check_teachers(cls, config: SdsslConfig, teachers: Mapping) -> None:
        check_teacher_embed(cls.name, config.teacher_embed, teachers[PRIMARY_TEACHER])

    @classmethod
    def check_student(cls, config: SdsslConfig, student: nn.Module) -> None:
        try:
            total = num_layers(student)
            resolve_layers(tuple(config.blocks or ()), total)
        except UsageError as e:
            blocks = "all" if config.blocks is None else list(config.blocks)
            raise UsageError(
                f"strategy sdssl distils the student's blocks {blocks}, but {e}; change strategy.sdssl.blocks"
            ) from None
        if not pools_blocks(student):
            raise UsageError(
                f"strategy sdssl reads each block's class token, but {type(student).__name__}."
                "forward_intermediates cannot return prefix tokens; use a timm VisionTransformer"
            )

    def term_weights(self) -> dict[str, float]:
        weights = {"out": 1.0}
        if self.blocks:
            weights["mid"] = 1.0  # lambda(p) is applied in forward, where the progress is known
        if self.predictors is not None:
            weights["pred"] = 1.0
        return weights

    def forward(self, step: StepInputs) -> dict[str, Tensor]:
        c = self.config
        if len(step.student_views) < c.views:
            raise UsageError(f"strategy sdssl with views = {c.views} got {len(step.student_views)} view(s)")
        pairs = [(0, 1), (1, 0)] if c.views == 2 else [(0, 0)]
        out = mid = pred = 0.0
        lam = ramp(c.ramp, c.ramp_max, step.progress)
        # each term's weight in L: the output term 1, each intermediate one lambda(p) / #blocks
        weights = [lam / len(self.blocks) for _ in self.blocks] + [1.0]
        # each head runs once over the views it serves (batch norms per view: `heads_per_view`)
        used = [a for a, _ in pairs]
        inputs = [[step.student_views[a].block_embeddings[i] for a in used] for i in self.blocks]
        inputs.append([step.student_views[a].embedding for a in used])
        z = [heads_per_view(project, views) for project, views in zip(self.projectors, inputs)]
        if self.predictors is not None:
            # one predictor pass serves L_pred too (module docstring, "One predictor pass")
            z = [
                heads_per_view(predict, [scale_gradient(zv, w / (w + 1.0)) for zv in views])
                for predict, views, w in zip(self.predictors, z, weights)
            ]
        for j, (_, b) in enumerate(pairs):
            keys = F.normalize(fp32(teacher_vector(step.teacher_views[b], self.use_projection)), dim=1)
            keys, offset = all_gather(keys.detach())  # stop-grad keys: no gradient crosses processes
            losses = [info_nce(views[j], keys, offset, c.temperature) for views in z]
            if self.predictors is not None:
                pred = pred + sum(losses)
            out = out + losses[-1]
            if self.blocks:
                mid = mid + sum(losses[:-1]) / len(self.blocks)
        terms = {"out": out}
        if self.blocks:
            terms["mid"] = lam * mid
        if self.predictors is not None:
            terms["pred"] = pred
        return terms
