"""report.html and its plots, the per-epoch online k-NN, and `distillkit report`, on tiny real runs
(EfficientNet-Lite0 teacher and MobileNetV3-Small student at 32 px, 2 epochs of 2 steps)."""

from __future__ import annotations

import base64
import json
import re
import shutil
import warnings

import pytest
import torch
from PIL import Image
from torch import nn
from typer.testing import CliRunner

import distillkit
from distillkit import api
from distillkit.cli import app
from distillkit.data.sources import ImageData, TensorImages
from distillkit.errors import UsageError
from distillkit.recipe import Recipe, resolve_recipe
from distillkit.teachers import InputConfig
from distillkit.train.online import OnlineKnn

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
TINY = ["teacher.input_size=32", "strategy.seed.queue_size=64", "eval.max_train=64", "eval.max_test=32",
        "eval.probe_steps=5", "eval.latency_runs=1", "train.log_every=1"]


@pytest.fixture(scope="module")
def drop_path_student(tmp_path_factory):
    """A student that draws from the global RNG every step (drop path): a stray draw would change its losses."""
    spec = tmp_path_factory.mktemp("spec") / "mnv3-drop-path.yaml"
    spec.write_text("timm: mobilenetv3_small_100\ndescription: test student\ninput_size: 32\nchannels_last: true\n"
                    "model_args: {drop_path_rate: 0.2}\n")
    return str(spec)


def tiny_run(out, student, extra=(), **kwargs):
    options = dict(student=student, data="builtin:fashion-mnist", limit=64, batch_size=32, epochs=2, out=out,
                   set=TINY + list(extra), quiet=True)
    return distillkit.compress(**(options | kwargs))


@pytest.fixture(scope="module")
def finished(tmp_path_factory, drop_path_student, one_cpu_thread):
    return tiny_run(tmp_path_factory.mktemp("runs") / "on", drop_path_student, ["eval.online_images=64"])


def read_metrics(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def step_losses(run_dir):
    return [line["loss"] for line in read_metrics(run_dir) if "epoch_end" not in line]


def assert_valid_png(path):
    data = path.read_bytes()
    assert data.startswith(PNG_SIGNATURE)
    with Image.open(path) as image:
        image.verify()
    return data


def test_online_knn_is_recorded_at_every_epoch_end(finished):
    epochs = [line for line in read_metrics(finished.run_dir) if "epoch_end" in line]
    assert [line["epoch_end"] for line in epochs] == [1, 2]
    for line in epochs:
        assert 0.0 <= line["online_knn_top1"] <= 1.0
        assert line["online_knn_top1"] * 32 == pytest.approx(round(line["online_knn_top1"] * 32))  # of 32 images
        assert line["online_knn_seconds"] > 0
    assert finished.timings["online_eval"] == pytest.approx(sum(line["online_knn_seconds"] for line in epochs))


def test_online_knn_does_not_change_the_training(finished, drop_path_student, tmp_path):
    off = tiny_run(tmp_path / "off", drop_path_student, ["eval.online_images=0"])
    assert not any("online_knn_top1" in line for line in read_metrics(off.run_dir))
    losses = step_losses(finished.run_dir)
    assert len(losses) == 4 and losses == step_losses(off.run_dir)


def test_compress_writes_a_self_contained_report_with_the_runs_numbers(finished):
    run_dir = finished.run_dir
    page = (run_dir / "report.html").read_text(encoding="utf-8")
    saved = json.loads((run_dir / "result.json").read_text())
    for name in ("teacher", "student", "student_random_init"):
        row = saved["metrics"][name]
        assert f"{row['knn_top1']:.2%}" in page and f"{row['probe_top1']:.2%}" in page
        assert f"{row['params']:,}" in page
    assert f"{step_losses(run_dir)[-1]:.4f}" in page
    assert "efficientnet-lite0" in page and "seed" in page and "Missing" not in page
    for stem in ("loss", "online_knn", "accuracy", "size_latency"):
        png = assert_valid_png(run_dir / "plots" / f"{stem}.png")
        assert base64.b64encode(png).decode() in page  # embedded, not linked
    sources = re.findall(r'(?:src|href)="([^"]*)"', page)
    assert len(sources) == 4 and all(s.startswith("data:image/png;base64,") for s in sources)


def test_a_stopped_run_gets_a_report_that_says_what_is_missing(finished, tmp_path):
    run_dir = tmp_path / "stopped"
    shutil.copytree(finished.run_dir, run_dir)
    (run_dir / "result.json").unlink()
    with open(run_dir / "metrics.jsonl", "a") as f:
        f.write('{"step": 5, "loss"')  # killed while writing a line
    path = distillkit.report(run_dir)
    page = path.read_text(encoding="utf-8")
    assert "no result.json" in page and "an unreadable line was skipped" in page
    assert "4 logged so far" in page
    assert_valid_png(run_dir / "plots" / "loss.png")
    assert_valid_png(run_dir / "plots" / "online_knn.png")
    assert not (run_dir / "plots" / "accuracy.png").exists()  # the finished run's plot is not kept
    assert not (run_dir / "plots" / "size_latency.png").exists()


def test_cli_report_regenerates_and_refuses_a_folder_that_is_not_a_run(finished, tmp_path):
    run_dir = tmp_path / "copy"
    shutil.copytree(finished.run_dir, run_dir)
    (run_dir / "report.html").unlink()
    shutil.rmtree(run_dir / "plots")
    result = CliRunner().invoke(app, ["report", str(run_dir)])
    assert result.exit_code == 0, result.output
    assert "report.html" in result.output and (run_dir / "report.html").is_file()
    assert len(list((run_dir / "plots").glob("*.png"))) == 4

    result = CliRunner().invoke(app, ["report", str(tmp_path / "empty")])
    assert result.exit_code == 2 and "is not a folder" in " ".join(result.output.split())  # rich may wrap
    (tmp_path / "empty").mkdir()
    result = CliRunner().invoke(app, ["report", str(tmp_path / "empty")])
    assert result.exit_code == 2 and "is not a distillkit run folder" in " ".join(result.output.split())
    with pytest.raises(UsageError, match="no recipe.yaml"):
        distillkit.report(tmp_path / "empty")


def test_a_failing_report_does_not_lose_the_run_and_eval_off_is_reported(tmp_path, monkeypatch, one_cpu_thread):
    def broken(run_dir):
        raise OSError("simulated")

    monkeypatch.setattr(api, "report", broken)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = tiny_run(tmp_path / "run", "mobilenetv3-small", ["eval.enabled=false"], max_steps=1)
    assert any("report could not be written (OSError: simulated)" in str(w.message) for w in caught)
    assert (result.run_dir / "result.json").is_file() and not (result.run_dir / "report.html").exists()

    page = distillkit.report(result.run_dir).read_text(encoding="utf-8")
    assert page.count("not measured: eval.enabled is false") >= 2  # online k-NN and the comparison
    assert f"{result.metrics['student']['params']:,}" in page
    assert_valid_png(result.run_dir / "plots" / "size_latency.png")
    assert not (result.run_dir / "plots" / "online_knn.png").exists()


class ColourMean(nn.Module):
    """Embeds an image as its mean colour; records the training mode it ran in."""

    def __init__(self):
        super().__init__()
        self.scale = nn.Parameter(torch.ones(()))
        self.modes = []  # (training, grad enabled) of each call

    def forward(self, x):
        self.modes.append((self.training, torch.is_grad_enabled()))
        return x.mean((2, 3)) * self.scale


def colour_images(n):
    """n 8x8 images, class c pure red / green / blue."""
    labels = torch.arange(n) % 3
    images = torch.zeros(n, 3, 8, 8, dtype=torch.uint8)
    images[torch.arange(n), labels] = 200
    return TensorImages(images, labels)


def test_online_knn_scores_detached_in_eval_mode_and_leaves_the_rng_alone():
    recipe = Recipe()
    recipe.eval.online_images = 30
    images = ImageData(train=colour_images(30), train_all=colour_images(60), test=colour_images(12), num_classes=3,
                       source="colours")
    online = OnlineKnn.from_recipe(recipe, images)
    assert len(online.bank) == 30 and len(online.test) == 12  # at most 30 // 2 held-out images
    student = ColourMean().train()
    rng = torch.get_rng_state()
    record = online(student, InputConfig(size=(8, 8), mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0)), False)
    assert record["online_knn_top1"] == 1.0  # mean colours separate the classes perfectly
    assert student.modes and set(student.modes) == {(False, False)} and student.training
    assert torch.equal(torch.get_rng_state(), rng)

    unlabelled = ImageData(train=images.train, train_all=images.train_all, test=None, num_classes=None, source="x")
    assert OnlineKnn.from_recipe(recipe, unlabelled) is None
    recipe.eval.online_images = 0
    assert OnlineKnn.from_recipe(recipe, images) is None


@pytest.mark.parametrize("value", [-1, 1])
def test_online_images_must_be_off_or_at_least_two(value):
    with pytest.raises(UsageError, match="eval.online_images must be 0"):
        resolve_recipe(None, {}, overrides=[f"eval.online_images={value}"])
