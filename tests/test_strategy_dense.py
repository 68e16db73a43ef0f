"""Strategy dense (multi-scale dense targets): the loss of `MultiScaleDense` against a float64 computation written
from its formula (every target_norm, mse, stage weights), `resample_to` against torch's reference ops and a case
worked by hand, the stages chosen by default (strides 8, 16, 32 on timm CNNs), training through a real objective
with a ViT teacher + CNN student and a CNN teacher + ViT student, the role it reads, a checkpoint round trip, and
the checks that reject a recipe."""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest
import timm
import torch
import torch.nn.functional as F
from helpers import objectives
from helpers.objectives import IMAGENET, image_folder, images, same_rows, tiny_cnn, tiny_vit

import distillkit
from distillkit.errors import UsageError
from distillkit.recipe import resolve_recipe
from distillkit.strategies import Objective, StepInputs
from distillkit.strategies.dense import MultiScaleDense, resample_to
from distillkit.teachers import InputConfig, Teacher
from distillkit.teachers.zoo import RANDOM_WEIGHTS

pytestmark = pytest.mark.usefixtures("one_cpu_thread")


@pytest.fixture(scope="module")
def teachers():
    """A ViT at 16 px (4 x 4 patches of 4 px, width 48) and a CNN at 64 px (last map 2 x 2 of 64 channels)."""
    return {
        "vit": Teacher("vit16", tiny_vit(16, 4), InputConfig((16, 16), *IMAGENET), "random"),
        "cnn": Teacher("cnn64", tiny_cnn(1), InputConfig((64, 64), *IMAGENET), "random"),
    }


def build(settings: dict, teachers: dict, student: torch.nn.Module, size: int) -> Objective:
    return objectives.build("dense", settings, teachers, student, size)


def step_of(objective, teachers, student, x, size: int) -> StepInputs:
    return objectives.step_of(objective, teachers, student, x, size)


# ----------------------------------------------------------------------------- references (float64, numpy)


def np64(t: torch.Tensor) -> np.ndarray:
    return t.detach().double().numpy()


def ref_tokens(maps: np.ndarray) -> np.ndarray:
    """(B, C, H, W) -> (B, H * W, C), row-major cells."""
    b, c, h, w = maps.shape
    return maps.transpose(0, 2, 3, 1).reshape(b, h * w, c)


def ref_project(conv: torch.nn.Conv2d, maps: np.ndarray) -> np.ndarray:
    """A 1x1 conv as a matrix on every cell's channel vector: (B, C_s, h, w) -> (B, h * w, C_t)."""
    weight, bias = np64(conv.weight)[:, :, 0, 0], np64(conv.bias)
    return ref_tokens(maps) @ weight.T + bias


def ref_block_mean(maps: np.ndarray, factor: int) -> np.ndarray:
    """The mean of every factor x factor block of cells."""
    b, c, h, w = maps.shape
    return maps.reshape(b, c, h // factor, factor, w // factor, factor).mean(axis=(3, 5))


def ref_stage(prediction: np.ndarray, target: np.ndarray, cosine: float, smooth_l1: float, beta: float) -> float:
    """mean over tokens of cosine (1 - cos) + smooth_l1 mean_c SmoothL1_beta, written out."""
    total, tokens = 0.0, 0
    for p_image, y_image in zip(prediction, target):
        for p, y in zip(p_image, y_image):
            cos = (p @ y) / (np.linalg.norm(p) * np.linalg.norm(y))
            d = np.abs(p - y)
            huber = np.where(d < beta, 0.5 * d * d / beta, d - 0.5 * beta).mean()
            total += cosine * (1 - cos) + smooth_l1 * huber
            tokens += 1
    return total / tokens


def ref_standardize(target: np.ndarray) -> np.ndarray:
    """(B, C, H, W): every channel minus its mean over all cells of all images, over sqrt(variance + 1e-6)."""
    mean = target.mean(axis=(0, 2, 3), keepdims=True)
    var = ((target - mean) ** 2).mean(axis=(0, 2, 3), keepdims=True)
    return (target - mean) / np.sqrt(var + 1e-6)


def ref_layer_norm(tokens: np.ndarray) -> np.ndarray:
    """(..., C): every token minus its channel mean, over sqrt(its channel variance + 1e-5)."""
    mean = tokens.mean(axis=-1, keepdims=True)
    var = ((tokens - mean) ** 2).mean(axis=-1, keepdims=True)
    return (tokens - mean) / np.sqrt(var + 1e-5)


# ----------------------------------------------------------------------------- the loss by hand


def ref_hand_stages(dense, student, y: np.ndarray, cosine=0.9, smooth_l1=0.1, beta=1.0) -> dict[int, float]:
    """L_2 and L_4 of the hand case for the (already normalised) 4 x 4 target `y`."""
    project = {layer: ref_project(dense.projections[str(layer)], np64(student[layer])) for layer in (2, 4)}
    return {
        2: ref_stage(project[2], ref_tokens(y), cosine, smooth_l1, beta),
        4: ref_stage(project[4], ref_tokens(ref_block_mean(y, 2)), cosine, smooth_l1, beta),
    }


@pytest.fixture
def hand_case():
    """Two stages, layer 2 on a 4 x 4 grid (3 channels) and layer 4 on 2 x 2 (5 channels); a 4-channel teacher
    map on 4 x 4: stage 2 reads it as it is, stage 4 as the mean of each 2 x 2 block."""
    g = torch.Generator().manual_seed(0)
    student = {2: torch.randn(2, 3, 4, 4, generator=g), 4: torch.randn(2, 5, 2, 2, generator=g)}
    target = torch.randn(2, 4, 4, 4, generator=g) * 3 + 1
    return student, target


def test_the_loss_is_its_formula(hand_case):
    student, target = hand_case
    dense = MultiScaleDense({2: 3, 4: 5}, 4, cosine=0.7, smooth_l1=0.3, beta=0.5, target_norm="none")
    losses = dense.stage_losses(student, target)
    expected = ref_hand_stages(dense, student, np64(target), cosine=0.7, smooth_l1=0.3, beta=0.5)
    assert {k: v.item() for k, v in losses.items()} == pytest.approx(expected, rel=1e-5)
    assert dense(student, target).item() == pytest.approx((expected[2] + expected[4]) / 2, rel=1e-5)


def test_stage_weights_weigh_the_average(hand_case):
    student, target = hand_case
    dense = MultiScaleDense({2: 3, 4: 5}, 4, stage_weights={2: 3.0, 4: 1.0}, target_norm="none")
    assert dense.stage_weights == {2: 0.75, 4: 0.25}
    expected = ref_hand_stages(dense, student, np64(target))
    assert dense(student, target).item() == pytest.approx(0.75 * expected[2] + 0.25 * expected[4], rel=1e-5)


def test_mse_is_the_element_mean_of_squares(hand_case):
    student, target = hand_case
    dense = MultiScaleDense({2: 3, 4: 5}, 4, loss="mse", target_norm="none")
    losses = dense.stage_losses(student, target)
    goal = ref_tokens(ref_block_mean(np64(target), 2))
    expected = ((ref_project(dense.projections["4"], np64(student[4])) - goal) ** 2).mean()
    assert losses[4].item() == pytest.approx(expected, rel=1e-5)


def test_standardize_uses_the_moments_of_every_teacher_token(hand_case):
    """After one update the moments are exactly the batch's (bias-corrected); before it the target is raw."""
    student, target = hand_case
    dense = MultiScaleDense({2: 3, 4: 5}, 4, target_norm="standardize")
    raw = dense.stage_losses(student, target)
    assert {k: v.item() for k, v in raw.items()} == pytest.approx(
        ref_hand_stages(dense, student, np64(target)), rel=1e-5
    )
    dense.update(target)
    losses = dense.stage_losses(student, target)
    expected = ref_hand_stages(dense, student, ref_standardize(np64(target)))
    assert {k: v.item() for k, v in losses.items()} == pytest.approx(expected, rel=1e-5)


def test_layer_norm_normalises_every_token_after_resampling(hand_case):
    student, target = hand_case
    dense = MultiScaleDense({2: 3, 4: 5}, 4, loss="mse", target_norm="layer_norm")
    assert dense.moments is None  # no state
    losses = dense.stage_losses(student, target)
    goal = ref_layer_norm(ref_tokens(ref_block_mean(np64(target), 2)))  # pooled first, then normalised
    expected = ((ref_project(dense.projections["4"], np64(student[4])) - goal) ** 2).mean()
    assert losses[4].item() == pytest.approx(expected, rel=1e-5)


# ----------------------------------------------------------------------------- resampling


def test_resampling_pools_to_shrink_and_interpolates_to_grow():
    maps = torch.rand(2, 3, 6, 6, generator=torch.Generator().manual_seed(0))
    pooled = resample_to(maps, (2, 2))  # every cell of each 3 x 3 block counts
    torch.testing.assert_close(pooled, torch.from_numpy(ref_block_mean(np64(maps), 3)).float())
    torch.testing.assert_close(resample_to(maps, (4, 3)), F.adaptive_avg_pool2d(maps, (4, 3)))  # uneven cells
    small = maps[..., :2, :3]
    torch.testing.assert_close(
        resample_to(small, (5, 7)), F.interpolate(small, size=(5, 7), mode="bilinear", align_corners=False)
    )
    assert resample_to(maps, (6, 6)) is maps


def test_resampling_that_grows_one_direction_and_shrinks_the_other():
    """2 x 4 -> 4 x 2 by hand: column pairs averaged; rows r0, r1 interpolated at source positions
    (i + 0.5) / 2 - 0.5 = -0.25, 0.25, 0.75, 1.25, clamped to the edge: r0, 3/4 r0 + 1/4 r1, 1/4 r0 + 3/4 r1, r1."""
    maps = torch.tensor([[[[1.0, 3.0, 5.0, 7.0], [11.0, 13.0, 17.0, 19.0]]]])
    r0, r1 = np.array([2.0, 6.0]), np.array([12.0, 18.0])
    expected = np.stack([r0, 0.75 * r0 + 0.25 * r1, 0.25 * r0 + 0.75 * r1, r1])
    got = resample_to(maps, (4, 2))
    assert got.shape == (1, 1, 4, 2)
    np.testing.assert_allclose(got[0, 0].numpy(), expected, rtol=1e-6)


# ----------------------------------------------------------------------------- the stages and the roles


@pytest.mark.parametrize("arch, channels", [("mobilenetv3_small_050", [16, 24, 288]), ("resnet18", [128, 256, 512])])
def test_the_default_stages_of_timm_cnns_are_the_stride_8_16_32_ones(teachers, arch, channels):
    student = timm.create_model(arch, pretrained=False, num_classes=0)
    objective = build({"teacher": "vit"}, {"vit": teachers["vit"]}, student, 64)
    dense = objective.strategies["dense"].dense
    layers = list(dense.stage_weights)
    assert [student.feature_info[i]["reduction"] for i in layers] == [8, 16, 32]
    assert [dense.projections[str(i)].in_channels for i in layers] == channels
    assert all(dense.projections[str(i)].out_channels == 48 for i in layers)  # the ViT teacher's width
    assert objective.strategies["dense"].term_weights() == pytest.approx({f"layer{i}": 1 / 3 for i in layers})


@pytest.mark.parametrize("depth, layers", [(12, [5, 8, 11]), (4, [1, 2, 3]), (2, [0, 1])])
def test_a_vit_student_is_supervised_at_relative_depths(teachers, depth, layers):
    """Blocks at depths 0.5, 0.75, 1.0; on 2 blocks 0.75 and 1.0 are the same block, supervised once."""
    student = tiny_vit(32, 8, width=32, depth=depth, seed=4)
    objective = build({"teacher": "cnn"}, {"cnn": teachers["cnn"]}, student, 32)
    assert list(objective.strategies["dense"].dense.stage_weights) == layers


def test_the_configured_role_is_the_one_read(teachers):
    """Primary teacher the CNN, dense reads the ViT's role: its tokens (48 channels) are the target."""
    pair = {"teacher": teachers["cnn"], "vit": teachers["vit"]}
    student = tiny_cnn(5)
    objective = build({"teacher": "vit"}, pair, student, 64)
    assert set(objective.teacher_requests(pair, student)) == {"vit"}
    assert {p.out_channels for p in objective.strategies["dense"].dense.projections.values()} == {48}
    step = step_of(objective, pair, student, images(4, size=64), 64)
    _, terms = objective(step)
    assert set(terms) == {"dense.layer2", "dense.layer3", "dense.layer4"}


def test_a_vit_teacher_of_a_non_square_grid_is_reshaped_to_its_patch_grid():
    """16 x 32 px in patches of 4: a 4 x 8 grid of tokens. The CNN student's 8 x 8 stage reads it with its rows
    interpolated; its 2 x 2 stage with every 2 x 4 block averaged."""
    torch.manual_seed(0)
    model = timm.create_model(
        "vit_tiny_patch16_224",
        pretrained=False,
        num_classes=0,
        img_size=(16, 32),
        patch_size=4,
        depth=2,
        embed_dim=48,
        num_heads=2,
    ).eval()
    one = {"teacher": Teacher("vit16x32", model, InputConfig((16, 32), *IMAGENET), "random")}
    student = tiny_cnn(2)
    objective = build({"target_norm": "none", "loss": "mse"}, one, student, 64)
    step = step_of(objective, one, student, images(2, size=64), 64)
    _, terms = objective(step)
    tokens = np64(step.teacher.layers[1])  # (2, 32, 48), row-major over the 4 x 8 grid
    grid = tokens.reshape(2, 4, 8, 48).transpose(0, 3, 1, 2)
    goal = ref_tokens(grid.reshape(2, 48, 2, 2, 2, 4).mean(axis=(3, 5)))
    dense = objective.strategies["dense"].dense
    prediction = ref_project(dense.projections["4"], np64(step.student.layers[4]))
    assert terms["dense.layer4"].item() == pytest.approx(((prediction - goal) ** 2).mean(), rel=1e-5)


# ----------------------------------------------------------------------------- training


@pytest.mark.parametrize("pairing", ["vit teacher, cnn student", "cnn teacher, vit student"])
def test_a_few_steps_reduce_the_loss(teachers, pairing):
    """ViT teacher (4 x 4) to a CNN at 64 px (stages 8 x 8: interpolated, 4 x 4, 2 x 2: pooled); CNN teacher
    (2 x 2) to a 4-block ViT at 32 px (4 x 4 tokens: interpolated)."""
    role, size = ("vit", 64) if pairing.startswith("vit") else ("cnn", 32)
    student = (tiny_cnn(7) if role == "vit" else tiny_vit(32, 8, width=64, depth=4, seed=7)).train()
    one = {"teacher": teachers[role]}
    objective = build({}, one, student, size)
    x = images(8, size=size)
    optimizer = torch.optim.Adam(list(student.parameters()) + list(objective.parameters()), lr=2e-3)
    before = [p.clone() for p in teachers[role].parameters()]
    losses = []
    for number in range(20):
        step = step_of(objective, one, student, x, size)
        loss, terms = objective(step)
        optimizer.zero_grad()
        loss.backward()
        if number == 0:
            assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in objective.parameters())
            assert len(terms) == 3
        optimizer.step()
        objective.after_step(step, same_rows)
        losses.append(loss.item())
    assert losses[-1] < 0.7 * losses[1]  # from step 2 on the targets are standardised (fixed batch: fixed moments)
    assert all(torch.equal(b, a) for b, a in zip(before, teachers[role].parameters()))


def test_the_moments_are_checkpointed(teachers):
    one = {"teacher": teachers["vit"]}
    student = tiny_cnn(4)
    trained = build({}, one, student, 64)
    step = step_of(trained, one, student, images(4, size=64), 64)
    trained.after_step(step, same_rows)
    state = trained.state_dict()
    assert "strategies.dense.dense.moments.first" in state
    fresh = build({}, one, student, 64)
    fresh.load_state_dict(state)
    _, expected = trained(step)
    _, got = fresh(step)
    assert {k: v.item() for k, v in got.items()} == pytest.approx({k: v.item() for k, v in expected.items()})


def test_compress_trains_a_cnn_student_on_a_vit_teacher(tmp_path):
    folder = image_folder(tmp_path / "images")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = distillkit.compress(
            teacher="timm:vit_tiny_patch16_224",
            teacher_weights=RANDOM_WEIGHTS,
            student="mobilenetv3-small",
            strategy="dense+feature",
            data=str(folder),
            batch_size=8,
            max_steps=2,
            out=tmp_path / "run",
            quiet=True,
            set=["teacher.input_size=32", "student.input_size=64", "data.teacher_cache=null", "eval.enabled=false"],
        )
    assert result.steps == 2
    lines = [json.loads(line) for line in (result.run_dir / "metrics.jsonl").read_text().splitlines()]
    logged = [line for line in lines if "loss" in line]
    assert logged and all(np.isfinite(line[f"dense.layer{i}"]) for line in logged for i in (2, 3, 4))


# ----------------------------------------------------------------------------- bad settings


def test_bad_settings_are_rejected_with_the_key(teachers):
    with pytest.raises(UsageError, match=r"student_layers must name at least one student layer"):
        resolve_recipe({"strategy": {"dense": {"student_layers": []}}})
    with pytest.raises(UsageError, match=r"stage_weights has 2 entries for 3 student_layers"):
        resolve_recipe({"strategy": {"dense": {"stage_weights": [1, 2]}}})
    with pytest.raises(UsageError, match=r"stage_weights must all be positive"):
        resolve_recipe({"strategy": {"dense": {"stage_weights": [1, 0, 1]}}})
    with pytest.raises(UsageError, match=r"cosine and smooth_l1 are both 0"):
        resolve_recipe({"strategy": {"dense": {"cosine": 0, "smooth_l1": 0}}})
    with pytest.raises(UsageError, match=r"strategy\.dense\.target_norm = 'whiten' is not allowed"):
        resolve_recipe({"strategy": {"dense": {"target_norm": "whiten"}}})
    one = {"teacher": teachers["vit"]}
    with pytest.raises(UsageError, match=r"layer index 7 is out of range for a model with 5 layers.*student_layers"):
        build({"student_layers": [-1, 7]}, one, tiny_cnn(), 64)
    with pytest.raises(UsageError, match=r"teacher 'teacher' \(vit16\).*out of range.*strategy\.dense\.teacher_layer"):
        build({"teacher_layer": 9}, one, tiny_cnn(), 64)
    with pytest.raises(UsageError, match=r"name the student's layer 1 twice.*stage_weights"):
        build({"stage_weights": [1, 2, 3]}, one, tiny_vit(32, 8, depth=2), 32)
    with pytest.raises(UsageError, match=r"no teachers\.mim section"):
        build({"teacher": "mim"}, one, tiny_cnn(), 64)
