"""Agglomerate (many teachers, one student) and its target standardisers: Hadamard matrices, zscore and PHI-S
against their defining properties and a case worked by hand, the loss against a float64 computation written
from the formula, the teachers' shares, UNIC's teacher dropping (its frequency, the kept teacher, the same
draws for one process and two), training through a real objective, a checkpoint round trip, the checks that
reject a recipe, and a `distillkit.compress` run with two teacher roles."""

from __future__ import annotations

import json
import math
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from helpers import objectives
from helpers.objectives import IMAGENET, image_folder, images, same_rows, tiny_cnn, tiny_vit
from torch import nn

import distillkit
from distillkit.errors import UsageError
from distillkit.features import FeatureRequest
from distillkit.recipe import resolve_recipe
from distillkit.strategies import Objective, StepInputs
from distillkit.strategies.agglomerate import drop_draws, keep_mask, resample
from distillkit.strategies.standardize import PhiS, ZScore, align_basis, hadamard, hadamard_order, refreshes
from distillkit.teachers import InputConfig, Teacher
from distillkit.teachers.zoo import RANDOM_WEIGHTS

pytestmark = pytest.mark.usefixtures("one_cpu_thread")


@pytest.fixture(scope="module")
def teachers():
    """A ViT at 16 px (4 x 4 patches of 4 px, width 48), a CNN at 64 px (2 x 2 last map of 64 channels, pooled
    embedding 256) and a second ViT at 32 px (4 x 4 patches of 8 px, width 40)."""
    return {
        "teacher": Teacher("vit16", tiny_vit(16, 4), InputConfig((16, 16), *IMAGENET), "random"),
        "cnn": Teacher("cnn64", tiny_cnn(1), InputConfig((64, 64), *IMAGENET), "random"),
        "vit2": Teacher("vit32", tiny_vit(32, 8, width=40, seed=2), InputConfig((32, 32), *IMAGENET), "random"),
    }


def build(settings: dict, teachers: dict, student: nn.Module, size: int = 32) -> Objective:
    return objectives.build("agglomerate", settings, teachers, student, size)


def step_of(objective, teachers, student, x, size: int = 32) -> StepInputs:
    return objectives.step_of(objective, teachers, student, x, size)


# ----------------------------------------------------------------------------- references (float64)


def ref_smooth_l1(a: torch.Tensor, b: torch.Tensor, beta: float) -> torch.Tensor:
    """Element-wise 0.5 d^2 / beta where |d| < beta, else |d| - 0.5 beta."""
    d = (a.double() - b.double()).abs()
    return torch.where(d < beta, 0.5 * d * d / beta, d - 0.5 * beta)


def ref_cos(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """cos over the last dimension: the dot product over the product of the norms."""
    a, b = a.double(), b.double()
    return (a * b).sum(-1) / (a.norm(dim=-1) * b.norm(dim=-1))


def ref_zscore(rows: torch.Tensor) -> torch.Tensor:
    """(x - mean) / sqrt(population variance + 1e-6) per column of (N, C) rows."""
    rows = rows.double()
    mean = rows.mean(0)
    var = ((rows - mean) ** 2).mean(0)
    return (rows - mean) / torch.sqrt(var + 1e-6)


def ref_mlp(head: nn.Sequential, x: torch.Tensor) -> torch.Tensor:
    """Linear -> ReLU -> Linear from the head's weights."""
    first, _, second = head
    hidden = (x.double() @ first.weight.double().T + first.bias.double()).clamp_min(0)
    return hidden @ second.weight.double().T + second.bias.double()


# ----------------------------------------------------------------------------- standardisers


@pytest.mark.parametrize("n", [1, 2, 4, 12, 20, 24, 28, 36, 40, 96, 768, 1280])
def test_hadamard_matrices_are_orthogonal_with_entries_of_one_size(n):
    h = hadamard(n)
    torch.testing.assert_close(h @ h.T, torch.eye(n, dtype=torch.float64), rtol=0, atol=1e-12)
    torch.testing.assert_close(h.abs(), torch.full((n, n), 1 / math.sqrt(n), dtype=torch.float64))


def test_widths_without_a_hadamard_matrix_pad_to_the_next_order():
    assert [hadamard_order(d) for d in (1, 2, 3, 5, 10, 12, 92, 384, 1000)] == [1, 2, 4, 8, 12, 12, 96, 384, 1000]
    with pytest.raises(ValueError, match="hadamard_order"):
        hadamard(92)  # 4 * 23: neither Sylvester nor Paley (prime q) reaches it


def correlated(n: int, d: int, seed: int = 0) -> torch.Tensor:
    """Rows with a mean far from 0 and variances spread over four orders of magnitude."""
    g = torch.Generator().manual_seed(seed)
    mixing = torch.randn(d, d, generator=g) * torch.logspace(0, -2, d)
    return torch.randn(n, d, generator=g) @ mixing.T + 3.0


def test_zscore_gives_mean_0_and_variance_1_on_the_data_of_its_moments():
    x = correlated(400, 5)
    standardizer = ZScore(5, momentum=0.9)
    assert torch.equal(standardizer(x), x)  # no moments yet: the raw target
    standardizer.update(x)
    torch.testing.assert_close(standardizer(x).double(), ref_zscore(x), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(standardizer.restore(standardizer(x)), x, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("d, n", [(20, 20), (10, 12)])
def test_phi_s_gives_every_dimension_variance_1_and_is_an_isometry_up_to_one_scale(d, n):
    x = correlated(500, d)
    standardizer = PhiS(d, momentum=0.9)
    assert standardizer.out_dim == n
    before = standardizer(x)
    torch.testing.assert_close(before, torch.cat([x, torch.zeros(500, n - d)], dim=1))  # raw, padded
    standardizer.update(x)
    y = standardizer(x).double()
    covariance = torch.cov(y.T, correction=0)
    torch.testing.assert_close(covariance.diagonal(), torch.ones(n, dtype=torch.float64), rtol=0, atol=1e-4)
    torch.testing.assert_close(y.mean(0), torch.zeros(n, dtype=torch.float64), rtol=0, atol=1e-4)
    # one scale: alpha^2 = trace(Sigma) / n, and every distance is divided by alpha
    centred = x.double() - x.double().mean(0)
    alpha = math.sqrt((centred**2).mean(0).sum().item() / n)
    assert standardizer.scale.item() == pytest.approx(alpha, rel=1e-5)
    torch.testing.assert_close(torch.cdist(y, y), torch.cdist(x.double(), x.double()) / alpha, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(standardizer.restore(standardizer(x)), x, rtol=1e-5, atol=1e-4)


def test_phi_s_on_four_points_by_hand():
    """x in {(+-1, 0), (0, +-2)}: mean 0, Sigma = diag(0.5, 2), U = I, alpha^2 = (0.5 + 2) / 2 = 1.25,
    H = [[1, 1], [1, -1]] / sqrt(2): y = H x / sqrt(1.25)."""
    x = torch.tensor([[1.0, 0.0], [-1.0, 0.0], [0.0, 2.0], [0.0, -2.0]])
    standardizer = PhiS(2, momentum=0.5)
    standardizer.update(x)
    a = 1 / math.sqrt(2 * 1.25)  # 0.632...
    expected = torch.tensor([[a, a], [-a, -a], [2 * a, -2 * a], [-2 * a, 2 * a]])
    torch.testing.assert_close(standardizer(x), expected, rtol=1e-5, atol=1e-6)


def test_a_new_eigenbasis_is_matched_to_the_previous_one():
    previous, _ = torch.linalg.qr(torch.randn(6, 6, generator=torch.Generator().manual_seed(0), dtype=torch.float64))
    order = torch.tensor([2, 0, 1, 5, 3, 4])
    signs = torch.tensor([1.0, -1.0, -1.0, 1.0, -1.0, 1.0], dtype=torch.float64)
    shuffled = previous[:, order] * signs + 1e-3 * torch.randn(6, 6, dtype=torch.float64)
    torch.testing.assert_close(align_basis(previous, shuffled), previous, rtol=0, atol=1e-2)
    assert torch.equal(align_basis(previous, previous), previous)


def test_phi_s_moments_are_a_bias_corrected_moving_average():
    a, b = correlated(300, 4, seed=1), correlated(200, 4, seed=2) * 2
    standardizer = PhiS(4, momentum=0.6)
    standardizer.update(a)
    standardizer.update(b)
    # m = (0.6 * 0.4 mean_a + 0.4 mean_b) / (1 - 0.36), likewise the second moment
    mean = (0.24 * a.double().mean(0) + 0.4 * b.double().mean(0)) / 0.64
    second = (0.24 * a.double().T @ a.double() / 300 + 0.4 * b.double().T @ b.double() / 200) / 0.64
    got_mean, got_covariance = standardizer.moments.moments()
    torch.testing.assert_close(got_mean, mean)
    torch.testing.assert_close(got_covariance, second - torch.outer(mean, mean))


# ----------------------------------------------------------------------------- the loss


def test_the_loss_is_its_formula(teachers):
    """ViT student (4 x 4 tokens) against the 16 px ViT (4 x 4: no resampling) and the CNN (2 x 2: the student's
    grid average-pooled), zscore targets after one update, every coefficient set."""
    pair = {role: teachers[role] for role in ("teacher", "cnn")}
    student = tiny_vit(32, 8, width=64, seed=5).train()
    settings = {
        "standardize": "zscore",
        "summary_cosine": 0.7,
        "summary_smooth_l1": 0.3,
        "dense_cosine": 0.6,
        "dense_smooth_l1": 0.4,
        "dense_weight": 0.5,
        "beta": 0.5,
        "weights": {"teacher": 3, "cnn": 1},
    }
    objective = build(settings, pair, student)
    strategy = objective.strategies["agglomerate"]
    x = images()
    step = step_of(objective, pair, student, x)
    objective.after_step(step, same_rows)
    total, terms = objective(step)

    with torch.no_grad():
        student_embedding = step.student.embedding
        student_tokens = step.student.layers[1]  # (6, 16, 64), the last block
        expected_total = 0.0
        for role, share in (("teacher", 0.75), ("cnn", 0.25)):
            teacher = step.views_of(role)[0]
            heads = strategy.heads[role]
            y = ref_zscore(teacher.embedding)
            p = ref_mlp(heads["summary"], student_embedding)
            summary = (0.7 * (1 - ref_cos(p, y)) + 0.3 * ref_smooth_l1(p, y, 0.5).mean(-1)).mean()
            layer = teacher.layers[max(teacher.layers)]
            if role == "cnn":  # (6, 64, 2, 2) map -> 4 tokens in row-major order
                layer = layer.flatten(2).transpose(1, 2)
            channels = layer.shape[-1]
            target = ref_zscore(layer.reshape(-1, channels)).view(6, -1, channels)
            prediction = ref_mlp(heads["dense"], student_tokens)  # (6, 16, C), on the 4 x 4 grid
            if role == "cnn":  # mean of each 2 x 2 block of the 4 x 4 grid
                grid = prediction.view(6, 2, 2, 2, 2, channels)  # (b, row block, row, column block, column, c)
                prediction = grid.mean(dim=(2, 4)).reshape(6, 4, channels)
            per_token = 0.6 * (1 - ref_cos(prediction, target)) + 0.4 * ref_smooth_l1(prediction, target, 0.5).mean(-1)
            dense = per_token.mean()
            assert terms[f"agglomerate.{role}.summary"].item() == pytest.approx(summary.item(), rel=1e-4)
            assert terms[f"agglomerate.{role}.dense"].item() == pytest.approx(dense.item(), rel=1e-4)
            expected_total += share * (summary + 0.5 * dense)
    assert total.item() == pytest.approx(expected_total.item(), rel=1e-4)


def test_mse_dense_loss_is_the_element_mean_of_squares(teachers):
    pair = {"teacher": teachers["teacher"]}
    student = tiny_vit(32, 8, width=64, seed=5)
    objective = build({"standardize": "none", "dense_loss": "mse"}, pair, student)
    step = step_of(objective, pair, student, images())
    _, terms = objective(step)
    with torch.no_grad():
        teacher = step.teacher
        prediction = ref_mlp(objective.strategies["agglomerate"].heads["teacher"]["dense"], step.student.layers[1])
        expected = ((prediction - teacher.layers[1].double()) ** 2).mean()
    assert terms["agglomerate.teacher.dense"].item() == pytest.approx(expected.item(), rel=1e-5)


def block_means(tokens: torch.Tensor, side: int, to: int) -> torch.Tensor:
    """Row-major tokens (B, side^2, C) of a side x side grid -> (B, to^2, C): the mean of each block."""
    batch, _, channels = tokens.shape
    k = side // to
    return tokens.view(batch, to, k, to, k, channels).mean(dim=(2, 4)).reshape(batch, to * to, channels)


def bilinear_2_to_4(tokens: torch.Tensor) -> torch.Tensor:
    """Row-major tokens (B, 4, C) of a 2 x 2 grid -> (B, 16, C) on 4 x 4, bilinear with align_corners False:
    output cell i reads source coordinate (i + 0.5) / 2 - 0.5 = -0.25, 0.25, 0.75, 1.25, clamped to [0, 1],
    so per direction the weights are A = [[1, 0], [0.75, 0.25], [0.25, 0.75], [0, 1]] and the map is A X A^T."""
    a = torch.tensor([[1.0, 0.0], [0.75, 0.25], [0.25, 0.75], [0.0, 1.0]], dtype=torch.float64)
    grid = tokens.double().view(tokens.shape[0], 2, 2, tokens.shape[-1])
    return torch.einsum("ir,brcd,jc->bijd", a, grid, a).reshape(tokens.shape[0], 16, tokens.shape[-1])


def test_dense_heads_on_two_student_stages_average_their_losses(teachers):
    """CNN student at 64 px, dense_layers [0.5, 1.0]: of its 5 levels, 0.5 -> index 2 (32 channels, 8 x 8) and
    1.0 -> index 4 (64 channels, 2 x 2). Each stage's head predicts on its own grid, resampled to the teacher's:
    the ViT's 4 x 4 (8 x 8 block-averaged, 2 x 2 interpolated bilinearly) and the CNN's 2 x 2 (8 x 8
    block-averaged, 2 x 2 kept); D = the mean over the two stages of the per-stage losses."""
    pair = {role: teachers[role] for role in ("teacher", "cnn")}
    student = tiny_cnn(4).train()
    settings = {"standardize": "zscore", "dense_cosine": 0.6, "dense_smooth_l1": 0.4, "dense_layers": [0.5, 1.0]}
    objective = build(settings, pair, student, 64)
    strategy = objective.strategies["agglomerate"]
    assert objective.student_request() == FeatureRequest(embedding=True, layers=(0.5, 1.0))
    assert strategy.dense_layers == (2, 4)
    for role in pair:
        assert list(strategy.heads[role]) == ["summary", "dense_layer2", "dense"]
        assert strategy.heads[role]["dense_layer2"][0].in_features == 32
        assert strategy.heads[role]["dense"][0].in_features == 64
        assert list(strategy.standardizers[role]) == ["summary", "dense"]  # one dense standardiser per teacher
    assert strategy.term_weights() == pytest.approx(
        {"teacher.summary": 0.5, "teacher.dense": 0.5, "cnn.summary": 0.5, "cnn.dense": 0.5}
    )
    step = step_of(objective, pair, student, images(6, size=64), 64)
    objective.after_step(step, same_rows)
    total, terms = objective(step)

    with torch.no_grad():
        stage2 = step.student.layers[2].flatten(2).transpose(1, 2)  # (6, 64, 32): the 8 x 8 grid, row-major
        stage4 = step.student.layers[4].flatten(2).transpose(1, 2)  # (6, 4, 64): the 2 x 2 grid
        for role, side in (("teacher", 4), ("cnn", 2)):
            layer = step.views_of(role)[0].layers[max(step.views_of(role)[0].layers)]
            if layer.dim() == 4:
                layer = layer.flatten(2).transpose(1, 2)
            channels = layer.shape[-1]
            target = ref_zscore(layer.reshape(-1, channels)).view(6, side * side, channels)
            heads = strategy.heads[role]
            from_stage2 = block_means(ref_mlp(heads["dense_layer2"], stage2), 8, side)
            from_stage4 = ref_mlp(heads["dense"], stage4)
            if side == 4:
                from_stage4 = bilinear_2_to_4(from_stage4)
            losses = [
                (0.6 * (1 - ref_cos(p, target)) + 0.4 * ref_smooth_l1(p, target, 1.0).mean(-1)).mean()
                for p in (from_stage2, from_stage4)
            ]
            expected = (losses[0] + losses[1]) / 2
            assert terms[f"agglomerate.{role}.dense"].item() == pytest.approx(expected.item(), rel=1e-4)
    total.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in strategy.heads.parameters())


def test_the_default_dense_layer_keeps_the_heads_and_requests(teachers):
    """dense_layers [-1] (the default), or entries that all resolve to the last layer: one dense head per
    teacher under the keys of a single-stage run, and the student's last layer requested."""
    pair = {role: teachers[role] for role in ("teacher", "cnn")}
    student = tiny_cnn(4)
    expected = {
        f"strategies.agglomerate.heads.{role}.{path}.{layer}.{kind}"
        for role in pair
        for path in ("summary", "dense")
        for layer in (0, 2)
        for kind in ("weight", "bias")
    }
    for settings in ({}, {"dense_layers": [1.0, -1, 4]}):
        objective = build(settings, pair, student, 64)
        state = objective.state_dict()
        assert {k for k in state if k.startswith("strategies.agglomerate.heads.")} == expected
        standardizers = {".".join(k.split(".")[:5]) for k in state if ".standardizers." in k}
        assert standardizers == {
            f"strategies.agglomerate.standardizers.{r}.{p}" for r in pair for p in ("summary", "dense")
        }
        assert objective.strategies["agglomerate"].dense_layers == (4,)
    assert build({}, pair, student, 64).student_request() == FeatureRequest(embedding=True, layers=(-1,))


@pytest.mark.parametrize(
    "layers, message",
    [
        ([5], r"read the student's layers \[5\], but layer index 5 is out of range for a model with 5 layers"),
        ([0.5, -6], r"layer index -6 is out of range"),
        ([1.5], r"relative layer depth 1.5 must be in \(0, 1\]"),
    ],
)
def test_dense_layers_the_student_lacks_are_refused(teachers, layers, message):
    with pytest.raises(UsageError, match=message + r".*change strategy\.agglomerate\.dense_layers"):
        build({"dense_layers": layers}, {"teacher": teachers["teacher"]}, tiny_cnn(4), 64)
    with pytest.raises(UsageError, match="dense_layers names no student layer"):
        resolve_recipe({"strategy": {"agglomerate": {"dense_layers": []}}})


def test_resampling_pools_to_shrink_and_interpolates_to_grow():
    maps = torch.rand(2, 3, 6, 6, generator=torch.Generator().manual_seed(0))
    pooled = resample(maps, (2, 2))  # every cell of each 3 x 3 block counts (bilinear would read one per block)
    torch.testing.assert_close(pooled, maps.view(2, 3, 2, 3, 2, 3).mean(dim=(3, 5)))
    grown = resample(maps[..., :2, :2], (4, 4))
    torch.testing.assert_close(
        grown, F.interpolate(maps[..., :2, :2], size=(4, 4), mode="bilinear", align_corners=False)
    )
    assert resample(maps, (6, 6)) is maps


@pytest.mark.parametrize("roles", [("teacher",), ("teacher", "cnn"), ("teacher", "cnn", "vit2")])
def test_equal_shares_sum_to_one_whatever_the_number_of_teachers(teachers, roles):
    chosen = {role: teachers[role] for role in roles}
    student = tiny_cnn(4)
    objective = build({"dense_weight": 2.0}, chosen, student, 64)
    strategy = objective.strategies["agglomerate"]
    share = 1 / len(roles)
    expected = {
        f"{role}.{part}": share * (2.0 if part == "dense" else 1.0) for role in roles for part in ("summary", "dense")
    }
    assert strategy.term_weights() == pytest.approx(expected)
    total, terms = objective(step_of(objective, chosen, student, images(4, size=64), 64))
    weighted = sum(expected[name.removeprefix("agglomerate.")] * value for name, value in terms.items())
    assert total.item() == pytest.approx(weighted.item(), rel=1e-6)


def test_given_shares_are_normalised_and_unnamed_roles_get_one(teachers):
    objective = build({"weights": {"cnn": 2.0, "vit2": 5}}, teachers, tiny_cnn(4), 64)
    weights = objective.strategies["agglomerate"].term_weights()
    assert weights["teacher.summary"] == pytest.approx(1 / 8)
    assert weights["cnn.summary"] == pytest.approx(2 / 8)
    assert weights["vit2.dense"] == pytest.approx(5 / 8)


def test_every_teacher_role_is_read_by_default_and_the_heads_are_named_by_role(teachers):
    objective = build({}, teachers, tiny_cnn(4), 64)
    strategy = objective.strategies["agglomerate"]
    assert strategy.config.teachers == ["teacher", "cnn", "vit2"]
    heads = strategy.adaptor_heads()
    assert list(heads) == ["teacher", "cnn", "vit2"] and all(set(h) == {"summary", "dense"} for h in heads.values())
    # phi_s widths: 256 = 2^8; the CNN's map has 64 channels; the ViTs' widths 48 and 40 are Paley orders
    assert heads["cnn"]["summary"][-1].out_features == 256 and heads["cnn"]["dense"][-1].out_features == 64
    assert heads["vit2"]["summary"][-1].out_features == 40
    requests = objective.teacher_requests(teachers, tiny_cnn(4))
    assert set(requests) == {"teacher", "cnn", "vit2"}
    assert all(r == FeatureRequest(embedding=True, layers=(-1,)) for r in requests.values())


def test_dense_weight_0_asks_no_teacher_layers_and_builds_no_dense_heads(teachers):
    pair = {role: teachers[role] for role in ("teacher", "cnn")}
    student = tiny_cnn(4)
    objective = build({"dense_weight": 0}, pair, student, 64)
    assert objective.teacher_requests(pair, student) == {
        "teacher": FeatureRequest(embedding=True),
        "cnn": FeatureRequest(embedding=True),
    }
    assert objective.student_request() == FeatureRequest(embedding=True)
    strategy = objective.strategies["agglomerate"]
    assert all(set(h) == {"summary"} for h in strategy.adaptor_heads().values())
    _, terms = objective(step_of(objective, pair, student, images(4, size=64), 64))
    assert set(terms) == {"agglomerate.teacher.summary", "agglomerate.cnn.summary"}


def test_a_listed_subset_of_roles_is_read(teachers):
    objective = build({"teachers": ["cnn", "vit2"]}, teachers, tiny_cnn(4), 64)  # the primary one unread: allowed
    assert objective.strategies["agglomerate"].roles == ("cnn", "vit2")
    with pytest.raises(UsageError, match=r"teachers\.vit2 is read by no strategy"):
        build({"teachers": ["teacher", "cnn"]}, teachers, tiny_cnn(4), 64)


def test_bad_settings_are_rejected_with_the_key(teachers):
    with pytest.raises(UsageError, match=r"weights\.cnn must be a positive number"):
        resolve_recipe({"strategy": {"agglomerate": {"weights": {"cnn": 0}}}})
    with pytest.raises(UsageError, match=r"weights gives a share to 'mim'"):
        resolve_recipe({"strategy": {"agglomerate": {"teachers": ["teacher"], "weights": {"mim": 1}}}})
    with pytest.raises(UsageError, match=r"weights gives a share to 'mim'"):  # caught once bound to the roles
        build({"weights": {"mim": 1}}, {"teacher": teachers["teacher"]}, tiny_cnn(4), 64)
    with pytest.raises(UsageError, match="names no role"):
        resolve_recipe({"strategy": {"agglomerate": {"teachers": []}}})
    with pytest.raises(UsageError, match="teacher_drop"):
        resolve_recipe({"strategy": {"agglomerate": {"teacher_drop": 1.5}}})
    with pytest.raises(UsageError, match="summary_cosine and summary_smooth_l1 are both 0"):
        resolve_recipe({"strategy": {"agglomerate": {"summary_cosine": 0}}})
    with pytest.raises(UsageError, match="standardize"):
        resolve_recipe({"strategy": {"agglomerate": {"standardize": "whiten"}}})


def test_a_teacher_without_layers_is_named_when_the_dense_path_needs_them():
    class Pooled(nn.Module):  # no feature_info: its layers cannot be tapped
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 8, 3)

    odd = Teacher("pooled-net", Pooled(), InputConfig((32, 32), *IMAGENET), "random")
    with pytest.raises(UsageError, match=r"teacher 'teacher' \(pooled-net\).*dense_weight=0"):
        build({}, {"teacher": odd}, tiny_cnn(4), 64)


# ----------------------------------------------------------------------------- teacher dropping


def test_teacher_dropping_keeps_the_worst_teacher_and_drops_the_others_at_the_rate():
    generator = torch.Generator().manual_seed(0)
    losses = torch.rand(3, 4000, generator=generator)
    draws = drop_draws(4000, 3, generator, world=1, rank=0)
    keep = keep_mask(losses, 0.4, draws)
    worst = losses.argmax(0)
    assert bool((keep[worst, torch.arange(4000)] == 1).all())
    others = torch.ones(3, 4000, dtype=torch.bool)
    others[worst, torch.arange(4000)] = False
    assert keep[others].mean().item() == pytest.approx(0.6, abs=0.02)
    assert bool((keep.sum(0) >= 1).all())
    only_worst = keep_mask(losses, 1.0, draws)
    assert bool((only_worst.sum(0) == 1).all()) and torch.equal(only_worst.argmax(0), worst)
    assert bool((keep_mask(losses, 0.0, draws) == 1).all())


def test_one_process_and_two_draw_the_same():
    whole = drop_draws(8, 3, torch.Generator().manual_seed(5), world=1, rank=0)
    shares = [drop_draws(4, 3, torch.Generator().manual_seed(5), world=2, rank=r) for r in (0, 1)]
    assert torch.equal(whole, torch.cat(shares))


def test_dropped_pairs_leave_the_loss_and_its_normaliser(teachers):
    pair = {role: teachers[role] for role in ("teacher", "cnn")}
    student = tiny_cnn(4).train()
    objective = build({"teacher_drop": 0.5, "standardize": "none", "weights": {"cnn": 3}}, pair, student, 64)
    step = step_of(objective, pair, student, images(8, size=64), 64)
    plain = build({"standardize": "none", "weights": {"cnn": 3}}, pair, student, 64)
    plain.load_state_dict(objective.state_dict())
    _, undropped = plain(step)  # the same heads, nothing dropped: batch means
    torch.manual_seed(11)
    total, terms = objective(step)
    torch.manual_seed(11)  # the same global draw, then the same generator and draws
    draws = drop_draws(8, 2, torch.Generator().manual_seed(int(torch.randint(0, 2**62, (1,)))), 1, 0)

    strategy = objective.strategies["agglomerate"]
    with torch.no_grad():
        per_image = {}
        for role in ("teacher", "cnn"):
            teacher = step.views_of(role)[0]
            p = ref_mlp(strategy.heads[role]["summary"], step.student.embedding)
            summary = 1 - ref_cos(p, teacher.embedding)
            tokens = ref_mlp(strategy.heads[role]["dense"], step.student.layers[4].flatten(2).transpose(1, 2))
            target = teacher.layers[max(teacher.layers)]
            target = target.flatten(2).transpose(1, 2) if target.dim() == 4 else target
            if role == "teacher":  # the student's 2 x 2 grid interpolated to the ViT's 4 x 4
                maps = tokens.transpose(1, 2).reshape(8, -1, 2, 2).float()
                tokens = F.interpolate(maps, size=(4, 4), mode="bilinear", align_corners=False)
                tokens = tokens.flatten(2).transpose(1, 2).double()
            dense = (0.9 * (1 - ref_cos(tokens, target)) + 0.1 * ref_smooth_l1(tokens, target, 1.0).mean(-1)).mean(1)
            per_image[role] = (summary, dense)
        for role, (summary, dense) in per_image.items():  # the reference's per-image losses are the strategy's
            assert undropped[f"agglomerate.{role}.summary"].item() == pytest.approx(summary.mean().item(), rel=1e-4)
            assert undropped[f"agglomerate.{role}.dense"].item() == pytest.approx(dense.mean().item(), rel=1e-4)
        losses = torch.stack([s + d for s, d in per_image.values()])
        keep = (draws.T >= 0.5) | (torch.arange(2)[:, None] == losses.argmax(0)[None])
        shares = torch.tensor([0.25, 0.75], dtype=torch.float64)
        normaliser = (shares[:, None] * keep).sum()
        assert 8 < int(keep.sum()) < 16  # some pairs dropped, none of the worst
        for t, role in enumerate(("teacher", "cnn")):
            summary, dense = per_image[role]
            expected_summary = (keep[t] * summary).sum() / normaliser
            expected_dense = (keep[t] * dense).sum() / normaliser
            assert terms[f"agglomerate.{role}.summary"].item() == pytest.approx(expected_summary.item(), rel=1e-4)
            assert terms[f"agglomerate.{role}.dense"].item() == pytest.approx(expected_dense.item(), rel=1e-4)
    # a teacher dropped for every image still gets a (zero) gradient: DDP sees every head used
    all_dropped = build({"teacher_drop": 1.0}, pair, student, 64)
    loss, _ = all_dropped(step)
    loss.backward()
    assert all(p.grad is not None for p in all_dropped.parameters())


# ----------------------------------------------------------------------------- training


@pytest.mark.parametrize("kind", ["vit", "cnn"])
def test_a_vit_and_a_cnn_teacher_at_different_sizes_train_the_student(teachers, kind):
    pair = {role: teachers[role] for role in ("teacher", "cnn")}
    size = 32 if kind == "vit" else 64
    student = (tiny_vit(32, 8, width=64, seed=7) if kind == "vit" else tiny_cnn(7)).train()
    objective = build({}, pair, student, size)
    x = images(8, size=size)
    step = step_of(objective, pair, student, x, size)
    optimizer = torch.optim.Adam(list(student.parameters()) + list(objective.parameters()), lr=2e-3)
    before = [p.clone() for t in pair.values() for p in t.parameters()]
    losses = []
    for number in range(25):
        step = step_of(objective, pair, student, x, size)
        loss, _ = objective(step)
        optimizer.zero_grad()
        loss.backward()
        if number == 0:
            assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in objective.parameters())
        optimizer.step()
        objective.after_step(step, same_rows)
        losses.append(loss.item())
    assert losses[-1] < 0.7 * losses[1]  # from step 2 on, the targets are standardised (fixed batch: fixed moments)
    assert all(torch.equal(b, a) for b, a in zip(before, (p for t in pair.values() for p in t.parameters())))


def test_the_standardisers_are_checkpointed(teachers):
    pair = {role: teachers[role] for role in ("teacher", "cnn")}
    student = tiny_cnn(4)
    trained = build({}, pair, student, 64)
    step = step_of(trained, pair, student, images(6, size=64), 64)
    trained.after_step(step, same_rows)
    state = trained.state_dict()
    assert "strategies.agglomerate.standardizers.cnn.dense.matrix" in state
    assert "strategies.agglomerate.standardizers.teacher.summary.moments.second" in state
    fresh = build({}, pair, student, 64)
    fresh.load_state_dict(state)
    _, expected = trained(step)
    _, got = fresh(step)
    assert {k: v.item() for k, v in got.items()} == pytest.approx({k: v.item() for k, v in expected.items()})


def test_compress_with_two_teacher_roles(tmp_path):
    folder = image_folder(tmp_path / "images")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = distillkit.compress(
            teacher="timm:vit_tiny_patch16_224",
            teacher_weights=RANDOM_WEIGHTS,
            student="mobilenetv3-small",
            strategy="agglomerate",
            data=str(folder),
            batch_size=8,
            max_steps=2,
            out=tmp_path / "run",
            quiet=True,
            set=[
                "teacher.input_size=32",
                "teachers.cnn.name=timm:test_efficientnet",
                f"teachers.cnn.weights={RANDOM_WEIGHTS}",
                "teachers.cnn.input_size=64",
                "student.input_size=32",
                "data.teacher_cache=null",
                "strategy.agglomerate.teacher_drop=0.5",
                "eval.enabled=false",
                "eval.latency_runs=1",
            ],
        )
    assert result.steps == 2
    lines = [json.loads(line) for line in (result.run_dir / "metrics.jsonl").read_text().splitlines()]
    logged = [line for line in lines if "loss" in line]
    names = (
        "agglomerate.teacher.summary",
        "agglomerate.teacher.dense",
        "agglomerate.cnn.summary",
        "agglomerate.cnn.dense",
    )
    assert logged and all(np.isfinite(line[name]) for line in logged for name in names)


def test_phi_s_recomputes_its_transform_on_a_doubling_then_fixed_schedule():
    """An eigendecomposition per step would cost seconds for a 1280-d teacher on a CPU: after updates 1, 2, 4, 8
    (up to refresh_every 8), then every 8th."""
    assert [n for n in range(1, 40) if refreshes(n, 8)] == [1, 2, 4, 8, 16, 24, 32]
    assert [n for n in range(1, 6) if refreshes(n, 1)] == [1, 2, 3, 4, 5]
    torch.manual_seed(0)
    standardizer = PhiS(4, momentum=0.5, refresh_every=4)
    matrices = []
    for _ in range(5):
        standardizer.update(torch.randn(32, 4) * torch.tensor([3.0, 1.0, 0.5, 0.1]))
        matrices.append(standardizer.matrix.clone())
    assert not torch.equal(matrices[0], matrices[1])  # refreshed after update 2
    assert torch.equal(matrices[1], matrices[2])  # update 3: the moments move, the transform stays
    assert not torch.equal(matrices[2], matrices[3])  # update 4
    assert torch.equal(matrices[3], matrices[4])
    # a standardiser loaded from a checkpoint counts on from the saved updates: the same schedule
    loaded = PhiS(4, momentum=0.5, refresh_every=4)
    loaded.load_state_dict(standardizer.state_dict())
    batch = torch.randn(32, 4)
    standardizer.update(batch), loaded.update(batch)  # update 6: no refresh for either
    assert torch.equal(loaded.matrix, standardizer.matrix)
