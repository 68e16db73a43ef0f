"""The training budget (train.images, epochs, max_steps), sizes that adapt to the data, and the automatic
teacher cache: on when the run has more epochs than view slots, off with --no-teacher-cache, skipped with
a message when the disk has no room for it."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest
from safetensors.torch import load_file

import distillkit
from distillkit.errors import UsageError
from distillkit.recipe import TrainConfig
from distillkit.train.budget import plan_budget

pytestmark = pytest.mark.usefixtures("one_cpu_thread")

TINY = ["teacher.input_size=32", "student.input_size=32", "strategy.seed.queue_size=64", "eval.enabled=false"]


def test_budget_in_images_decides_the_steps_and_epochs():
    # 1000 images seen at batch 32 = ceil(31.25) = 32 steps; 10 steps an epoch -> 4 epochs, the last partial
    budget = plan_budget(TrainConfig(images=1000, batch_size=32, epochs=99), micro_batches=10)
    assert (budget.total_steps, budget.epochs, budget.steps_per_epoch) == (32, 4, 10)
    # grad_accum: an optimiser step sees batch x accum images
    budget = plan_budget(TrainConfig(images=1000, batch_size=32, grad_accum=2), micro_batches=10)
    assert (budget.total_steps, budget.epochs, budget.steps_per_epoch) == (16, 4, 5)
    # 10 micro-batches with grad_accum 3: Accelerate also steps at the epoch's end (3 + 3 + 3 + 1)
    assert plan_budget(TrainConfig(epochs=3, grad_accum=3), micro_batches=10).total_steps == 12
    # without images, epochs decide; max_steps caps either
    assert plan_budget(TrainConfig(epochs=3), micro_batches=10).total_steps == 30
    budget = plan_budget(TrainConfig(images=1000, batch_size=32, max_steps=12), micro_batches=10)
    assert (budget.total_steps, budget.epochs) == (12, 2)  # the epochs those 12 steps reach, not the 4 planned
    assert plan_budget(TrainConfig(epochs=3, max_steps=30), micro_batches=10).epochs == 3
    with pytest.raises(UsageError, match="grad_accum"):
        plan_budget(TrainConfig(grad_accum=4), micro_batches=3)


def run(out: Path, extra=(), **kwargs):
    options = dict(
        student="mobilenetv3-small", data="builtin:fashion-mnist", limit=64, batch_size=32, out=out, quiet=True
    )
    options.update(kwargs)
    return distillkit.compress(set=TINY + list(extra), **options)


def test_a_small_data_source_trains_the_whole_image_budget(tmp_path):
    result = run(tmp_path / "run", ["train.images=256", "train.log_every=1"], teacher_cache=False)
    assert result.steps == 8 and result.images_seen == 256  # 4 epochs of 2 batches of the 64 images
    epochs = [
        json.loads(line) for line in (result.run_dir / "metrics.jsonl").read_text().splitlines() if "epoch_end" in line
    ]
    assert [e["epoch_end"] for e in epochs] == [1, 2, 3, 4]
    saved = json.loads((result.run_dir / "result.json").read_text())
    assert saved["train_images"] == 64 and saved["images_seen"] == 256


def test_epochs_flag_wins_over_the_recipe_image_budget(tmp_path):
    recipe = tmp_path / "budget.yaml"
    recipe.write_text("train:\n  images: 100000\n")
    result = run(tmp_path / "run", epochs=1, teacher_cache=False, recipe=str(recipe))
    assert result.steps == 2 and result.recipe.train.images is None  # --epochs replaced the recipe's budget


def test_a_queue_longer_than_the_data_shrinks_to_it(tmp_path, capsys):
    result = run(tmp_path / "run", ["strategy.seed.queue_size=4096"], epochs=1, teacher_cache=False, quiet=False)
    assert "queue_size 4096 is more than the 64 training images" in capsys.readouterr().out
    assert result.recipe.strategy["seed"].queue_size == 32  # 64 images minus one batch of 32
    state = load_file(result.run_dir / "checkpoints" / "last" / "model.safetensors")
    queue = next(v for k, v in state.items() if k.endswith("queue.embeddings"))
    assert queue.shape[0] == 32


def test_the_teacher_cache_is_automatic_when_epochs_outnumber_view_slots(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("DISTILLKIT_CACHE", str(tmp_path / "user-cache"))
    entries = tmp_path / "user-cache" / "teacher-outputs"
    one_epoch = run(tmp_path / "one", ["data.view_slots=1"], epochs=1)
    assert one_epoch.teacher_cache is None and not entries.exists()  # 1 epoch, 1 slot: nothing to reuse
    two = run(tmp_path / "two", ["data.view_slots=1"], epochs=2, quiet=False)
    assert two.teacher_cache == str(entries) and len(list(entries.iterdir())) == 1
    said = " ".join(capsys.readouterr().out.split())
    # before filling it says what one image costs: SEED caches Lite0's 1280-d embedding of 1 view, float16
    assert f"per image and slot: teacher {1280 * 2 / 1e3:.1f} kB" in said, said
    off = run(tmp_path / "off", ["data.view_slots=1"], epochs=2, teacher_cache=False)
    assert off.teacher_cache is None
    fresh = run(tmp_path / "fresh", ["data.view_slots=null"], epochs=3)  # new views every epoch: nothing to reuse
    assert fresh.teacher_cache is None
    # 3 epochs planned, but train.max_steps stops the run inside its first: no view is ever seen twice, and
    # nothing is cached (a 60k-image teacher cache was reserved for a few steps before)
    capped = run(tmp_path / "capped", ["data.view_slots=1", "train.max_steps=1"], epochs=3)
    assert capped.steps == 1 and capped.teacher_cache is None and len(list(entries.iterdir())) == 1


@pytest.fixture
def disk(tmp_path):
    """`disk(size)`: a real tmpfs of `size` ("2m") mounted in tmp_path (root only), unmounted afterwards."""
    mounts = []

    def mount(size: str) -> Path:
        folder = tmp_path / f"disk-{size}"
        folder.mkdir()
        if (
            shutil.which("mount") is None
            or subprocess.run(
                ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)], capture_output=True
            ).returncode
            != 0
        ):
            pytest.skip("needs root to mount a tmpfs")
        mounts.append(folder)
        return folder

    yield mount
    for folder in mounts:
        subprocess.run(["umount", str(folder)], check=False)


@pytest.fixture
def tiny_disk(disk):
    """A real 2 MB tmpfs: a disk too small for a teacher cache and its safety margin."""
    return disk("2m")


def test_no_room_for_the_automatic_cache_falls_back_to_the_teacher(tmp_path, tiny_disk, monkeypatch, capsys):
    monkeypatch.setenv("DISTILLKIT_CACHE", str(tiny_disk))
    result = run(tmp_path / "run", ["data.view_slots=1"], epochs=2, quiet=False)
    assert result.teacher_cache is None and result.steps == 4
    assert "teacher cache skipped" in capsys.readouterr().out
    with pytest.raises(UsageError, match="needs more than"):  # an explicit folder is refused instead
        run(tmp_path / "explicit", ["data.view_slots=1"], epochs=2, teacher_cache=tiny_disk / "cache")


def test_a_disk_with_room_for_one_teacher_caches_that_one_and_recomputes_the_other(tmp_path, disk, capsys, monkeypatch):
    """agglomerate with Lite0 at 32 px (3.2 kB per image in float16) and a random ViT-Tiny at 128 px (its 64
    tokens: 25 kB): 256 MB of margin + Lite0's 0.2 MB fit in a 257 MB tmpfs, the ViT's 1.6 MB more do not."""
    room = disk("257m")
    monkeypatch.setenv("DISTILLKIT_CACHE", str(room))  # the automatic cache, in the user cache
    vit = ["teachers.vit.name=timm:vit_tiny_patch16_224", "teachers.vit.weights=random", "teachers.vit.input_size=128"]
    result = run(
        tmp_path / "run", ["data.view_slots=1", *vit], strategy="agglomerate", epochs=2, quiet=False
    )  # fmt: skip
    said = " ".join(capsys.readouterr().out.split())
    assert "needs more than" not in said and result.steps == 4
    assert "teacher cache: only teacher fits" in said and "Not cached, run every epoch: vit" in said, said
    entries = (room / "teacher-outputs").iterdir()
    cached = [json.loads((entry / "meta.json").read_text())["key"]["teacher"] for entry in entries]
    assert cached == ["efficientnet-lite0"]  # the role `teacher`


def test_view_slots_auto_gives_the_teacher_an_eighth_of_the_images_seen():
    from distillkit.data.views import view_slots
    from distillkit.recipe import resolve_recipe

    recipe = resolve_recipe({"data": {"view_slots": "auto"}, "train": {"images": 480000, "batch_size": 128}})
    for images, slots in ((60000, 1), (20000, 3), (5000, 12), (400000, 1)):
        budget = plan_budget(recipe.train, micro_batches=images // 128)
        seen = budget.total_steps * recipe.train.batch_size
        assert view_slots(recipe.data, seen, budget.epochs, images) == slots, images
    short = resolve_recipe({"data": {"view_slots": "auto"}, "train": {"epochs": 2}})
    budget = plan_budget(short.train, micro_batches=10)
    assert view_slots(short.data, budget.total_steps * 128, budget.epochs, 1280) == 1  # never more than the epochs
    with pytest.raises(UsageError, match="view_slots"):
        resolve_recipe({"data": {"view_slots": "many"}})


def test_grad_accum_trains_exactly_the_epochs_asked_for(tmp_path):
    """10 micro-batches an epoch with grad_accum 3 make 4 optimiser steps (Accelerate steps at the epoch's end
    too): --epochs 3 trains 3 whole epochs (12 steps), not 9 steps in 2.25 epochs."""
    result = run(tmp_path / "run", extra=["train.grad_accum=3"], limit=160, batch_size=16, epochs=3)
    lines = [json.loads(line) for line in (result.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [line["epoch_end"] for line in lines if "epoch_end" in line] == [1, 2, 3]
    assert result.steps == 12
