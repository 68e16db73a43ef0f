"""I-JEPA block masks (strategies/masks.py) against docs/methods.md#hidden-block-masks: 4 target rectangles of
scale (0.15, 0.2) and aspect (0.75, 1.5), one context block of scale (0.85, 1.0) and aspect 1 minus the
targets, at least min_keep patches."""

from __future__ import annotations

import pytest
import torch

from distillkit.errors import UsageError
from distillkit.strategies.masks import block_size, check_mask_grid, sample_block_masks

GRID = (14, 14)  # ViT-S/16 at 224 px


def _masks(seed: int, batch: int = 8, grid=GRID, **kwargs):
    return sample_block_masks(batch, grid, torch.Generator().manual_seed(seed), **kwargs)


def _cells(indices: torch.Tensor, width: int) -> set[tuple[int, int]]:
    return {(int(i) // width, int(i) % width) for i in indices}


def _bounding_box(cells: set[tuple[int, int]]) -> tuple[int, int]:
    rows = [r for r, _ in cells]
    cols = [c for _, c in cells]
    return max(rows) - min(rows) + 1, max(cols) - min(cols) + 1


def test_block_size_follows_the_ijepa_formula_by_hand():
    # u = 0: scale 0.15 -> int(196 * 0.15) = 29 patches; aspect 0.75 -> h = round(sqrt(21.75)) = 5,
    # w = round(sqrt(38.67)) = 6.  u = 1: int(196 * 0.2) = 39, aspect 1.5 -> h = round(7.65) = 8, w = round(5.10) = 5.
    assert block_size(GRID, (0.15, 0.2), (0.75, 1.5), 0.0) == (5, 6)
    assert block_size(GRID, (0.15, 0.2), (0.75, 1.5), 1.0) == (8, 5)
    # context: int(196 * 0.85) = 166 -> round(12.88) = 13; scale 1.0 -> 14, cut to grid side - 1 = 13
    assert block_size(GRID, (0.85, 1.0), (1.0, 1.0), 0.0) == (13, 13)
    assert block_size(GRID, (0.85, 1.0), (1.0, 1.0), 1.0) == (13, 13)
    # sides never reach 0 on small grids
    assert block_size((3, 3), (0.15, 0.2), (0.75, 1.5), 0.0) == (1, 1)


def test_shapes_counts_and_rectangles_per_the_spec():
    masks = _masks(seed=0)
    num_targets, batch, per_target = masks.targets.shape
    assert (num_targets, batch) == (4, 8)
    assert masks.context.shape[0] == 8
    allowed_targets = {block_size(GRID, (0.15, 0.2), (0.75, 1.5), u / 1000) for u in range(1001)}
    for b in range(batch):
        target_cells = set()
        for k in range(4):
            cells = _cells(masks.targets[k, b], 14)
            h, w = _bounding_box(cells)
            assert len(cells) == per_target == h * w  # a full rectangle
            assert (h, w) in allowed_targets
            assert 0.15 * 196 * 0.7 <= h * w <= 0.2 * 196 * 1.3  # rounding of sides only
            target_cells |= cells
        context = masks.context[b]
        assert len(set(context.tolist())) == len(context) >= 10  # min_keep
        assert torch.equal(context, context.sort().values)
        context_cells = _cells(context, 14)
        assert not context_cells & target_cells  # targets removed from the context
        h, w = _bounding_box(context_cells)
        assert h <= 13 and w <= 13  # inside one 13 x 13 context block


def test_one_block_size_per_batch_and_contexts_cut_to_the_smallest():
    masks = _masks(seed=3, batch=16)
    sizes = {_bounding_box(_cells(masks.targets[k, b], 14)) for k in range(4) for b in range(16)}
    assert len(sizes) == 1
    assert masks.context.dtype == masks.targets.dtype == torch.long
    assert int(masks.context.max()) < 196 and int(masks.context.min()) >= 0


def test_the_generator_alone_decides_the_masks():
    first, again, other = _masks(seed=11), _masks(seed=11), _masks(seed=12)
    assert torch.equal(first.context, again.context) and torch.equal(first.targets, again.targets)
    assert not torch.equal(first.targets, other.targets)
    torch.manual_seed(0)  # the global RNG plays no part
    a = _masks(seed=11)
    torch.manual_seed(1)
    b = _masks(seed=11)
    assert torch.equal(a.context, b.context) and torch.equal(a.targets, b.targets)


def test_small_grid_relaxes_exclusions_and_still_keeps_min_keep():
    # 8 x 8: the context block is at most 7 x 7 = 49 patches and four ~3 x 3 targets can eat most of it
    for seed in range(5):
        masks = _masks(seed=seed, batch=4, grid=(8, 8), min_keep=30)
        assert masks.context.shape[1] >= 30
        assert masks.targets.shape[0] == 4


@pytest.mark.parametrize("grid,min_keep", [((4, 4), 10), ((1, 8), 1)])
def test_grids_too_small_for_the_context_are_refused(grid, min_keep):
    with pytest.raises(UsageError, match="grid"):
        check_mask_grid(grid, (0.85, 1.0), min_keep)
    with pytest.raises(UsageError):
        _masks(seed=0, grid=grid, min_keep=min_keep)


def test_number_of_targets_is_configurable():
    masks = _masks(seed=0, num_targets=2)
    assert masks.targets.shape[:2] == (2, 8)
