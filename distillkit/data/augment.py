"""Photometric augmentation of rendered views, batched and replayable from hashes.

Like the crops in `views.py`, each view's augmentation parameters are a pure function of
(seed, epoch or view slot, image index, view index), drawn with `hashing.hash_uniform`. They come from a
stream of their own: the view index is XORed with `AUGMENT_STREAM` (a fixed 32-bit constant, never a
small view index), so adding augmentation leaves the crops unchanged and the two are independent.
A teacher-output cache, a resume and any sharding across processes therefore see the same pixels.

The recipe (`AugmentConfig`, in `recipe.py`) follows SimCLR (Chen et al. 2020, appendix A): colour jitter
of strength s (brightness, contrast and saturation 0.8 s, hue 0.2 s) applied with probability 0.8, in a
random order; grayscale with probability 0.2; on ImageNet a Gaussian blur with probability 0.5 and sigma
uniform in 0.1-2.0 (pixels of a 224 px view). BYOL (Grill et al. 2020) adds solarisation with
probability 0.2 on one of its two views. The ops are applied in that order: jitter, grayscale, blur,
solarize, each to the images whose parameters select it, with the formulas of torchvision's
`transforms.v2.functional`.

Parameters per view, (B, 13) float64, one row per image (the column constants below):
  0 JITTER      1 if colour jitter applies, else 0
  1 BRIGHTNESS  brightness factor            2 CONTRAST  contrast factor
  3 SATURATION  saturation factor            4 HUE       hue shift, a fraction of a full turn
  5-8 ORDER     the jitter op applied 1st, 2nd, 3rd, 4th (0 brightness, 1 contrast, 2 saturation, 3 hue)
  9 GRAYSCALE   1 if grayscale applies       10 BLUR     1 if the blur applies
  11 SIGMA      blur sigma in pixels of a 224 px view    12 SOLARIZE  1 if solarisation applies
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from ..recipe import AugmentConfig
from .hashing import hash_uniform

AUGMENT_STREAM = 0x9E3779B9  # XORed into the view index: augmentation draws never reuse the crop draws

JITTER, BRIGHTNESS, CONTRAST, SATURATION, HUE, ORDER, GRAYSCALE, BLUR, SIGMA, SOLARIZE = 0, 1, 2, 3, 4, 5, 9, 10, 11, 12
NUM_PARAMS = 13
JITTER_OPS = 4  # brightness, contrast, saturation, hue: op j's factor is column BRIGHTNESS + j

GRAY_WEIGHTS = (0.2989, 0.587, 0.114)  # torchvision's rgb_to_grayscale (ITU-R 601 luma, 0.299 as torchvision rounds it)
SOLARIZE_THRESHOLD = 0.5
BLUR_REFERENCE_SIDE = 224  # `blur_sigma` is in pixels of a view this size


# ----------------------------------------------------------------------------- parameters


def sample_augment_params(indices: Tensor, config: AugmentConfig, *, seed: int, epoch: int, view: int) -> Tensor:
    """(B, 13) float64 augmentation parameters of images `indices` (layout: the module docstring).

    Draw d of image i is u_d = hash_uniform(seed, epoch, i, view ^ AUGMENT_STREAM)[d], d = column d:
    a flag is u < p (p the probability); a factor of strength s is max(0, 1 - s) + (1 + s - max(0, 1 - s)) u,
    as torchvision's ColorJitter; the hue shift is h (2 u - 1); the sigma is low + (high - low) u; the
    jitter order is the argsort of the four draws 5-8, a uniformly random permutation as ColorJitter's
    randperm(4). Each image's row depends only on its own index, not on the rest of the batch.
    """
    indices = indices.to(torch.int64).cpu()
    u = hash_uniform(seed, epoch, indices, view ^ AUGMENT_STREAM, NUM_PARAMS)
    params = torch.zeros_like(u)
    params[:, JITTER] = (u[:, JITTER] < config.jitter).double()
    for column, strength in (
        (BRIGHTNESS, config.brightness),
        (CONTRAST, config.contrast),
        (SATURATION, config.saturation),
    ):
        low = max(0.0, 1.0 - strength)
        params[:, column] = low + (1.0 + strength - low) * u[:, column]
    params[:, HUE] = config.hue * (2.0 * u[:, HUE] - 1.0)
    params[:, ORDER : ORDER + JITTER_OPS] = u[:, ORDER : ORDER + JITTER_OPS].argsort(dim=1).double()
    params[:, GRAYSCALE] = (u[:, GRAYSCALE] < config.grayscale).double()
    params[:, BLUR] = (u[:, BLUR] < config.blur).double()
    low, high = config.blur_sigma
    params[:, SIGMA] = low + (high - low) * u[:, SIGMA]
    params[:, SOLARIZE] = (u[:, SOLARIZE] < config.solarize).double()
    return params


def is_active(config: AugmentConfig | None) -> bool:
    """Whether `config` changes any pixel: some op has a probability > 0 (jitter also needs a strength > 0)."""
    if config is None:
        return False
    strengths = (config.brightness, config.contrast, config.saturation, config.hue)
    return (
        (config.jitter > 0 and any(s > 0 for s in strengths))
        or config.grayscale > 0
        or config.blur > 0
        or config.solarize > 0
    )


# ----------------------------------------------------------------------------- application


def apply_augment(views: Tensor, params: Tensor, config: AugmentConfig | None) -> Tensor:
    """float (B, 3, H, W) views in [0, 1] + (B, 13) parameters -> augmented views, on the views' device.

    Colour jitter (its four ops in each image's own order), then grayscale, blur and solarize, each on
    the images whose flag is set, batched over those images (no loop over images). An op whose
    probability or strength is 0 in `config` is skipped; when nothing is active the input itself is
    returned, unchanged. The same parameters give the same augmentation at any view size (the blur
    sigma scales with it, see `blur_sigma_pixels`).
    """
    if not is_active(config):
        return views
    params = params.cpu()
    out = views.clone()
    if config.jitter > 0:
        _color_jitter(out, params, config)
    if config.grayscale > 0:
        _apply_to_some(out, params, params[:, GRAYSCALE] > 0, lambda x, p: grayscale(x))
    if config.blur > 0:
        _apply_to_some(out, params, params[:, BLUR] > 0, lambda x, p: gaussian_blur(x, p[:, SIGMA]))
    if config.solarize > 0:
        _apply_to_some(out, params, params[:, SOLARIZE] > 0, lambda x, p: solarize(x))
    return out


def _color_jitter(x: Tensor, params: Tensor, config: AugmentConfig) -> None:
    """In place: at each of the four positions, every image with jitter on gets the op its ORDER column
    names there, with its own factor. An op of strength 0 is skipped, as torchvision's ColorJitter."""
    ops = [
        (adjust_brightness, config.brightness),
        (adjust_contrast, config.contrast),
        (adjust_saturation, config.saturation),
        (adjust_hue, config.hue),
    ]
    jitter_on = params[:, JITTER] > 0
    for position in range(JITTER_OPS):
        for op_index, (op, strength) in enumerate(ops):
            if strength == 0:
                continue
            chosen = jitter_on & (params[:, ORDER + position] == op_index)
            factor_column = BRIGHTNESS + op_index
            _apply_to_some(x, params, chosen, lambda v, p, op=op, c=factor_column: op(v, p[:, c]))


def _apply_to_some(x: Tensor, params: Tensor, selected: Tensor, op: Callable[[Tensor, Tensor], Tensor]) -> None:
    """In place: x[selected] = op(x[selected], params[selected]); `selected` is a CPU bool mask (no device sync)."""
    rows = selected.nonzero().squeeze(1)
    if rows.numel() == 0:
        return
    on_device = rows.to(x.device)
    x.index_copy_(0, on_device, op(x.index_select(0, on_device), params[rows]).to(x.dtype))


def _per_image(values: Tensor, x: Tensor) -> Tensor:
    """(n,) per-image numbers -> (n, 1, 1, 1) in x's dtype and device, to broadcast over (n, C, H, W)."""
    return values.to(device=x.device, dtype=x.dtype).view(-1, 1, 1, 1)


def _blend(x: Tensor, other: Tensor, factor: Tensor) -> Tensor:
    """clamp(f x + (1 - f) other, 0, 1) per image: torchvision's `_blend`."""
    f = _per_image(factor, x)
    return (f * x + (1 - f) * other).clamp(0.0, 1.0)


def gray_channel(x: Tensor) -> Tensor:
    """(n, 3, H, W) -> (n, 1, H, W) luma 0.2989 R + 0.587 G + 0.114 B (torchvision's weights)."""
    r, g, b = x.unbind(dim=1)
    return (GRAY_WEIGHTS[0] * r + GRAY_WEIGHTS[1] * g + GRAY_WEIGHTS[2] * b).unsqueeze(1)


def grayscale(x: Tensor) -> Tensor:
    """rgb_to_grayscale(x, num_output_channels=3): the luma replicated to 3 channels."""
    return gray_channel(x).expand_as(x)


def adjust_brightness(x: Tensor, factor: Tensor) -> Tensor:
    """clamp(f x, 0, 1) per image, as torchvision's adjust_brightness."""
    return (x * _per_image(factor, x)).clamp(0.0, 1.0)


def adjust_contrast(x: Tensor, factor: Tensor) -> Tensor:
    """Blend with the mean of the grayscale image: clamp(f x + (1 - f) mean(gray(x)), 0, 1)."""
    return _blend(x, gray_channel(x).mean(dim=(1, 2, 3), keepdim=True), factor)


def adjust_saturation(x: Tensor, factor: Tensor) -> Tensor:
    """Blend with the grayscale image: clamp(f x + (1 - f) gray(x), 0, 1)."""
    return _blend(x, gray_channel(x), factor)


def adjust_hue(x: Tensor, shift: Tensor) -> Tensor:
    """Rotate the hue in HSV: h' = (h + shift) mod 1, saturation and value kept, as torchvision's adjust_hue.

    HSV -> RGB with the closed form channel_n = v - v s clamp(min(k, 4 - k), 0, 1), k = (n + 6 h') mod 6,
    n = 5, 3, 1 for R, G, B (equal to the sector table torchvision uses).
    """
    hue, saturation, value = _rgb_to_hsv(x)
    hue = (hue + shift.to(device=x.device, dtype=x.dtype).view(-1, 1, 1)) % 1.0
    n = torch.tensor([5.0, 3.0, 1.0], device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
    k = (n + 6.0 * hue.unsqueeze(1)) % 6.0
    ramp = torch.minimum(k, 4.0 - k).clamp(0.0, 1.0)
    return (value.unsqueeze(1) * (1.0 - saturation.unsqueeze(1) * ramp)).clamp(0.0, 1.0)


def _rgb_to_hsv(x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """(n, 3, H, W) RGB -> hue in [0, 1), saturation, value, each (n, H, W). v = max, s = (max - min) / max,
    h = the sector formula over 6 (0 where max = min: gray pixels have no hue)."""
    r, g, b = x.unbind(dim=1)
    value, _ = x.max(dim=1)
    chroma = value - x.min(dim=1).values
    gray = chroma == 0
    saturation = chroma / torch.where(gray, torch.ones_like(value), value)
    safe_chroma = torch.where(gray, torch.ones_like(chroma), chroma)
    sector = torch.where(
        value == r,
        (g - b) / safe_chroma,
        torch.where(value == g, 2.0 + (b - r) / safe_chroma, 4.0 + (r - g) / safe_chroma),
    )
    hue = torch.where(gray, torch.zeros_like(sector), sector / 6.0) % 1.0
    return hue, saturation, value


def solarize(x: Tensor) -> Tensor:
    """Invert the bright pixels: where(x >= 0.5, 1 - x, x)."""
    return torch.where(x >= SOLARIZE_THRESHOLD, 1.0 - x, x)


def blur_sigma_pixels(sigma: Tensor, side: int) -> Tensor:
    """A sigma in pixels of a 224 px view -> pixels of a view `side` px long: sigma side / 224, so views of
    one crop rendered at different sizes are blurred alike relative to the image."""
    return sigma * (side / BLUR_REFERENCE_SIDE)


def blur_kernel_sizes(sigma: Tensor, side: int) -> Tensor:
    """Odd kernel lengths 2 ceil(3 sigma) + 1 (sigma in pixels of this view), capped to the largest odd
    length <= side so reflect padding stays inside the view."""
    largest = side if side % 2 else side - 1
    return (2 * torch.ceil(3 * sigma) + 1).clamp(max=largest).long()


def gaussian_kernels(sigma: Tensor, side: int) -> Tensor:
    """(n,) sigmas in pixels -> (n, K) normalised 1-D kernels exp(-t^2 / (2 sigma^2)), t = -K//2..K//2,
    each zero outside its own `blur_kernel_sizes` length; K is the largest of them. Zero taps change
    nothing, and reflect padding maps an index the same way however wide the padding."""
    radius = (blur_kernel_sizes(sigma, side) - 1) // 2
    widest = int(radius.max())
    t = torch.arange(-widest, widest + 1, dtype=torch.float64)
    weights = torch.exp(-(t**2) / (2 * sigma.double().unsqueeze(1) ** 2))
    weights = weights * (t.abs() <= radius.unsqueeze(1))
    return weights / weights.sum(dim=1, keepdim=True)


def gaussian_blur(x: Tensor, sigma: Tensor) -> Tensor:
    """Separable Gaussian blur with reflect padding, as torchvision's gaussian_blur, a sigma per image
    given in pixels of a 224 px view (`blur_sigma_pixels` scales it to this view, per axis)."""
    height, width = x.shape[-2:]
    sigma = sigma.cpu()
    x = _blur_last_axis(x, gaussian_kernels(blur_sigma_pixels(sigma, width), width))
    return _blur_last_axis(x.transpose(-1, -2), gaussian_kernels(blur_sigma_pixels(sigma, height), height)).transpose(
        -1, -2
    )


def _blur_last_axis(x: Tensor, kernels: Tensor) -> Tensor:
    """Convolve each image's rows with its own (K,) kernel (a grouped conv, one group per channel)."""
    n, channels, height, width = x.shape
    size = kernels.shape[1]
    weight = kernels.to(device=x.device, dtype=x.dtype).repeat_interleave(channels, dim=0).view(-1, 1, 1, size)
    padded = F.pad(x.reshape(1, n * channels, height, width), (size // 2, size // 2, 0, 0), mode="reflect")
    return F.conv2d(padded, weight, groups=n * channels).view(n, channels, height, width)


__all__ = [
    "AUGMENT_STREAM",
    "NUM_PARAMS",
    "apply_augment",
    "blur_kernel_sizes",
    "blur_sigma_pixels",
    "gaussian_blur",
    "is_active",
    "sample_augment_params",
]
