"""Augmented views, computed for a whole batch at once and replayable from their parameters.

A view of image `i` is a random resized crop plus an optional horizontal flip. Its parameters
come from a counter-based hash of (seed, epoch, image index, view index), not from a stateful RNG,
so the same image gets the same view however the data is sharded across processes, after a resume,
or when a teacher-output cache replays it. `render_views` turns parameters into pixels with one
batched `roi_align` (bilinear crop + resize, adaptive sampling so downscaling averages) on uint8 images scaled to [0, 1].

Parameters per view: (x0, y0, x1, y1, flip) in pixel coordinates of the source image. Photometric
augmentation (colour jitter, grayscale, blur, solarize) has its own parameters from an independent hash
stream, see `augment.py`; `BatchViews` applies it after rendering.

`BatchViews` renders one batch's views at each size asked for, once per size: with `data.render`
per_network every network gets the same crops resampled once, straight to its own input size (a 64 px
teacher and a 32 px student see the same region), and a student reading cached teacher outputs renders
only its own size; with shared (the default) all get one rendering at the largest input size.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor
from torchvision.ops import roi_align

from ..recipe import AugmentConfig

MASK32 = 0xFFFFFFFF
ATTEMPTS = 10  # crop proposals per view, as torchvision's RandomResizedCrop


@dataclass(frozen=True)
class ViewConfig:
    """How views are drawn: RandomResizedCrop's area and aspect ranges, the flip probability and the
    photometric augmentation (None = none; see `augment.py`). The size a view is rendered at is each
    network's own (see `BatchViews`)."""

    crop_scale: tuple[float, float] = (0.2, 1.0)
    crop_ratio: tuple[float, float] = (3 / 4, 4 / 3)
    flip: float = 0.5
    augment: AugmentConfig | None = None


def _mix32(x: Tensor) -> Tensor:
    """A 32-bit integer hash (lowbias32) on int64 tensors holding values < 2**32."""
    x = x & MASK32
    x = ((x ^ (x >> 16)) * 0x7FEB352D) & MASK32
    x = ((x ^ (x >> 15)) * 0x846CA68B) & MASK32
    return x ^ (x >> 16)


def hash_uniform(seed: int, epoch: int, indices: Tensor, view: int, draws: int) -> Tensor:
    """Uniform [0, 1) numbers, shape (len(indices), draws), a pure function of all the arguments."""
    x = _mix32(torch.full_like(indices, seed & MASK32))
    x = _mix32(x ^ (epoch & MASK32))
    x = _mix32(x ^ (indices & MASK32))
    x = _mix32(x ^ (view & MASK32)).unsqueeze(1)
    x = _mix32(x ^ torch.arange(draws, dtype=torch.int64, device=indices.device))
    return (x >> 8).double() / float(1 << 24)


def sample_view_params(indices: Tensor, height: int, width: int, config: ViewConfig, *, seed: int, epoch: int,
                       view: int) -> Tensor:
    """(B, 5) float64 view parameters for images `indices` of size height x width."""
    indices = indices.to(torch.int64).cpu()
    u = hash_uniform(seed, epoch, indices, view, 4 * ATTEMPTS + 1)
    area = height * width
    scale = config.crop_scale[0] + (config.crop_scale[1] - config.crop_scale[0]) * u[:, :ATTEMPTS]
    log_lo, log_hi = math.log(config.crop_ratio[0]), math.log(config.crop_ratio[1])
    ratio = torch.exp(log_lo + (log_hi - log_lo) * u[:, ATTEMPTS:2 * ATTEMPTS])
    w = torch.sqrt(scale * area * ratio).round()
    h = torch.sqrt(scale * area / ratio).round()
    fits = (w >= 1) & (h >= 1) & (w <= width) & (h <= height)
    first = torch.where(fits.any(1), fits.int().argmax(1), torch.full_like(indices, -1))
    rows = torch.arange(indices.shape[0])
    pick = first.clamp(min=0)
    w, h = w[rows, pick], h[rows, pick]
    x_pos = u[:, 2 * ATTEMPTS:3 * ATTEMPTS][rows, pick]
    y_pos = u[:, 3 * ATTEMPTS:4 * ATTEMPTS][rows, pick]
    x0 = torch.floor(x_pos * (width - w + 1)).clamp(max=width - w)
    y0 = torch.floor(y_pos * (height - h + 1)).clamp(max=height - h)
    # No proposal fitted: a centre crop at the aspect ratio clamped into crop_ratio (as torchvision).
    fallback = first < 0
    fw, fh = _fallback_crop(height, width, config.crop_ratio)
    w = torch.where(fallback, torch.full_like(w, fw), w)
    h = torch.where(fallback, torch.full_like(h, fh), h)
    x0 = torch.where(fallback, torch.full_like(x0, (width - fw) // 2), x0)
    y0 = torch.where(fallback, torch.full_like(y0, (height - fh) // 2), y0)
    flip = (u[:, -1] < config.flip).double()
    return torch.stack([x0, y0, x0 + w, y0 + h, flip], dim=1)


def _fallback_crop(height: int, width: int, ratio: tuple[float, float]) -> tuple[int, int]:
    in_ratio = width / height
    if in_ratio < ratio[0]:
        return width, min(height, max(1, round(width / ratio[0])))
    if in_ratio > ratio[1]:
        return min(width, max(1, round(height * ratio[1]))), height
    return width, height


def as_views(images: Tensor) -> Tensor:
    """uint8 (B, C, H, W) -> float (B, 3, H, W) in [0, 1]; grayscale becomes 3 channels."""
    x = images.float().div_(255.0)
    return x.expand(-1, 3, -1, -1) if x.shape[1] == 1 else x


def render_views(images: Tensor, params: Tensor, size: int | tuple[int, int]) -> Tensor:
    """uint8 (B, C, H, W) images + (B, 5) parameters -> float (B, 3, height, width) views in [0, 1]."""
    size = (size, size) if isinstance(size, int) else tuple(size)
    x = as_views(images)
    params = params.to(x.device)
    boxes = torch.cat([torch.arange(x.shape[0], device=x.device, dtype=x.dtype).unsqueeze(1),
                       params[:, :4].to(x.dtype)], dim=1)
    out = roi_align(x, boxes, output_size=size, spatial_scale=1.0, sampling_ratio=0, aligned=True)
    flip = params[:, 4].to(torch.bool)
    if flip.any():
        out[flip] = out[flip].flip(-1)
    return out


class BatchViews:
    """One batch's views: crop parameters per view index, rendered on demand at each size asked for,
    photometrically augmented when `augment` is given (`augment[v]`: view v's (B, P) parameters from
    `augment.sample_augment_params`, applied with the same parameters at every size), then passed through
    `expand` (a strategy's derived views, e.g. rotations); each size is rendered once."""

    def __init__(self, images: Tensor, params: list[Tensor], expand: Callable[[list[Tensor]], list[Tensor]],
                 augment: list[Tensor] | None = None, augment_config: AugmentConfig | None = None):
        if augment is not None and len(augment) != len(params):
            raise ValueError(f"{len(augment)} augmentation parameter sets for {len(params)} views")
        if augment is not None and augment_config is None:
            raise ValueError("BatchViews: augmentation parameters need their augment_config")
        self.images = images
        self.params = params
        self.expand = expand
        self.augment = augment
        self.augment_config = augment_config
        self._rendered: dict[tuple[int, int], list[Tensor]] = {}

    def at(self, size: tuple[int, int]) -> list[Tensor]:
        size = tuple(size)
        if size not in self._rendered:
            views = [render_views(self.images, p, size) for p in self.params]
            if self.augment is not None:
                from .augment import apply_augment  # here: augment.py imports this module's hash_uniform

                views = [apply_augment(v, a, self.augment_config) for v, a in zip(views, self.augment)]
            self._rendered[size] = self.expand(views)
        return self._rendered[size]
