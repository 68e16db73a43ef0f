"""`Teacher`: a frozen network with its own input size and normalisation, answering `Features`.

Frozen means: parameters never require grad, the module stays in eval mode even when `.train()` is
called (mdistiller's lesson), and every forward runs under `torch.inference_mode()`. Views arrive as
raw [0, 1] images; the teacher resizes and normalises them itself (timm's `normalize_input` idea).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..features import FeatureRequest, Features, extract_features, is_token_model, num_layers


@dataclass(frozen=True)
class InputConfig:
    size: tuple[int, int]
    mean: tuple[float, float, float]
    std: tuple[float, float, float]


def prepare_input(views: Tensor, config: InputConfig, channels_last: bool) -> Tensor:
    """Resize raw [0, 1] views to the network's size and normalise them with its mean/std."""
    if tuple(views.shape[-2:]) != config.size:
        views = F.interpolate(views, size=config.size, mode="bilinear", antialias=True, align_corners=False)
    mean = torch.tensor(config.mean, device=views.device, dtype=views.dtype).view(1, 3, 1, 1)
    std = torch.tensor(config.std, device=views.device, dtype=views.dtype).view(1, 3, 1, 1)
    views = (views - mean) / std
    return views.contiguous(memory_format=torch.channels_last) if channels_last else views


class Teacher(nn.Module):
    def __init__(
        self,
        name: str,
        model: nn.Module,
        input_config: InputConfig,
        source: str,
        projection_head: nn.Module | None = None,
        channels_last: bool = True,
    ):
        super().__init__()
        self.name = name
        self.model = model
        self.projection_head = projection_head
        self.input_config = input_config
        self.source = source
        self.channels_last = channels_last and not is_token_model(model)
        if self.channels_last:
            self.model.to(memory_format=torch.channels_last)
        self.requires_grad_(False)
        super().train(False)

    def train(self, mode: bool = True) -> "Teacher":
        return super().train(False)  # a teacher never leaves eval mode

    @property
    def has_projection(self) -> bool:
        return self.projection_head is not None

    @property
    def has_logits(self) -> bool:
        return getattr(self.model, "num_classes", 0) > 0

    @property
    def is_vit(self) -> bool:
        return is_token_model(self.model)

    @property
    def num_layers(self) -> int:
        return num_layers(self.model)

    def forward(self, views: Tensor, request: FeatureRequest) -> Features:
        with torch.inference_mode():
            x = prepare_input(views, self.input_config, self.channels_last)
            wanted = FeatureRequest(
                embedding=request.embedding or request.projection, layers=request.layers, logits=request.logits
            )
            features = extract_features(self.model, x, wanted)
            if request.projection:
                features.projection = self.projection_head(features.embedding)
        # Inference tensors cannot be saved for backward; strategies mix them with student tensors.
        return Features(
            embedding=_clone(features.embedding) if request.embedding else None,
            projection=_clone(features.projection),
            layers={k: v.clone() for k, v in features.layers.items()},
            logits=_clone(features.logits),
        )

    def describe(self) -> dict:
        return {
            "name": self.name,
            "architecture": getattr(self.model, "pretrained_cfg", {}).get("architecture", type(self.model).__name__),
            "source": self.source,
            "input_size": list(self.input_config.size),
            "mean": list(self.input_config.mean),
            "std": list(self.input_config.std),
            "embed_dim": getattr(self.model, "num_features", None),
            "has_projection": self.has_projection,
            "has_logits": self.has_logits,
            "params": sum(p.numel() for p in self.parameters()),
        }


def _clone(t: Tensor | None) -> Tensor | None:
    return None if t is None else t.clone()
