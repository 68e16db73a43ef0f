"""I-JEPA multi-block masks on a patch grid, for strategy hidden: a few target rectangles and one context block.

Assran et al., "Self-Supervised Learning from Images with a Joint-Embedding Predictive Architecture",
CVPR 2023 (arXiv 2301.08243); official code facebookresearch/ijepa src/masks/multiblock.py
(`MaskCollator`) with the defaults of configs/in1k_vith14_ep300.yaml (docs/methods.md#hidden-block-masks):

    targets: 4 blocks, scale (0.15, 0.2) of the grid, aspect ratio h/w in (0.75, 1.5)
    context: 1 block, scale (0.85, 1.0), aspect 1, minus every target patch (allow_overlap false),
             at least `min_keep` patches

As in `MaskCollator.__call__`, one block size is drawn per batch (the same for all images and all
target blocks; one uniform number sets both scale and aspect, as `_sample_block_size` does), the
positions per image; the context of every image is then cut to the smallest context in the batch
so that the indices stack. If the context block, minus the targets, keeps fewer than `min_keep`
patches 20 times in a row, one target's exclusion is dropped (I-JEPA's `tries` relaxation).

Where distillkit differs from the I-JEPA code (on purpose, documented):
- every random draw comes from the given `torch.Generator` (I-JEPA draws positions from the global
  RNG), so the masks are a pure function of the generator;
- a block's top-left corner ranges over every position where the block fits (I-JEPA's
  `randint(0, H - h)` never touches the last row/column);
- `min_keep` applies to the context only, means "at least" (I-JEPA: more than), and a grid on which
  it cannot be met even without exclusions is refused up front (I-JEPA would loop forever);
- block sides are at least 1 patch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from ..errors import UsageError

MAX_TRIES_PER_RELAXATION = 20  # I-JEPA's `timeout`


@dataclass(frozen=True)
class BlockMasks:
    """Flat patch indices (row-major on the grid), sorted ascending within each row.

    context: (B, N_ctx) the patches the student encoder sees
    targets: (num_targets, B, N_tgt) the patches the predictor must predict, one block each
    """

    context: Tensor
    targets: Tensor


def block_size(
    grid: tuple[int, int], scale: tuple[float, float], aspect: tuple[float, float], u: float
) -> tuple[int, int]:
    """I-JEPA `_sample_block_size` for the uniform draw `u`: (h, w), each side in [1, grid side - 1]."""
    height, width = grid
    mask_scale = scale[0] + u * (scale[1] - scale[0])
    max_keep = int(height * width * mask_scale)
    aspect_ratio = aspect[0] + u * (aspect[1] - aspect[0])
    h = int(round(math.sqrt(max_keep * aspect_ratio)))
    w = int(round(math.sqrt(max_keep / aspect_ratio)))
    h = max(1, min(h, height - 1))  # I-JEPA: `while h >= height: h -= 1`
    w = max(1, min(w, width - 1))
    return h, w


def check_mask_grid(grid: tuple[int, int], context_scale: tuple[float, float], min_keep: int) -> None:
    """Raise `UsageError` when even an unconstrained context block has fewer than `min_keep` patches."""
    height, width = grid
    if height < 2 or width < 2:
        raise UsageError(
            f"a {height}x{width} patch grid is too small for block masks; use a larger input "
            "size or a smaller patch size"
        )
    smallest = block_size(grid, context_scale, (1.0, 1.0), 0.0)
    if smallest[0] * smallest[1] < min_keep:
        raise UsageError(
            f"on a {height}x{width} patch grid the context block can be as small as {smallest[0]}x{smallest[1]} "
            f"= {smallest[0] * smallest[1]} patches, fewer than mask_min_keep = {min_keep}; use a larger input "
            "size, a smaller patch size or a lower mask_min_keep"
        )


def _block(grid: tuple[int, int], size: tuple[int, int], generator: torch.Generator) -> Tensor:
    """A (H, W) bool mask with one h x w rectangle at a uniformly drawn position."""
    height, width = grid
    h, w = size
    top = int(torch.randint(0, height - h + 1, (1,), generator=generator))
    left = int(torch.randint(0, width - w + 1, (1,), generator=generator))
    mask = torch.zeros(height, width, dtype=torch.bool)
    mask[top : top + h, left : left + w] = True
    return mask


def sample_block_masks(
    batch_size: int,
    grid: tuple[int, int],
    generator: torch.Generator,
    num_targets: int = 4,
    target_scale: tuple[float, float] = (0.15, 0.2),
    target_aspect: tuple[float, float] = (0.75, 1.5),
    context_scale: tuple[float, float] = (0.85, 1.0),
    min_keep: int = 10,
) -> BlockMasks:
    """Sample I-JEPA block masks for `batch_size` images on a `grid` = (H, W) of patches."""
    check_mask_grid(grid, context_scale, min_keep)
    if num_targets < 1:
        raise UsageError(f"num_targets must be at least 1, got {num_targets}")
    target_size = block_size(grid, target_scale, target_aspect, float(torch.rand(1, generator=generator)))
    context_size = block_size(grid, context_scale, (1.0, 1.0), float(torch.rand(1, generator=generator)))
    contexts, targets = [], []
    for _ in range(batch_size):
        blocks = [_block(grid, target_size, generator) for _ in range(num_targets)]
        targets.append(torch.stack([b.flatten().nonzero().squeeze(1) for b in blocks]))
        context = None
        relaxed, tries = 0, 0
        while context is None:
            candidate = _block(grid, context_size, generator)
            for block in blocks[: num_targets - relaxed]:  # I-JEPA drops exclusions from the end
                candidate &= ~block
            if int(candidate.sum()) >= min_keep:
                context = candidate
                break
            tries += 1
            if tries == MAX_TRIES_PER_RELAXATION:
                relaxed, tries = min(relaxed + 1, num_targets), 0
        contexts.append(context.flatten().nonzero().squeeze(1))
    keep = min(len(c) for c in contexts)
    return BlockMasks(context=torch.stack([c[:keep] for c in contexts]), targets=torch.stack(targets, dim=1))
