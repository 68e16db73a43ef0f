"""KDSS: knowledge distillation with self-supervision, the triple loss of docs/methods.md#kdss.

Xu, Liu, Li, Loy, "Knowledge Distillation Meets Self-Supervision" (SSKD), ECCV 2020 (arXiv 2006.07114);
official code xuguodong03/SSKD student.py (lines 239-295) and wrapper.py. Every image x_0 is turned
into its four rotations x_r, r in {0, 90, 180, 270} degrees (`expand_views`: view 0 is upright, the
three rotations are appended as further views); teacher and student see all of them, the student as
one batch of 4B images (the training step joins views of one shape), so its batch-norm statistics cover
every rotation, as in SSKD's student.py.

    L = w_kl L_kd + w_tf L_tf + w_ss L_ss + w_feat L_feat + w_rot L_rot + w_ce L_ce

    L_kd   = T^2 KL(softmax(t(x_0)/T) || softmax(s(x_0)/T)), batch mean          w_kl 0.9, T 4  (SSKD)
    L_tf   = the same on the 3B rotated images kept by error_select(teacher probabilities, label,
             keep_ratio_tf)                                                      w_tf 2.7       (SSKD)
    L_ss   = tau^2 KL(softmax(c_T/tau) || softmax(c_S/tau)) on the rows kept by
             error_select(c_T, own image, keep_ratio_ss), where row (i, r) of c is the cosine similarity
             of image i rotated by r with every upright image j of the batch: c[(i,r), j] = cos(z(x_i^r), z(x_j^0));
             z_S = MLP head on the student embedding, z_T = the teacher's projection if it has one, else
             its pooled embedding                                               w_ss 10, tau 0.5, keep 0.75 (SSKD)
    L_feat = mean_{b,h,w} (1 - cos(P(F_S)[b,:,h,w], F_T[b,:,h,w])) on upright images, P a 1x1 conv
             (CNN maps) or Linear (ViT tokens) C_s -> C_t, the student map adaptive-avg-pooled to the
             teacher's grid, last stage / block by default                     w_feat 1.0     (distillkit [D])
    L_rot  = CE(Linear(C_s, 4)(f_S(x_r)), r) over all 4B images                 w_rot 0 (off)  (distillkit [D])
    L_ce   = CE(s(x_0), y) on labelled upright images                           w_ce 0.1       (SSKD)

error_select(P, target, ratio) (SSKD student.py:249-283): rank = position of `target` in the row sorted
by descending score; keep every row of rank 0 (the teacher is right) plus the int(ratio * #wrong)
wrong rows of smallest rank.

s(.) is a strategy-owned classifier Linear(D_s, K) on the student embedding (K = the teacher's classes):
the exported student has no classifier. L_kd and L_tf need a teacher with class logits; for a teacher
without them (self-supervised checkpoints) they are off, with a warning. L_ce uses the same classifier
when the data's labels are the teacher's classes (`ce_classes: null`, SSKD), else a separate
Linear(D_s, ce_classes). Rows are ordered per image, [x_0^90, x_0^180, x_0^270, x_1^90, ...], as in SSKD.

distillkit decisions [D]: SSKD first trains a teacher-side proj_head for 60 epochs; distillkit uses the
teacher's own projection head when it has one and the teacher's pooled embedding directly otherwise
(no separate teacher stage). Without labels, L_tf keeps every rotated row (SSKD's keep_ratio_tf is 1.0
anyway); with keep_ratio_tf < 1, unlabelled rows count as rank 0.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Mapping

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import UsageError
from ..features import FeatureRequest, Features, num_layers, resolve_layer
from ..messages import warn
from ..roles import PRIMARY_TEACHER
from .base import StepInputs, Strategy
from .registry import register_strategy
from .summaries import SUMMARIES
from .toolbox import (
    TeacherEmbed,
    as_map,
    check_fraction,
    check_non_negative,
    check_positive,
    check_teacher_embed,
    embedding_request,
    fp32,
    heads_per_view,
    kd_loss,
    labelled_ce,
    mlp_head,
    teacher_vector,
)

ROTATIONS = (1, 2, 3)  # quarter turns appended after the upright view


@dataclass
class KdssConfig:
    weight: float = 1.0
    w_kl: float = 0.9  # KD on upright images (needs teacher logits)
    temperature: float = 4.0  # T of L_kd and L_tf
    w_tf: float = 2.7  # KD on rotated images (needs teacher logits)
    keep_ratio_tf: float = 1.0
    w_ss: float = 10.0  # similarity-distribution transfer between rotated and upright images
    tau: float = 0.5
    keep_ratio_ss: float = 0.75
    w_feat: float = 1.0  # feature-map cosine, upright images
    feat_student_layer: int | float = -1  # block index or relative depth; -1 = last stage / block
    feat_teacher_layer: int | float = -1
    w_rot: float = 0.0  # rotation prediction (off by default)
    w_ce: float = 0.1  # cross-entropy on labelled upright images
    ce_classes: int | None = None  # None = the labels are the teacher's classes; else a separate head
    head_hidden_dim: int | None = None  # student SS head hidden width; None = the student's width
    teacher_embed: TeacherEmbed = "auto"  # auto = projection if any

    def __post_init__(self):
        check_positive("kdss", self, ("temperature", "tau", "ce_classes", "head_hidden_dim"))
        check_non_negative("kdss", self, ("w_kl", "w_tf", "w_ss", "w_feat", "w_rot", "w_ce"))
        check_fraction("kdss", self, ("keep_ratio_tf", "keep_ratio_ss"))


def rotate_views(views: list[Tensor]) -> list[Tensor]:
    """The views, then the upright view turned by 90, 180 and 270 degrees (torch.rot90 on H, W)."""
    return list(views) + [torch.rot90(views[0], k, dims=(2, 3)) for k in ROTATIONS]


def error_select(scores: Tensor, target: Tensor, ratio: float, always_keep: Tensor | None = None) -> Tensor:
    """SSKD's error-level selection: sorted indices of the rows to keep.

    rank[i] = position of target[i] in row i sorted by descending score; keep all rows of rank 0 and
    the int(ratio * #wrong) wrong rows of smallest rank (ties: lower row first). `always_keep` rows
    count as rank 0 (unlabelled rows)."""
    order = torch.argsort(scores, dim=1, descending=True)
    rank = (order == target[:, None]).long().argmax(dim=1)
    if always_keep is not None:
        rank = torch.where(always_keep, torch.zeros_like(rank), rank)
    wrong = int((rank > 0).sum())
    kept = scores.shape[0] - wrong + int(wrong * ratio)
    return torch.sort(torch.argsort(rank, stable=True)[:kept]).values


def rotation_similarities(upright: Tensor, rotated: list[Tensor]) -> Tensor:
    """c[(i, r), j] = cos(rotated[r][i], upright[j]), rows ordered per image: (3B, B), in fp32."""
    aug = torch.stack([fp32(r) for r in rotated], dim=1).flatten(0, 1)  # (B, 3, D) -> (3B, D)
    return F.normalize(aug, dim=1) @ F.normalize(fp32(upright), dim=1).T


def per_image_rows(tensors: list[Tensor]) -> Tensor:
    """[(B, ...)] * 3 -> (3B, ...) with the rotations of one image next to each other."""
    return torch.stack(tensors, dim=1).flatten(0, 1)


def feature_map_cosine(student_map: Tensor, teacher_map: Tensor) -> Tensor:
    """mean over (b, h, w) of 1 - cos along channels; the student map is pooled to the teacher grid."""
    if tuple(student_map.shape[-2:]) != tuple(teacher_map.shape[-2:]):
        student_map = F.adaptive_avg_pool2d(student_map, teacher_map.shape[-2:])
    with torch.autocast(device_type=student_map.device.type, enabled=False):
        return (1.0 - F.cosine_similarity(fp32(student_map), fp32(teacher_map), dim=1)).mean()


@register_strategy
class Kdss(Strategy):
    name = "kdss"
    Config = KdssConfig
    summary = SUMMARIES["kdss"]

    def __init__(self, config: KdssConfig, teacher_probe: Features, student_probe: Features):
        super().__init__(config)
        self._rotation_start = 1  # index of the first rotated view; set again by expand_views
        student_dim = student_probe.embedding.shape[1]
        has_logits = teacher_probe.logits is not None
        if not has_logits and (config.w_kl > 0 or config.w_tf > 0):
            warn(
                "strategy kdss: the teacher has no class logits, so L_kd and L_tf (the KL terms) are "
                "off; set w_kl and w_tf to 0 to silence this"
            )
        self.kd_on = has_logits and config.w_kl > 0
        self.tf_on = has_logits and config.w_tf > 0
        self.ce_on = config.w_ce > 0 and (config.ce_classes is not None or has_logits)
        shared_ce = self.ce_on and config.ce_classes is None
        self.classifier = (
            nn.Linear(student_dim, teacher_probe.logits.shape[1]) if self.kd_on or self.tf_on or shared_ce else None
        )
        self.ce_head = nn.Linear(student_dim, config.ce_classes) if self.ce_on and not shared_ce else None

        self.use_projection = teacher_probe.projection is not None
        self.ss_head = None
        if config.w_ss > 0:
            teacher_dim = teacher_vector(teacher_probe, self.use_projection).shape[1]
            self.ss_head = mlp_head(student_dim, config.head_hidden_dim or student_dim, teacher_dim)

        self.feat_proj = None
        if config.w_feat > 0:
            ((self.teacher_layer, teacher_map),) = teacher_probe.layers.items()
            ((self.student_layer, student_map),) = student_probe.layers.items()
            teacher_channels = as_map(teacher_map, "the teacher layer of kdss.feat").shape[1]
            if student_map.dim() == 4:  # conv map: 1x1 conv
                self.feat_proj = nn.Conv2d(student_map.shape[1], teacher_channels, kernel_size=1)
            else:  # tokens: Linear
                as_map(student_map, "the student layer of kdss.feat")
                self.feat_proj = nn.Linear(student_map.shape[2], teacher_channels)
        self.rot_head = nn.Linear(student_dim, len(ROTATIONS) + 1) if config.w_rot > 0 else None
        if not any(self.active_terms().values()):
            raise UsageError(
                "strategy kdss has no active term: every weight is 0, or the KL terms are the only "
                "ones left and the teacher has no logits"
            )

    def active_terms(self) -> dict[str, bool]:
        c = self.config
        return {
            "kd": self.kd_on,
            "tf": self.tf_on,
            "ss": c.w_ss > 0,
            "feat": c.w_feat > 0,
            "rot": c.w_rot > 0,
            "ce": self.ce_on,
        }

    @classmethod
    def build(
        cls,
        config: KdssConfig,
        teachers: Mapping,
        teacher_probes: Mapping[str, Features],
        student: nn.Module,
        student_probe: Features,
    ) -> "Kdss":
        return cls(config, teacher_probes[PRIMARY_TEACHER], student_probe)

    @classmethod
    def teacher_requests(cls, config: KdssConfig, teachers: Mapping, student: nn.Module) -> dict[str, FeatureRequest]:
        teacher = teachers[PRIMARY_TEACHER]
        wants_logits = teacher.has_logits and (
            config.w_kl > 0 or config.w_tf > 0 or (config.w_ce > 0 and config.ce_classes is None)
        )
        request = FeatureRequest(layers=(config.feat_teacher_layer,) if config.w_feat > 0 else (), logits=wants_logits)
        if config.w_ss > 0:
            request = request.merge(embedding_request(config.teacher_embed, teacher))
        return {PRIMARY_TEACHER: request}

    @classmethod
    def student_request(cls, config: KdssConfig) -> FeatureRequest:
        return FeatureRequest(embedding=True, layers=(config.feat_student_layer,) if config.w_feat > 0 else ())

    @classmethod
    def check_teachers(cls, config: KdssConfig, teachers: Mapping) -> None:
        teacher = teachers[PRIMARY_TEACHER]
        check_teacher_embed(cls.name, config.teacher_embed, teacher)
        if config.w_feat > 0:
            _check_layer("teacher", lambda: teacher.num_layers, config.feat_teacher_layer, "feat_teacher_layer")

    @classmethod
    def check_student(cls, config: KdssConfig, student: nn.Module) -> None:
        if config.w_feat > 0:
            _check_layer("student", lambda: num_layers(student), config.feat_student_layer, "feat_student_layer")

    def term_weights(self) -> dict[str, float]:
        c = self.config
        weights = {"kd": c.w_kl, "tf": c.w_tf, "ss": c.w_ss, "feat": c.w_feat, "rot": c.w_rot, "ce": c.w_ce}
        return {term: weights[term] for term, on in self.active_terms().items() if on}

    def expand_views(self, views: list[Tensor]) -> list[Tensor]:
        self._rotation_start = len(views)
        return rotate_views(views)

    def forward(self, step: StepInputs) -> dict[str, Tensor]:
        start = self._rotation_start
        if len(step.student_views) < start + len(ROTATIONS):
            raise UsageError(
                f"strategy kdss needs the upright view and its 3 rotations (expand_views), got "
                f"{len(step.student_views)} views"
            )
        views = [0] + list(range(start, start + len(ROTATIONS)))
        teacher = [step.teacher_views[v] for v in views]
        student = [step.student_views[v] for v in views]
        embeddings = [s.embedding for s in student]
        terms: dict[str, Tensor] = {}
        c = self.config
        # the heads (no batch norm: row-wise) run once over all 4 x B rows, as SSKD's do (`heads_per_view`)
        logits = heads_per_view(self.classifier, embeddings) if self.classifier is not None else None
        if self.kd_on:
            terms["kd"] = kd_loss(logits[0], teacher[0].logits, c.temperature)
        if self.tf_on:
            student_rotated = per_image_rows(logits[1:])
            teacher_rotated = per_image_rows([t.logits for t in teacher[1:]])
            keep = torch.arange(student_rotated.shape[0], device=student_rotated.device)
            if c.keep_ratio_tf < 1.0 and step.labels is not None:
                labels = step.labels.to(teacher_rotated.device).repeat_interleave(len(ROTATIONS))
                keep = error_select(teacher_rotated, labels.clamp(min=0), c.keep_ratio_tf, always_keep=labels < 0)
            terms["tf"] = kd_loss(student_rotated[keep], teacher_rotated[keep], c.temperature)
        if self.ss_head is not None:
            z_s = heads_per_view(self.ss_head, embeddings)
            z_t = [teacher_vector(t, self.use_projection) for t in teacher]
            with torch.autocast(device_type=z_s[0].device.type, enabled=False):
                c_s = rotation_similarities(z_s[0], z_s[1:])
                c_t = rotation_similarities(z_t[0], z_t[1:])
            own = torch.arange(c_t.shape[1], device=c_t.device).repeat_interleave(len(ROTATIONS))
            keep = error_select(c_t, own, c.keep_ratio_ss)
            terms["ss"] = kd_loss(c_s[keep], c_t[keep], c.tau)
        if self.feat_proj is not None:
            student_map = student[0].layers[self.student_layer]
            if student_map.dim() == 3:  # tokens: Linear per token, then the grid
                student_map = as_map(self.feat_proj(student_map), "the student layer of kdss.feat")
            else:
                student_map = self.feat_proj(student_map)
            teacher_map = as_map(teacher[0].layers[self.teacher_layer], "the teacher layer of kdss.feat")
            terms["feat"] = feature_map_cosine(student_map, teacher_map)
        if self.rot_head is not None:
            rot_logits = self.rot_head(torch.cat(embeddings))
            rotation = torch.arange(len(views), device=rot_logits.device).repeat_interleave(embeddings[0].shape[0])
            with torch.autocast(device_type=rot_logits.device.type, enabled=False):
                terms["rot"] = F.cross_entropy(fp32(rot_logits), rotation)
        if self.ce_on:
            ce_logits = self.ce_head(embeddings[0]) if self.ce_head is not None else logits[0]
            ce = labelled_ce(ce_logits, step.labels, self.name)
            if ce is not None:
                terms["ce"] = ce
        return terms


def _check_layer(side: str, count_layers: Callable[[], int], layer: int | float, key: str) -> None:
    try:
        resolve_layer(layer, count_layers())
    except UsageError as e:
        raise UsageError(
            f"strategy kdss: the feature-map term (w_feat > 0) taps a {side} layer, but {e}; "
            f"choose another strategy.kdss.{key}, or set strategy.kdss.w_feat=0"
        ) from None
