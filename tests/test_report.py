"""report.html and its plots, the per-epoch online k-NN, and `distillkit report`, on tiny real runs
(EfficientNet-Lite0 teacher and MobileNetV3-Small student at 32 px, 2 epochs of 2 steps)."""

from __future__ import annotations

import base64
import html
import importlib
import json
import re
import shutil

import pytest
import torch
import yaml
from PIL import Image
from torch import nn
from typer.testing import CliRunner

import distillkit
from distillkit import api
from distillkit.cli import app
from distillkit.data.sources import ImageData, TensorImages
from distillkit.errors import UsageError
from distillkit.evaluate import OnlineKnn
from distillkit.recipe import Recipe, resolve_recipe
from distillkit.student import Student
from distillkit.teachers import InputConfig
from distillkit.verdict import gap_recovered, verdict

report_module = importlib.import_module("distillkit.report")  # distillkit.report is the function
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
TINY = [
    "teacher.input_size=32",
    "strategy.seed.queue_size=64",
    "eval.max_train=64",
    "eval.max_test=32",
    "eval.probe_steps=5",
    "eval.latency_runs=1",
    "train.log_every=1",
]


@pytest.fixture(scope="module")
def drop_path_student(tmp_path_factory):
    """A student that draws from the global RNG every step (drop path): a stray draw would change its losses."""
    spec = tmp_path_factory.mktemp("spec") / "mnv3-drop-path.yaml"
    spec.write_text(
        "timm: mobilenetv3_small_100\ndescription: test student\ninput_size: 32\nchannels_last: true\n"
        "model_args: {drop_path_rate: 0.2}\n"
    )
    return str(spec)


def tiny_run(out, student, extra=(), **kwargs):
    # no teacher cache: a run that reads float16 teacher outputs cached by an earlier one has other losses
    options = dict(
        student=student,
        data="builtin:fashion-mnist",
        limit=64,
        batch_size=32,
        epochs=2,
        out=out,
        set=TINY + list(extra),
        quiet=True,
        teacher_cache=False,
    )
    return distillkit.compress(**(options | kwargs))


@pytest.fixture(scope="module")
def finished(tmp_path_factory, drop_path_student, one_cpu_thread):
    return tiny_run(tmp_path_factory.mktemp("runs") / "on", drop_path_student, ["eval.online_images=64"])


def read_metrics(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def step_losses(run_dir):
    return [line["loss"] for line in read_metrics(run_dir) if "step" in line and "epoch_end" not in line]


def assert_valid_png(path):
    data = path.read_bytes()
    assert data.startswith(PNG_SIGNATURE)
    with Image.open(path) as image:
        image.verify()
    return data


def test_online_knn_is_recorded_at_every_epoch_end(finished):
    lines = read_metrics(finished.run_dir)
    [reference] = [line for line in lines if line.get("online_reference")]
    assert lines.index(reference) == 0  # written before the first step
    for key in ("teacher_knn_top1", "student_random_init_knn_top1"):
        assert 0.0 <= reference[key] <= 1.0
    epochs = [line for line in lines if "epoch_end" in line]
    assert [line["epoch_end"] for line in epochs] == [1, 2]
    for line in epochs:
        assert 0.0 <= line["online_knn_top1"] <= 1.0
        assert line["online_knn_top1"] * 32 == pytest.approx(round(line["online_knn_top1"] * 32))  # of 32 images
        assert line["online_knn_seconds"] > 0
    # the epochs' online k-NN and the reference levels scored before the first epoch
    assert finished.timings["online_eval"] >= sum(line["online_knn_seconds"] for line in epochs)


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
    assert 'class="verdict ' in page and "on the same split: teacher " in page
    assert f"trained on {saved['train_images']:,} images, {saved['images_seen']:,} images seen" in page
    assert "requested limit" not in page
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


def test_a_failing_report_does_not_lose_the_run_and_eval_off_is_reported(tmp_path, monkeypatch, one_cpu_thread, tells):
    def broken(run_dir):
        raise OSError("simulated")

    monkeypatch.setattr(api, "report", broken)
    with tells(r"report could not be written \(OSError: simulated\)"):
        result = tiny_run(tmp_path / "run", "mobilenetv3-small", ["eval.enabled=false"], max_steps=1)
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
    images = ImageData(
        train=colour_images(30), train_all=colour_images(60), test=colour_images(12), num_classes=3, source="colours"
    )
    online = OnlineKnn.from_recipe(recipe, images)
    assert len(online.bank) == 30 and len(online.test) == 12  # at most 30 // 2 held-out images
    student = ColourMean().train()
    rng = torch.get_rng_state()
    record = online(Student(student, None, InputConfig(size=(8, 8), mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0)), False))
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


# -- the verdict and what the run trained on, from fake run folders (no training) ----------------------

GOOD = {
    "teacher": {"knn_top1": 0.861, "probe_top1": 0.869, "params": 4_652_008, "latency_ms": 9.81},
    "student": {"knn_top1": 0.855, "probe_top1": 0.866, "params": 1_517_856, "latency_ms": 2.47},
    "student_random_init": {"knn_top1": 0.760, "probe_top1": 0.779, "params": 1_517_856, "latency_ms": 2.45},
}
BAD = GOOD | {"student": GOOD["student"] | {"knn_top1": 0.702, "probe_top1": 0.741}}  # below its random init


def fake_run(path, metrics=GOOD, *, new_fields=True, epochs=20, steps_per_epoch=10, stored_gap=None):
    """A run folder as compress writes it, with realistic numbers; `new_fields=False`: as runs written
    before train_images / images_seen / gap_recovered / the online_reference line existed."""
    path.mkdir(parents=True)
    batch = 256
    recipe = {
        "teacher": {"name": "efficientnet-lite0"},
        "student": {"name": "mobilenetv3-small"},
        "strategy": {"seed": {"weight": 1.0}, "feature": {"weight": 0.5}},
        "data": {"source": "builtin:fashion-mnist", "limit": 30000},
        "train": {"epochs": 1, "images": 480_000 if new_fields else None, "batch_size": batch, "lr": 0.001},
        "eval": {"online_images": 1000},
    }
    (path / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    lines = (
        [{"online_reference": True, "teacher_knn_top1": 0.85, "student_random_init_knn_top1": 0.70}]
        if new_fields
        else []
    )
    step = 0
    for epoch in range(epochs):
        for _ in range(steps_per_epoch):
            step += 1
            seed, feature = 4.2 * 0.5 ** (step / 60) + 0.9, 0.8 * 0.5 ** (step / 120) + 0.15
            lines.append(
                {
                    "step": step,
                    "epoch": epoch,
                    "seed": seed,
                    "feature": feature,
                    "loss": seed + feature,
                    "lr": 0.001 * (1 - step / 400),
                    "images_per_s": 812.4,
                }
            )
        lines.append(
            {
                "epoch_end": epoch + 1,
                "step": step,
                "seconds": 31.2,
                "seed": seed,
                "feature": feature,
                "online_knn_top1": 0.70 + 0.14 * (epoch + 1) / epochs,
                "online_knn_seconds": 0.41,
            }
        )
    (path / "metrics.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    result = {
        "metrics": {"eval_split": {"train_images": 5000, "test_images": 2000}, **metrics},
        "steps": step,
        "data_source": "builtin:fashion-mnist (5000 train / 2000 test)",
        "timings": {"setup": 4.1, "train": 624.0, "evaluate": 38.2, "total": 671.5},
    }
    if new_fields:
        result |= {"train_images": 5000, "images_seen": step * batch}
        result["metrics"]["gap_recovered"] = stored_gap or gap_recovered(metrics)
    (path / "result.json").write_text(json.dumps(result))
    return path


def sections(page):
    """Where each part of the page starts."""
    return {
        name: page.index(marker)
        for name, marker in (
            ("title", "<h1>"),
            ("verdict", 'class="verdict'),
            ("plots", "<h2>Plots</h2>"),
            ("results", "<h2>Results</h2>"),
            ("recipe", "<h2>Recipe</h2>"),
        )
    }


def test_the_report_leads_with_a_good_verdict(tmp_path):
    page = distillkit.report(fake_run(tmp_path / "good")).read_text(encoding="utf-8")
    at = sections(page)
    assert at["title"] < at["verdict"] < at["plots"] < at["results"] < at["recipe"]
    assert '<div class="verdict good">' in page and 'class="warning"' not in page
    text = verdict(GOOD)["text"]
    assert text.startswith("the student recovers 94% of the k-NN gap")
    assert (text[0].upper() + text[1:]) in page
    assert "<td>student</td>" in page and "94% / 97%" in page  # the gap recovered column, student row
    assert page.count("94% / 97%") == 1


def test_a_bad_student_gets_a_red_warning_whatever_result_json_claims(tmp_path):
    run_dir = fake_run(tmp_path / "bad", BAD, stored_gap={"knn_top1": 0.99, "probe_top1": 0.99})
    page = distillkit.report(run_dir).read_text(encoding="utf-8")
    assert '<div class="verdict bad">' in page and "verdict good" not in page
    judged = verdict(BAD)
    assert judged["level"] == "bad" and judged["advice"]
    warning = page.index('<div class="warning">')
    assert sections(page)["verdict"] < warning < sections(page)["plots"]
    assert html.escape(judged["advice"]) in page
    assert "99%" not in page  # the stored gap is not trusted
    assert "-57% / -42%" in page
    assert page.count("no better than") == 1  # said once, in the warning, not again in the verdict's label


def test_fair_and_missing_verdicts(tmp_path):
    fair = GOOD | {"student": GOOD["student"] | {"knn_top1": 0.80}}
    assert '<div class="verdict fair">' in distillkit.report(fake_run(tmp_path / "fair", fair)).read_text()
    no_accuracy = {name: {"params": row["params"], "latency_ms": row["latency_ms"]} for name, row in GOOD.items()}
    page = distillkit.report(fake_run(tmp_path / "unlabelled", no_accuracy)).read_text()
    assert '<div class="verdict unknown">' in page and "no k-NN / linear-probe accuracies" in page


def test_the_recipe_summary_states_the_data_the_run_trained_on(tmp_path):
    page = distillkit.report(fake_run(tmp_path / "new")).read_text(encoding="utf-8")
    assert "trained on 5,000 images, 51,200 images seen" in page
    assert "limit" not in page and "30000" not in page and "30,000" not in page
    assert "480,000 images; batch 256" in page and "1 epoch" not in page  # the planned budget


def test_an_old_run_folder_without_the_new_fields_still_renders(tmp_path, monkeypatch):
    calls = []
    draw = report_module.plots.online_knn_curve

    def spy(*args, **kwargs):
        calls.append(kwargs)
        return draw(*args, **kwargs)

    monkeypatch.setattr(report_module.plots, "online_knn_curve", spy)
    run_dir = fake_run(tmp_path / "old", new_fields=False)
    page = distillkit.report(run_dir).read_text(encoding="utf-8")
    assert calls == [{"teacher": None, "random_init": None}]
    assert '<div class="verdict good">' in page  # from the model rows, as before
    assert "requested limit 30,000 images" in page and "trained on" not in page
    assert "planned</th><td>1 epoch; batch 256" in page
    assert "Missing" not in page and "on the same split" not in page
    for stem in ("loss", "online_knn", "accuracy", "size_latency"):
        assert_valid_png(run_dir / "plots" / f"{stem}.png")


def test_the_online_knn_plot_gets_the_reference_lines(tmp_path, monkeypatch):
    calls = []
    draw = report_module.plots.online_knn_curve

    def spy(epochs, top1, **kwargs):
        calls.append((list(epochs), list(top1), kwargs))
        return draw(epochs, top1, **kwargs)

    monkeypatch.setattr(report_module.plots, "online_knn_curve", spy)
    run_dir = fake_run(tmp_path / "new", epochs=3)
    page = distillkit.report(run_dir).read_text(encoding="utf-8")
    [(epochs, top1, references)] = calls
    assert epochs == [1, 2, 3] and top1[-1] == pytest.approx(0.84)
    assert references == {"teacher": 0.85, "random_init": 0.70}
    assert "on the same split: teacher 85.00%, student at random init 70.00%" in page
    with_lines = assert_valid_png(run_dir / "plots" / "online_knn.png")
    assert with_lines != draw(epochs, top1)
    assert with_lines == draw(epochs, top1, teacher=0.85, random_init=0.70)


def test_a_long_per_epoch_table_folds_away_and_a_short_one_does_not(tmp_path):
    long = distillkit.report(fake_run(tmp_path / "long", epochs=20)).read_text(encoding="utf-8")
    assert "<details><summary>20 epochs: show the table</summary><table>" in long
    short = distillkit.report(fake_run(tmp_path / "short", epochs=report_module.FOLD_ROWS)).read_text()
    assert "<details>" not in short and "<td>8</td>" in short
