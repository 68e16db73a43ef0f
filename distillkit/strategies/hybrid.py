"""Hybrid Distill: a MIM teacher's token relations at intermediate layers + a CL/supervised teacher's
final features, with progressive redundant-token masking of the student input.

Shi et al., "Hybrid Distillation: Connecting Masked Autoencoders with Contrastive Learners", ICLR 2024
(OpenReview jUWktnsplU; no official code). docs/methods.md#hybrid (objective) and
docs/methods.md#hybrid-decisions (distillkit's decisions). With T_c the feature teacher (role
`feature_teacher`, default the recipe's `teacher`), T_m the relation teacher (role `relation_teacher`,
default `teachers.mim`) and M the kept tokens:

    L = alpha * D( LN(T_c(x))[M],  h_c(S(x_M)) )                                     feature term
      + beta  * mean_{(l_s, l_t)} D( R(T_m^{l_t}(x))[M, M],  R(S^{l_s}(x_M)) )         relation term
    R(q, k) = softmax(q k^T / sqrt(d)) per relation head, over the kept tokens only
    D_feature  = Smooth-L1 (beta 1; element mean) by default, or MSE
    D_relation = row-wise KL(R_t || R_s), mean over rows, heads, images (MiniLMv2) by default, or Smooth-L1
    alpha = beta = 1.0 (quoted from the paper by its reviewers)

  [D, docs/methods.md#hybrid-decisions: not Smooth-L1 for the relations too. Relation maps are probabilities of
  size ~1/K per entry, so an element-mean Smooth-L1 is ~0.5 (1/K)^2: measured 1e-5 against a feature
  term of 0.5 with only K = 16 tokens (random ViTs), i.e. no gradient next to the feature term, and it
  shrinks as 1/K^2. KL sums each row (its gradient on the student's attention logits is R_s - R_t, per
  row), so it does not vanish with K; `relation_loss: smooth_l1` remains available.]

- T_c(x): the feature teacher's last block (ViT: patch tokens; CNN: last feature map), parameter-free
  LayerNorm per token. Teachers see the full image; their tokens are resized to the student's grid.
- Student: a ViT student runs on its prefix tokens + the kept patch tokens only (the dropped tokens
  cost nothing); h_c = Linear(D_s, D_c) on its final-normed last block. A CNN student sees the image
  with the dropped patches set to 0 (its input normalisation's zero) and h_c is a 1x1 conv on its last map.
- Relations: teacher q and k of block l_t, prefix tokens dropped, resized to the student's grid and
  gathered at the kept tokens before the softmax (= the full-image attention renormalised over the kept
  tokens). Heads: MiniLMv2-style relation heads (q and k re-split into h_r = min(H_s, H_t) heads in both
  networks), or `head_mode: average` (head-averaged maps). CNN students have no attention: each of their
  stage maps, resized to the grid, goes through learned 1x1 query and key projections with h_r heads.
- Layers: student blocks `student_layers` (default all but the last), teacher block
  l_t = round((l_s + 1) * L_t / L_s) - 1 unless `teacher_layers` is given.
- Masking: redundancy s_i = mean over heads of T_c's [CLS] -> token i attention at its last block (a
  teacher without class token: the mean attention token i receives); keep the n - round(r n) tokens with
  the largest log s_i + gumbel_scale * Gumbel noise (sampling in proportion to s, Gumbel-top-k).
  r = mask_ratio * ramp(min(1, progress / mask_ramp)), ramp linear (default), cosine, or constant.
  [D: the paper's schedule and ratio are unknown; 0 -> 0.5 over the first half of training.]
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal, Mapping

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import UsageError
from ..features import (
    FeatureRequest,
    Features,
    attention_width,
    extract_features,
    forward_kept_tokens,
    is_token_model,
    layer_channels,
    num_layers,
    patch_grid,
    resolve_layers,
    runs_on_kept_tokens,
)
from ..relations import relation_maps
from ..roles import PRIMARY_TEACHER
from .base import StepInputs, Strategy
from .registry import register_strategy
from .summaries import SUMMARIES
from .toolbox import (
    as_map,
    check_fraction,
    check_non_negative,
    check_positive,
    fp32,
    gather_tokens,
    generator_from_global_rng,
    peer_features,
    regression_loss,
)


@dataclass
class HybridConfig:
    weight: float = 1.0
    feature_teacher: str = PRIMARY_TEACHER  # role of the CL / supervised teacher: final features, token scores
    relation_teacher: str = "mim"  # role of the MIM teacher: token relations
    feature_weight: float = 1.0  # alpha
    relation_weight: float = 1.0  # beta
    student_layers: list[int | float] | None = None  # None = every student block but the last
    teacher_layers: list[int | float] | None = None  # None = round((l_s + 1) L_t / L_s) - 1
    head_mode: Literal["split", "average"] = "split"
    relation_heads: int | None = None  # split mode; None = the largest h <= min(H_s, H_t) dividing both widths
    #                                     (CNN students: H_t)
    cnn_head_dim: int = 64  # CNN students: width of each learned query / key head
    relation_loss: Literal["kl", "smooth_l1"] = "kl"  # see the module docstring for why not Smooth-L1
    feature_loss: Literal["smooth_l1", "mse"] = "smooth_l1"
    beta: float = 1.0  # Smooth-L1 beta
    mask_ratio: float = 0.5  # r_max: the share of student tokens dropped at the end of the ramp
    mask_ramp: float = 0.5  # share of training over which the ratio ramps from 0 to mask_ratio
    mask_schedule: Literal["linear", "cosine", "constant"] = "linear"
    mask_score: Literal["cls_attention", "random"] = "cls_attention"
    gumbel_scale: float = 1.0  # 0 = always drop the lowest-scoring tokens
    grid: int | None = None  # CNN students: side of the token grid; None = the relation teacher's patch grid

    def __post_init__(self):
        check_fraction("hybrid", self, ("mask_ratio",), one_allowed=False)
        check_fraction("hybrid", self, ("mask_ramp",))
        check_non_negative("hybrid", self, ("feature_weight", "relation_weight", "gumbel_scale"))
        check_positive("hybrid", self, ("beta", "cnn_head_dim", "relation_heads", "grid"))
        if self.teacher_layers is not None and (
            self.student_layers is None or len(self.teacher_layers) != len(self.student_layers)
        ):
            raise UsageError("strategy.hybrid.teacher_layers pairs with student_layers: give both, of the same length")
        if self.student_layers is not None and not self.student_layers:
            raise UsageError("strategy.hybrid.student_layers must name at least one layer, or be null")


def mask_ratio_at(config: HybridConfig, progress: float) -> float:
    """The share of tokens dropped at `progress` (fraction of training done)."""
    if config.mask_schedule == "constant" or config.mask_ramp == 0:
        return config.mask_ratio
    x = min(1.0, max(0.0, progress) / config.mask_ramp)
    ramp = x if config.mask_schedule == "linear" else 0.5 * (1.0 - math.cos(math.pi * x))
    return config.mask_ratio * ramp


def redundancy_scores(qk: Tensor, prefix: int) -> Tensor:
    """Mean over heads of the [CLS] -> patch attention, (B, N); without prefix tokens, the mean attention
    each patch receives. `qk`: (2, B, H, P + N, d) of the feature teacher's last block."""
    q, k = fp32(qk).unbind(0)
    queries = q[:, :, :1] if prefix else q
    attention = (queries @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])).softmax(dim=-1)
    return attention[..., prefix:].mean(dim=(1, 2))


def keep_indices(scores: Tensor, keep: int, gumbel_scale: float, generator: torch.Generator) -> Tensor:
    """The `keep` tokens with the largest log(score) + gumbel_scale * Gumbel noise, in grid order: (B, keep)."""
    keys = scores.clamp_min(1e-12).log()
    if gumbel_scale > 0:
        uniform = torch.rand(scores.shape, generator=generator).clamp(1e-9, 1 - 1e-9).to(scores.device)
        keys = keys - gumbel_scale * torch.log(-torch.log(uniform))
    return keys.topk(keep, dim=1).indices.sort(dim=1).values


def to_grid(tokens: Tensor, grid: int) -> Tensor:
    """(B, N, C) square-grid tokens or (B, C, H, W) maps -> (B, grid * grid, C) tokens on a grid x grid grid
    (adaptive average pooling to shrink, bilinear interpolation to grow)."""
    maps = as_map(tokens, "a hybrid feature")
    if maps.shape[-1] != grid or maps.shape[-2] != grid:
        if maps.shape[-1] >= grid and maps.shape[-2] >= grid:
            maps = F.adaptive_avg_pool2d(maps, grid)
        else:
            maps = F.interpolate(maps, size=(grid, grid), mode="bilinear", align_corners=False)
    return maps.flatten(2).transpose(1, 2)


def qk_to_grid(qk: Tensor, prefix: int, grid: int) -> Tensor:
    """Teacher queries and keys (2, B, H, P + N, d) -> patch tokens only, resized: (2, B, H, grid^2, d)."""
    two, batch, heads, _, dim = qk.shape
    patches = qk[:, :, :, prefix:].reshape(two * batch * heads, -1, dim)
    return to_grid(patches, grid).reshape(two, batch, heads, grid * grid, dim)


def relations(qk: Tensor, head_mode: str, heads: int, keep: Tensor | None = None) -> Tensor:
    """Relation maps (B, h, K, K) in fp32: re-split into `heads` heads, or averaged over heads (h = 1)."""
    maps = relation_maps(fp32(qk), heads=None if head_mode == "average" else heads, keep=keep)
    return maps.mean(dim=1, keepdim=True) if head_mode == "average" else maps


def relation_loss(student: Tensor, teacher: Tensor, kind: str, beta: float) -> Tensor:
    if kind == "kl":  # row-wise KL(teacher || student), mean over rows
        return (teacher * (teacher.clamp_min(1e-12).log() - student.clamp_min(1e-12).log())).sum(-1).mean()
    return F.smooth_l1_loss(student, teacher, beta=beta)


def default_relation_heads(student_heads: int, student_width: int, teacher_heads: int, teacher_width: int) -> int:
    """MiniLMv2's h_r = min(H_s, H_t), lowered until both q/k widths split evenly (1 always does)."""
    heads = min(student_heads, teacher_heads)
    while student_width % heads or teacher_width % heads:
        heads -= 1
    return heads


def default_layer_pairs(student_total: int, teacher_total: int) -> list[tuple[int, int]]:
    """Every student block but the last, each with teacher block round((l_s + 1) L_t / L_s) - 1."""
    return [
        (s, max(0, math.floor((s + 1) * teacher_total / student_total + 0.5) - 1)) for s in range(student_total - 1)
    ]


def layer_pairs(config: HybridConfig, student: nn.Module, relation_teacher) -> list[tuple[int, int]]:
    student_total, teacher_total = num_layers(student), relation_teacher.num_layers
    if config.student_layers is None:
        if student_total < 2:
            raise UsageError(
                "strategy hybrid distils relations at every student layer but the last, and this "
                "student has one; set strategy.hybrid.student_layers"
            )
        return default_layer_pairs(student_total, teacher_total)
    students = [resolve_layers((d,), student_total)[0] for d in config.student_layers]
    if config.teacher_layers is not None:
        teachers = [resolve_layers((d,), teacher_total)[0] for d in config.teacher_layers]
    else:
        teachers = [max(0, math.floor((s + 1) * teacher_total / student_total + 0.5) - 1) for s in students]
    return list(zip(students, teachers))


@dataclass
class KeptFeatures(Features):
    """A hybrid student forward: which grid tokens were kept, and the student's outputs on them.

    ViT students: `layers` / `relations` hold kept tokens only (prefix tokens first in relations);
    `final_tokens` is the final-normed last block at the kept tokens. CNN students: full maps of the
    masked image."""

    keep_index: Tensor | None = None  # (B, K) indices into the grid x grid tokens
    final_tokens: Tensor | None = None  # (B, K, D_s), ViT students


@register_strategy
class Hybrid(Strategy):
    name = "hybrid"
    Config = HybridConfig
    reads = (HybridConfig.feature_teacher, HybridConfig.relation_teacher)  # by default; the config names them
    summary = SUMMARIES["hybrid"]

    @classmethod
    def teacher_roles(cls, config: HybridConfig) -> tuple[str, ...]:
        return tuple(dict.fromkeys((config.feature_teacher, config.relation_teacher)))

    @classmethod
    def teacher_requests(cls, config: HybridConfig, teachers: Mapping, student: nn.Module) -> dict[str, FeatureRequest]:
        scores = config.mask_score == "cls_attention" and config.mask_ratio > 0
        feature = FeatureRequest(layers=(-1,), relations=(-1,) if scores else ())
        pairs = layer_pairs(config, student, teachers[config.relation_teacher])
        relation = FeatureRequest(relations=tuple(sorted({t for _, t in pairs})))
        if config.feature_teacher == config.relation_teacher:
            return {config.feature_teacher: feature.merge(relation)}
        return {config.feature_teacher: feature, config.relation_teacher: relation}

    @classmethod
    def student_request(cls, config: HybridConfig) -> FeatureRequest:
        return FeatureRequest()  # the strategy runs the student itself (student_features)

    @classmethod
    def check_teachers(cls, config: HybridConfig, teachers: Mapping) -> None:
        relation, feature = teachers[config.relation_teacher], teachers[config.feature_teacher]
        if not relation.is_vit:
            raise UsageError(
                f"strategy hybrid imitates the token relations (attention q.k) of its relation teacher "
                f"(role {config.relation_teacher!r}), but {relation.name} is a conv net; use a ViT "
                "MIM teacher such as mae-vitb"
            )
        if config.mask_score == "cls_attention" and config.mask_ratio > 0 and not feature.is_vit:
            raise UsageError(
                f"strategy hybrid ranks tokens by the [CLS] attention of its feature teacher (role "
                f"{config.feature_teacher!r}), but {feature.name} is a conv net without attention; "
                "use a ViT feature teacher, strategy.hybrid.mask_score=random, or mask_ratio=0"
            )
        if config.teacher_layers is not None:
            try:
                resolve_layers(tuple(config.teacher_layers), relation.num_layers)
            except UsageError as e:
                raise UsageError(f"strategy.hybrid.teacher_layers: {e}") from None

    @classmethod
    def check_student(cls, config: HybridConfig, student: nn.Module) -> None:
        if is_token_model(student) and not runs_on_kept_tokens(student):
            raise UsageError(
                f"strategy hybrid drops tokens from a ViT student and needs a timm VisionTransformer; "
                f"{type(student).__name__} is another kind of token model; use one or a CNN"
            )
        try:
            total = num_layers(student)
            if config.student_layers is not None:
                resolve_layers(tuple(config.student_layers), total)
        except UsageError as e:
            raise UsageError(f"strategy hybrid distils relations at student layers: {e}") from None

    @classmethod
    def build(
        cls,
        config: HybridConfig,
        teachers: Mapping,
        teacher_probes: Mapping[str, Features],
        student: nn.Module,
        student_probe: Features,
    ) -> "Hybrid":
        return cls(
            config,
            teacher_probes[config.feature_teacher],
            teacher_probes[config.relation_teacher],
            student,
            layer_pairs(config, student, teachers[config.relation_teacher]),
        )

    def __init__(
        self,
        config: HybridConfig,
        feature_probe: Features,
        relation_probe: Features,
        student: nn.Module,
        pairs: list[tuple[int, int]],
    ):
        super().__init__(config)
        self.pairs = pairs
        self.feature_layer = max(feature_probe.layers)
        feature_dim = as_map(feature_probe.layers[self.feature_layer], "the feature teacher's last layer").shape[1]
        qk = relation_probe.relations[pairs[0][1]]
        teacher_heads, teacher_patches = qk.shape[2], qk.shape[3] - relation_probe.prefix_tokens
        self.vit = is_token_model(student)
        channels = layer_channels(student)
        if self.vit:
            self.grid = patch_grid(student)[0]
            self.relation_heads = config.relation_heads or default_relation_heads(
                *attention_width(student), teacher_heads, teacher_heads * qk.shape[4]
            )
            self.feature_head = nn.Linear(channels[-1], feature_dim)
        else:
            self.grid = config.grid or math.isqrt(teacher_patches)
            self.relation_heads = config.relation_heads or teacher_heads
            self.feature_head = nn.Conv2d(channels[-1], feature_dim, kernel_size=1)
            heads = 1 if config.head_mode == "average" else self.relation_heads
            self.query_key = nn.ModuleDict(
                {str(s): nn.Conv2d(channels[s], 2 * heads * config.cnn_head_dim, 1) for s, _ in pairs}
            )
        if config.head_mode == "split":
            self._check_heads(student, qk)

    def _check_heads(self, student: nn.Module, teacher_qk: Tensor) -> None:
        widths = {"the relation teacher": teacher_qk.shape[2] * teacher_qk.shape[4]}
        if self.vit:
            widths["the student"] = attention_width(student)[1]
        for who, width in widths.items():
            if width % self.relation_heads:
                raise UsageError(
                    f"strategy hybrid: {who}'s {width} attention channels do not split into "
                    f"{self.relation_heads} relation heads; set strategy.hybrid.relation_heads to a "
                    "divisor of both widths, or head_mode=average"
                )

    def term_weights(self) -> dict[str, float]:
        return {"feature": self.config.feature_weight, "relation": self.config.relation_weight}

    def student_features(
        self, student: nn.Module, x: Tensor, teachers: Mapping[str, Features], request: FeatureRequest, progress: float
    ) -> Features | None:
        batch, tokens = x.shape[0], self.grid * self.grid
        keep_count = max(1, tokens - round(mask_ratio_at(self.config, progress) * tokens))
        keep = self._choose_tokens(teachers[self.config.feature_teacher], batch, keep_count).to(x.device)
        # Other strategies of the objective get their features from a full, unmasked forward.
        shared = peer_features(student, x, self.peer_request)
        student_layers = tuple(sorted({s for s, _ in self.pairs}))
        if self.vit:
            final_tokens, kept = forward_kept_tokens(student, x, keep, student_layers, student_layers)
            return KeptFeatures(
                **shared | {"layers": kept.layers, "relations": kept.relations, "prefix_tokens": kept.prefix_tokens},
                keep_index=keep,
                final_tokens=final_tokens,
            )
        masked = x * self._pixel_mask(keep, batch, x).to(x.dtype)
        maps = extract_features(student, masked, FeatureRequest(layers=tuple(student_layers) + (-1,))).layers
        return KeptFeatures(**shared | {"layers": maps}, keep_index=keep)

    def _choose_tokens(self, feature_teacher: Features, batch: int, keep_count: int) -> Tensor:
        tokens = self.grid * self.grid
        if keep_count >= tokens:
            return torch.arange(tokens).expand(batch, -1)
        generator = generator_from_global_rng()
        if self.config.mask_score == "random":
            scores = torch.ones(batch, tokens)
        else:
            qk = feature_teacher.relations[max(feature_teacher.relations)]
            scores = redundancy_scores(qk, feature_teacher.prefix_tokens)
            scores = to_grid(scores.unsqueeze(-1), self.grid).squeeze(-1)  # stays on the device: no sync
        return keep_indices(scores, keep_count, self.config.gumbel_scale, generator)

    def _pixel_mask(self, keep: Tensor, batch: int, x: Tensor) -> Tensor:
        """1 on kept grid cells, 0 on dropped ones, at the image's resolution: (B, 1, H, W)."""
        cells = torch.zeros(batch, self.grid * self.grid, device=x.device)
        cells.scatter_(1, keep, 1.0)
        return F.interpolate(cells.view(batch, 1, self.grid, self.grid), size=x.shape[-2:], mode="nearest")

    def forward(self, step: StepInputs) -> dict[str, Tensor]:
        student = step.student
        if not isinstance(student, KeptFeatures):
            raise UsageError("strategy hybrid needs its own student forward (student_features); got plain features")
        keep = student.keep_index
        feature_teacher = step.views_of(self.config.feature_teacher)[0]
        relation_teacher = step.views_of(self.config.relation_teacher)[0]
        with torch.autocast(device_type=keep.device.type, enabled=False):
            target = to_grid(fp32(feature_teacher.layers[self.feature_layer]), self.grid)
            target = gather_tokens(F.layer_norm(target, target.shape[-1:]), keep)
            prediction = fp32(self._student_feature(student, keep))
            feature = regression_loss(prediction, target, self.config.feature_loss, self.config.beta)
            losses = []
            for student_layer, teacher_layer in self.pairs:
                teacher_qk = qk_to_grid(
                    relation_teacher.relations[teacher_layer], relation_teacher.prefix_tokens, self.grid
                )
                teacher_maps = relations(teacher_qk, self.config.head_mode, self.relation_heads, keep)
                student_maps = self._student_relations(student, student_layer, keep)
                losses.append(relation_loss(student_maps, teacher_maps, self.config.relation_loss, self.config.beta))
        return {"feature": feature, "relation": torch.stack(losses).mean()}

    def _student_feature(self, student: KeptFeatures, keep: Tensor) -> Tensor:
        if self.vit:
            return self.feature_head(student.final_tokens)
        return gather_tokens(to_grid(self.feature_head(student.layers[max(student.layers)]), self.grid), keep)

    def _student_relations(self, student: KeptFeatures, layer: int, keep: Tensor) -> Tensor:
        if self.vit:
            qk = student.relations[layer][:, :, :, student.prefix_tokens :]
            return relations(qk, self.config.head_mode, self.relation_heads)
        heads = 1 if self.config.head_mode == "average" else self.relation_heads
        projected = gather_tokens(to_grid(self.query_key[str(layer)](student.layers[layer]), self.grid), keep)
        batch, kept, _ = projected.shape
        qk = projected.view(batch, kept, 2, heads, self.config.cnn_head_dim).permute(2, 0, 3, 1, 4)
        return relations(qk, "split", heads)
