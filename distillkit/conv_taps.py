"""Convolutions that skip the kernel taps which only ever multiply padding, and 1 x 1 ones as matrix products:
exact, and much faster on small maps.

A k x k convolution with padding p on an H x W map reads, for output row o, input row o*s - p + t*d for the
kernel row t. Taps t whose input row is outside [0, H) for every output row multiply zeros only: they add
nothing to the output and get a zero gradient. At the small inputs distillation uses on CPUs (a 32 px
MobileNetV3 ends on 1 x 1 and 2 x 2 maps with 5 x 5 depthwise kernels), most taps are such taps, and the CPU
kernels (oneDNN's depthwise backward above all) still pay for all of them: on 2 cores, a MobileNetV3-Small
training step at 32 px spends half its time there. `cropped_taps(model)` makes every such `nn.Conv2d` of
`model` convolve with the reachable block of its kernel only (the same weights, sliced), on its input
padded explicitly (the padding a small map is mostly made of is, itself, a slow path of oneDNN's depthwise
backward), for as long as the context lasts; the outputs and gradients are the same
up to float rounding, the state dict does not change (exports and checkpoints are unaffected).

On a map of at most 8 x 8 pixels, a convolution whose kernel is (or is cropped to) 1 x 1, with stride 1, is
not handed to oneDNN at all: a pointwise one (groups 1) on a channels-last map is one matrix product over the
pixels, a depthwise one a per-channel multiply-add. On 1 x 1 to 8 x 8 maps oneDNN is 1.3-3.2x slower at these
(forward + backward, 1 thread, batch 128: MobileNetV3's 576 -> 1024 `conv_head` on its 1 x 1 map takes
19.4 ms as a convolution, 6.1 ms as a matrix product).

Only the CPU gains: CUDA's kernels do not have this cost, so `cropped_taps` changes nothing for a model on
another device.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch
import torch.nn.functional as F
from torch import Tensor, nn

# maps of at most this many pixels take the matrix-product path; on larger ones oneDNN's own 1 x 1 kernels are
# as fast or faster (forward + backward, 1 thread: 0.75x for 32 x 64 x 56 x 56 -> 256)
SMALL_MAP_PIXELS = 64


def reachable_taps(size: int, kernel: int, stride: int, padding: int, dilation: int) -> tuple[int, int, int]:
    """(first, last, outputs): the first and last kernel taps that read a real input row of a map `size`
    long, and the number of output rows (PyTorch's formula). No tap reaches the input: (0, kernel - 1, ...)."""
    outputs = (size + 2 * padding - dilation * (kernel - 1) - 1) // stride + 1
    used = [t for t in range(kernel) if any(0 <= o * stride - padding + t * dilation < size for o in range(outputs))]
    if not used:  # the output is the bias alone: rare enough to leave to the full kernel
        return 0, kernel - 1, outputs
    return used[0], used[-1], outputs


def _axis_plan(size: int, kernel: int, stride: int, padding: int, dilation: int) -> tuple[int, int, int, int]:
    """(first tap, last tap, padding before, padding after) that give the same output rows; a negative
    padding trims rows that no output reads."""
    first, last, outputs = reachable_taps(size, kernel, stride, padding, dilation)
    before = padding - first * dilation
    span = (last - first) * dilation + 1
    after = (outputs - 1) * stride + span - size - before
    return first, last, before, after


class CroppedTapsConv2d(nn.Conv2d):
    """An `nn.Conv2d` whose forward convolves with its reachable taps only (see the module docstring)."""

    def _conv_forward(self, input: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        if input.device.type != "cpu" or self.padding_mode != "zeros" or isinstance(self.padding, str):
            return super()._conv_forward(input, weight, bias)
        sizes = input.shape[-2:]
        plans = [
            _axis_plan(sizes[axis], self.kernel_size[axis], self.stride[axis], self.padding[axis], self.dilation[axis])
            for axis in (0, 1)
        ]
        cropped = any(last - first + 1 < k for (first, last, _, _), k in zip(plans, self.kernel_size))
        mostly_padding = any(2 * p >= size for p, size in zip(self.padding, sizes))
        padding = self.padding
        if cropped or mostly_padding:
            (top, bottom, pad_top, pad_bottom), (left, right, pad_left, pad_right) = plans
            weight = weight[:, :, top : bottom + 1, left : right + 1]
            # a map that is mostly padding: padding it explicitly and convolving unpadded is the fast oneDNN path
            input, padding = F.pad(input, (pad_left, pad_right, pad_top, pad_bottom)), (0, 0)
        small = input.shape[-2] * input.shape[-1] <= SMALL_MAP_PIXELS
        if small and weight.shape[-2:] == (1, 1) and tuple(padding) == (0, 0) and self.stride == (1, 1):
            if self.groups == 1 and input.is_contiguous(memory_format=torch.channels_last):
                return pointwise(input, weight, bias)
            if self.groups == input.shape[1] == weight.shape[0]:
                return channelwise(input, weight, bias)
        return F.conv2d(input, weight, bias, self.stride, padding, self.dilation, self.groups)


def pointwise(x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    """A 1 x 1 convolution (groups 1, stride 1, no padding) of a channels-last map as one matrix product over
    its pixels: (N H W, C) @ (C, C_out), returned channels-last as the convolution returns it."""
    return F.linear(x.permute(0, 2, 3, 1), weight.flatten(1), bias).permute(0, 3, 1, 2)


def channelwise(x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    """A 1 x 1 depthwise convolution (one filter per channel): x * w_c + b_c."""
    scale = weight.view(1, -1, 1, 1)
    return x * scale if bias is None else torch.addcmul(bias.view(1, -1, 1, 1), x, scale)


@contextmanager
def cropped_taps(model: nn.Module) -> Iterator[nn.Module]:
    """Within the context, every plain `nn.Conv2d` of `model` skips its padding-only taps (on the CPU)."""
    swapped = [m for m in model.modules() if type(m) is nn.Conv2d]
    for module in swapped:
        module.__class__ = CroppedTapsConv2d
    try:
        yield model
    finally:
        for module in swapped:
            module.__class__ = nn.Conv2d
