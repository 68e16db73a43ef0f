"""The console table, the verdict and report.html of a pretraining run (`distillkit pretrain bootleg`), from
run folders written by hand in the layout pretrain writes (recipe.yaml, metrics.jsonl, result.json,
bootleg.pth, teacher/); no training. The numbers the tests expect are worked out by hand from the metrics."""

from __future__ import annotations

import base64
import html
import importlib
import json
import re

import yaml
from PIL import Image
from rich.console import Console

import distillkit
from distillkit.summary import print_results
from distillkit.verdict import pretraining_verdict, run_verdict, signed_points, verdict

report_module = importlib.import_module("distillkit.report")  # distillkit.report is the function
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"

# a ViT-Tiny-sized run on Fashion-MNIST: the target encoder 20.7 k-NN and 18.5 probe points above random init
GOOD = {
    "target_encoder": {"knn_top1": 0.612, "probe_top1": 0.655, "params": 5_526_336, "latency_ms": 3.42},
    "encoder": {"knn_top1": 0.598, "probe_top1": 0.641, "params": 5_526_336, "latency_ms": 3.39},
    "random_init": {"knn_top1": 0.405, "probe_top1": 0.47, "params": 5_526_336, "latency_ms": 3.41},
}
# the target encoder 1.5 k-NN points below its random init and level with it on the probe
BAD = GOOD | {"target_encoder": GOOD["target_encoder"] | {"knn_top1": 0.39, "probe_top1": 0.47}}
GOOD_TEXT = (
    "the target encoder (the teacher) is 20.7 points above its random init on k-NN and 18.5 points above on "
    "the linear probe"
)
BAD_TEXT = "the target encoder (the teacher) is 1.5 points below its random init on k-NN and level on the linear probe"
STEPS_PER_EPOCH, LOG_EVERY, BATCH = 40, 10, 128


def recipe():
    """recipe.yaml of `distillkit pretrain bootleg` (the parts the report reads, with pretrain's values)."""
    return {
        "teacher": None,
        "teachers": {},
        "student": {
            "name": "timm:vit_tiny_patch16_224",
            "input_size": 32,
            "model_args": {"patch_size": 4, "depth": 6, "class_token": False, "global_pool": "avg"},
        },
        "strategy": {"bootleg": {"weight": 1.0, "ema": [0.99, 0.995], "collapse_std": 0.01}},
        "data": {"source": "builtin:fashion-mnist", "limit": None},
        "train": {"epochs": 1, "images": 15_360, "max_steps": None, "batch_size": BATCH, "lr": 0.001},
        "eval": {"enabled": True, "online_images": 1000},
    }


def pretraining_run(path, metrics=GOOD, *, epochs=3, finished=True):
    """A run folder as pretrain writes it: `finished=False` is a run stopped before its evaluation (no
    result.json, bootleg.pth or teacher/)."""
    path.mkdir(parents=True)
    (path / "recipe.yaml").write_text(yaml.safe_dump(recipe(), sort_keys=False))
    lines = [{"online_reference": True, "student_random_init_knn_top1": 0.35}]  # no teacher level
    step = 0
    for epoch in range(epochs):
        for _ in range(STEPS_PER_EPOCH // LOG_EVERY):
            step += LOG_EVERY
            loss = 0.05 + 0.4 * 0.5 ** (step / 40)
            lines.append(
                {
                    "step": step,
                    "epoch": epoch,
                    "bootleg": loss,
                    "bootleg.target_std": 0.82 - 0.002 * step,
                    "loss": loss,
                    "lr": 0.001,
                    "images_per_s": 402.0,
                }
            )
        lines.append(
            {
                "epoch_end": epoch + 1,
                "step": step,
                "seconds": 12.7,
                "bootleg": loss,
                "bootleg.target_std": 0.82 - 0.002 * step,
                "loss": loss,
                "online_knn_top1": [0.48, 0.55, 0.59][epoch],
                "online_knn_seconds": 0.52,
            }
        )
    (path / "metrics.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    if not finished:
        return path
    (path / "bootleg.pth").write_bytes(b"checkpoint")  # the report only says whether the outputs are there
    (path / "teacher").mkdir()
    (path / "teacher" / "config.json").write_text("{}")
    result = {
        "run_dir": str(path),
        "checkpoint": str(path / "bootleg.pth"),
        "teacher_dir": str(path / "teacher"),
        "metrics": {"eval_split": {"train_images": 10_000, "test_images": 10_000}, **metrics},
        "timings": {"setup": 2.1, "train": 38.1, "online_eval": 1.6, "export": 0.3, "evaluate": 41.0, "total": 83.1},
        "steps": step,
        "data_source": "Fashion-MNIST (full)",
        "recipe": recipe(),
        "images_seen": step * BATCH,
    }
    (path / "result.json").write_text(json.dumps(result))
    return path


def console_text(metrics):
    console = Console(record=True, width=200)
    print_results(console, metrics)
    return console.export_text()


def sections(page):
    markers = [("title", "<h1>"), ("verdict", 'class="verdict'), ("plots", "<h2>Plots</h2>")]
    markers += [("results", "<h2>Results</h2>"), ("recipe", "<h2>Recipe</h2>"), ("outputs", "<h2>Outputs</h2>")]
    return {name: page.index(marker) for name, marker in markers}


def test_the_pretraining_verdict_counts_the_points_above_random_init():
    judged = pretraining_verdict(GOOD)
    assert judged["level"] == "good" and judged["advice"] is None
    assert judged["points"]["knn_top1"] == 100 * (0.612 - 0.405)  # 20.7
    assert judged["text"] == GOOD_TEXT
    assert signed_points(judged["points"]) == "+20.7 / +18.5"

    judged = pretraining_verdict(BAD)
    assert judged["level"] == "bad" and judged["text"] == BAD_TEXT
    assert signed_points(judged["points"]) == "-1.5 / 0.0"
    assert "train longer" in judged["advice"] and "--lr" in judged["advice"] and "--arch" in judged["advice"]

    unlabelled = {name: {"params": row["params"], "latency_ms": row["latency_ms"]} for name, row in GOOD.items()}
    assert pretraining_verdict(unlabelled) is None
    compress = {"teacher": {"knn_top1": 0.8}, "student": {"knn_top1": 0.7}, "student_random_init": {"knn_top1": 0.6}}
    assert run_verdict(GOOD) == pretraining_verdict(GOOD) and run_verdict(compress) == verdict(compress)


def test_the_console_table_shows_a_pretraining_runs_rows_and_verdict():
    text = console_text({"eval_split": {"train_images": 10_000, "test_images": 10_000}, **GOOD})
    rows = {line.split("│")[1].strip(): line for line in text.splitlines() if line.count("│") == 7}
    assert list(rows) == ["target encoder (the teacher)", "encoder (trained)", "random init"]
    for cell in ("61.20%", "65.50%", "5.53 M", "3.4 ms", "+20.7 / +18.5"):
        assert cell in rows["target encoder (the teacher)"]
    assert "+19.3 / +17.1" in rows["encoder (trained)"]  # 59.8 - 40.5, 64.1 - 47.0
    assert "40.50%" in rows["random init"] and "+" not in rows["random init"]
    assert " ".join(GOOD_TEXT.split()) in " ".join(text.split())
    assert "warning" not in text and "held-out split: k-NN and linear-probe accuracy were skipped" not in text


def test_a_target_encoder_no_better_than_random_init_gets_the_red_warning_on_the_console():
    text = " ".join(console_text({"eval_split": {"train_images": 10, "test_images": 10}, **BAD}).split())
    assert BAD_TEXT in text and "-1.5 / 0.0" in text
    assert "warning: the pretrained target encoder is no better than the same ViT at random init" in text


def test_the_report_of_a_pretraining_run(tmp_path, monkeypatch):
    calls = {}
    for name in ("online_knn_curve", "loss_curves", "spread_curve"):
        draw = getattr(report_module.plots, name)

        def spy(*args, _draw=draw, _name=name, **kwargs):
            calls[_name] = (args, kwargs)
            return _draw(*args, **kwargs)

        monkeypatch.setattr(report_module.plots, name, spy)
    run_dir = pretraining_run(tmp_path / "ptr")
    page = distillkit.report(run_dir).read_text(encoding="utf-8")

    at = sections(page)
    assert at["title"] < at["verdict"] < at["plots"] < at["results"] < at["recipe"] < at["outputs"]
    title = "distillkit pretraining run <code>ptr</code>: bootleg, <code>timm:vit_tiny_patch16_224</code>"
    assert f"<h1>{title}</h1>" in page and "<title>distillkit pretraining run ptr (bootleg, timm:" in page
    assert '<div class="verdict good">' in page and "no verdict" not in page and 'class="warning"' not in page
    assert (GOOD_TEXT[0].upper() + GOOD_TEXT[1:]) in page
    assert "Missing" not in page and "not available" not in page

    # the comparison: the points each trained network is above random init, by hand
    assert "<td>target encoder (the teacher)</td>" in page and "+20.7 / +18.5" in page
    assert "<td>encoder (trained)</td>" in page and "+19.3 / +17.1" in page
    assert "5,526,336 (5.53 M)" in page and "3.42 ms" in page
    assert "gap recovered" not in page and "student" not in page.lower().replace("distil a student", "")

    # the online k-NN: the encoder against its random init, no teacher line
    (epochs, top1), references = calls["online_knn_curve"]
    assert list(epochs) == [1, 2, 3] and list(top1) == [0.48, 0.55, 0.59]
    assert references == {"random_init": 0.35, "model": "encoder"}
    assert "on the same split: encoder at random init 35.00%:" in page
    # the loss without the spread (the lone term `bootleg` is the loss: drawn once), the spread on its own
    (_, terms), _ = calls["loss_curves"]
    assert list(terms) == ["loss"]
    (steps, spread), floor = calls["spread_curve"]
    assert len(steps) == 12 and spread[0] == 0.82 - 0.002 * 10 and floor == {"floor": 0.01}

    for stem in ("loss", "target_std", "online_knn", "accuracy", "size_latency"):
        png = (run_dir / "plots" / f"{stem}.png").read_bytes()
        assert png.startswith(PNG_SIGNATURE)
        with Image.open(run_dir / "plots" / f"{stem}.png") as image:
            image.verify()
        assert base64.b64encode(png).decode() in page
    assert len(re.findall(r'src="data:image/png;base64,', page)) == 5

    # the recipe and the outputs
    assert "none: pretraining" in page and "patch_size=4, depth=6" in page
    assert "15,360 images; batch 128" in page and "15,360 images seen" in page  # 120 steps of 128
    assert str(run_dir / "bootleg.pth") in page and str(run_dir / "teacher") in page
    assert "missing from the folder" not in page
    command = f"distillkit compress --teacher bootleg --teacher-weights {run_dir / 'bootleg.pth'}"
    assert f"<pre><code>{html.escape(command)}</code></pre>" in page


def test_a_target_encoder_no_better_than_random_init_gets_the_red_warning_in_the_report(tmp_path):
    run_dir = pretraining_run(tmp_path / "bad", BAD)
    (run_dir / "bootleg.pth").unlink()
    page = distillkit.report(run_dir).read_text(encoding="utf-8")
    assert '<div class="verdict bad">' in page and "verdict good" not in page
    warning = page.index('<div class="warning">')
    assert sections(page)["verdict"] < warning < sections(page)["plots"]
    assert html.escape(pretraining_verdict(BAD)["advice"]) in page and html.escape(BAD_TEXT[1:]) in page
    assert "-1.5 / 0.0" in page
    assert f"{run_dir / 'bootleg.pth'} (missing from the folder)" in page and f"{run_dir / 'teacher'}</td>" in page


def test_a_stopped_pretraining_run_says_what_is_missing(tmp_path):
    run_dir = pretraining_run(tmp_path / "stopped", finished=False)
    page = distillkit.report(run_dir).read_text(encoding="utf-8")
    assert "<h1>distillkit pretraining run" in page and '<div class="verdict unknown">' in page
    assert "How good the target encoder (the teacher) is is not known: the run has no result.json" in page
    assert '<p class="missing">outputs: not available: the run has no result.json' in page
    assert "distillkit compress" not in page
    assert (run_dir / "plots" / "target_std.png").is_file() and (run_dir / "plots" / "online_knn.png").is_file()
    assert not (run_dir / "plots" / "accuracy.png").exists()
