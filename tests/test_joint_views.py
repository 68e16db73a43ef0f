"""A step's views of one shape go through the student as one batch (as SimCLR's, SSKD's and DINO's official code
run them): one student forward per shape, batch-norm statistics over all those views, each view's Features cut
back out exactly; strategies that run the student themselves still get one view at a time."""

from __future__ import annotations

import copy
import warnings

import pytest
import timm
import torch
from torch import nn

from distillkit.features import Features, cat_batches, split_batch
from distillkit.recipe import resolve_recipe
from distillkit.strategies import Objective
from distillkit.strategies.simclr import Simclr, nt_xent
from distillkit.strategies.toolbox import heads_per_view
from distillkit.student import Student
from distillkit.teachers import InputConfig, Teacher
from distillkit.train.step import DistillModule

pytestmark = pytest.mark.usefixtures("one_cpu_thread")

IMAGENET = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))


def test_split_batch_cuts_every_tensor_on_its_batch_dimension_and_cat_batches_joins_them():
    generator = torch.Generator().manual_seed(0)
    whole = Features(
        embedding=torch.randn(5, 4, generator=generator),
        layers={2: torch.randn(5, 3, 2, 2, generator=generator)},
        logits=torch.randn(5, 7, generator=generator),
        relations={1: torch.randn(2, 5, 2, 3, 4, generator=generator)},  # (q/k, B, heads, N, d)
        prefix_tokens=1,
    )
    first, second = split_batch(whole, [3, 2])
    assert torch.equal(first.embedding, whole.embedding[:3]) and torch.equal(second.logits, whole.logits[3:])
    assert torch.equal(second.layers[2], whole.layers[2][3:])
    assert torch.equal(first.relations[1], whole.relations[1][:, :3]) and second.prefix_tokens == 1
    joined = cat_batches([first, second])
    assert joined.named().keys() == whole.named().keys()
    assert all(torch.equal(joined.named()[k], t) for k, t in whole.named().items())


@pytest.fixture(scope="module")
def teacher():
    torch.manual_seed(0)
    model = timm.create_model("test_efficientnet", pretrained=False, num_classes=0).eval()
    return Teacher("tiny-cnn", model, InputConfig((32, 32), *IMAGENET), "random, test only")


def simclr_module(teacher) -> DistillModule:
    torch.manual_seed(1)
    student = timm.create_model("test_efficientnet", pretrained=False, num_classes=0)  # has batch norms
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        objective = Objective.build(resolve_recipe({"strategy": {"simclr": {}}}).strategy, teacher, student, 32)
    return DistillModule(Student(student, None, InputConfig((32, 32), *IMAGENET), False), objective).train()


def student_calls(module: DistillModule) -> list[int]:
    """The batch size of every pass through the student's network (its first convolution), from now on."""
    sizes: list[int] = []
    stem = next(m for m in module.student.modules() if isinstance(m, nn.Conv2d))
    stem.register_forward_pre_hook(lambda m, args: sizes.append(args[0].shape[0]))
    return sizes


def test_two_views_run_as_one_batch_with_batch_norm_statistics_over_both(teacher):
    module = simclr_module(teacher)
    reference = copy.deepcopy(module)  # the same weights and running statistics, run by hand below
    generator = torch.Generator().manual_seed(2)
    views = [torch.rand(6, 3, 32, 32, generator=generator) for _ in range(2)]
    sizes = student_calls(module)

    loss, _, step = module(views, {}, None, 0.0)

    assert sizes == [12]  # one forward of both views
    assert [v.embedding.shape[0] for v in step.student_views] == [6, 6]
    strategy = reference.objective.strategies["simclr"]
    joint = reference.student(reference.io.prepare(torch.cat(views)))  # train mode: BN over the 12 images
    za, zb = strategy.head(joint).split(6)
    torch.testing.assert_close(loss, nt_xent(za, zb, strategy.config.temperature), rtol=1e-5, atol=1e-6)
    apart = [reference.student(reference.io.prepare(v)) for v in views]  # BN over each view alone
    za, zb = strategy.head(torch.cat(apart)).split(6)
    assert not torch.allclose(loss, nt_xent(za, zb, strategy.config.temperature), rtol=1e-3)


def test_each_views_features_are_those_of_its_own_images(teacher):
    """In eval mode (no batch statistics) the joint batch must give each view exactly its own embedding."""
    module = simclr_module(teacher).eval()
    generator = torch.Generator().manual_seed(3)
    views = [torch.rand(4, 3, 32, 32, generator=generator) for _ in range(2)]
    _, _, step = module(views, {}, None, 0.0)
    for view, features in zip(views, step.student_views):
        alone = module.student(module.io.prepare(view))
        torch.testing.assert_close(features.embedding, alone, rtol=1e-4, atol=1e-5)


def test_views_of_different_sizes_run_as_one_batch_per_size(teacher):
    module = simclr_module(teacher)
    generator = torch.Generator().manual_seed(4)
    views = [torch.rand(5, 3, *size, generator=generator) for size in ((32, 32), (32, 32), (24, 24))]
    sizes = student_calls(module)

    _, _, step = module(views, {}, None, 0.0)

    assert sizes == [10, 5]
    assert [v.embedding.shape[0] for v in step.student_views] == [5, 5, 5]


def test_a_strategy_that_runs_the_student_itself_gets_one_view_at_a_time(teacher, monkeypatch):
    """A strategy with its own `student_features` (bootleg and hybrid mask each view's tokens from that view's
    teacher features) gets each view alone: the step must not join them."""
    calls = []

    def own_forward(self, student, x, teachers, request, progress):
        calls.append(x.shape[0])
        return Features(embedding=student(x))

    monkeypatch.setattr(Simclr, "student_features", own_forward)
    module = simclr_module(teacher)
    assert module.objective.runs_student
    generator = torch.Generator().manual_seed(5)
    module([torch.rand(3, 3, 32, 32, generator=generator) for _ in range(2)], {}, None, 0.0)
    assert calls == [3, 3]


def test_heads_per_view_gives_the_numbers_and_running_moments_of_one_call_per_view():
    """Linear / ReLU on all rows at once, each batch norm on its own view's rows: outputs, gradients and the
    batch norms' running moments equal those of calling the head on each view in turn (train mode)."""
    torch.manual_seed(0)
    head = nn.Sequential(nn.Linear(6, 8, bias=False), nn.BatchNorm1d(8), nn.ReLU(inplace=True), nn.Linear(8, 5))
    twin = copy.deepcopy(head)
    views = [torch.randn(4, 6, requires_grad=True), torch.randn(3, 6, requires_grad=True)]
    twins = [v.detach().clone().requires_grad_(True) for v in views]
    weights = [torch.randn(4, 5), torch.randn(3, 5)]

    got = heads_per_view(head, views)
    expected = [twin(v) for v in twins]  # the reference: one call per view
    assert [g.shape for g in got] == [(4, 5), (3, 5)]
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e)
    sum((g * w).sum() for g, w in zip(got, weights)).backward()
    sum((e * w).sum() for e, w in zip(expected, weights)).backward()
    for v, t in zip(views, twins):
        torch.testing.assert_close(v.grad, t.grad)
    for p, q in zip(head.parameters(), twin.parameters()):
        torch.testing.assert_close(p.grad, q.grad)
    torch.testing.assert_close(head[1].running_mean, twin[1].running_mean)
    torch.testing.assert_close(head[1].running_var, twin[1].running_var)
    assert head[1].num_batches_tracked.item() == twin[1].num_batches_tracked.item() == 2

    # a joint batch norm (one call on all 7 rows) gives other numbers: the test tells the two apart
    joint = copy.deepcopy(twin)(torch.cat([t.detach() for t in twins]))
    assert not torch.allclose(joint[:4], expected[0].detach(), atol=1e-3)


def test_heads_per_view_takes_a_single_layer_and_a_single_view():
    torch.manual_seed(0)
    layer = nn.Linear(6, 3)
    views = [torch.randn(4, 6), torch.randn(2, 6)]
    for g, v in zip(heads_per_view(layer, views), views):
        torch.testing.assert_close(g, layer(v))
    (only,) = heads_per_view(nn.Sequential(nn.Linear(6, 3), nn.BatchNorm1d(3)), [views[0]])
    assert only.shape == (4, 3)
