"""teacher.compile / student.compile: extraction through torch.compile gives what eager extraction gives.

The graphs are compiled with the aot_eager backend (dynamo capture and AOT autograd, the same graphs
inductor gets, without generating C++), so the tests stay fast and need no compiler."""

from __future__ import annotations

import pytest
import timm
import torch

import distillkit
from distillkit.features import Extractor, FeatureRequest, extract_features
from distillkit.teachers.base import InputConfig, Teacher

pytestmark = pytest.mark.usefixtures("one_cpu_thread")


def tiny_vit():
    return timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, depth=2, num_classes=0).eval()


def tiny_cnn():
    return timm.create_model("mobilenetv3_small_050", num_classes=0).eval()


@pytest.mark.parametrize("make", [tiny_vit, tiny_cnn])
def test_compiled_extraction_matches_eager_and_trains(make):
    torch.manual_seed(0)
    model = make()
    x = torch.randn(2, 3, 32, 32)
    request = FeatureRequest(embedding=True, layers=(0, -1), block_embeddings=(0,))
    extractor = Extractor(compile=True, backend="aot_eager")
    compiled = extractor(model, x, request)
    eager = extract_features(model, x, request)
    assert set(compiled.named()) == set(eager.named())
    for name, tensor in eager.named().items():
        torch.testing.assert_close(compiled.named()[name], tensor, rtol=1e-5, atol=1e-5)
    # gradients reach the weights through the compiled graph, as through the eager one
    model.train()
    extractor(model, x, FeatureRequest(embedding=True)).embedding.sum().backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)
    assert len(extractor._graphs) == 2  # one graph per request


def test_relations_stay_eager():
    model = tiny_vit()
    extractor = Extractor(compile=True, backend="aot_eager")
    features = extractor(model, torch.randn(1, 3, 32, 32), FeatureRequest(relations=(1,)))
    assert features.relations[1].shape[0] == 2 and not extractor._graphs


def test_a_compiled_teacher_gives_the_eager_teachers_features():
    model = tiny_cnn()
    teacher = Teacher("tiny", model, InputConfig((32, 32), (0.5,) * 3, (0.5,) * 3), "test")
    views = torch.rand(3, 3, 32, 32)
    eager = teacher(views, FeatureRequest(embedding=True)).embedding
    teacher.extractor = Extractor(compile=True, backend="aot_eager")
    torch.testing.assert_close(teacher(views, FeatureRequest(embedding=True)).embedding, eager, rtol=1e-5, atol=1e-5)


def test_compile_is_a_recipe_switch_for_teacher_and_student():
    recipe = distillkit.recipe.resolve_recipe({}, overrides=["teacher.compile=true", "student.compile=true"])
    assert recipe.teacher.compile and recipe.student.compile
    assert not distillkit.recipe.resolve_recipe({}).student.compile
