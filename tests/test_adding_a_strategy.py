"""README's "Adding a strategy", end to end: a new strategy written in one file (tests/helpers/toy_strategy.py)
registers itself, is validated as a recipe section, and trains through `distillkit.compress`."""

from __future__ import annotations

import importlib.util
import json
import sys
import warnings
from pathlib import Path

import pytest
import timm
import torch
import yaml

import distillkit
from distillkit.errors import UsageError
from distillkit.features import Features
from distillkit.recipe import resolve_recipe
from distillkit.strategies import STRATEGIES, StepInputs

pytestmark = pytest.mark.usefixtures("one_cpu_thread")


@pytest.fixture(scope="module")
def toy():
    """The one-file strategy, imported as a user would import their own module; unregistered afterwards."""
    spec = importlib.util.spec_from_file_location("toy_strategy", Path(__file__).parent / "helpers" / "toy_strategy.py")
    module = sys.modules["toy_strategy"] = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    yield module
    STRATEGIES.unregister("cosine")
    del sys.modules["toy_strategy"]


def test_the_new_loss_is_its_formula(toy):
    torch.manual_seed(0)
    strategy = toy.Cosine(toy.CosineConfig(), student_width=6, teacher_width=4)
    student = [Features(embedding=torch.randn(5, 6)) for _ in range(2)]
    teacher = [Features(embedding=torch.randn(5, 4)) for _ in range(2)]
    got = strategy(StepInputs(teacher, student, None, 0.0))["cosine"]
    expected = 0.0
    for s, t in zip(student, teacher):  # 1 - cos by hand: dot product over the product of the norms
        p = s.embedding @ strategy.head.weight.T + strategy.head.bias
        expected += (1 - (p * t.embedding).sum(1) / (p.norm(dim=1) * t.embedding.norm(dim=1))).mean() / 2
    assert got.item() == pytest.approx(expected.item(), rel=1e-6)


def test_its_recipe_section_is_validated_like_any_other(toy):
    assert "cosine" in STRATEGIES.names()
    recipe = resolve_recipe({"strategy": {"cosine": {"head_scale": 0.5}}})
    assert recipe.strategy["cosine"] == toy.CosineConfig(head_scale=0.5)
    with pytest.raises(UsageError, match=r"strategy.cosine.head_scale must be positive"):
        resolve_recipe({"strategy": {"cosine": {"head_scale": 0}}})
    with pytest.raises(UsageError, match=r"strategy.cosine"):
        resolve_recipe({"strategy": {"cosine": {"head_sclae": 1.0}}})


def test_it_trains_through_compress_and_the_export_loads_in_timm(toy, tmp_path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = distillkit.compress(
            strategy="cosine",
            limit=128,
            batch_size=32,
            max_steps=24,
            lr=0.05,
            out=tmp_path / "run",
            quiet=True,
            set=[
                "eval.max_train=64",
                "eval.max_test=32",
                "eval.probe_steps=5",
                "eval.latency_runs=1",
                "eval.online_images=0",
                "data.teacher_cache=null",
                "train.log_every=4",
            ],
        )
    assert result.steps == 24
    saved = yaml.safe_load((result.run_dir / "recipe.yaml").read_text())
    assert saved["strategy"] == {"cosine": {"weight": 1.0, "head_scale": 1.0}}
    losses = [
        json.loads(line)["cosine"]
        for line in (result.run_dir / "metrics.jsonl").read_text().splitlines()
        if '"cosine"' in line and '"step"' in line and "epoch_end" not in line
    ]
    assert len(losses) >= 4 and sum(losses[-2:]) < sum(losses[:2])  # it learns
    model = timm.create_model(f"local-dir:{result.student_dir}", pretrained=True)
    assert not any(name.startswith("head") for name, _ in model.named_parameters())  # the Linear head stays behind
