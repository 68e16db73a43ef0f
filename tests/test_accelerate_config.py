"""What `accelerate launch` / `accelerate config` set is respected: precision (train.precision auto), gradient
accumulation (one number for Accelerate and the schedule), and checkpoints through Accelerate's save_state."""

from __future__ import annotations

import pytest
import torch
import yaml
from safetensors.torch import load_file
from test_faults import TINY, tiny  # tests/ is on the path (pytest's rootdir imports)

import distillkit
from distillkit.errors import UsageError
from distillkit.recipe import resolve_recipe
from distillkit.train import loop
from distillkit.train.launch import GRAD_ACCUM_ENV, PRECISION_ENV, resolve_launch


def launched(monkeypatch, **env: str) -> None:
    """The environment `accelerate launch` gives its processes (only the variables distillkit reads)."""
    for name in (PRECISION_ENV, GRAD_ACCUM_ENV):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)


def test_precision_auto_is_accelerate_launch_s_and_an_explicit_one_wins(monkeypatch, tells):
    assert resolve_recipe().train.precision == "auto"  # the default leaves it to accelerate
    launched(monkeypatch)
    assert resolve_launch(resolve_recipe()).train.precision == "fp32"  # plain python: fp32
    launched(monkeypatch, ACCELERATE_MIXED_PRECISION="no")
    assert resolve_launch(resolve_recipe()).train.precision == "fp32"
    launched(monkeypatch, ACCELERATE_MIXED_PRECISION="bf16")
    assert resolve_launch(resolve_recipe()).train.precision == "bf16"
    accelerator = loop.make_accelerator(resolve_recipe())
    assert accelerator.mixed_precision == "bf16"
    explicit = resolve_recipe(options={"precision": "fp32"})
    with tells("train.precision fp32 .* wins over accelerate's mixed precision bf16"):
        accelerator = loop.make_accelerator(explicit)
    assert accelerator.mixed_precision == "no" and resolve_launch(explicit).train.precision == "fp32"
    launched(monkeypatch, ACCELERATE_MIXED_PRECISION="fp8")
    with pytest.raises(UsageError, match="ACCELERATE_MIXED_PRECISION=fp8 .* is not a precision distillkit"):
        resolve_launch(resolve_recipe())


def test_grad_accum_has_one_source(monkeypatch):
    launched(monkeypatch)
    assert resolve_recipe().train.grad_accum is None
    assert resolve_launch(resolve_recipe()).train.grad_accum == 1
    assert resolve_launch(resolve_recipe(overrides=["train.grad_accum=3"])).train.grad_accum == 3
    launched(monkeypatch, ACCELERATE_GRADIENT_ACCUMULATION_STEPS="2")
    assert resolve_launch(resolve_recipe()).train.grad_accum == 2
    assert resolve_launch(resolve_recipe(overrides=["train.grad_accum=2"])).train.grad_accum == 2
    with pytest.raises(UsageError, match="train.grad_accum 3 contradicts ACCELERATE_GRADIENT_ACCUMULATION_STEPS=2"):
        resolve_launch(resolve_recipe(overrides=["train.grad_accum=3"]))
    with pytest.raises(UsageError, match="train.grad_accum must be a positive number or null"):
        resolve_recipe(overrides=["train.grad_accum=0"])


def test_the_schedule_counts_the_steps_accelerate_takes_with_the_launchers_grad_accum(tmp_path, monkeypatch):
    """ACCELERATE_GRADIENT_ACCUMULATION_STEPS=2, the recipe silent: 64 images in batches of 16 are 4
    micro-batches an epoch, 2 optimiser steps; 2 epochs are 4 steps, planned and taken (the schedule counting
    the recipe's 1 planned 8 while Accelerate took 4, and the warm-up and cosine never finished)."""
    launched(monkeypatch, ACCELERATE_GRADIENT_ACCUMULATION_STEPS="2")
    real_step, stepped, lrs = torch.optim.SGD.step, [], []

    def counted(self, *args, **kwargs):  # the real optimiser's steps: Accelerate's wrapper holds the others back
        stepped.append(True)
        lrs.append(self.param_groups[0]["lr"])
        return real_step(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.SGD, "step", counted)
    result = tiny(tmp_path / "run", epochs=2, set=TINY + ["train.warmup_fraction=0.5"])
    assert result.steps == len(stepped) == 4
    assert result.images_seen == 4 * 16 * 2
    # warm-up over 2 of the 4 planned steps, then cosine: the last step's factor is cos(pi / 2) / 2 + 1 / 2
    lr = result.recipe.train.lr
    assert lrs == pytest.approx([lr * 0.5, lr, lr, lr * 0.5])
    for saved in (tmp_path / "run" / "recipe.yaml", tmp_path / "run" / "checkpoints" / "last" / "recipe.yaml"):
        train = yaml.safe_load(saved.read_text())["train"]
        assert (train["grad_accum"], train["precision"]) == (2, "fp32")  # recorded resolved


def test_checkpoints_are_accelerates_save_state_and_earlier_ones_still_resume_exactly(tmp_path, monkeypatch):
    """The checkpoint holds save_state's files (model.safetensors with the student's and objective's own names,
    optimizer.bin, random_states_0.pkl) and our run state. A checkpoint in the layout before save_state (the
    optimiser inside train_state.pt) still resumes, bit-identical to the run never stopped."""
    launched(monkeypatch)
    extra = ["train.checkpoint_every=3", "strategy.seed.queue_size=32"]
    options = dict(epochs=2, teacher_cache=False, set=TINY + extra)
    whole = tiny(tmp_path / "whole", **options)
    files = sorted(p.name for p in (whole.run_dir / "checkpoints" / "last").iterdir())
    assert files == ["model.safetensors", "optimizer.bin", "random_states_0.pkl", "recipe.yaml", "train_state.pt"]
    weights = load_file(whole.run_dir / "checkpoints" / "last" / "model.safetensors")
    assert any(k.startswith("student.") for k in weights) and any(k.startswith("objective.") for k in weights)

    real_save = loop.save_checkpoint

    def crash_after_step_3(run_dir, accelerator, state, recipe):
        real_save(run_dir, accelerator, state, recipe)
        raise KeyboardInterrupt("simulated crash after the step-3 checkpoint")

    monkeypatch.setattr(loop, "save_checkpoint", crash_after_step_3)
    with pytest.raises(KeyboardInterrupt):
        tiny(tmp_path / "crashed", **options)
    monkeypatch.setattr(loop, "save_checkpoint", real_save)
    last = tmp_path / "crashed" / "checkpoints" / "last"
    state = torch.load(last / "train_state.pt", weights_only=True)
    assert (state["step"], "optimizer" in state) == (3, False)
    state["optimizer"] = torch.load(last / "optimizer.bin", weights_only=True)  # the earlier layout
    torch.save(state, last / "train_state.pt")
    for name in ("optimizer.bin", "random_states_0.pkl"):
        (last / name).unlink()

    resumed = tiny(tmp_path / "crashed", resume=True, **options)
    assert resumed.steps == whole.steps == 8
    a, b = weights, load_file(last / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert (last / "optimizer.bin").is_file()  # the resumed run saved in the new layout


def test_a_resume_whose_auto_precision_resolves_differently_is_a_recipe_change(tmp_path, monkeypatch):
    launched(monkeypatch)
    tiny(tmp_path / "run", max_steps=1)
    launched(monkeypatch, ACCELERATE_MIXED_PRECISION="bf16")  # resumed under accelerate launch --mixed_precision bf16
    with pytest.raises(UsageError, match=r"(?s)train.precision: 'fp32' -> 'bf16'.*--force-resume"):
        distillkit.compress(
            recipe="default", student="mobilenetv3-small", limit=64, batch_size=16, max_steps=2,
            out=tmp_path / "run", set=list(TINY), quiet=True, resume=True,
        )  # fmt: skip
