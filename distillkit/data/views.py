"""Augmented views, computed for a whole batch at once and replayable from their parameters.

A view of image `i` is a random resized crop plus an optional horizontal flip. Its parameters
come from a counter-based hash of (seed, epoch, image index, view index), not from a stateful RNG,
so the same image gets the same view however the data is sharded across processes, after a resume,
or when a teacher-output cache replays it. `render_views` turns parameters into pixels with one
batched `roi_align` (bilinear crop + resize, adaptive sampling so downscaling averages) on uint8 images
scaled to [0, 1].

Parameters per view: (x0, y0, x1, y1, flip) in pixel coordinates of the source image. Photometric
augmentation (colour jitter, grayscale, blur, solarize) has its own parameters from an independent hash
stream, see `augment.py`; `BatchViews` applies it after rendering.

`BatchViews` renders one batch's views at each size asked for, once per size: with `data.render`
per_network every network gets the same crops resampled once, straight to its own input size (a 64 px
teacher and a 32 px student see the same region), and a student reading cached teacher outputs renders
only its own size (the embedded default recipe); with shared (the schema default) all get one rendering at
the largest input size.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor
from torchvision.ops import roi_align

from ..recipe import AugmentConfig, DataConfig
from .augment import apply_augment, is_active, sample_augment_params
from .hashing import hash_uniform

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


def sample_view_params(
    indices: Tensor, height: int, width: int, config: ViewConfig, *, seed: int, epoch: int, view: int
) -> Tensor:
    """(B, 5) float64 view parameters for images `indices` of size height x width."""
    indices = indices.to(torch.int64).cpu()
    u = hash_uniform(seed, epoch, indices, view, 4 * ATTEMPTS + 1)
    area = height * width
    scale = config.crop_scale[0] + (config.crop_scale[1] - config.crop_scale[0]) * u[:, :ATTEMPTS]
    log_lo, log_hi = math.log(config.crop_ratio[0]), math.log(config.crop_ratio[1])
    ratio = torch.exp(log_lo + (log_hi - log_lo) * u[:, ATTEMPTS : 2 * ATTEMPTS])
    w = torch.sqrt(scale * area * ratio).round()
    h = torch.sqrt(scale * area / ratio).round()
    fits = (w >= 1) & (h >= 1) & (w <= width) & (h <= height)
    first = torch.where(fits.any(1), fits.int().argmax(1), torch.full_like(indices, -1))
    rows = torch.arange(indices.shape[0])
    pick = first.clamp(min=0)
    w, h = w[rows, pick], h[rows, pick]
    x_pos = u[:, 2 * ATTEMPTS : 3 * ATTEMPTS][rows, pick]
    y_pos = u[:, 3 * ATTEMPTS : 4 * ATTEMPTS][rows, pick]
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
    boxes = torch.cat(
        [torch.arange(x.shape[0], device=x.device, dtype=x.dtype).unsqueeze(1), params[:, :4].to(x.dtype)], dim=1
    )
    out = roi_align(x, boxes, output_size=size, spatial_scale=1.0, sampling_ratio=0, aligned=True)
    flip = params[:, 4].to(torch.bool).view(-1, 1, 1, 1)
    return torch.where(flip, out.flip(-1), out)  # no boolean indexing: it would wait for the device to count


class BatchViews:
    """One batch's views: crop parameters per view index, rendered on demand at each size asked for,
    photometrically augmented when `augment` is given (`augment[v]`: view v's (B, P) parameters from
    `augment.sample_augment_params`, applied with the same parameters at every size), then passed through
    `expand` (a strategy's derived views, e.g. rotations); each size is rendered once."""

    def __init__(
        self,
        images: Tensor,
        params: list[Tensor],
        expand: Callable[[list[Tensor]], list[Tensor]],
        augment: list[Tensor] | None = None,
        augment_config: AugmentConfig | None = None,
    ):
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
                views = [apply_augment(v, a, self.augment_config) for v, a in zip(views, self.augment)]
            self._rendered[size] = self.expand(views)
        return self._rendered[size]


def batch_views(
    images: Tensor,
    indices: Tensor,
    config: ViewConfig,
    *,
    seed: int,
    epoch: int,
    num_views: int,
    expand: Callable[[list[Tensor]], list[Tensor]],
) -> BatchViews:
    """The `num_views` views of each image of a batch for `epoch` (or view slot): crops, flips and the
    photometric augmentation, all drawn from (seed, epoch, image index, view)."""
    height, width = images.shape[-2:]
    params = [
        sample_view_params(indices, height, width, config, seed=seed, epoch=epoch, view=v) for v in range(num_views)
    ]
    augment = config.augment if is_active(config.augment) else None
    if augment is None:
        return BatchViews(images, params, expand)
    return BatchViews(
        images,
        params,
        expand,
        augment_config=augment,
        augment=[sample_augment_params(indices, augment, seed=seed, epoch=epoch, view=v) for v in range(num_views)],
    )


def view_config(data: DataConfig) -> ViewConfig:
    """The recipe's crop, flip and augmentation settings (an augmentation that changes no pixel is none)."""
    return ViewConfig(
        crop_scale=data.crop_scale,
        crop_ratio=data.crop_ratio,
        flip=data.flip,
        augment=data.augment if is_active(data.augment) else None,
    )


def view_seed(data: DataConfig, train_seed: int) -> int:
    """The seed the views' parameters are hashed from: `data.view_seed`, else the run's seed."""
    return train_seed if data.view_seed is None else data.view_seed


@dataclass(frozen=True)
class SizePlan:
    """The sizes a run's views are rendered at, decided once: each network's render size (a network
    resizes views of another size itself) and the size folder images are loaded at."""

    student: tuple[int, int]
    teachers: dict[str, tuple[int, int]]  # role -> render size
    load_size: int  # folder images are resized to this when read


def plan_sizes(data: DataConfig, teacher_sizes: dict[str, tuple[int, int]], student_size: tuple[int, int]) -> SizePlan:
    """`data.view_size` for every network when set; else the largest network input for `data.render` shared,
    or each network's own input size for per_network. Images load at `data.load_size`, else 1.15 x the largest
    view (room for the crops)."""
    largest = max(*(s for size in teacher_sizes.values() for s in size), *student_size)

    def render_size(size: tuple[int, int]) -> tuple[int, int]:
        if data.view_size:
            return data.view_size, data.view_size
        return (largest, largest) if data.render == "shared" else tuple(size)

    return SizePlan(
        student=render_size(student_size),
        teachers={role: render_size(size) for role, size in teacher_sizes.items()},
        load_size=data.load_size or int(round((data.view_size or largest) * 1.15)),
    )


DEFAULT_CACHE_SLOTS = 4  # views per image a teacher cache stores when data.view_slots is not set
AUTO_SLOTS_SHARE = 8  # view_slots auto: the teacher renders 1 / AUTO_SLOTS_SHARE of the images seen


def view_slots(
    data: DataConfig, images_seen: int | None = None, epochs: int | None = None, num_images: int | None = None
) -> int | None:
    """How many distinct views per image (and view index) the run cycles through; None = new ones every epoch.
    A cache folder given explicitly without `data.view_slots` gets DEFAULT_CACHE_SLOTS. `auto` sizes K to the
    data: enough fixed views for the teacher to render an eighth of the images the run sees (one slot for a
    large dataset, more for a small one, never more than the epochs), so a small dataset is not one fixed
    crop per image repeated every epoch."""
    slots = data.view_slots
    if slots == "auto":
        if not (images_seen and epochs and num_images):
            raise ValueError("view_slots auto needs the images the run sees, its epochs and its data size")
        return max(1, min(epochs, round(images_seen / (AUTO_SLOTS_SHARE * num_images))))
    if slots is not None:
        return slots
    return DEFAULT_CACHE_SLOTS if data.teacher_cache not in (None, "auto") else None
