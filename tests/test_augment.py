"""Photometric augmentation: batched pixels equal torchvision's per-image ops, parameters are pure and
shard-invariant, frequencies follow the probabilities, the default costs nothing, the blur scales with the
view, bad settings name their key, and BatchViews augments every size alike."""

from __future__ import annotations

import math
import re

import pytest
import torch
import torch.nn.functional as F
from torchvision.transforms.v2 import functional as TF

from distillkit.data.augment import AUGMENT_STREAM, NUM_PARAMS, apply_augment, blur_sigma_pixels, sample_augment_params
from distillkit.data.hashing import hash_uniform
from distillkit.data.views import BatchViews, ViewConfig, render_views, sample_view_params
from distillkit.errors import UsageError
from distillkit.recipe import AugmentConfig, check_value

# the column layout, written out independently of the module's constants
JITTER, FACTORS, ORDER, GRAY, BLUR, SIGMA, SOLARIZE = 0, slice(1, 5), slice(5, 9), 9, 10, 11, 12

EVERYTHING = AugmentConfig(
    jitter=0.8, brightness=0.4, contrast=0.4, saturation=0.4, hue=0.1, grayscale=0.2, blur=0.5, solarize=0.2
)


def draw(indices, config=EVERYTHING, seed=0, epoch=0, view=0):
    return sample_augment_params(torch.as_tensor(indices), config, seed=seed, epoch=epoch, view=view)


def some_views(b=24, h=20, w=24, seed=0):
    """Random views with exact grays, blacks, whites and pure colours (hue and clamping edge cases)."""
    x = torch.rand(b, 3, h, w, generator=torch.Generator().manual_seed(seed))
    x[:, :, :3] = x[:, :1, :3]  # gray rows: r = g = b
    x[:, :, 3, :4] = 0.0
    x[:, :, 4, :4] = 1.0
    x[:, :, 5, :3] = torch.eye(3).T.unsqueeze(0)  # pure red, green, blue pixels
    return x


# ----------------------------------------------------------------------------- pixels vs torchvision


def reference(view: torch.Tensor, row: list[float], config: AugmentConfig) -> torch.Tensor:
    """One image through torchvision.transforms.v2.functional, following its parameter row."""
    x = view
    if config.jitter > 0 and row[JITTER]:
        ops = [
            (TF.adjust_brightness, config.brightness),
            (TF.adjust_contrast, config.contrast),
            (TF.adjust_saturation, config.saturation),
            (TF.adjust_hue, config.hue),
        ]
        for op_index in row[ORDER]:
            op, strength = ops[int(op_index)]
            if strength > 0:
                x = op(x, row[1 + int(op_index)])
    if config.grayscale > 0 and row[GRAY]:
        x = TF.rgb_to_grayscale(x, num_output_channels=3)
    if config.blur > 0 and row[BLUR]:
        h, w = x.shape[-2:]
        sx, sy = row[SIGMA] * w / 224, row[SIGMA] * h / 224
        kx = min(2 * math.ceil(3 * sx) + 1, w if w % 2 else w - 1)
        ky = min(2 * math.ceil(3 * sy) + 1, h if h % 2 else h - 1)
        x = TF.gaussian_blur(x, kernel_size=[kx, ky], sigma=[sx, sy])
    if config.solarize > 0 and row[SOLARIZE]:
        x = TF.solarize(x, threshold=0.5)
    return x


@pytest.mark.parametrize(
    "config",
    [
        AugmentConfig(jitter=1.0, brightness=0.8),
        AugmentConfig(jitter=1.0, contrast=0.8),
        AugmentConfig(jitter=1.0, saturation=1.5),  # factors down to 0 (fully gray)
        AugmentConfig(jitter=1.0, hue=0.5),
        AugmentConfig(grayscale=1.0),
        AugmentConfig(blur=1.0, blur_sigma=(5.0, 30.0)),  # 0.5-3.2 px at 24 px: 5- to 21-tap kernels
        AugmentConfig(blur=1.0, blur_sigma=(50.0, 200.0)),  # kernels capped to the view side
        AugmentConfig(solarize=1.0),
        AugmentConfig(jitter=1.0, brightness=0.8, contrast=0.8, saturation=0.8, hue=0.2),  # the order matters
        EVERYTHING,
    ],
    ids=[
        "brightness",
        "contrast",
        "saturation",
        "hue",
        "grayscale",
        "blur",
        "blur-capped",
        "solarize",
        "jitter",
        "everything",
    ],
)
def test_batched_matches_torchvision_one_image_at_a_time(config):
    views = some_views()
    params = draw(range(100, 124), config, seed=3)
    out = apply_augment(views, params, config)
    assert out.shape == views.shape and out.dtype == views.dtype
    for i in range(views.shape[0]):
        expected = reference(views[i], params[i].tolist(), config)
        torch.testing.assert_close(out[i], expected, atol=1e-5, rtol=0, msg=f"image {i}")


def test_every_op_and_order_is_exercised():
    params = draw(range(100, 124), seed=3)
    assert 0 < params[:, JITTER].sum() < 24 and 0 < params[:, BLUR].sum() < 24
    assert 0 < params[:, GRAY].sum() and 0 < params[:, SOLARIZE].sum()
    assert len({tuple(r) for r in params[:, ORDER].tolist()}) > 5


def test_apply_keeps_its_input():
    views = some_views()
    before = views.clone()
    apply_augment(views, draw(range(24)), EVERYTHING)
    assert torch.equal(views, before)


def test_the_default_config_returns_the_input_itself():
    views = some_views()
    for config in (AugmentConfig(), None, AugmentConfig(jitter=0.8)):  # jitter with no strength does nothing
        assert apply_augment(views, draw(range(24), config or AugmentConfig()), config) is views
    assert ViewConfig().augment is None


def test_zero_probabilities_change_no_pixel():
    views = some_views()
    config = AugmentConfig(brightness=0.9, contrast=0.9, grayscale=0.0, blur_sigma=(1.0, 3.0), solarize=1.0)
    out = apply_augment(views, draw(range(24), config), config)
    torch.testing.assert_close(out, torch.where(views >= 0.5, 1 - views, views), atol=0, rtol=0)


# ----------------------------------------------------------------------------- parameters


def test_params_shape_dtype_and_ranges():
    config = AugmentConfig(jitter=0.5, brightness=1.5, contrast=0.3, saturation=0.0, hue=0.2, blur_sigma=(0.5, 1.5))
    p = draw(range(4000), config)
    assert p.shape == (4000, NUM_PARAMS) == (4000, 13) and p.dtype == torch.float64
    brightness, contrast, saturation, hue = p[:, FACTORS].T
    assert float(brightness.min()) >= 0.0 and float(brightness.max()) <= 2.5 and float(brightness.min()) < 0.01
    assert float(contrast.min()) >= 0.7 and float(contrast.max()) <= 1.3 and abs(float(contrast.mean()) - 1) < 0.02
    assert torch.equal(saturation, torch.ones_like(saturation))
    assert float(hue.min()) >= -0.2 and float(hue.max()) <= 0.2 and float(hue.min()) < -0.19
    sigma = p[:, SIGMA]
    assert float(sigma.min()) >= 0.5 and float(sigma.max()) <= 1.5 and abs(float(sigma.mean()) - 1.0) < 0.02


def test_jitter_order_is_a_uniform_random_permutation():
    orders = draw(range(4800))[:, ORDER].long()
    assert torch.equal(orders.sort(dim=1).values, torch.arange(4).expand(4800, 4))
    counts = torch.unique(orders, dim=0, return_counts=True)[1]
    assert len(counts) == 24  # 4! orders, each about 200 times
    assert int(counts.min()) > 200 - 3 * 14 and int(counts.max()) < 200 + 3 * 14


@pytest.mark.parametrize(
    "column, name, p",
    [(GRAY, "grayscale", 0.3), (JITTER, "jitter", 0.8), (BLUR, "blur", 0.5), (SOLARIZE, "solarize", 0.2)],
)
def test_frequencies_match_the_probabilities(column, name, p):
    n = 4000
    flags = draw(range(n), AugmentConfig(**{name: p}), seed=5)[:, column]
    assert set(flags.tolist()) <= {0.0, 1.0}
    assert abs(float(flags.mean()) - p) < 3 * math.sqrt(p * (1 - p) / n)


def test_probabilities_zero_and_one_are_exact():
    never = draw(range(1000), AugmentConfig())
    always = draw(range(1000), AugmentConfig(jitter=1.0, grayscale=1.0, blur=1.0, solarize=1.0))
    for column in (JITTER, GRAY, BLUR, SOLARIZE):
        assert float(never[:, column].sum()) == 0 and float(always[:, column].sum()) == 1000


def test_params_are_a_pure_function():
    a = draw(range(16), seed=3, epoch=2, view=1)
    assert torch.equal(a, draw(list(range(16)), seed=3, epoch=2, view=1))
    assert torch.equal(a, draw(torch.arange(16, dtype=torch.int32), seed=3, epoch=2, view=1))
    assert torch.equal(a, sample_augment_params(torch.arange(16), EVERYTHING, seed=3, epoch=2, view=1))


@pytest.mark.parametrize("change", [{"epoch": 3}, {"view": 0}, {"seed": 4}])
def test_params_change_with_epoch_view_seed(change):
    base = draw(range(64), seed=3, epoch=2, view=1)
    other = draw(range(64), **{"seed": 3, "epoch": 2, "view": 1, **change})
    assert float((base[:, SIGMA] != other[:, SIGMA]).double().mean()) > 0.95


def test_params_differ_between_images():
    p = draw(range(64))
    assert len(set(p[:, SIGMA].tolist())) == 64


def test_params_do_not_depend_on_the_batch():
    batch = draw(range(50), seed=9, epoch=1, view=1)
    assert torch.equal(draw([7], seed=9, epoch=1, view=1)[0], batch[7])
    assert torch.equal(draw([31, 7, 2], seed=9, epoch=1, view=1), batch[[31, 7, 2]])
    shards = torch.cat([draw(range(0, 25), seed=9, epoch=1, view=1), draw(range(25, 50), seed=9, epoch=1, view=1)])
    assert torch.equal(shards, batch)


def test_params_are_independent_of_the_crop_draws():
    n = 4000
    indices = torch.arange(n)
    crops = sample_view_params(indices, 32, 32, ViewConfig(flip=0.5), seed=1, epoch=0, view=0)
    augment = draw(indices, AugmentConfig(grayscale=0.5), seed=1, epoch=0, view=0)
    # the two streams are different draws ...
    assert not torch.equal(hash_uniform(1, 0, indices, 0, 13), hash_uniform(1, 0, indices, AUGMENT_STREAM, 13))
    # ... and uncorrelated: grayscale agrees with the flip about half the time, sigma ignores the crop position
    agree = float((crops[:, 4] == augment[:, GRAY]).double().mean())
    assert abs(agree - 0.5) < 3 * math.sqrt(0.25 / n)
    assert abs(float(torch.corrcoef(torch.stack([crops[:, 0], augment[:, SIGMA]]))[0, 1])) < 3 / math.sqrt(n)
    # asking for augmentation leaves the crops as they were
    assert torch.equal(
        crops, sample_view_params(indices, 32, 32, ViewConfig(flip=0.5, augment=EVERYTHING), seed=1, epoch=0, view=0)
    )


# ----------------------------------------------------------------------------- blur scales with the view


def test_blur_sigma_scales_with_the_view_size():
    sigma = torch.tensor([0.5, 2.0], dtype=torch.float64)
    torch.testing.assert_close(blur_sigma_pixels(sigma, 224), sigma)
    torch.testing.assert_close(blur_sigma_pixels(sigma, 64), 2 * blur_sigma_pixels(sigma, 32))


def test_a_64_and_a_32_px_view_of_one_crop_are_blurred_alike():
    # a smooth image with structure at a few scales, rendered from the same crop at 64 and 32 px
    base = torch.rand(2, 3, 12, 12, generator=torch.Generator().manual_seed(1))
    images = (F.interpolate(base, size=(96, 96), mode="bicubic", align_corners=False).clamp(0, 1) * 255).byte()
    crops = torch.tensor([[8.0, 8.0, 88.0, 88.0, 0.0]] * 2, dtype=torch.float64)
    config = AugmentConfig(blur=1.0, blur_sigma=(25.0, 25.0))  # 7.1 px at 64, 3.6 px at 32
    params = draw(range(2), config)
    large = apply_augment(render_views(images, crops, 64), params, config)
    small = apply_augment(render_views(images, crops, 32), params, config)
    unscaled = TF.gaussian_blur(render_views(images, crops, 32), kernel_size=[31, 31], sigma=[7.1, 7.1])
    matched = (F.avg_pool2d(large, 2) - small).abs().mean()
    assert matched < 0.01
    assert matched < 0.25 * (F.avg_pool2d(large, 2) - unscaled).abs().mean()  # same sigma in pixels: far off
    assert matched < 0.25 * (F.avg_pool2d(render_views(images, crops, 64), 2) - small).abs().mean()  # blur is visible


# ----------------------------------------------------------------------------- config


@pytest.mark.parametrize(
    "key, value, allowed",
    [
        ("jitter", 1.5, "[0, 1]"),
        ("grayscale", -0.1, "[0, 1]"),
        ("blur", 2.0, "[0, 1]"),
        ("solarize", float("nan"), "[0, 1]"),
        ("brightness", -0.1, ">= 0"),
        ("contrast", -1.0, ">= 0"),
        ("saturation", float("inf"), ">= 0"),
        ("hue", 0.6, "[0, 0.5]"),
        ("hue", -0.1, "[0, 0.5]"),
        ("blur_sigma", (0.0, 1.0), "0 < low <= high"),
        ("blur_sigma", (2.0, 1.0), "0 < low <= high"),
    ],
)
def test_bad_values_name_their_key_and_range(key, value, allowed):
    with pytest.raises(UsageError, match=rf"data\.augment\.{key} .*{re.escape(allowed)}"):
        AugmentConfig(**{key: value})


def test_the_recipe_builder_reads_a_yaml_section():
    built = check_value(AugmentConfig, {"jitter": 0.8, "hue": 0.1, "blur_sigma": [0.5, 1]}, "data.augment")
    assert built == AugmentConfig(jitter=0.8, hue=0.1, blur_sigma=(0.5, 1.0))
    with pytest.raises(UsageError, match=r"data\.augment\.grayscale"):
        check_value(AugmentConfig, {"grayscale": 3}, "data.augment")
    with pytest.raises(UsageError, match=r"unknown key 'data\.augment\.jiter'"):
        check_value(AugmentConfig, {"jiter": 0.8}, "data.augment")


def test_config_is_frozen_and_hashable():
    assert hash(ViewConfig(augment=EVERYTHING)) == hash(ViewConfig(augment=EVERYTHING))
    with pytest.raises(AttributeError):
        EVERYTHING.jitter = 0.1


# ----------------------------------------------------------------------------- BatchViews


def batch_views(images, crops, augment, config=EVERYTHING):
    return BatchViews(images, crops, lambda vs: vs + [v.flip(-2) for v in vs], augment=augment, augment_config=config)


def test_batch_views_augment_every_size_with_the_same_parameters():
    images = torch.randint(0, 256, (8, 3, 40, 40), dtype=torch.uint8, generator=torch.Generator().manual_seed(2))
    crops = [sample_view_params(torch.arange(8), 40, 40, ViewConfig(), seed=1, epoch=0, view=v) for v in range(2)]
    augment = [draw(range(8), view=v) for v in range(2)]
    views = batch_views(images, crops, augment)
    for size in ((16, 16), (32, 32)):
        got = views.at(size)
        assert len(got) == 4 and views.at(size) is got
        for v in range(2):
            expected = apply_augment(render_views(images, crops[v], size), augment[v], EVERYTHING)
            assert torch.equal(got[v], expected)
            assert torch.equal(got[2 + v], expected.flip(-2))  # expand comes after the augmentation
    # the same inputs give the same pixels
    again = batch_views(images, crops, [a.clone() for a in augment])
    assert all(torch.equal(a, b) for a, b in zip(again.at((16, 16)), views.at((16, 16))))
    # the two sizes show the same augmentation: a grayscale view is gray at both, and they agree once pooled
    gray = augment[0][:, GRAY].bool()
    for size in ((16, 16), (32, 32)):
        view = views.at(size)[0][gray]
        assert torch.equal(view[:, 0], view[:, 1])
    pooled = F.avg_pool2d(views.at((32, 32))[0], 2)
    assert (pooled - views.at((16, 16))[0]).abs().mean() < 0.03


def test_batch_views_without_augmentation_are_unchanged():
    images = torch.randint(0, 256, (3, 1, 28, 28), dtype=torch.uint8)
    crops = [sample_view_params(torch.arange(3), 28, 28, ViewConfig(), seed=4, epoch=0, view=0)]
    plain = BatchViews(images, crops, lambda vs: vs).at((16, 16))
    default = batch_views(images, crops, [draw(range(3), AugmentConfig())], AugmentConfig()).at((16, 16))
    assert torch.equal(plain[0], render_views(images, crops[0], 16)) and torch.equal(default[0], plain[0])
    with pytest.raises(ValueError, match="augment_config"):
        BatchViews(images, crops, lambda vs: vs, augment=[draw(range(3))])
    with pytest.raises(ValueError, match="2 augmentation parameter sets for 1 views"):
        batch_views(images, crops, [draw(range(3))] * 2)
