"""Augmented views: pure, shard-invariant parameters and exact rendering in simple cases."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from distillkit.data.hashing import hash_uniform
from distillkit.data.views import ViewConfig, as_views, render_views, sample_view_params

# ----------------------------------------------------------------------------- hash_uniform

M32 = 0xFFFFFFFF


def lowbias32(x: int) -> int:
    """Reference lowbias32 on Python ints (Chris Wellons' constants)."""
    x &= M32
    x = ((x ^ (x >> 16)) * 0x7FEB352D) & M32
    x = ((x ^ (x >> 15)) * 0x846CA68B) & M32
    return x ^ (x >> 16)


def reference_uniform(seed: int, epoch: int, index: int, view: int, draw: int) -> float:
    x = lowbias32(seed)
    x = lowbias32(x ^ epoch)
    x = lowbias32(x ^ index)
    x = lowbias32(x ^ view)
    x = lowbias32(x ^ draw)
    return (x >> 8) / 2**24


def test_lowbias32_reference_known_values():
    # hand-checked: 0 maps to 0; 1 is mixed well away from small values
    assert lowbias32(0) == 0
    assert lowbias32(1) not in (0, 1)


@pytest.mark.parametrize("seed, epoch, view", [(0, 0, 0), (1, 2, 1), (12345, 7, 3), (2**32 + 5, 1, 0)])
def test_hash_uniform_matches_reference(seed, epoch, view):
    indices = torch.tensor([0, 1, 2, 99, 2**31 + 3])
    got = hash_uniform(seed, epoch, indices, view, 3)
    assert got.shape == (5, 3)
    assert got.dtype == torch.float64
    for row, index in enumerate(indices.tolist()):
        for draw in range(3):
            assert got[row, draw].item() == reference_uniform(seed & M32, epoch, index, view, draw)


def test_hash_uniform_range_and_mean():
    u = hash_uniform(0, 0, torch.arange(10000), 0, 1).flatten()
    assert float(u.min()) >= 0.0
    assert float(u.max()) < 1.0
    assert abs(float(u.mean()) - 0.5) < 0.01
    assert abs(float(u.std()) - math.sqrt(1 / 12)) < 0.01
    # roughly uniform over 10 bins: each holds ~1000
    counts = torch.histc(u.float(), bins=10, min=0.0, max=1.0)
    assert counts.min() > 850 and counts.max() < 1150
    # values are multiples of 2**-24
    assert torch.equal(u * 2**24, torch.floor(u * 2**24))


def test_hash_uniform_draws_are_independent_columns():
    u = hash_uniform(3, 1, torch.arange(5000), 2, 4)
    assert abs(float(u.mean()) - 0.5) < 0.01
    corr = torch.corrcoef(u.T)
    off_diagonal = corr - torch.eye(4, dtype=corr.dtype)
    assert float(off_diagonal.abs().max()) < 0.05


def test_hash_uniform_is_pure():
    indices = torch.tensor([4, 8, 15, 16, 23, 42])
    assert torch.equal(hash_uniform(7, 3, indices, 1, 5), hash_uniform(7, 3, indices.clone(), 1, 5))
    assert not torch.equal(hash_uniform(7, 3, indices, 1, 5), hash_uniform(8, 3, indices, 1, 5))


# ----------------------------------------------------------------------------- sample_view_params


def params(indices, h=48, w=64, config=None, seed=0, epoch=0, view=0):
    config = config or ViewConfig()
    return sample_view_params(torch.as_tensor(indices), h, w, config, seed=seed, epoch=epoch, view=view)


def test_params_shape_and_dtype():
    p = params(range(10))
    assert p.shape == (10, 5)
    assert p.dtype == torch.float64


def test_params_are_pure():
    a = params(range(16), seed=3, epoch=2, view=1)
    b = params(list(range(16)), seed=3, epoch=2, view=1)
    assert torch.equal(a, b)
    assert torch.equal(a, params(torch.arange(16, dtype=torch.int32), seed=3, epoch=2, view=1))


@pytest.mark.parametrize("change", [{"epoch": 1}, {"view": 1}, {"seed": 1}])
def test_params_change_with_epoch_view_seed(change):
    base = params(range(32))
    other = params(range(32), **change)
    assert not torch.equal(base[:, :4], other[:, :4])
    # almost every image gets a different box
    differs = (base[:, :4] != other[:, :4]).any(1).float().mean()
    assert differs > 0.9


def test_params_are_shard_invariant():
    whole = params(range(8), seed=11, epoch=4, view=1)
    shards = torch.cat([params(range(0, 4), seed=11, epoch=4, view=1), params(range(4, 8), seed=11, epoch=4, view=1)])
    assert torch.equal(whole, shards)
    # any order, any subset: each image's view depends only on its own index
    picked = params([5, 2, 7], seed=11, epoch=4, view=1)
    assert torch.equal(picked, whole[[5, 2, 7]])
    assert torch.equal(params([6], seed=11, epoch=4, view=1)[0], whole[6])


@pytest.mark.parametrize(
    "h, w, scale", [(48, 64, (0.2, 1.0)), (64, 48, (0.08, 0.5)), (28, 28, (0.3, 1.0)), (20, 60, (0.2, 1.0))]
)
def test_boxes_inside_image_and_within_scale(h, w, scale):
    config = ViewConfig(crop_scale=scale)
    p = params(range(2000), h=h, w=w, config=config, seed=1)
    x0, y0, x1, y1 = p[:, 0], p[:, 1], p[:, 2], p[:, 3]
    assert bool((x0 >= 0).all() and (x0 < x1).all() and (x1 <= w).all())
    assert bool((y0 >= 0).all() and (y0 < y1).all() and (y1 <= h).all())
    for column in (x0, y0, x1, y1):  # integer pixel coordinates
        assert torch.equal(column, column.round())
    frac = (x1 - x0) * (y1 - y0) / (h * w)
    whole = (x0 == 0) & (y0 == 0) & (x1 == w) & (y1 == h)
    # widths/heights are rounded to whole pixels: |w*h - w'*h'| <= (w'+h')/2 + 1/4 with w' <= W+1/2, h' <= H+1/2
    tol = (0.5 * (w + h + 1) + 0.25) / (h * w)
    inside = (frac >= scale[0] - tol) & (frac <= scale[1] + tol)
    assert bool((inside | whole).all())
    assert float(whole.float().mean()) < 0.5  # the fallback is the exception


def test_aspect_ratio_within_bounds():
    h = w = 200
    config = ViewConfig(crop_ratio=(0.5, 2.0))
    p = params(range(2000), h=h, w=w, config=config)
    bw, bh = p[:, 2] - p[:, 0], p[:, 3] - p[:, 1]
    whole = (bw == w) & (bh == h)
    ratio = bw / bh
    # rounding to whole pixels (boxes at least ~sqrt(0.2*0.5)*200 = 63 px) moves the ratio by < 2 %
    ok = (ratio >= 0.5 * 0.98) & (ratio <= 2.0 * 1.02)
    assert bool((ok | whole).all())
    assert float(ratio[~whole].min()) < 0.7 and float(ratio[~whole].max()) > 1.4  # the range is used


def test_fixed_scale_and_ratio_gives_exact_box_size():
    # scale 1/4 of a 20x20 image with ratio 1 -> a 10x10 box at any of 11 x 11 positions
    config = ViewConfig(crop_scale=(0.25, 0.25), crop_ratio=(1.0, 1.0))
    p = params(range(3000), h=20, w=20, config=config)
    assert bool(((p[:, 2] - p[:, 0]) == 10).all() and ((p[:, 3] - p[:, 1]) == 10).all())
    assert set(p[:, 0].long().tolist()) == set(range(11))
    assert set(p[:, 1].long().tolist()) == set(range(11))
    assert abs(float(p[:, 0].mean()) - 5.0) < 0.3


def test_full_scale_square_is_whole_image():
    config = ViewConfig(crop_scale=(1.0, 1.0), crop_ratio=(1.0, 1.0), flip=0.0)
    p = params(range(50), h=16, w=16, config=config)
    assert torch.equal(p, torch.tensor([[0.0, 0.0, 16.0, 16.0, 0.0]], dtype=torch.float64).expand(50, 5))


def test_no_fitting_proposal_falls_back_to_a_centre_crop_at_the_clamped_ratio():
    # full area with ratio 2..3 can never fit in a square image
    config = ViewConfig(crop_scale=(1.0, 1.0), crop_ratio=(2.0, 3.0), flip=0.0)
    p = params(range(20), h=32, w=32, config=config)
    # torchvision's fallback: aspect 1 < 2 = min ratio -> full width 32, height 32 / 2 = 16, centred (y0 = 8)
    assert torch.equal(p[:, :4], torch.tensor([[0.0, 8.0, 32.0, 24.0]], dtype=torch.float64).expand(20, 4))


@pytest.mark.parametrize("flip", [0.5, 0.25, 0.8])
def test_flip_frequency(flip):
    p = params(range(2000), config=ViewConfig(flip=flip), seed=2)
    assert set(p[:, 4].tolist()) <= {0.0, 1.0}
    assert abs(float(p[:, 4].mean()) - flip) < 0.05


def test_flip_never_and_always():
    assert float(params(range(500), config=ViewConfig(flip=0.0))[:, 4].sum()) == 0
    assert float(params(range(500), config=ViewConfig(flip=1.0))[:, 4].sum()) == 500


# ----------------------------------------------------------------------------- render_views


def random_images(b=2, c=3, h=16, w=16, seed=0):
    return torch.randint(0, 256, (b, c, h, w), generator=torch.Generator().manual_seed(seed), dtype=torch.uint8)


def box(x0, y0, x1, y1, flip=0.0):
    return [float(x0), float(y0), float(x1), float(y1), float(flip)]


def test_whole_image_same_size_is_exact():
    images = random_images()
    out = render_views(images, torch.tensor([box(0, 0, 16, 16)] * 2, dtype=torch.float64), 16)
    assert out.shape == (2, 3, 16, 16)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, images.float() / 255, atol=1e-6, rtol=0)


def test_whole_image_flipped_is_mirror():
    images = random_images()
    out = render_views(images, torch.tensor([box(0, 0, 16, 16, 1)] * 2, dtype=torch.float64), 16)
    torch.testing.assert_close(out, torch.flip(images.float() / 255, dims=[-1]), atol=1e-6, rtol=0)


def test_mixed_flips_in_one_batch():
    images = random_images(b=3)
    p = torch.tensor([box(0, 0, 16, 16, 1), box(0, 0, 16, 16, 0), box(0, 0, 16, 16, 1)], dtype=torch.float64)
    out = render_views(images, p, 16)
    expected = images.float() / 255
    torch.testing.assert_close(out[0], expected[0].flip(-1), atol=1e-6, rtol=0)
    torch.testing.assert_close(out[1], expected[1], atol=1e-6, rtol=0)
    torch.testing.assert_close(out[2], expected[2].flip(-1), atol=1e-6, rtol=0)


def test_quadrant_crops_at_their_own_size():
    images = random_images(b=2, h=16, w=16)
    p = torch.tensor([box(0, 0, 8, 8), box(8, 8, 16, 16)], dtype=torch.float64)
    out = render_views(images, p, 8)
    expected = images.float() / 255
    torch.testing.assert_close(out[0], expected[0, :, :8, :8], atol=1e-6, rtol=0)
    torch.testing.assert_close(out[1], expected[1, :, 8:, 8:], atol=1e-6, rtol=0)


def test_non_square_crop_of_a_non_square_image():
    images = random_images(b=1, h=12, w=20)
    out = render_views(images, torch.tensor([box(4, 2, 10, 8)], dtype=torch.float64), 6)
    torch.testing.assert_close(out[0], images[0, :, 2:8, 4:10].float() / 255, atol=1e-6, rtol=0)


def test_half_size_view_averages_2x2_blocks():
    # adaptive sampling: a 16 px box rendered at 8 px samples pixels 2i and 2i+1 of each bin
    images = random_images(b=2)
    out = render_views(images, torch.tensor([box(0, 0, 16, 16)] * 2, dtype=torch.float64), 8)
    expected = F.avg_pool2d(images.float() / 255, 2)
    torch.testing.assert_close(out, expected, atol=1e-6, rtol=0)


def test_hand_computed_downscale():
    image = torch.tensor([[[[0, 255], [255, 255]]]], dtype=torch.uint8)  # one 2x2 grayscale image
    out = render_views(image, torch.tensor([box(0, 0, 2, 2)], dtype=torch.float64), 1)
    assert out.shape == (1, 3, 1, 1)
    torch.testing.assert_close(out.flatten(), torch.full((3,), 0.75), atol=1e-6, rtol=0)


def test_double_size_view_is_bilinear():
    images = random_images(b=1, h=8, w=8)
    out = render_views(images, torch.tensor([box(0, 0, 8, 8)], dtype=torch.float64), 16)
    expected = F.interpolate(images.float() / 255, size=(16, 16), mode="bilinear", align_corners=False)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=0)


def test_grayscale_becomes_three_identical_channels():
    images = random_images(b=2, c=1)
    out = render_views(images, torch.tensor([box(0, 0, 16, 16), box(2, 3, 13, 15, 1)], dtype=torch.float64), 16)
    assert out.shape == (2, 3, 16, 16)
    assert torch.equal(out[:, 0], out[:, 1]) and torch.equal(out[:, 1], out[:, 2])
    torch.testing.assert_close(out[0, 0], images[0, 0].float() / 255, atol=1e-6, rtol=0)


def test_as_views():
    gray = torch.tensor([[[[0, 51], [255, 102]]]], dtype=torch.uint8)
    out = as_views(gray)
    assert out.shape == (1, 3, 2, 2)
    expected = torch.tensor([[0.0, 0.2], [1.0, 0.4]])
    for c in range(3):
        torch.testing.assert_close(out[0, c], expected, atol=1e-6, rtol=0)
    rgb = random_images(b=1)
    torch.testing.assert_close(as_views(rgb), rgb.float() / 255)


def test_random_views_stay_in_range():
    images = random_images(b=64, h=28, w=28, seed=3)
    images[:8] = 255
    images[8:16] = 0
    p = params(range(64), h=28, w=28, config=ViewConfig())
    out = render_views(images, p, 20)
    assert out.shape == (64, 3, 20, 20)
    assert float(out.min()) >= 0.0 and float(out.max()) <= 1.0 + 1e-6
    torch.testing.assert_close(out[:8], torch.ones_like(out[:8]), atol=1e-6, rtol=0)
    torch.testing.assert_close(out[8:16], torch.zeros_like(out[8:16]), atol=1e-6, rtol=0)


def test_rendering_is_per_image():
    # a batch renders each image as it would alone
    images = random_images(b=4, h=28, w=28, seed=5)
    p = params(range(4), h=28, w=28, config=ViewConfig(), seed=9)
    together = render_views(images, p, 20)
    for i in range(4):
        torch.testing.assert_close(together[i : i + 1], render_views(images[i : i + 1], p[i : i + 1], 20))


# ----------------------------------------------------------------------------- BatchViews


def test_batch_views_render_each_size_once_from_the_same_crops():
    from distillkit.data.views import BatchViews

    images = torch.randint(0, 256, (3, 1, 28, 28), dtype=torch.uint8)
    p = params(range(3), h=28, w=28, config=ViewConfig(), seed=4)
    expanded = []
    views = BatchViews(images, [p], lambda vs: expanded.append(len(vs)) or vs + [v.flip(-2) for v in vs])
    small, large = views.at((16, 16)), views.at((32, 32))
    assert views.at((16, 16)) is small and expanded == [1, 1]  # rendered and expanded once per size
    assert [v.shape for v in small] == [(3, 3, 16, 16)] * 2 and large[0].shape == (3, 3, 32, 32)
    torch.testing.assert_close(small[0], render_views(images, p, 16))
    torch.testing.assert_close(small[1], render_views(images, p, 16).flip(-2))
    # the same region at both sizes: the large view averaged 2x2 is close to the small one
    pooled = torch.nn.functional.avg_pool2d(large[0], 2)
    assert (pooled - small[0]).abs().mean() < 0.03


def test_render_views_takes_a_height_and_width():
    images = torch.randint(0, 256, (2, 3, 20, 20), dtype=torch.uint8)
    out = render_views(images, params(range(2), h=20, w=20, config=ViewConfig()), (12, 8))
    assert out.shape == (2, 3, 12, 8)
