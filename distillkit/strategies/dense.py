"""Multi-scale dense distillation: several student stages, each through its own 1x1 conv, regress one teacher's
token map resampled to that stage's grid.

Sources: AM-RADIO (Ranzinger, Heinrich, Kautz, Molchanov, "AM-RADIO: Agglomerative Vision Foundation Model -
Reduce All Domains Into One", CVPR 2024, arXiv 2312.06709; official code NVlabs/RADIO) distils a teacher's
patch tokens into the student's through a per-teacher adaptor, with 0.9 cosine + 0.1 Smooth-L1 per token;
FitNets (Romero, Ballas, Kahou, Chassang, Gatta, Bengio, "FitNets: Hints for Thin Deep Nets", ICLR 2015,
arXiv 1412.6550) regresses a teacher's intermediate "hint" layer from a student's intermediate layer through a
learned regressor. Here one teacher layer is the hint of several student stages at once. For every student
layer s of `student_layers` (relative depths (0.5, 0.75, 1.0) by default) and the teacher layer T
(`teacher_layer`, default -1, of the role `teacher`):

    F_s = student layer s               a CNN stage map (B, C_s, h_s, w_s), or a ViT block's patch tokens
                                        (prefix tokens removed) reshaped to the student's patch grid
    T   = teacher layer                 a ViT's patch tokens reshaped to its patch grid, or a CNN stage map,
                                        (B, C_t, H, W)
    P_s = W_s F_s + b_s                 a 1x1 conv C_s -> C_t, one per stage
    Y_s = N(R_s(T))                     R_s resamples T to (h_s, w_s); N normalises (`target_norm`, below)
    L_s = mean_{b,k} [ c (1 - cos(P_sbk, Y_sbk)) + l mean_c SmoothL1_beta(P_sbkc - Y_sbkc) ]
                                        (`loss: cosine_smooth_l1`; k the h_s w_s tokens, cos over channels)
    L_s = mean_{b,k,c} (P_sbkc - Y_sbkc)^2                                          (`loss: mse`)
    L   = sum_s w_s L_s / sum_s w_s     w_s = `stage_weights` (default equal)

c = `cosine` (0.9), l = `smooth_l1` (0.1), beta = `beta` (1): AM-RADIO's feature loss. Terms:
`dense.layer<s>` = L_s, weighted w_s / sum_s w_s.

N (`target_norm`):
    standardize (default): y_c = (t_c - mu_c) / sqrt(var_c + 1e-6), per channel, with running moments
                 (feature.RunningMoments: momentum `target_momentum`, bias-corrected) of every teacher token
                 of the gathered global batch, updated after each step; the raw target before the first update
    layer_norm:  per token over channels, no affine, eps 1e-5 (hidden.py, I-JEPA); no state
    none:        the teacher's values

distillkit decisions [D]:
- Default stages: relative depths (0.5, 0.75, 1.0) resolve to the feature levels of strides 8, 16 and 32 on
  timm CNNs (5 levels: MobileNetV3, ResNet, EfficientNet; 4 levels: ConvNeXt), and on a ViT student to the
  blocks half-way, three quarters down and the last. Entries that resolve to the same layer count once
  (a shallow ViT); with `stage_weights` given that is an error, since it would be unclear which weight holds.
- The target is resampled to each stage's grid, not the prediction to the teacher's: every stage regresses
  the teacher at its own resolution. `resample_to`, per direction: one that shrinks is adaptive-average
  pooled (every source cell counts), one that grows is interpolated bilinearly (align_corners False); a map
  that shrinks in one direction and grows in the other is interpolated first, then pooled.
- standardize is a per-channel affine map and both resamplings average cells with weights summing to 1, so it
  is applied once on the teacher's grid; layer_norm is applied after resampling, so every target token of
  every stage is exactly normalised (as hidden.py).
- Layers after the deepest tapped student stage (MobileNetV3's conv_head, EfficientNet's conv_head + bn2) get
  no gradient from this loss: combine it with a strategy on the pooled embedding (e.g. `dense+feature`).

`MultiScaleDense` (projections, normalisation, loss) and `resample_to` do not depend on the Strategy
contract: strategy agglomerate builds its per-teacher dense heads from them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Mapping, get_args

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import UsageError
from ..features import FeatureRequest, Features, is_token_model, num_layers, patch_grid, resolve_layer
from ..roles import PRIMARY_TEACHER
from .base import Gather, StepInputs, Strategy
from .feature import RunningMoments, normalise_target
from .registry import register_strategy
from .summaries import SUMMARIES
from .toolbox import check_fraction, check_non_negative, check_positive, fp32

TargetNorm = Literal["standardize", "layer_norm", "none"]
DenseLoss = Literal["cosine_smooth_l1", "mse"]
LAYER_NORM_EPS = 1e-5  # hidden.py's (I-JEPA's F.layer_norm default)


@dataclass
class DenseConfig:
    weight: float = 1.0
    teacher: str = PRIMARY_TEACHER  # the role whose layer is the target
    teacher_layer: int | float = -1
    student_layers: list[int | float] = field(default_factory=lambda: [0.5, 0.75, 1.0])  # CNNs: strides 8, 16, 32
    stage_weights: list[float] | None = None  # one per student_layers entry; None = equal
    loss: DenseLoss = "cosine_smooth_l1"
    cosine: float = 0.9  # c
    smooth_l1: float = 0.1  # l
    beta: float = 1.0  # Smooth-L1 beta
    target_norm: TargetNorm = "standardize"
    target_momentum: float = 0.99  # of the running moments target_norm standardize uses

    def __post_init__(self):
        check_fraction("dense", self, ("target_momentum",), one_allowed=False)
        check_non_negative("dense", self, ("cosine", "smooth_l1"))
        check_positive("dense", self, ("beta",))
        if not self.student_layers:
            raise UsageError(
                "strategy.dense.student_layers must name at least one student layer, e.g. [0.5, 0.75, 1.0] "
                "(relative depths) or [-3, -2, -1] (the last three stages)"
            )
        if self.loss == "cosine_smooth_l1" and self.cosine + self.smooth_l1 == 0:
            raise UsageError(
                "strategy.dense.cosine and smooth_l1 are both 0: the loss would be 0; give one of them a positive "
                "weight, or set strategy.dense.loss=mse"
            )
        if self.stage_weights is not None:
            if len(self.stage_weights) != len(self.student_layers):
                raise UsageError(
                    f"strategy.dense.stage_weights has {len(self.stage_weights)} entries for "
                    f"{len(self.student_layers)} student_layers {self.student_layers}; give one weight per layer "
                    "or null for equal weights"
                )
            if not all(w > 0 for w in self.stage_weights):
                raise UsageError(
                    f"strategy.dense.stage_weights must all be positive, got {self.stage_weights}; to leave a "
                    "stage out, remove it from strategy.dense.student_layers"
                )


def resample_to(maps: Tensor, grid: tuple[int, int]) -> Tensor:
    """(B, C, H, W) -> (B, C, *grid): adaptive average pooling in a direction that shrinks (or stays), bilinear
    interpolation (align_corners False) in one that grows; both at once: interpolate, then pool."""
    rows, columns = grid
    grown = (max(maps.shape[-2], rows), max(maps.shape[-1], columns))
    if grown != tuple(maps.shape[-2:]):
        maps = F.interpolate(maps, size=grown, mode="bilinear", align_corners=False)
    if grown != (rows, columns):
        maps = F.adaptive_avg_pool2d(maps, (rows, columns))
    return maps


def tokens_of(maps: Tensor) -> Tensor:
    """(B, C, H, W) -> (B, H * W, C)."""
    return maps.flatten(2).transpose(1, 2)


class MultiScaleDense(nn.Module):
    """Per-stage 1x1 conv projections and the loss L = sum_s w_s L_s of the module docstring.

    student_channels: student layer -> its channels C_s; teacher_channels: C_t; stage_weights: student layer ->
    w_s (normalised here to sum 1; None = equal). With `target_norm` standardize, `update(target_map)` feeds the
    running moments (call it after the loss, with the gathered global batch)."""

    def __init__(
        self,
        student_channels: dict[int, int],
        teacher_channels: int,
        loss: DenseLoss = "cosine_smooth_l1",
        cosine: float = 0.9,
        smooth_l1: float = 0.1,
        beta: float = 1.0,
        stage_weights: dict[int, float] | None = None,
        target_norm: TargetNorm = "standardize",
        target_momentum: float = 0.99,
    ):
        super().__init__()
        for key, value, allowed in (("loss", loss, DenseLoss), ("target_norm", target_norm, TargetNorm)):
            if value not in get_args(allowed):
                raise UsageError(f"MultiScaleDense: {key} = {value!r} is not allowed; choose {get_args(allowed)}")
        self.loss, self.cosine, self.smooth_l1, self.beta = loss, cosine, smooth_l1, beta
        self.target_norm = target_norm
        raw = stage_weights or {layer: 1.0 for layer in student_channels}
        self.stage_weights = {layer: raw[layer] / sum(raw.values()) for layer in student_channels}
        self.projections = nn.ModuleDict(
            {
                str(layer): nn.Conv2d(channels, teacher_channels, kernel_size=1)
                for layer, channels in student_channels.items()
            }
        )
        self.moments = RunningMoments(teacher_channels, target_momentum) if target_norm == "standardize" else None

    def stage_losses(self, student_maps: Mapping[int, Tensor], target_map: Tensor) -> dict[int, Tensor]:
        """L_s for every student layer: student_maps layer -> (B, C_s, h_s, w_s), target_map (B, C_t, H, W)."""
        device = target_map.device.type
        with torch.autocast(device_type=device, enabled=False):
            target = fp32(target_map)
            if self.moments is not None:
                target = normalise_target(target.movedim(1, -1), self.moments.moments(), "standardize").movedim(-1, 1)
        losses = {}
        for layer in self.stage_weights:
            prediction = self.projections[str(layer)](student_maps[layer])
            with torch.autocast(device_type=device, enabled=False):
                goal = tokens_of(resample_to(target, tuple(prediction.shape[-2:])))
                if self.target_norm == "layer_norm":
                    goal = F.layer_norm(goal, goal.shape[-1:], eps=LAYER_NORM_EPS)
                losses[layer] = self._token_loss(tokens_of(fp32(prediction)), goal)
        return losses

    def forward(self, student_maps: Mapping[int, Tensor], target_map: Tensor) -> Tensor:
        """L = sum_s w_s L_s."""
        losses = self.stage_losses(student_maps, target_map)
        return sum(self.stage_weights[layer] * loss for layer, loss in losses.items())

    def _token_loss(self, prediction: Tensor, target: Tensor) -> Tensor:
        """(B, K, C) each -> the mean over tokens of c (1 - cos) + l mean_c SmoothL1, or the element mean of squares."""
        if self.loss == "mse":
            return F.mse_loss(prediction, target)
        loss = prediction.new_zeros(())
        if self.cosine > 0:
            loss = loss + self.cosine * (1.0 - F.cosine_similarity(prediction, target, dim=-1)).mean()
        if self.smooth_l1 > 0:
            loss = loss + self.smooth_l1 * F.smooth_l1_loss(prediction, target, beta=self.beta)
        return loss

    @torch.no_grad()
    def update(self, target_map: Tensor) -> None:
        """Feed every token of `target_map` (B, C_t, H, W) to the running moments (target_norm standardize)."""
        if self.moments is not None:
            self.moments.update(tokens_of(fp32(target_map)).reshape(-1, target_map.shape[1]))


def stage_plan(config: DenseConfig, total: int) -> dict[int, float]:
    """Student layer index -> its weight, from `student_layers` and `stage_weights` on a student of `total`
    layers (entries that resolve to the same layer count once; an error when each has its own weight)."""
    weights = config.stage_weights or [1.0] * len(config.student_layers)
    plan: dict[int, float] = {}
    for depth, weight in zip(config.student_layers, weights):
        try:
            layer = resolve_layer(depth, total)
        except UsageError as e:
            raise UsageError(
                f"strategy dense supervises the student's layers {list(config.student_layers)}, but {e}; change "
                "strategy.dense.student_layers"
            ) from None
        if layer in plan and config.stage_weights is not None:
            raise UsageError(
                f"strategy.dense.student_layers {list(config.student_layers)} name the student's layer {layer} "
                "twice on this student, each with its own stage_weights entry; list distinct layers"
            )
        plan.setdefault(layer, weight)
    return dict(sorted(plan.items()))


def grid_of(model: nn.Module) -> tuple[int, int] | None:
    """A token model's patch grid, which its (B, N, C) layers are reshaped to; None for a conv net."""
    return patch_grid(model) if is_token_model(model) else None


def as_grid_map(layer: Tensor, grid: tuple[int, int] | None, what: str) -> Tensor:
    """A layer as a (B, C, H, W) map: maps stay, (B, N, C) tokens are reshaped to `grid`."""
    if layer.dim() == 4:
        return layer
    if grid is None or layer.dim() != 3 or grid[0] * grid[1] != layer.shape[1]:
        raise UsageError(
            f"strategy dense: {what} has shape {tuple(layer.shape)}, which is neither a (B, C, H, W) map nor the "
            f"tokens of the model's patch grid {grid}"
        )
    return layer.transpose(1, 2).reshape(layer.shape[0], layer.shape[2], *grid)


@register_strategy
class Dense(Strategy):
    name = "dense"
    Config = DenseConfig
    reads = (DenseConfig.teacher,)  # by default; the config names the role
    summary = SUMMARIES["dense"]

    def __init__(
        self,
        config: DenseConfig,
        teacher_probe: Features,
        teacher_grid: tuple[int, int] | None,
        student_probe: Features,
        student_grid: tuple[int, int] | None,
        plan: dict[int, float],
    ):
        super().__init__(config)
        ((self.teacher_layer, teacher_layer),) = teacher_probe.layers.items()
        self.teacher_grid, self.student_grid = teacher_grid, student_grid
        teacher_channels = as_grid_map(teacher_layer, teacher_grid, "the teacher layer").shape[1]
        student_channels = {
            layer: as_grid_map(student_probe.layers[layer], student_grid, f"student layer {layer}").shape[1]
            for layer in plan
        }
        self.dense = MultiScaleDense(
            student_channels,
            teacher_channels,
            loss=config.loss,
            cosine=config.cosine,
            smooth_l1=config.smooth_l1,
            beta=config.beta,
            stage_weights=plan,
            target_norm=config.target_norm,
            target_momentum=config.target_momentum,
        )

    @classmethod
    def teacher_roles(cls, config: DenseConfig) -> tuple[str, ...]:
        return (config.teacher,)

    @classmethod
    def teacher_requests(cls, config: DenseConfig, teachers: Mapping, student: nn.Module) -> dict[str, FeatureRequest]:
        return {config.teacher: FeatureRequest(layers=(config.teacher_layer,))}

    @classmethod
    def student_request(cls, config: DenseConfig) -> FeatureRequest:
        return FeatureRequest(layers=tuple(config.student_layers))

    @classmethod
    def check_teachers(cls, config: DenseConfig, teachers: Mapping) -> None:
        teacher = teachers[config.teacher]
        try:
            resolve_layer(config.teacher_layer, num_layers(teacher.full_model))
        except UsageError as e:
            raise UsageError(
                f"strategy dense regresses layer {config.teacher_layer} of teacher {config.teacher!r} "
                f"({teacher.name}), but {e}; change strategy.dense.teacher_layer or the teacher"
            ) from None

    @classmethod
    def check_student(cls, config: DenseConfig, student: nn.Module) -> None:
        try:
            total = num_layers(student)
        except UsageError as e:
            raise UsageError(f"strategy dense supervises the student's stages, but {e}") from None
        stage_plan(config, total)

    @classmethod
    def build(
        cls,
        config: DenseConfig,
        teachers: Mapping,
        teacher_probes: Mapping[str, Features],
        student: nn.Module,
        student_probe: Features,
    ) -> "Dense":
        return cls(
            config,
            teacher_probes[config.teacher],
            grid_of(teachers[config.teacher].full_model),
            student_probe,
            grid_of(student),
            stage_plan(config, num_layers(student)),
        )

    def term_weights(self) -> dict[str, float]:
        return {f"layer{layer}": weight for layer, weight in self.dense.stage_weights.items()}

    def forward(self, step: StepInputs) -> dict[str, Tensor]:
        student = {
            layer: as_grid_map(step.student.layers[layer], self.student_grid, f"student layer {layer}")
            for layer in self.dense.stage_weights
        }
        losses = self.dense.stage_losses(student, self._target(step))
        return {f"layer{layer}": loss for layer, loss in losses.items()}

    def after_step(self, step: StepInputs, gather: Gather) -> None:
        if self.config.target_norm == "standardize":
            self.dense.update(gather(fp32(self._target(step))))

    def _target(self, step: StepInputs) -> Tensor:
        teacher = step.views_of(self.config.teacher)[0]
        return as_grid_map(teacher.layers[self.teacher_layer], self.teacher_grid, "the teacher layer")
