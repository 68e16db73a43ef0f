"""What a network's input looks like, and how raw [0, 1] views become it. Teachers and students both
resize and normalise their own views (timm's `normalize_input` idea), so views are rendered once."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor


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
