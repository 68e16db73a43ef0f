"""Multi-hidden-layer regression (Bootleg-style): predict several normalised teacher layers at once.

Lowe, Fuller, Oore, Shelhamer, Taylor, "Self-Distillation of Hidden Layers" (Bootleg, arXiv 2603.15553;
no official code), which extends I-JEPA (Assran et al., CVPR 2023, arXiv 2301.08243; official code
facebookresearch/ijepa src/train.py:298-313, src/models/vision_transformer.py:220-257
`VisionTransformerPredictor`) by regressing the concatenation of several layers. distillkit's exact
construction is docs/methods.md#hidden. Targets, for the blocks l in `layers` (relative depths
(0.25, 0.5, 0.75, 1.0) by default, i.e. 4 evenly spaced blocks ending at the last):

    h_l = raw output of teacher block l (no final norm), prefix tokens removed       (B, N, D_l)
          (a CNN teacher: its stage-l feature map, flattened to (B, H*W, C_l) tokens)
    y   = concat_l layer_norm(h_l)   per token over channels, no affine, eps 1e-5     (B, N, sum_l D_l)

ViT students (timm VisionTransformer) are trained I-JEPA style: 4 target blocks and 1 context block
are sampled on the student's patch grid (strategies/masks.py; target scale (0.15, 0.2), aspect
(0.75, 1.5); context scale (0.85, 1.0) minus the targets, at least `mask_min_keep` patches). The
student encodes only its context tokens (patch embed + pos embed, gather, blocks, norm; `student_features`),
and a narrow ViT predictor (depth 6, width 384 by default; timm `Block`s, fixed 2-D sin-cos positions)
reads the context tokens plus one mask token per target position and outputs Linear(width, sum_l D_l)
per target token:

    L = (1/4) sum_k  SmoothL1_beta(pred_k, y[target_k])     (element mean; beta 1; or MSE)

Other students (CNNs) are not masked: their last feature map goes through a 1x1 conv to sum_l D_l
channels, is adaptive-avg-pooled to the teacher's grid, and every token is regressed with the same loss.
Layers that act after that map (EfficientNet's conv_head + bn2, MobileNetV3's conv_head after pooling)
make the embedding that is exported and scored, and get no gradient from the token loss, so CNN students
get a second term [D] on their pooled embedding z_S (the network's output, after those layers):

    L_pooled = SmoothL1_beta(W z_S + b, mean_tokens(y))      weight `pooled_weight` (1.0)

the token-mean of the same normalised target, predicted by a Linear head. Without it (pooled_weight 0)
the exported embedding stays at its random init (measured level with random init in
benchmarks/quality.py, 2026-12-01).

distillkit decisions [D]: when the teacher's grid differs from the target grid (the student's patch grid
for ViT students; for CNN teachers, whose stages have different resolutions, the grid of the deepest
requested layer), each teacher layer's (B, C, H, W) map is adaptive-avg-pooled to that grid *before* the
per-token layer norm, so every target token is exactly z-scored. Mask positions are drawn with a
generator seeded from the global torch RNG, which checkpoints save and restore. The student's
`patch_drop` is skipped on the masked path (the masks replace it).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from functools import partial
from typing import Literal, Mapping

import torch
import torch.nn.functional as F
from timm.models.vision_transformer import Block
from torch import Tensor, nn

from ..errors import UsageError
from ..features import (
    FeatureRequest,
    Features,
    forward_kept_tokens,
    is_token_model,
    num_layers,
    patch_grid,
    resolve_layers,
    runs_on_kept_tokens,
)
from ..roles import PRIMARY_TEACHER
from .base import StepInputs, Strategy
from .masks import check_mask_grid, sample_block_masks
from .registry import register_strategy
from .summaries import SUMMARIES
from .toolbox import (
    as_map,
    check_non_negative,
    check_positive,
    fp32,
    gather_tokens,
    generator_from_global_rng,
    peer_features,
    process_share,
    regression_loss,
)

TARGET_NORM_EPS = 1e-5  # I-JEPA's F.layer_norm default


@dataclass
class HiddenConfig:
    weight: float = 1.0
    layers: list[int | float] = field(default_factory=lambda: [0.25, 0.5, 0.75, 1.0])  # teacher layers
    loss: Literal["smooth_l1", "mse"] = "smooth_l1"
    beta: float = 1.0  # Smooth-L1 beta
    predictor_depth: int = 6  # ViT students only
    predictor_width: int = 384
    predictor_heads: int = 6
    num_targets: int = 4
    target_scale: tuple[float, float] = (0.15, 0.2)
    target_aspect: tuple[float, float] = (0.75, 1.5)
    context_scale: tuple[float, float] = (0.85, 1.0)
    mask_min_keep: int = 10
    pooled_weight: float = 1.0  # CNN students: the pooled-embedding term that trains the layers after the last map

    def __post_init__(self):
        check_non_negative("hidden", self, ("pooled_weight",))
        if not self.layers:
            raise UsageError("strategy.hidden.layers must name at least one teacher layer, e.g. [0.5, 1.0]")
        check_predictor_and_masks("hidden", self)


def check_predictor_and_masks(strategy: str, config) -> None:
    """The predictor's and the block masks' settings (shared by hidden and bootleg): positive sizes, a width
    the heads and the 2-D sin-cos positions divide, scales in (0, 1], aspects positive."""
    check_positive(
        strategy,
        config,
        ("beta", "predictor_depth", "predictor_width", "predictor_heads", "num_targets", "mask_min_keep"),
    )
    if config.predictor_width % config.predictor_heads or config.predictor_width % 4:
        raise UsageError(
            f"strategy.{strategy}.predictor_width ({config.predictor_width}) must be a multiple of 4 "
            f"and of predictor_heads ({config.predictor_heads})"
        )
    for key in ("target_scale", "context_scale"):
        low, high = getattr(config, key)
        if not 0.0 < low <= high <= 1.0:
            raise UsageError(f"strategy.{strategy}.{key} must satisfy 0 < low <= high <= 1, got {[low, high]}")
    low, high = config.target_aspect
    if not 0.0 < low <= high:
        raise UsageError(f"strategy.{strategy}.target_aspect must satisfy 0 < low <= high, got {[low, high]}")


def masks_for(config, batch_size: int, grid: tuple[int, int], device) -> tuple[Tensor, Tensor]:
    """I-JEPA block masks drawn with `config`'s settings from the global RNG: (context, targets) on `device`.

    Under several processes every process draws the masks of the whole global batch (the same draws: the
    global RNG is the same everywhere) and keeps its own rows, so the masks do not depend on the number of
    processes (process r holds rows r*B .. (r+1)*B - 1 of the global batch)."""
    world, rank = process_share()
    masks = sample_block_masks(
        batch_size * world,
        grid,
        generator_from_global_rng(),
        num_targets=config.num_targets,
        target_scale=config.target_scale,
        target_aspect=config.target_aspect,
        context_scale=config.context_scale,
        min_keep=config.mask_min_keep,
    )
    rows = slice(rank * batch_size, (rank + 1) * batch_size)
    return masks.context[rows].to(device), masks.targets[:, rows].to(device)


@dataclass
class MaskedFeatures(Features):
    """Student features of a masked forward: the encoded context tokens and where they and the targets are."""

    context_tokens: Tensor | None = None  # (B, N_ctx, D_s), after the student's final norm
    context_index: Tensor | None = None  # (B, N_ctx) flat patch indices
    target_index: Tensor | None = None  # (num_targets, B, N_tgt)


def normalised_targets(layers: list[Tensor], grid: tuple[int, int]) -> Tensor:
    """concat_l layer_norm(h_l) per token, each layer pooled to `grid` first: (B, H*W, sum_l C_l), fp32."""
    out = []
    for layer in layers:
        layer = as_map(fp32(layer), "a teacher layer of strategy hidden")
        if tuple(layer.shape[-2:]) != tuple(grid):
            layer = F.adaptive_avg_pool2d(layer, grid)
        tokens = layer.flatten(2).transpose(1, 2)
        out.append(F.layer_norm(tokens, tokens.shape[-1:], eps=TARGET_NORM_EPS))
    return torch.cat(out, dim=-1)


def sincos_2d(grid: tuple[int, int], dim: int) -> Tensor:
    """Fixed 2-D sin-cos position embeddings (MAE / I-JEPA `get_2d_sincos_pos_embed`): (H*W, dim)."""
    rows, cols = torch.meshgrid(
        torch.arange(grid[0], dtype=torch.float64), torch.arange(grid[1], dtype=torch.float64), indexing="ij"
    )

    def encode(positions: Tensor, d: int) -> Tensor:
        omega = 1.0 / 10000 ** (torch.arange(d // 2, dtype=torch.float64) / (d / 2))
        angles = positions.flatten()[:, None] * omega[None]
        return torch.cat([angles.sin(), angles.cos()], dim=1)

    return torch.cat([encode(rows, dim // 2), encode(cols, dim // 2)], dim=1).float()


class Predictor(nn.Module):
    """I-JEPA's narrow ViT predictor: context tokens + mask tokens at the target positions -> targets."""

    def __init__(self, in_dim: int, out_dim: int, grid: tuple[int, int], width: int, depth: int, heads: int):
        super().__init__()
        self.embed = nn.Linear(in_dim, width)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, width))
        self.register_buffer("pos_embed", sincos_2d(grid, width)[None], persistent=False)
        norm = partial(nn.LayerNorm, eps=1e-6)
        self.blocks = nn.Sequential(
            *[Block(width, heads, mlp_ratio=4.0, qkv_bias=True, norm_layer=norm) for _ in range(depth)]
        )
        self.norm = norm(width)
        self.proj = nn.Linear(width, out_dim)
        self.apply(_init_weights)
        nn.init.trunc_normal_(self.mask_token, std=0.02)
        for i, block in enumerate(self.blocks, start=1):  # I-JEPA `fix_init_weight`
            block.attn.proj.weight.data.div_(math.sqrt(2.0 * i))
            block.mlp.fc2.weight.data.div_(math.sqrt(2.0 * i))

    def forward(self, context: Tensor, context_index: Tensor, target_index: Tensor) -> Tensor:
        """context (B, N_ctx, D_s), context_index (B, N_ctx), target_index (T, B, N_tgt) -> (T, B, N_tgt, out)."""
        num_targets, batch, num_target_tokens = target_index.shape
        pos = self.pos_embed.to(context.dtype)
        x = self.embed(context) + gather_tokens(pos.expand(batch, -1, -1), context_index)
        num_context = x.shape[1]
        flat_targets = target_index.reshape(num_targets * batch, num_target_tokens)  # block-major rows
        queries = self.mask_token + gather_tokens(pos.expand(num_targets * batch, -1, -1), flat_targets)
        x = torch.cat([x.repeat(num_targets, 1, 1), queries.to(x.dtype)], dim=1)
        x = self.norm(self.blocks(x))
        out = self.proj(x[:, num_context:])
        return out.view(num_targets, batch, num_target_tokens, -1)


def _init_weights(module: nn.Module) -> None:
    if isinstance(module, nn.Linear):
        nn.init.trunc_normal_(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)


def _square_grid(tokens: int, what: str) -> tuple[int, int]:
    side = math.isqrt(tokens)
    if side * side != tokens:
        raise UsageError(f"strategy hidden: {what} has {tokens} tokens, not a square patch grid")
    return side, side


@register_strategy
class Hidden(Strategy):
    name = "hidden"
    Config = HiddenConfig
    summary = SUMMARIES["hidden"]

    def __init__(self, config: HiddenConfig, teacher_probe: Features, student_probe: Features):
        super().__init__(config)
        self.teacher_layers = sorted(teacher_probe.layers)
        teacher_maps = [
            as_map(teacher_probe.layers[i], "a teacher layer of strategy hidden") for i in self.teacher_layers
        ]
        self.target_dim = sum(m.shape[1] for m in teacher_maps)
        ((self.student_layer, student_layer),) = student_probe.layers.items()
        self.masked = student_layer.dim() == 3  # tokens: a ViT student
        if self.masked:
            self.grid = _square_grid(student_layer.shape[1], "the student's last block")
            self.predictor = Predictor(
                student_layer.shape[2],
                self.target_dim,
                self.grid,
                config.predictor_width,
                config.predictor_depth,
                config.predictor_heads,
            )
        else:
            self.grid = tuple(teacher_maps[-1].shape[-2:])  # the deepest requested teacher layer's grid
            self.proj = nn.Conv2d(student_layer.shape[1], self.target_dim, kernel_size=1)
            self.pooled_head = nn.Linear(student_probe.embedding.shape[1], self.target_dim)

    @classmethod
    def build(
        cls,
        config: HiddenConfig,
        teachers: Mapping,
        teacher_probes: Mapping[str, Features],
        student: nn.Module,
        student_probe: Features,
    ) -> "Hidden":
        return cls(config, teacher_probes[PRIMARY_TEACHER], student_probe)

    @classmethod
    def teacher_requests(cls, config: HiddenConfig, teachers: Mapping, student: nn.Module) -> dict[str, FeatureRequest]:
        return {PRIMARY_TEACHER: FeatureRequest(layers=tuple(config.layers))}

    @classmethod
    def student_request(cls, config: HiddenConfig) -> FeatureRequest:
        return FeatureRequest(layers=(-1,), embedding=True)  # the embedding: CNN students' pooled term

    def term_weights(self) -> dict[str, float]:
        return {self.name: 1.0} if self.masked else {self.name: 1.0, "pooled": self.config.pooled_weight}

    @classmethod
    def check_teachers(cls, config: HiddenConfig, teachers: Mapping) -> None:
        try:
            resolve_layers(tuple(config.layers), teachers[PRIMARY_TEACHER].num_layers)
        except UsageError as e:
            raise UsageError(
                f"strategy hidden regresses the teacher's hidden layers {list(config.layers)}, "
                f"but {e}; change strategy.hidden.layers"
            ) from None

    @classmethod
    def check_student(cls, config: HiddenConfig, student: nn.Module) -> None:
        if is_token_model(student):
            if not runs_on_kept_tokens(student):
                raise UsageError(
                    f"strategy hidden masks a ViT student's tokens and needs a timm VisionTransformer "
                    f"(patch_embed, _pos_embed, blocks, norm); {type(student).__name__} is another kind of token "
                    "model; use a VisionTransformer student or a CNN"
                )
            try:
                check_mask_grid(patch_grid(student), config.context_scale, config.mask_min_keep)
            except UsageError as e:
                raise UsageError(f"strategy hidden (I-JEPA block masks on the student's patches): {e}") from None
            return
        try:
            num_layers(student)
        except UsageError as e:
            raise UsageError(f"strategy hidden regresses from the student's last feature map, but {e}") from None

    def student_features(
        self, student: nn.Module, x: Tensor, teachers: Mapping[str, Features], request: FeatureRequest, progress: float
    ) -> Features | None:
        if not self.masked:
            return None  # the generic extraction gives the last feature map
        context_index, target_index = masks_for(self.config, x.shape[0], self.grid, x.device)
        # Other strategies of the objective get their features from a full forward.
        shared = peer_features(student, x, self.peer_request)
        context_tokens, _ = forward_kept_tokens(student, x, context_index)
        return MaskedFeatures(
            **shared, context_tokens=context_tokens, context_index=context_index, target_index=target_index
        )

    def forward(self, step: StepInputs) -> dict[str, Tensor]:
        targets = normalised_targets([step.teacher.layers[i] for i in self.teacher_layers], self.grid)
        student = step.student
        if not self.masked:
            prediction = self.proj(student.layers[self.student_layer])
            if tuple(prediction.shape[-2:]) != tuple(self.grid):
                prediction = F.adaptive_avg_pool2d(prediction, self.grid)
            prediction = prediction.flatten(2).transpose(1, 2)
            pooled = self.pooled_head(student.embedding)
            return {
                self.name: regression_loss(prediction, targets, self.config.loss, self.config.beta),
                "pooled": regression_loss(pooled, targets.mean(1), self.config.loss, self.config.beta),
            }
        if not isinstance(student, MaskedFeatures) or student.context_tokens is None:
            raise UsageError(
                "strategy hidden with a ViT student needs the masked student forward "
                "(its student_features hook); got plain features"
            )
        predictions = self.predictor(student.context_tokens, student.context_index, student.target_index)
        losses = [
            regression_loss(p, gather_tokens(targets, index), self.config.loss, self.config.beta)
            for p, index in zip(predictions, student.target_index)
        ]
        return {self.name: torch.stack(losses).mean()}
