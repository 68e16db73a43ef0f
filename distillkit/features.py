"""`Features`: what a model exposes for one batch, and `FeatureRequest`: what a strategy asks for.

Teachers and students produce `Features`; strategies consume them and never touch models.
Extraction uses timm's `forward_intermediates`, which every timm model answers, so one path
serves ViTs and CNNs.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from .errors import UsageError


@dataclass
class Features:
    """Outputs of one network for one batch of views.

    embedding:  pooled pre-logits embedding, (B, D)
    projection: the teacher's own projection-head embedding, (B, P), when it has one
    layers:     block index -> tokens (B, N, C) for ViTs (prefix tokens removed) or maps (B, C, H, W)
    logits:     class logits (B, num_classes), when the model has a classifier
    """

    embedding: Tensor | None = None
    projection: Tensor | None = None
    layers: dict[int, Tensor] = field(default_factory=dict)
    logits: Tensor | None = None


@dataclass(frozen=True)
class FeatureRequest:
    """What a strategy needs from a network.

    `layers` holds block indices (int, negative counts from the end) or relative depths
    (float in (0, 1], e.g. 0.5 = the block half-way down); `resolve_layers` turns them into indices.
    """

    embedding: bool = False
    projection: bool = False
    layers: tuple[int | float, ...] = ()
    logits: bool = False

    def merge(self, other: "FeatureRequest") -> "FeatureRequest":
        layers = tuple(dict.fromkeys(self.layers + other.layers))
        return FeatureRequest(
            embedding=self.embedding or other.embedding,
            projection=self.projection or other.projection,
            layers=layers,
            logits=self.logits or other.logits,
        )


def num_layers(model: nn.Module) -> int:
    """How many tappable layers `forward_intermediates` indexes: blocks (ViT) or stage ends (CNN)."""
    info = getattr(model, "feature_info", None)
    if not info:
        raise UsageError(
            f"{type(model).__name__} exposes no feature_info, so its layers cannot be tapped; "
            "use a timm model that supports forward_intermediates"
        )
    return len(info)


def resolve_layer(depth: int | float, total: int) -> int:
    """Resolve a block index or relative depth to a non-negative index in [0, total)."""
    if isinstance(depth, bool):
        raise UsageError(f"layer {depth!r} is not a block index or a relative depth")
    if isinstance(depth, float):
        if not 0.0 < depth <= 1.0:
            raise UsageError(f"relative layer depth {depth} must be in (0, 1]; e.g. 0.5 or 1.0")
        return max(0, min(total - 1, math.ceil(depth * total - 1e-9) - 1))
    index = depth + total if depth < 0 else depth
    if not 0 <= index < total:
        raise UsageError(f"layer index {depth} is out of range for a model with {total} layers")
    return index


def resolve_layers(depths: tuple[int | float, ...], total: int) -> tuple[int, ...]:
    return tuple(dict.fromkeys(resolve_layer(d, total) for d in depths))


def extract_features(model: nn.Module, x: Tensor, request: FeatureRequest) -> Features:
    """Run a timm model once and collect what `request` asks for.

    Without layer taps this is a plain forward (`model.forward_features` + `forward_head`);
    with taps it is one `forward_intermediates` call, so the final embedding and the taps
    come from the same pass. Projection heads are the teacher's business, not this function's.
    """
    wants_head = request.embedding or request.logits
    features = Features()
    if request.layers:
        indices = resolve_layers(request.layers, num_layers(model))
        final, intermediates = model.forward_intermediates(
            x, indices=list(indices), norm=False, output_fmt=_layer_format(model),
            intermediates_only=False,
        )
        features.layers = dict(zip(sorted(indices), intermediates))
    elif wants_head:
        final = model.forward_features(x)
    else:
        return features
    if request.embedding:
        features.embedding = model.forward_head(final, pre_logits=True)
    if request.logits:
        features.logits = model.forward_head(final)
    return features


def is_token_model(model: nn.Module) -> bool:
    """ViT-like models (patch embedding + blocks of tokens), as opposed to conv nets."""
    return hasattr(model, "blocks") and hasattr(model, "patch_embed")


def _layer_format(model: nn.Module) -> str:
    """Token models give (B, N, C) tokens; conv nets give (B, C, H, W) maps."""
    return "NLC" if is_token_model(model) else "NCHW"


def probe_features(model: nn.Module, request: FeatureRequest, input_size: tuple[int, int]) -> Features:
    """A dry forward on zeros (batch 2), to learn output shapes before building heads."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            param = next(model.parameters())
            x = torch.zeros(2, 3, *input_size, device=param.device, dtype=param.dtype)
            return extract_features(model, x, request)
    finally:
        model.train(was_training)

