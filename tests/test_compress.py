"""End-to-end runs of `compress`, small enough for CI: real EfficientNet-Lite0 teacher at 32 px,
MobileNetV3-Small student at 32 px, a few steps on a few hundred images."""

from __future__ import annotations

import json

import numpy as np
import pytest
import timm
import torch
from huggingface_hub import ModelCard
from PIL import Image
from safetensors.torch import load_file
from typer.testing import CliRunner

import distillkit
from distillkit.cli import app
from distillkit.errors import UsageError
from distillkit.train import loop

TINY = [
    "teacher.input_size=32",
    "strategy.seed.queue_size=64",
    "eval.max_train=200",
    "eval.max_test=100",
    "eval.probe_steps=20",
    "eval.latency_runs=2",
]


def tiny_run(out, **kwargs):
    options = dict(
        student="mobilenetv3-small",
        data="builtin:fashion-mnist",
        limit=128,
        batch_size=32,
        out=out,
        set=list(TINY),
        quiet=True,
    )
    options.update(kwargs)
    return distillkit.compress(**options)


def test_api_run_writes_everything_and_exports_the_trained_student(tmp_path):
    result = tiny_run(tmp_path / "run", epochs=1)
    assert result.steps == 4  # 128 images / 32 per batch
    for name in ("teacher", "student", "student_random_init"):
        row = result.metrics[name]
        assert 0.0 <= row["knn_top1"] <= 1.0 and 0.0 <= row["probe_top1"] <= 1.0
        assert row["params"] > 0 and row["latency_ms"] > 0
    assert result.metrics["teacher"]["params"] > result.metrics["student"]["params"]
    assert set(result.timings) >= {"setup", "train", "evaluate", "export", "total"}

    lines = [json.loads(line) for line in (result.run_dir / "metrics.jsonl").read_text().splitlines()]
    steps = [line for line in lines if "loss" in line]
    assert steps and all(np.isfinite(line["loss"]) and "seed" in line for line in steps)
    assert any("epoch_end" in line for line in lines)
    saved = json.loads((result.run_dir / "result.json").read_text())
    assert saved["steps"] == 4 and saved["metrics"]["student"]["params"] == result.metrics["student"]["params"]

    # The export holds exactly the checkpoint's student weights, and plain timm loads it.
    exported = load_file(str(result.student_dir / "model.safetensors"))
    checkpoint = load_file(str(result.run_dir / "checkpoints" / "last" / "model.safetensors"))
    student_part = {k[len("student.") :]: v for k, v in checkpoint.items() if k.startswith("student.")}
    assert exported.keys() == student_part.keys()
    assert all(torch.equal(exported[k], student_part[k]) for k in exported)
    assert any(k.startswith("objective.strategies.seed.queue") for k in checkpoint)

    model = timm.create_model(f"local-dir:{result.student_dir}", pretrained=True).eval()
    config = json.loads((result.student_dir / "config.json").read_text())
    assert config["architecture"] == "mobilenetv3_small_100"
    assert config["pretrained_cfg"]["input_size"] == [3, 32, 32]
    x = torch.rand(2, 3, 32, 32)
    assert torch.allclose(model(x), distillkit.load_student(result.run_dir)(x), atol=1e-6)

    # The model card's Hub metadata names the data and carries the run's own accuracies
    card = ModelCard.load(result.student_dir / "README.md").data
    assert card.datasets == ["zalando-datasets/fashion_mnist"] and card.library_name == "timm"
    assert {r.metric_name: r.metric_value for r in card.eval_results} == {
        "k-NN top-1": round(result.metrics["student"]["knn_top1"], 4),
        "linear probe top-1": round(result.metrics["student"]["probe_top1"], 4),
    }


def test_resume_after_a_crash_gives_the_uninterrupted_weights(tmp_path, monkeypatch):
    # each run has a teacher cache of its own (the default recipe caches): a shared one would serve the
    # second run the first run's float16 outputs
    whole = tiny_run(tmp_path / "whole", epochs=2, set=TINY + ["eval.enabled=false"], teacher_cache=tmp_path / "c1")

    real_save = loop.save_checkpoint

    def crash_after_first_checkpoint(*args, **kwargs):
        real_save(*args, **kwargs)
        raise KeyboardInterrupt("simulated crash after epoch 1")

    monkeypatch.setattr(loop, "save_checkpoint", crash_after_first_checkpoint)
    with pytest.raises(KeyboardInterrupt):
        tiny_run(tmp_path / "crashed", epochs=2, set=TINY + ["eval.enabled=false"], teacher_cache=tmp_path / "c2")
    monkeypatch.setattr(loop, "save_checkpoint", real_save)

    resumed = tiny_run(
        tmp_path / "crashed", epochs=2, set=TINY + ["eval.enabled=false"], resume=True, teacher_cache=tmp_path / "c2"
    )
    assert resumed.steps == whole.steps == 8
    a = load_file(str(whole.run_dir / "checkpoints" / "last" / "model.safetensors"))
    b = load_file(str(resumed.run_dir / "checkpoints" / "last" / "model.safetensors"))
    assert a.keys() == b.keys()
    for key in a:
        assert torch.allclose(a[key], b[key], atol=1e-6, rtol=1e-5), key


def test_resume_with_a_changed_recipe_is_refused_and_leaves_the_run_as_it_was(tmp_path):
    tiny_run(tmp_path / "run", max_steps=2, set=TINY + ["eval.enabled=false"])
    saved = (tmp_path / "run" / "recipe.yaml").read_bytes()
    with pytest.raises(UsageError, match=r"train.lr: 0.15 -> 0.1"):
        tiny_run(tmp_path / "run", max_steps=4, lr=0.1, set=TINY + ["eval.enabled=false"], resume=True)
    assert (tmp_path / "run" / "recipe.yaml").read_bytes() == saved


def test_the_readme_resume_command_continues_a_run_started_with_flags(tmp_path):
    """`distillkit compress --out DIR --resume`: the run's own recipe, not the default plus nothing."""
    first = tiny_run(tmp_path / "run", max_steps=2, lr=0.05, seed=3, set=TINY + ["eval.enabled=false"])
    assert first.steps == 2
    resumed = distillkit.compress(out=tmp_path / "run", resume=True, max_steps=3, quiet=True)
    assert resumed.steps == 3
    assert resumed.recipe.train.lr == 0.05 and resumed.recipe.train.seed == 3
    assert resumed.recipe.student.name == "mobilenetv3-small" and resumed.recipe.data.limit == 128


def test_overwrite_keeps_an_export_of_the_previous_run_and_says_what_it_is(tmp_path):
    """`distillkit export RUN` writes RUN/student-onnx beside the student: --overwrite refuses to delete it
    and names it as an export, so the user knows why their run folder is not theirs to clear."""
    tiny_run(tmp_path / "run", max_steps=1, set=TINY + ["eval.enabled=false"])
    exported = distillkit.export(tmp_path / "run", format="torchscript")
    assert exported.out_dir.parent == tmp_path / "run"
    with pytest.raises(UsageError, match=rf"{exported.out_dir.name} is an export of the run there"):
        tiny_run(tmp_path / "run", max_steps=1, set=TINY + ["eval.enabled=false"], overwrite=True)
    assert exported.out_dir.is_dir() and any(exported.out_dir.iterdir())


def test_an_existing_run_is_not_overwritten_by_accident(tmp_path):
    tiny_run(tmp_path / "run", max_steps=1, set=TINY + ["eval.enabled=false"])
    with pytest.raises(UsageError, match="already holds a run"):
        tiny_run(tmp_path / "run", max_steps=1, set=TINY + ["eval.enabled=false"])
    notes = tmp_path / "run" / "my-notes.txt"
    notes.write_text("keep me", encoding="utf-8")
    stale = tmp_path / "run" / "plots" / "stale.png"
    stale.parent.mkdir(exist_ok=True)
    stale.write_bytes(b"old")
    before = sorted(p.relative_to(tmp_path) for p in (tmp_path / "run").rglob("*"))
    with pytest.raises(UsageError, match="holds files a run did not write: my-notes.txt"):
        tiny_run(tmp_path / "run", max_steps=1, set=TINY + ["eval.enabled=false"], overwrite=True)
    assert sorted(p.relative_to(tmp_path) for p in (tmp_path / "run").rglob("*")) == before  # nothing deleted
    assert notes.read_text(encoding="utf-8") == "keep me"
    notes.unlink()
    again = tiny_run(tmp_path / "run", max_steps=1, set=TINY + ["eval.enabled=false"], overwrite=True)
    assert again.steps == 1
    assert not stale.exists()  # the previous run's files were replaced
    assert len((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()) == 1


def test_unlabelled_folder_trains_and_reports_size_and_latency(tmp_path):
    rng = np.random.default_rng(0)
    folder = tmp_path / "images"
    folder.mkdir()
    for i in range(40):
        Image.fromarray(rng.integers(0, 255, (20, 24, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    result = tiny_run(tmp_path / "run", data=str(folder), limit=None, batch_size=16, max_steps=2)
    assert result.steps == 2
    assert "knn_top1" not in result.metrics["student"]
    assert result.metrics["student"]["latency_ms"] > 0


def test_cli_compress_runs_end_to_end(tmp_path):
    args = [
        "compress",
        "--student",
        "mobilenetv3-small",
        "--limit",
        "64",
        "--batch-size",
        "32",
        "--max-steps",
        "2",
        "--out",
        str(tmp_path / "cli"),
        "--quiet",
        "--seed",
        "1",
        "--precision",
        "fp32",
    ]
    for item in TINY:
        args += ["--set", item]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert (tmp_path / "cli" / "student" / "model.safetensors").is_file()
    recipe = (tmp_path / "cli" / "recipe.yaml").read_text()
    assert "seed: 1" in recipe and "max_steps: 2" in recipe


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_mixed_precision_runs_on_cpu_with_finite_losses(tmp_path, precision):
    result = tiny_run(tmp_path / precision, max_steps=3, precision=precision, set=TINY + ["eval.enabled=false"])
    assert result.steps == 3
    lines = [json.loads(line) for line in (result.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert all(np.isfinite(line["seed"]) for line in lines if "seed" in line)
