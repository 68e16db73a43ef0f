"""Hybrid Distill: the loss against a float64 computation written from the formula (q, k recomputed from
the networks' weights), the masking schedule and the token choice, that ViT students really run fewer
tokens and CNN students see blanked patches, gradients, and the checks that reject a recipe."""

from __future__ import annotations

import math
import warnings

import pytest
import timm
import torch
import torch.nn.functional as F

import distillkit
from distillkit.errors import UsageError
from distillkit.features import FeatureRequest
from distillkit.recipe import resolve_recipe
from distillkit.strategies import Objective, StepInputs
from distillkit.strategies.hybrid import (
    HybridConfig,
    default_layer_pairs,
    keep_indices,
    mask_ratio_at,
    redundancy_scores,
    to_grid,
)
from distillkit.teachers import InputConfig, Teacher, load_teacher, prepare_input
from distillkit.teachers.zoo import RANDOM_WEIGHTS

pytestmark = pytest.mark.usefixtures("one_cpu_thread")

IMAGENET = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
STUDENT_INPUT = InputConfig((32, 32), *IMAGENET)


def tiny_vit(depth: int, width: int, heads: int, seed: int, **kwargs):
    torch.manual_seed(seed)
    return timm.create_model(
        "vit_tiny_patch16_224",
        pretrained=False,
        num_classes=0,
        img_size=32,
        patch_size=8,
        depth=depth,
        embed_dim=width,
        num_heads=heads,
        **kwargs,
    ).eval()


@pytest.fixture(scope="module")
def teachers():
    """A CL teacher with a class token (4 blocks, 2 heads) and a MIM teacher without (6 blocks, 3 heads)."""
    return {
        "teacher": Teacher("cl", tiny_vit(4, 48, 2, 0), InputConfig((32, 32), *IMAGENET), "random"),
        "mim": Teacher(
            "mim",
            tiny_vit(6, 48, 3, 1, class_token=False, global_pool="avg"),
            InputConfig((32, 32), *IMAGENET),
            "random",
        ),
    }


def build(settings: dict, teachers, student):
    recipe = resolve_recipe({"strategy": {"hybrid": settings}, "teachers": {"mim": {"name": "unused-here"}}})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        objective = Objective.build(recipe.strategy, teachers, student, 32)
        return objective, objective.student_request()


def teacher_features(objective, teachers, student, x):
    return {role: teachers[role](x, request) for role, request in objective.teacher_requests(teachers, student).items()}


def images(n: int = 6, seed: int = 3) -> torch.Tensor:
    return torch.rand(n, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


# ----------------------------------------------------------------------------- independent reference


def naive_blocks(model, tokens: torch.Tensor, upto: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Run blocks 0..upto-1, then return (block upto's input, its q, its k) with q, k as (B, N, width)
    computed from the block's weights: layer norm, then the qkv matrix."""
    for block in list(model.blocks)[:upto]:
        tokens = block(tokens)
    block = model.blocks[upto]
    normed = F.layer_norm(tokens, tokens.shape[-1:], block.norm1.weight, block.norm1.bias, block.norm1.eps)
    qkv = normed @ block.attn.qkv.weight.T + block.attn.qkv.bias
    width = qkv.shape[-1] // 3
    return tokens, qkv[..., :width], qkv[..., width : 2 * width]


def embed(model, x: torch.Tensor) -> torch.Tensor:
    return model._pos_embed(model.patch_embed(prepare_input(x, InputConfig((32, 32), *IMAGENET), False)))


def split_relations(q: torch.Tensor, k: torch.Tensor, heads: int) -> torch.Tensor:
    """softmax(q_h k_h^T / sqrt(d_h)) for `heads` equal chunks of the channels, float64: (B, heads, N, N)."""
    batch, tokens, width = q.shape
    d = width // heads
    q = q.double().view(batch, tokens, heads, d).transpose(1, 2)
    k = k.double().view(batch, tokens, heads, d).transpose(1, 2)
    return torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(d), dim=-1)


def smooth_l1(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    d = (a.double() - b.double()).abs()
    return torch.where(d < 1, 0.5 * d * d, d - 0.5).mean()


def test_loss_matches_a_float64_computation_from_the_formula(teachers):
    torch.manual_seed(5)
    student = tiny_vit(3, 64, 4, 2).train()
    objective, request = build({"mask_ratio": 0.5, "mask_schedule": "constant"}, teachers, student)
    hybrid = objective.strategies["hybrid"]
    assert hybrid.pairs == [(0, 1), (1, 3)]  # round((l_s + 1) * 6 / 3) - 1
    assert hybrid.relation_heads == 2  # min(4, 3) = 3 does not divide 48 channels; 2 does
    x = images()
    by_role = teacher_features(objective, teachers, student, x)
    features = objective.student_features(student, prepare_input(x, STUDENT_INPUT, False), by_role, request, 1.0)
    keep = features.keep_index
    assert keep.shape == (6, 8)  # 16 patches, half dropped
    _, terms = objective(
        StepInputs([by_role["teacher"]], [features], None, 1.0, other_teachers={"mim": [by_role["mim"]]})
    )

    with torch.no_grad():
        rows = torch.arange(6)[:, None]
        # feature term: the CL teacher's last block output, per-token layer norm, at the kept tokens
        cl = teachers["teacher"].model
        tokens, _, _ = naive_blocks(cl, embed(cl, x), 3)
        target = cl.blocks[3](tokens)[:, 1:].double()
        target = (target - target.mean(-1, keepdim=True)) / (target.var(-1, unbiased=False, keepdim=True) + 1e-5).sqrt()
        student_tokens = embed(student, x)
        kept_tokens = torch.cat([student_tokens[:, :1], student_tokens[:, 1:][rows, keep]], dim=1)
        final = student.norm(student.blocks(kept_tokens))[:, 1:]
        prediction = final.double() @ hybrid.feature_head.weight.double().T + hybrid.feature_head.bias.double()
        expected_feature = smooth_l1(prediction, target[rows, keep])
        # relation term: KL(R_t || R_s) per row over the kept tokens, 2 relation heads, mean over the pairs
        mim = teachers["mim"].model
        kls = []
        for s_layer, t_layer in hybrid.pairs:
            _, q_t, k_t = naive_blocks(mim, embed(mim, x), t_layer)
            r_t = split_relations(q_t[rows, keep], k_t[rows, keep], 2)
            _, q_s, k_s = naive_blocks(student, kept_tokens, s_layer)
            r_s = split_relations(q_s[:, 1:], k_s[:, 1:], 2)
            kls.append((r_t * (r_t.log() - r_s.log())).sum(-1).mean())
        expected_relation = torch.stack(kls).mean()
    assert terms["hybrid.feature"].item() == pytest.approx(expected_feature.item(), rel=1e-4)
    assert terms["hybrid.relation"].item() == pytest.approx(expected_relation.item(), rel=1e-4, abs=1e-8)


def test_the_masking_ratio_ramps_as_configured():
    linear = HybridConfig(mask_ratio=0.5, mask_ramp=0.5)
    assert [mask_ratio_at(linear, p) for p in (0.0, 0.25, 0.5, 1.0)] == pytest.approx([0.0, 0.25, 0.5, 0.5])
    cosine = HybridConfig(mask_ratio=0.4, mask_ramp=1.0, mask_schedule="cosine")
    assert [mask_ratio_at(cosine, p) for p in (0.0, 0.5, 1.0)] == pytest.approx([0.0, 0.2, 0.4])
    assert mask_ratio_at(HybridConfig(mask_ratio=0.3, mask_schedule="constant"), 0.0) == 0.3


def test_tokens_are_ranked_by_the_cl_teachers_cls_attention(teachers):
    x = images()
    features = teachers["teacher"](x, FeatureRequest(relations=(-1,)))
    scores = redundancy_scores(features.relations[3], features.prefix_tokens)
    cl = teachers["teacher"].model
    with torch.no_grad():
        _, q, k = naive_blocks(cl, embed(cl, x), 3)
        attention = split_relations(q, k, 2)  # the teacher's own 2 heads
    expected = attention[:, :, 0, 1:].mean(dim=1)  # [CLS] row, patch columns, mean over heads
    torch.testing.assert_close(scores.double(), expected, rtol=1e-4, atol=1e-6)
    generator = torch.Generator().manual_seed(0)
    kept = keep_indices(scores, 5, gumbel_scale=0.0, generator=generator)
    torch.testing.assert_close(kept, expected.topk(5, dim=1).indices.sort(dim=1).values)
    noisy = keep_indices(scores, 5, gumbel_scale=1.0, generator=generator)
    assert noisy.shape == (6, 5) and all(len(set(row.tolist())) == 5 for row in noisy)
    assert (noisy.diff(dim=1) > 0).all()  # in grid order


def test_gumbel_top_k_keeps_tokens_in_proportion_to_their_score():
    scores = torch.tensor([[0.7, 0.1, 0.1, 0.1]]).expand(4000, -1)
    kept = keep_indices(scores, 1, gumbel_scale=1.0, generator=torch.Generator().manual_seed(1))
    share = (kept == 0).float().mean().item()
    assert share == pytest.approx(0.7, abs=0.03)


def test_a_vit_student_runs_only_the_kept_tokens(teachers):
    student = tiny_vit(3, 64, 4, 2)
    objective, request = build({"mask_ratio": 0.75, "mask_schedule": "constant"}, teachers, student)
    x = images()
    seen = []
    handle = student.blocks[0].register_forward_pre_hook(lambda module, args: seen.append(args[0].shape[1]))
    by_role = teacher_features(objective, teachers, student, x)
    features = objective.student_features(student, prepare_input(x, STUDENT_INPUT, False), by_role, request, 1.0)
    handle.remove()
    assert seen == [1 + 4]  # the class token + 16 - 12 kept patches, and no full forward
    assert features.final_tokens.shape == (6, 4, 64)


def test_with_nothing_masked_the_vit_student_forward_is_the_plain_one(teachers):
    student = tiny_vit(3, 64, 4, 2)
    objective, request = build({}, teachers, student)
    x = prepare_input(images(), STUDENT_INPUT, False)
    by_role = teacher_features(objective, teachers, student, images())
    features = objective.student_features(student, x, by_role, request, 0.0)  # ratio 0 at the start
    torch.testing.assert_close(features.final_tokens, student.forward_features(x)[:, 1:])


def test_a_cnn_student_sees_the_dropped_patches_blanked(teachers):
    torch.manual_seed(1)
    student = timm.create_model("test_efficientnet", pretrained=False, num_classes=0)
    objective, request = build({"mask_ratio": 0.5, "mask_schedule": "constant"}, teachers, student)
    hybrid = objective.strategies["hybrid"]
    assert hybrid.grid == 4  # the MIM teacher's patch grid
    x = prepare_input(images(), STUDENT_INPUT, False)
    inputs = []
    handle = student.register_forward_pre_hook(lambda module, args: inputs.append(args[0]))
    student.forward_intermediates = _recording(student.forward_intermediates, inputs)
    features = objective.student_features(
        student, x, teacher_features(objective, teachers, student, images()), request, 1.0
    )
    handle.remove()
    seen = inputs[-1]
    cells = torch.zeros(6, 16)
    cells[torch.arange(6)[:, None], features.keep_index] = 1
    pixel_mask = cells.view(6, 1, 4, 4).repeat_interleave(8, dim=2).repeat_interleave(8, dim=3)
    torch.testing.assert_close(seen, x * pixel_mask)
    assert (cells.sum(1) == 8).all()


def _recording(method, inputs):
    def wrapper(x, *args, **kwargs):
        inputs.append(x)
        return method(x, *args, **kwargs)

    return wrapper


@pytest.mark.parametrize("kind", ["vit", "cnn"])
def test_gradients_reach_the_student_and_its_heads_and_the_loss_falls(teachers, kind):
    torch.manual_seed(4)
    student = (
        tiny_vit(3, 64, 4, 2)
        if kind == "vit"
        else timm.create_model("test_efficientnet", pretrained=False, num_classes=0)
    ).train()
    objective, request = build({"mask_ratio": 0.5, "mask_schedule": "constant", "gumbel_scale": 0.0}, teachers, student)
    x = images(8)
    by_role = teacher_features(objective, teachers, student, x)
    params = list(student.parameters()) + list(objective.parameters())
    optimizer = torch.optim.Adam(params, lr=2e-3)
    teacher_before = [p.clone() for t in teachers.values() for p in t.parameters()]
    losses = []
    for step in range(12):
        features = objective.student_features(student, prepare_input(x, STUDENT_INPUT, False), by_role, request, 1.0)
        loss, _ = objective(
            StepInputs([by_role["teacher"]], [features], None, 1.0, other_teachers={"mim": [by_role["mim"]]})
        )
        optimizer.zero_grad()
        loss.backward()
        if step == 0:
            hybrid = objective.strategies["hybrid"]
            heads = [hybrid.feature_head] + ([] if kind == "vit" else list(hybrid.query_key.values()))
            assert all(p.grad is not None and p.grad.abs().sum() > 0 for h in heads for p in h.parameters())
            first_block = student.blocks[0] if kind == "vit" else student.conv_stem
            assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in first_block.parameters())
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.8 * losses[0]
    for before, after in zip(teacher_before, (p for t in teachers.values() for p in t.parameters())):
        assert torch.equal(before, after)


def test_teacher_tokens_are_pooled_to_the_students_grid():
    tokens = torch.arange(2 * 16 * 3, dtype=torch.float32).view(2, 16, 3)
    pooled = to_grid(tokens, 2)
    grid = tokens.view(2, 4, 4, 3)
    expected = grid.view(2, 2, 2, 2, 2, 3).mean(dim=(2, 4)).reshape(2, 4, 3)
    torch.testing.assert_close(pooled, expected)
    assert to_grid(tokens, 8).shape == (2, 64, 3)


def test_default_layer_pairs_follow_the_depth_ratio():
    assert default_layer_pairs(12, 12) == [(i, i) for i in range(11)]
    assert default_layer_pairs(4, 12) == [(0, 2), (1, 5), (2, 8)]
    assert default_layer_pairs(12, 24) == [(i, 2 * i + 1) for i in range(11)]


@pytest.fixture(scope="module")
def lite0():
    return load_teacher("efficientnet-lite0", None, 64)


def test_a_conv_net_cannot_be_the_relation_teacher(teachers, lite0):
    with pytest.raises(UsageError, match="token relations .* conv net"):
        build({}, {"teacher": teachers["teacher"], "mim": lite0}, tiny_vit(2, 64, 2, 0))


def test_a_conv_feature_teacher_needs_random_masking(teachers, lite0):
    pair = {"teacher": lite0, "mim": teachers["mim"]}
    with pytest.raises(UsageError, match="mask_score=random"):
        build({}, pair, tiny_vit(2, 64, 2, 0))
    objective, _ = build({"mask_score": "random"}, pair, tiny_vit(2, 64, 2, 0))
    assert objective.strategies["hybrid"].feature_head.out_features == 320  # Lite0's last stage map


def test_a_missing_or_unread_teacher_role_is_named():
    recipe = resolve_recipe({"strategy": {"hybrid": {}}})
    with pytest.raises(UsageError, match=r"role 'mim'.*teachers\.mim"):
        Objective.build(recipe.strategy, {"teacher": object()}, tiny_vit(2, 64, 2, 0), 32)
    recipe = resolve_recipe({"teachers": {"extra": {"name": "efficientnet-lite0"}}})
    with pytest.raises(UsageError, match=r"teachers\.extra is read by no strategy"):
        Objective.build(recipe.strategy, {"teacher": object(), "extra": object()}, tiny_vit(2, 64, 2, 0), 32)


def test_bad_settings_are_rejected_with_the_key(teachers):
    with pytest.raises(UsageError, match="mask_ratio"):
        resolve_recipe({"strategy": {"hybrid": {"mask_ratio": 1.0}}})
    with pytest.raises(UsageError, match="teacher_layers pairs with student_layers"):
        resolve_recipe({"strategy": {"hybrid": {"teacher_layers": [1]}}})
    with pytest.raises(UsageError, match="do not split into 5 relation heads"):
        build({"relation_heads": 5}, teachers, tiny_vit(2, 64, 2, 0))
    with pytest.raises(UsageError, match="role name"):
        resolve_recipe({"teachers": {"teacher": {"name": "efficientnet-lite0"}}})


def test_compress_with_two_teachers_from_the_command_line_options(tmp_path):
    spec = tmp_path / "vit.yaml"
    spec.write_text(
        "timm: vit_tiny_patch16_224\ninput_size: 64\n"
        "model_args: {patch_size: 16, depth: 2, embed_dim: 64, num_heads: 2}\n"
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = distillkit.compress(
            teacher="timm:vit_tiny_patch16_224",
            teacher_weights=RANDOM_WEIGHTS,
            student=str(spec),
            strategy="hybrid",
            limit=16,
            batch_size=8,
            max_steps=2,
            out=tmp_path / "run",
            quiet=True,
            set=[
                "teachers.mim.name=timm:vit_tiny_patch16_224",
                f"teachers.mim.weights={RANDOM_WEIGHTS}",
                "eval.enabled=false",
                "eval.latency_runs=1",
            ],
        )
    assert result.steps == 2
    assert "mim:" in (tmp_path / "run" / "recipe.yaml").read_text()
    import json

    card = json.loads((result.student_dir / "config.json").read_text())
    assert card["distillkit"]["other_teachers"]["mim"]["name"] == "timm:vit_tiny_patch16_224"
