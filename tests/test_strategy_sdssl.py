"""The `sdssl` strategy: its loss against the SDSSL formula written out in float64, the lambda ramp,
per-block embeddings of ViT and CNN students, where gradients go, and the checks that reject a recipe."""

from __future__ import annotations

import math
import os
import subprocess
import sys
import warnings

import pytest
import timm
import torch
from torch import nn

from distillkit.errors import UsageError
from distillkit.features import FeatureRequest, Features, extract_features
from distillkit.recipe import resolve_recipe
from distillkit.strategies import Objective, StepInputs
from distillkit.strategies.sdssl import Sdssl, SdsslConfig, ramp
from distillkit.strategies.toolbox import all_gather
from distillkit.teachers import InputConfig, Teacher, prepare_input

pytestmark = pytest.mark.usefixtures("one_cpu_thread")

IMAGENET = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
TINY = {"projector_hidden_dim": 32, "final_projector_hidden_dim": 48, "predictor_hidden_dim": 32}


def tiny_vit(depth: int, width: int, seed: int, **kwargs) -> nn.Module:
    torch.manual_seed(seed)
    return timm.create_model(
        "vit_tiny_patch16_224",
        pretrained=False,
        num_classes=0,
        img_size=32,
        patch_size=8,
        depth=depth,
        embed_dim=width,
        num_heads=2,
        **kwargs,
    )


@pytest.fixture(scope="module")
def teacher():
    """A random 2-block ViT teacher (48-d) with a projection head to 24 dims, like a MoCo teacher."""
    model = tiny_vit(2, 48, 0).eval()
    torch.manual_seed(9)
    return Teacher(
        "tiny-vit", model, InputConfig((32, 32), *IMAGENET), "random, test only", projection_head=nn.Linear(48, 24)
    )


def cnn_student() -> nn.Module:
    torch.manual_seed(1)
    return timm.create_model("test_efficientnet", pretrained=False, num_classes=0)  # 5 stages


def build(settings: dict, teacher, student):
    recipe = resolve_recipe({"strategy": {"sdssl": settings}})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        objective = Objective.build(recipe.strategy, teacher, student, 32)
        return objective, objective.student_request()


def step_inputs(objective, request, teacher, student, progress: float, n: int = 8) -> StepInputs:
    """Two views of n images through teacher and student, as the training loop does."""
    generator = torch.Generator().manual_seed(3)
    views = [torch.rand(n, 3, 32, 32, generator=generator) for _ in range(objective.num_views)]
    teacher_request = objective.teacher_requests({"teacher": teacher}, student)["teacher"]
    student_input = InputConfig((32, 32), *IMAGENET)
    return StepInputs(
        teacher_views=[teacher(v, teacher_request) for v in views],
        student_views=[extract_features(student, prepare_input(v, student_input, False), request) for v in views],
        labels=None,
        progress=progress,
    )


# ----------------------------------------------------------------------------- the loss, from the formula


def reference_nce(z: torch.Tensor, t: torch.Tensor, tau: float) -> float:
    """2 tau * mean_i -log softmax_j(<z_i/|z_i|, t_j/|t_j|> / tau)[i], one row at a time in float64."""
    z, t = z.double(), t.double()
    total = 0.0
    for i in range(z.shape[0]):
        zi = z[i] / z[i].norm()
        logits = [float(zi @ (t[j] / t[j].norm())) / tau for j in range(t.shape[0])]
        top = max(logits)
        log_sum = top + math.log(sum(math.exp(v - top) for v in logits))
        total += log_sum - logits[i]
    return 2 * tau * total / z.shape[0]


@pytest.mark.parametrize("views, predictor", [(2, True), (1, True), (2, False)])
def test_loss_matches_the_sdssl_formula(views, predictor):
    torch.manual_seed(0)
    n, tau, progress = 6, 0.2, 0.5
    config = SdsslConfig(views=views, predictor=predictor, ramp_max=0.8, **TINY)
    student_probe = Features(
        embedding=torch.randn(2, 20),
        block_embeddings={0: torch.randn(2, 12), 1: torch.randn(2, 16), 2: torch.randn(2, 20)},
    )
    strategy = Sdssl(config, Features(embedding=torch.randn(2, 10)), student_probe)
    assert strategy.blocks == [0, 1] and len(strategy.projectors) == 3  # block 2 is the last: the output term
    student = [
        Features(
            embedding=torch.randn(n, 20),
            block_embeddings={0: torch.randn(n, 12), 1: torch.randn(n, 16), 2: torch.randn(n, 20)},
        )
        for _ in range(views)
    ]
    teacher = [Features(embedding=torch.randn(n, 10)) for _ in range(views)]
    terms = strategy(StepInputs(teacher, student, None, progress))

    pairs = [(0, 1), (1, 0)] if views == 2 else [(0, 0)]
    out = mid = pred = 0.0
    with torch.no_grad():  # the strategy's own heads (train mode, batch statistics); the loss written out here
        for a, b in pairs:
            inputs = [student[a].block_embeddings[0], student[a].block_embeddings[1], student[a].embedding]
            projected = [project(x) for project, x in zip(strategy.projectors, inputs)]
            final = [strategy.predictors[k](p) for k, p in enumerate(projected)] if predictor else projected
            t = teacher[b].embedding
            out += reference_nce(final[2], t, tau)
            mid += (reference_nce(final[0], t, tau) + reference_nce(final[1], t, tau)) / 2
            pred += sum(reference_nce(f, t, tau) for f in final)
    lam = 0.8 * (1 - math.cos(math.pi * progress)) / 2
    assert terms["out"].item() == pytest.approx(out, rel=1e-5)
    assert terms["mid"].item() == pytest.approx(lam * mid, rel=1e-5)
    if predictor:
        assert terms["pred"].item() == pytest.approx(pred, rel=1e-5)  # 12 * mean over 12 blocks = the sum
    else:
        assert "pred" not in terms and strategy.predictors is None
    assert set(strategy.term_weights()) == set(terms)


@pytest.mark.parametrize("progress", [0.0, 0.5, 1.0])
def test_gradients_match_the_official_two_predictor_passes(progress):
    """L_pred runs each predictor on detached projections (official `training_step`); the strategy runs each
    predictor once. Every gradient (student features, projectors, predictors) must be the official one."""
    torch.manual_seed(0)
    n = 6
    config = SdsslConfig(views=2, predictor=True, ramp_max=0.8, **TINY)
    shapes = {0: 12, 1: 16, 2: 20}
    probe = Features(embedding=torch.randn(2, 20), block_embeddings={k: torch.randn(2, d) for k, d in shapes.items()})
    strategy = Sdssl(config, Features(embedding=torch.randn(2, 10)), probe)
    student = [
        Features(
            embedding=torch.randn(n, 20, requires_grad=True),
            block_embeddings={k: torch.randn(n, d, requires_grad=True) for k, d in shapes.items()},
        )
        for _ in range(2)
    ]
    teacher = [Features(embedding=torch.randn(n, 10)) for _ in range(2)]
    leaves = [x for f in student for x in (f.block_embeddings[0], f.block_embeddings[1], f.embedding)]
    params = list(strategy.parameters())

    def gradients(loss):
        return torch.autograd.grad(loss, leaves + params)

    got = gradients(sum(strategy(StepInputs(teacher, student, None, progress)).values()))

    def nce(z, t):  # the formula, independent of the strategy's own helper
        logits = nn.functional.normalize(z, dim=1) @ nn.functional.normalize(t, dim=1).T / 0.2
        return 0.4 * nn.functional.cross_entropy(logits, torch.arange(n))

    lam = 0.8 * (1 - math.cos(math.pi * progress)) / 2
    expected_loss = 0.0
    for a, b in [(0, 1), (1, 0)]:
        inputs = [student[a].block_embeddings[0], student[a].block_embeddings[1], student[a].embedding]
        projected = [project(x) for project, x in zip(strategy.projectors, inputs)]
        final = [predict(p) for predict, p in zip(strategy.predictors, projected)]
        t = teacher[b].embedding
        expected_loss = expected_loss + nce(final[2], t) + lam * (nce(final[0], t) + nce(final[1], t)) / 2
        expected_loss = expected_loss + sum(
            nce(predict(p.detach()), t) for predict, p in zip(strategy.predictors, projected)
        )
    expected = gradients(expected_loss)
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e, rtol=1e-4, atol=1e-6)


def test_heads_are_sdssl_mlps():
    strategy = Sdssl(
        SdsslConfig(**TINY),
        Features(embedding=torch.randn(2, 10)),
        Features(embedding=torch.randn(2, 20), block_embeddings={0: torch.randn(2, 12), 1: torch.randn(2, 20)}),
    )
    kinds = [type(m).__name__ for m in strategy.projectors[0]]
    assert kinds == ["Linear", "BatchNorm1d", "ReLU"] * 2 + ["Linear", "BatchNorm1d"]
    assert [m.out_features for m in strategy.projectors[0] if isinstance(m, nn.Linear)] == [32, 32, 10]
    assert [m.out_features for m in strategy.projectors[1] if isinstance(m, nn.Linear)] == [48, 48, 10]
    assert [m.out_features for m in strategy.predictors[1] if isinstance(m, nn.Linear)] == [32, 10]
    for head in list(strategy.projectors) + list(strategy.predictors):
        assert all(m.bias is None for m in head if isinstance(m, nn.Linear))
        assert not head[-1].affine and all(m.affine for m in head[:-1] if isinstance(m, nn.BatchNorm1d))


def test_keys_of_one_process_are_the_batch():
    keys = torch.randn(4, 3)
    gathered, offset = all_gather(keys)
    assert gathered is keys and offset == 0


HALF_BATCH = """
import sys, torch, torch.distributed as dist, torch.nn.functional as F
from distillkit.strategies.sdssl import info_nce
from distillkit.strategies.toolbox import all_gather
rank = int(sys.argv[1])
dist.init_process_group("gloo", init_method="file://" + sys.argv[2], rank=rank, world_size=2)
z, t = torch.randn(12, 5, generator=torch.Generator().manual_seed(0)).split(6)
keys, offset = all_gather(F.normalize(t[3 * rank:3 * rank + 3], dim=1))
print(offset, info_nce(z[3 * rank:3 * rank + 3], keys, offset, 0.2).item())
"""


def test_two_processes_contrast_with_the_keys_of_both(tmp_path):
    """Rank r's rows are B*r.. of the gathered keys: the two halves' mean loss is the one-process loss."""
    runs = [
        subprocess.Popen(
            [sys.executable, "-c", HALF_BATCH, str(r), str(tmp_path / "store")],
            stdout=subprocess.PIPE,
            text=True,
            env={**os.environ, "OMP_NUM_THREADS": "1"},
        )
        for r in range(2)
    ]
    answers = [run.communicate(timeout=120)[0].split() for run in runs]
    assert [int(a[0]) for a in answers] == [0, 3]
    z, t = torch.randn(12, 5, generator=torch.Generator().manual_seed(0)).split(6)
    assert sum(float(a[1]) for a in answers) / 2 == pytest.approx(reference_nce(z, t, 0.2), rel=1e-5)


# ----------------------------------------------------------------------------- the ramp


@pytest.mark.parametrize(
    "shape, expected",
    [
        ("cosine", [0.0, 0.4, 0.8]),
        ("linear", [0.0, 0.4, 0.8]),
        ("constant", [0.8, 0.8, 0.8]),
    ],
)
def test_ramp_at_the_start_middle_and_end(shape, expected):
    assert [ramp(shape, 0.8, p) for p in (0.0, 0.5, 1.0)] == pytest.approx(expected, abs=1e-12)


def test_cosine_ramp_is_the_official_scheduler():
    # utils.cosine_scheduler(base=0, final=ratio): final + 0.5 (base - final) (1 + cos(pi i / N))
    for i in range(11):
        official = 0.8 + 0.5 * (0.0 - 0.8) * (1 + math.cos(math.pi * i / 10))
        assert ramp("cosine", 0.8, i / 10) == pytest.approx(official, abs=1e-12)
    assert ramp("linear", 0.8, 0.25) == pytest.approx(0.2)
    assert ramp("cosine", 0.8, 0.25) < ramp("linear", 0.8, 0.25)  # slow start


# ----------------------------------------------------------------------------- students, gradients


def test_vit_block_embeddings_are_the_class_token_after_the_final_norm():
    student = tiny_vit(3, 32, 2).eval()
    x = torch.randn(2, 3, 32, 32)
    features = extract_features(student, x, Sdssl.student_request(SdsslConfig()))
    with torch.no_grad():
        tokens = student.norm_pre(student._pos_embed(student.patch_embed(x)))
        for i, block in enumerate(student.blocks):
            tokens = block(tokens)
            assert torch.allclose(features.block_embeddings[i], student.norm(tokens)[:, 0], atol=1e-5)
    assert torch.allclose(features.embedding, features.block_embeddings[2], atol=1e-6)


def test_vit_without_class_token_pools_the_patch_tokens():
    student = tiny_vit(2, 32, 2, class_token=False, global_pool="avg").eval()
    x = torch.randn(2, 3, 32, 32)
    features = extract_features(student, x, FeatureRequest(block_embeddings=(0,)))
    with torch.no_grad():
        tokens = student.blocks[0](student.norm_pre(student._pos_embed(student.patch_embed(x))))
        expected = student.fc_norm(tokens.mean(1))  # timm's avg-pool ViT: identity norm, mean, fc_norm
    assert torch.allclose(features.block_embeddings[0], expected, atol=1e-5)


def test_cnn_block_embeddings_are_pooled_stage_maps():
    student = cnn_student().eval()
    x = torch.randn(2, 3, 32, 32)
    features = extract_features(student, x, FeatureRequest(layers=(1, 3), block_embeddings=(1, 3)))
    for i in (1, 3):
        assert torch.allclose(features.block_embeddings[i], features.layers[i].mean((2, 3)))


@pytest.mark.parametrize("kind", ["vit", "cnn"])
def test_gradients_reach_every_block_and_head_but_not_the_teacher(kind, teacher):
    student = tiny_vit(3, 32, 2) if kind == "vit" else cnn_student()
    objective, request = build(TINY, teacher, student)
    strategy = objective.strategies["sdssl"]
    assert objective.num_views == 2 and strategy.use_projection  # the teacher's projection head by default
    assert len(strategy.projectors) == (3 if kind == "vit" else 5)  # every block / stage
    student.train()
    loss, terms = objective(step_inputs(objective, request, teacher, student, progress=0.3))
    assert set(terms) == {"sdssl.out", "sdssl.mid", "sdssl.pred"} and math.isfinite(loss.item())
    loss.backward()
    assert [n for n, p in student.named_parameters() if p.grad is None] == []
    assert [n for n, p in objective.named_parameters() if p.grad is None or not p.grad.any()] == []
    assert all(p.grad is None and not p.requires_grad for p in teacher.parameters())


def test_an_intermediate_term_reaches_its_own_block_only(teacher):
    student = tiny_vit(3, 32, 2)
    objective, request = build({**TINY, "blocks": [0], "predictor": False}, teacher, student)
    assert objective.strategies["sdssl"].blocks == [0]
    values = objective.strategies["sdssl"](step_inputs(objective, request, teacher, student, progress=1.0))
    values["mid"].backward()
    reached = {n.split(".")[1] for n, p in student.named_parameters() if n.startswith("blocks.") and p.grad is not None}
    assert reached == {"0"} and student.norm.weight.grad is not None  # the shared final norm is trained too


def test_a_few_steps_lower_the_loss(teacher):
    student = cnn_student()
    objective, request = build({**TINY, "views": 1}, teacher, student)
    assert objective.num_views == 1
    optimizer = torch.optim.Adam(list(student.parameters()) + list(objective.parameters()), lr=3e-3)
    student.train()
    losses = []
    for _ in range(8):
        loss, _ = objective(step_inputs(objective, request, teacher, student, progress=0.0))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0], losses


# ----------------------------------------------------------------------------- checks before any forward


@pytest.mark.parametrize(
    "settings, message",
    [
        ({"views": 3}, "strategy.sdssl.views = 3 is not allowed"),
        ({"temperature": 0}, "strategy.sdssl.temperature must be positive"),
        ({"ramp": "step"}, "strategy.sdssl.ramp = 'step' is not allowed"),
        ({"ramp_max": -1}, "strategy.sdssl.ramp_max must be 0 or more"),
        ({"projector_hidden_dim": 0}, "strategy.sdssl.projector_hidden_dim must be positive"),
    ],
)
def test_bad_settings_are_rejected_with_the_recipe(settings, message):
    with pytest.raises(UsageError, match=message):
        resolve_recipe({"strategy": {"sdssl": settings}})


@pytest.mark.parametrize(
    "settings, student, message",
    [
        ({"blocks": [5]}, "vit", "sdssl distils the student's blocks \\[5\\], but layer index 5 is out of range"),
        ({"blocks": [1.5]}, "cnn", "relative layer depth 1.5 must be in"),
        ({"embed_dim": 256}, "vit", "embed_dim = 256, but the teacher embedding SDSSL contrasts with has 24 dims"),
    ],
)
def test_bad_recipes_are_rejected_before_training(settings, student, message, teacher):
    with pytest.raises(UsageError, match=message):
        build({**TINY, **settings}, teacher, tiny_vit(3, 32, 2) if student == "vit" else cnn_student())


def test_projection_is_refused_for_a_teacher_without_one(teacher):
    bare = Teacher("bare-vit", teacher.model, teacher.input_config, "random, test only")
    with pytest.raises(UsageError, match="teacher_embed = projection, but teacher 'bare-vit' has no projection"):
        build({**TINY, "teacher_embed": "projection"}, bare, cnn_student())
    objective, _ = build({**TINY, "teacher_embed": "embedding"}, teacher, cnn_student())
    assert not objective.strategies["sdssl"].use_projection


def test_composes_with_a_strategy_that_runs_the_student(teacher):
    """hidden masks a ViT student itself; its full forward for the other strategies carries the block embeddings."""
    student = tiny_vit(3, 32, 2)
    hidden = {"predictor_depth": 1, "predictor_width": 32, "predictor_heads": 2, "mask_min_keep": 4}
    recipe = resolve_recipe({"strategy": {"sdssl": TINY, "hidden": hidden}})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        objective = Objective.build(recipe.strategy, teacher, student, 32)
        request = objective.student_request()
    x = torch.randn(4, 3, 32, 32)
    features = objective.student_features(student, x, {}, request, 0.0)
    assert sorted(features.block_embeddings) == [0, 1, 2] and features.embedding.shape == (4, 32)


def test_no_intermediate_block_trains_the_output_and_its_predictor_only():
    config = SdsslConfig(blocks=[], **TINY)
    probe = Features(embedding=torch.randn(2, 20), block_embeddings={0: torch.randn(2, 20)})
    strategy = Sdssl(config, Features(embedding=torch.randn(2, 10)), probe)
    student = [Features(embedding=torch.randn(6, 20), block_embeddings={0: torch.randn(6, 20)}) for _ in range(2)]
    terms = strategy(StepInputs([Features(embedding=torch.randn(6, 10)) for _ in range(2)], student, None, 0.3))
    assert set(terms) == {"out", "pred"} and terms["out"].item() == pytest.approx(terms["pred"].item())
