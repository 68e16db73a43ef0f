"""The new strategies with real (tiny) networks: what they ask of teacher and student, the checks that
reject a recipe before any forward pass, composition, gradients (student and heads only, the teacher
untouched bit for bit) and a loss that falls on a fixed batch.

The training step is the loop's own (`train.step.train_step`), on one fixed batch.
"""

from __future__ import annotations

import math
import warnings

import pytest
import timm
import torch
from torch import nn

import distillkit.strategies.objective as objective_module
from distillkit.data import Batch
from distillkit.data.views import SizePlan, ViewConfig
from distillkit.errors import UsageError
from distillkit.features import FeatureRequest, Features, forward_kept_tokens
from distillkit.recipe import resolve_recipe
from distillkit.strategies import STRATEGIES, Objective, check_composable
from distillkit.strategies.hidden import Hidden, HiddenConfig, MaskedFeatures
from distillkit.student import Student
from distillkit.teachers import InputConfig, Teacher, load_teacher
from distillkit.train.step import DistillModule, StepContext, train_step

pytestmark = pytest.mark.usefixtures("one_cpu_thread")

IMAGENET = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
TINY_HIDDEN = {"predictor_depth": 1, "predictor_width": 32, "predictor_heads": 2, "mask_min_keep": 4}


@pytest.fixture(scope="module")
def lite0():
    """The real ImageNet EfficientNet-Lite0 at 64 px: class logits, 5 stages (deepest grid 2x2)."""
    return load_teacher("efficientnet-lite0", None, 64)


@pytest.fixture(scope="module")
def vit_teacher():
    """A small random ViT teacher without classifier or projection: 4x4 tokens of width 48."""
    torch.manual_seed(0)
    model = timm.create_model(
        "vit_tiny_patch16_224",
        pretrained=False,
        num_classes=0,
        img_size=32,
        patch_size=8,
        depth=4,
        embed_dim=48,
        num_heads=2,
    )
    return Teacher("tiny-vit", model.eval(), InputConfig((32, 32), *IMAGENET), "random, test only")


def cnn_student() -> nn.Module:
    torch.manual_seed(1)
    return timm.create_model("test_efficientnet", pretrained=False, num_classes=0)  # 0.1 M params, 5 stages


def vit_student() -> nn.Module:
    torch.manual_seed(2)
    return timm.create_model(
        "vit_tiny_patch16_224",
        pretrained=False,
        num_classes=0,
        img_size=32,
        patch_size=8,
        depth=2,
        embed_dim=64,
        num_heads=2,
    )


def build(strategies: dict, teacher, student) -> tuple[Objective, FeatureRequest]:
    recipe = resolve_recipe({"strategy": strategies})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        objective = Objective.build(recipe.strategy, teacher, student, 32)
        return objective, objective.student_request()


def images(n: int = 8, seed: int = 3) -> torch.Tensor:
    return torch.rand(n, 3, 64, 64, generator=torch.Generator().manual_seed(seed))


def train_steps(
    objective: Objective,
    teacher,
    student,
    steps: int,
    lr: float = 2e-3,
    labels: torch.Tensor | None = None,
    after_backward=None,
) -> list[dict[str, float]]:
    """`train_step`, the loop's own step, on one fixed batch (whole-image views, the same every step) with
    Adam; `after_backward` runs once, between the first backward and its optimiser step. Returns each
    step's terms and total ("loss")."""
    from accelerate import Accelerator

    module = DistillModule(Student(student, None, InputConfig((32, 32), *IMAGENET), False), objective)
    optimizer = torch.optim.Adam([p for p in module.parameters() if p.requires_grad], lr=lr)
    if after_backward is not None:

        def once(*args) -> None:
            after_backward()
            hook.remove()

        hook = optimizer.register_step_pre_hook(once)
    ctx = StepContext(
        Accelerator(cpu=True),
        module,
        optimizer,
        {"teacher": teacher},
        objective.teacher_requests({"teacher": teacher}, student),
        {},
        SizePlan(student=(64, 64), teachers={"teacher": (64, 64)}, load_size=64),
        ViewConfig(crop_scale=(1.0, 1.0), crop_ratio=(1.0, 1.0), flip=0.0),
        0,
        lambda step: lr,
    )
    batch = Batch(images=(images() * 255).to(torch.uint8), labels=labels, indices=torch.arange(8), bad=[])
    module.train()
    losses = []
    for step in range(steps):
        outcome = train_step(ctx, batch, view_epoch=0, step=step, progress=0.0)
        assert outcome.finite.item() == 1.0 and outcome.skipped.item() == 0.0
        losses.append({"loss": outcome.loss.item(), **{k: v.item() for k, v in outcome.terms.items()}})
    return losses


# name: (strategies, teacher, student, the term that must fall)
CASES = {
    "feature-cnn": ({"feature": {}}, "lite0", cnn_student, "loss"),
    "feature-vit-mse": ({"feature": {"loss": "mse"}}, "lite0", vit_student, "loss"),
    "logits-cnn": ({"logits": {"ce_weight": 0.5, "ce_classes": 10}}, "lite0", cnn_student, "loss"),
    "kdss-cnn": ({"kdss": {"w_rot": 0.5, "ce_classes": 10}}, "lite0", cnn_student, "loss"),
    "kdss-vit-ssl-teacher": ({"kdss": {}}, "vit", vit_student, "loss"),
    "hidden-cnn": ({"hidden": {}}, "lite0", cnn_student, "loss"),
    "hidden-vit": ({"hidden": TINY_HIDDEN}, "vit", vit_student, "loss"),
    "hidden-vit-cnn-teacher": ({"hidden": TINY_HIDDEN}, "lite0", vit_student, "loss"),
    # SEED on a random ViT teacher sits at its floor (near-identical teacher embeddings: the entropy of
    # a near-uniform target), so only the hidden term can fall here.
    "seed+hidden-vit": (
        {"seed": {"queue_size": 8, "tau_teacher": 0.05}, "hidden": TINY_HIDDEN},
        "vit",
        vit_student,
        "hidden",
    ),
}

# Student parameters a strategy leaves without gradient (none: hidden's pooled term reaches the layers after
# the last feature map, EfficientNet's conv_head + bn2, which its token loss alone cannot).
AFTER_LAST_MAP: dict[str, list[str]] = {}


@pytest.mark.parametrize("case", list(CASES))
def test_gradients_reach_student_and_heads_only_and_the_loss_falls(case, lite0, vit_teacher):
    strategies, teacher_name, make_student, watched = CASES[case]
    teacher = lite0 if teacher_name == "lite0" else vit_teacher
    student = make_student()
    objective, request = build(strategies, teacher, student)
    teacher_before = {k: v.clone() for k, v in teacher.state_dict().items()}
    seen = {}

    def check_gradients():
        seen["student"] = [n for n, p in student.named_parameters() if p.grad is None]
        seen["heads"] = [n for n, p in objective.named_parameters() if p.grad is None]
        seen["nonzero"] = sum(float(p.grad.abs().sum()) for p in student.parameters() if p.grad is not None)
        seen["teacher"] = [n for n, p in teacher.named_parameters() if p.grad is not None or p.requires_grad]

    torch.manual_seed(4)
    labels = torch.tensor([0, 1, 2, 3, 4, 5, -1, 7])
    losses = train_steps(objective, teacher, student, steps=25, labels=labels, after_backward=check_gradients)
    assert seen["student"] == AFTER_LAST_MAP.get(case, []) and seen["heads"] == [], seen
    assert seen["nonzero"] > 0 and seen["teacher"] == []
    assert sum(1 for _ in objective.parameters()) > 0  # the strategy owns trainable heads
    after = teacher.state_dict()
    assert all(torch.equal(teacher_before[k], after[k]) for k in teacher_before)  # bit for bit
    assert all(math.isfinite(v) for step in losses for v in step.values())
    curve = [step[watched] for step in losses]
    first, last = sum(curve[:3]) / 3, sum(curve[-5:]) / 5
    assert last < 0.8 * first, (case, curve)


# ----------------------------------------------------------------------------- the masked ViT forward


def test_forward_kept_tokens_with_every_patch_is_the_plain_forward():
    student = vit_student().eval()
    x = torch.randn(2, 3, 32, 32)
    everything = torch.arange(16).expand(2, 16)
    with torch.no_grad():
        plain = student.forward_features(x)[:, student.num_prefix_tokens :]
        ours, _ = forward_kept_tokens(student, x, everything)
        part, _ = forward_kept_tokens(student, x, torch.tensor([[0, 5, 6], [1, 2, 15]]))
    assert torch.allclose(ours, plain, atol=1e-5)
    assert part.shape == (2, 3, 64)


def test_student_features_masks_a_vit_and_serves_the_other_strategies(vit_teacher):
    student = vit_student()
    objective, request = build({"seed": {"queue_size": 64}, "hidden": TINY_HIDDEN}, vit_teacher, student)
    hidden = objective.strategies["hidden"]
    assert hidden.peer_request == FeatureRequest(embedding=True)
    assert objective.strategies["seed"].peer_request == FeatureRequest()  # only the one that runs the student
    x = torch.randn(3, 3, 32, 32)
    torch.manual_seed(0)
    features = objective.student_features(student, x, {}, request, 0.0)
    assert isinstance(features, MaskedFeatures)
    assert features.embedding.shape == (3, 64)  # from a full forward, for SEED
    assert features.target_index.shape[:2] == (4, 3)
    assert features.context_tokens.shape == (3, features.context_index.shape[1], 64)
    torch.manual_seed(0)
    again = objective.student_features(student, x, {}, request, 0.0)
    assert torch.equal(again.context_index, features.context_index)  # masks follow the global RNG
    alone, alone_request = build({"hidden": TINY_HIDDEN}, vit_teacher, student)
    only = alone.student_features(student, x, {}, alone_request, 0.0)
    assert only.embedding is None and only.layers == {}  # nobody else needs a full forward


def test_cnn_students_take_the_generic_extraction(lite0):
    objective, request = build({"hidden": {}}, lite0, cnn_student())
    assert objective.student_features(cnn_student(), torch.randn(2, 3, 32, 32), {}, request, 0.0) is None
    assert request == FeatureRequest(layers=(-1,), embedding=True)  # the embedding feeds the pooled term


# ----------------------------------------------------------------------------- checks before any forward


class _TokenModel(nn.Module):
    """Looks like a token model (blocks + patch_embed) but is not a timm VisionTransformer."""

    def __init__(self):
        super().__init__()
        self.patch_embed = nn.Conv2d(3, 8, 8, 8)
        self.blocks = nn.Sequential()


@pytest.fixture
def no_probes(monkeypatch):
    def fail(*args, **kwargs):
        raise AssertionError("a probe forward ran before the checks")

    monkeypatch.setattr(objective_module, "probe_features", fail)


def test_hidden_rejects_a_token_student_it_cannot_mask(lite0, no_probes):
    with pytest.raises(UsageError, match="strategy hidden.*VisionTransformer.*_TokenModel"):
        build({"hidden": {}}, lite0, _TokenModel())


def test_hidden_rejects_a_patch_grid_too_small_for_its_masks(lite0, no_probes):
    with pytest.raises(UsageError, match="strategy hidden.*4x4 patch grid.*mask_min_keep"):
        build({"hidden": {}}, lite0, vit_student())  # min_keep 10 on 16 patches


def test_kdss_feature_term_needs_layer_taps(lite0, no_probes):
    student = nn.Sequential(nn.Conv2d(3, 4, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten())
    with pytest.raises(UsageError, match="strategy kdss.*feature-map term.*w_feat=0"):
        build({"kdss": {}}, lite0, student)
    with pytest.raises(UsageError, match="feat_student_layer"):
        build({"kdss": {"feat_student_layer": 99}}, lite0, cnn_student())


def test_logits_rejects_a_teacher_without_logits(vit_teacher, no_probes):
    with pytest.raises(UsageError, match="strategy 'logits' needs a teacher with class logits.*tiny-vit"):
        build({"logits": {}}, vit_teacher, cnn_student())


def test_hidden_rejects_teacher_layers_out_of_range(lite0, no_probes):
    with pytest.raises(UsageError, match="strategy hidden.*teacher's hidden layers.*out of range"):
        build({"hidden": {"layers": [2, 9]}}, lite0, cnn_student())


class _AnotherRunner(Hidden):
    name = "runner"


def test_two_strategies_that_run_the_student_cannot_be_composed(lite0):
    with pytest.raises(UsageError, match="'hidden' and 'runner' both run the student"):
        check_composable({"hidden": Hidden, "runner": _AnotherRunner})
    check_composable({"hidden": Hidden, "seed": STRATEGIES.get("seed")})
    probes = (
        Features(layers={1: torch.zeros(2, 3, 2, 2)}),
        Features(layers={2: torch.zeros(2, 4, 2, 2)}, embedding=torch.zeros(2, 4)),
    )
    with pytest.raises(UsageError, match="both run the student"):
        Objective(
            {"hidden": Hidden(HiddenConfig(), *probes), "runner": _AnotherRunner(HiddenConfig(), *probes)},
            {"hidden": 1.0, "runner": 1.0},
        )
