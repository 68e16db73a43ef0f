"""Experiment trackers (`train.log_with`, `--log-with`) through Accelerate: what they record, read back with each
tracker's own reader and checked against metrics.jsonl, which stays the run's record. Tiny runs: a real
EfficientNet-Lite0 teacher at 32 px, MobileNetV3-Small, 4 steps of 32 Fashion-MNIST images."""

from __future__ import annotations

import json
from pathlib import Path

import accelerate.utils
import numpy as np
import pytest
import yaml
from test_compress import TINY as COMPRESS_TINY
from typer.testing import CliRunner

import distillkit
import distillkit.api
from distillkit.cli import app
from distillkit.errors import UsageError
from distillkit.recipe import resolve_recipe
from distillkit.run_folder import MARKER, check_run_folder, clear_run
from distillkit.train import loop
from distillkit.train.trackers import tracker_names

TINY = COMPRESS_TINY + ["eval.online_images=64", "train.log_every=1"]
NO_EVAL = TINY + ["eval.enabled=false"]


def tiny_run(out, **kwargs):
    options = dict(student="mobilenetv3-small", limit=128, batch_size=32, epochs=1, out=out, set=TINY, quiet=True)
    return distillkit.compress(**(options | kwargs))


def records(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def expected_scalars(run_dir: Path) -> dict[str, list[tuple[int, float]]]:
    """What the trackers must hold by the issue's contract, from metrics.jsonl: every number of a step line at
    its step; the online k-NN and the time of an epoch at its end; the reference levels at step 0."""
    out: dict[str, list] = {}
    for record in records(run_dir):
        if "online_reference" in record:
            values, step = {k: v for k, v in record.items() if k != "online_reference"}, 0
        elif "epoch_end" in record:
            values = {"epoch_seconds": record["seconds"]}
            values |= {k: v for k, v in record.items() if k.startswith("online_knn")}
            step = record["step"]
        else:
            values, step = {k: v for k, v in record.items() if k != "step"}, record["step"]
        for key, value in values.items():
            out.setdefault(key, []).append((step, value))
    return out


def tensorboard_folder(run_dir: Path) -> Path:
    return run_dir / "trackers" / "tensorboard" / "distillkit"


def tensorboard_scalars(folder: Path) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(folder), size_guidance={"scalars": 0})  # 0: keep every event
    events.Reload()
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


def assert_same_scalars(logged: dict, expected: dict) -> None:
    """Same tags, same steps, the same values after TensorBoard's float32 rounding."""
    assert logged.keys() == expected.keys()
    for tag, points in expected.items():
        assert [step for step, _ in logged[tag]] == [step for step, _ in points], tag
        assert [value for _, value in logged[tag]] == [float(np.float32(v)) for _, v in points], tag


def recipe_leaves(data: dict, prefix: str = "") -> dict:
    """The saved recipe's values by dotted key."""
    out = {}
    for key, value in data.items():
        if isinstance(value, dict) and value:
            out |= recipe_leaves(value, f"{prefix}{key}.")
        else:
            out[f"{prefix}{key}"] = value
    return out


def crash_and_resume(run_dir: Path, monkeypatch, **options):
    """A run killed after logging steps 3 and 4 but before their checkpoint (its last is step 2), then resumed:
    it trains 3 and 4 again. Returns the resumed run's result and the steps TensorBoard held after the crash."""
    options |= dict(teacher_cache=False)
    options["set"] = options.get("set", TINY) + ["train.checkpoint_every=2"]
    saves, real_save = [], loop.save_checkpoint

    def crash_at_the_second_save(*args, **kwargs):
        saves.append(args[2]["step"])
        if len(saves) == 2:
            raise RuntimeError("simulated crash before the step-4 checkpoint")
        return real_save(*args, **kwargs)

    monkeypatch.setattr(loop, "save_checkpoint", crash_at_the_second_save)
    with pytest.raises(RuntimeError, match="simulated crash"):
        tiny_run(run_dir, **options)
    monkeypatch.setattr(loop, "save_checkpoint", real_save)
    assert saves == [2, 4]
    crashed = [step for step, _ in tensorboard_scalars(tensorboard_folder(run_dir))["loss"]]
    return tiny_run(run_dir, resume=True, **options), crashed


def test_tensorboard_holds_what_metrics_jsonl_holds_through_a_crash_and_its_resume(tmp_path, monkeypatch):
    """Every number of metrics.jsonl (terms, lr, images/s, online k-NN, its references), each step once: the
    steps logged after the last checkpoint and trained again on resume are hidden from the crashed run's file."""
    pytest.importorskip("tensorboard")
    result, crashed = crash_and_resume(tmp_path / "run", monkeypatch, log_with=["tensorboard"])
    assert crashed == [1, 2, 3, 4]  # the trackers were closed on the failure: what it logged is on disk
    assert result.steps == 4
    expected = expected_scalars(result.run_dir)
    assert expected["online_knn_top1"] and expected["teacher_knn_top1"]  # the epoch's end and the references
    assert [step for step, _ in expected["loss"]] == [1, 2, 3, 4]
    assert_same_scalars(tensorboard_scalars(tensorboard_folder(result.run_dir)), expected)


def test_tensorboard_hparams_are_the_resolved_recipe(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.plugins.hparams import plugin_data_pb2

    result = tiny_run(tmp_path / "run", max_steps=1, log_with=["tensorboard"], set=NO_EVAL)
    (hparams_events,) = tensorboard_folder(result.run_dir).glob("*/events.out.tfevents.*")  # add_hparams' folder
    accumulator = EventAccumulator(str(hparams_events.parent))
    accumulator.Reload()
    content = accumulator.PluginTagToContent("hparams")["_hparams_/session_start_info"]
    hparams = plugin_data_pb2.HParamsPluginData.FromString(content).session_start_info.hparams
    saved = recipe_leaves(yaml.safe_load((result.run_dir / "recipe.yaml").read_text()))
    assert set(hparams) == set(saved)
    for key, value in saved.items():
        if isinstance(value, (int, float)):  # true / false too: torch's add_hparams writes them as 1 / 0
            assert hparams[key].number_value == value, key
        elif isinstance(value, str):
            assert hparams[key].string_value == value, key
        else:  # lists, null, empty sections: as JSON text
            assert json.loads(hparams[key].string_value) == value, key
    assert hparams["train.log_with"].string_value == '["tensorboard"]'
    assert hparams["student.name"].string_value == "mobilenetv3-small"


def test_wandb_offline_gets_the_recipe_and_every_logged_number(tmp_path, monkeypatch):
    wandb = pytest.importorskip("wandb", reason="wandb is not installed (pip install wandb)")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    logged, runs = {}, []
    real_log = wandb.Run.log

    def spy(self, data, step=None, **kwargs):  # what reached wandb, by step
        runs.append(self)
        for key, value in data.items():
            logged.setdefault(key, []).append((step, value))
        return real_log(self, data, step=step, **kwargs)

    monkeypatch.setattr(wandb.Run, "log", spy)
    result = tiny_run(tmp_path / "run", max_steps=2, log_with="wandb", set=NO_EVAL)
    assert logged == expected_scalars(result.run_dir)
    run = runs[0]
    assert run.name == "run" and run.project == "distillkit"
    saved = recipe_leaves(yaml.safe_load((result.run_dir / "recipe.yaml").read_text()))
    assert dict(run.config)["train.lr"] == saved["train.lr"] and dict(run.config).keys() == saved.keys()
    (offline,) = (result.run_dir / "trackers" / "wandb").glob("offline-run-*")
    (log_file,) = offline.glob("run-*.wandb")
    assert log_file.stat().st_size > 0


# ----------------------------------------------------------------------------- bad input, before anything loads


@pytest.fixture
def no_loading(monkeypatch):
    def forbidden(*args, **kwargs):
        raise AssertionError("bad input must be rejected before models or data load")

    monkeypatch.setattr(distillkit.api, "make_accelerator", forbidden)


def test_an_unknown_tracker_is_a_usage_error_naming_the_valid_ones(tmp_path, no_loading):
    with pytest.raises(UsageError, match=r"unknown tracker 'tensorbord': did you mean 'tensorboard'\?"):
        distillkit.compress(out=tmp_path / "run", log_with="tensorbord", quiet=True)
    result = CliRunner().invoke(app, ["compress", "--out", str(tmp_path / "run"), "--log-with", "neptune"])
    assert result.exit_code == 2, result.output
    assert "choose one of: all, mlflow, tensorboard, wandb" in " ".join(result.output.split())
    assert not (tmp_path / "run").exists()


def test_a_tracker_that_is_not_installed_is_a_usage_error_naming_its_pip_install(tmp_path, no_loading, monkeypatch):
    monkeypatch.setattr(accelerate.utils, "is_wandb_available", lambda: False)
    with pytest.raises(UsageError, match="wandb package is not installed; pip install wandb"):
        distillkit.compress(out=tmp_path / "run", log_with="tensorboard,wandb", quiet=True)


def test_all_means_the_installed_trackers(monkeypatch):
    monkeypatch.setattr(accelerate.utils, "is_tensorboard_available", lambda: True)
    monkeypatch.setattr(accelerate.utils, "is_wandb_available", lambda: False)
    monkeypatch.setattr(accelerate.utils, "is_mlflow_available", lambda: True)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5000")  # a server: no local store needed
    assert tracker_names(["all"]) == ["tensorboard", "mlflow"]
    monkeypatch.setattr(accelerate.utils, "is_tensorboard_available", lambda: False)
    monkeypatch.setattr(accelerate.utils, "is_mlflow_available", lambda: False)
    with pytest.raises(UsageError, match="none of tensorboard, wandb and mlflow is installed"):
        tracker_names(["all"])


def test_log_with_from_the_cli_the_api_and_a_recipe(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(distillkit.api, "compress", lambda recipe, **options: calls.append(options))
    runner = CliRunner()
    for args in (["--log-with", "tensorboard", "--log-with", "wandb"], ["--log-with", "tensorboard,wandb"], []):
        assert runner.invoke(app, ["compress", *args]).exit_code == 0
    resolved = [resolve_recipe(None, {"log_with": call["log_with"]}).train.log_with for call in calls]
    assert resolved == [["tensorboard", "wandb"], ["tensorboard", "wandb"], []]  # none: the default recipe's
    path = tmp_path / "r.yaml"
    path.write_text("train:\n  log_with: mlflow\n")
    assert resolve_recipe(path).train.log_with == ["mlflow"]
    assert resolve_recipe(path, {"log_with": ["all", "all"]}).train.log_with == ["all"]


def test_overwrite_removes_the_tracker_files_of_a_run(tmp_path):
    run_dir = tmp_path / "run"
    (run_dir / "trackers" / "tensorboard" / "distillkit").mkdir(parents=True)
    (run_dir / MARKER).write_text("{}\n")
    (run_dir / "recipe.yaml").write_text("{}\n")
    assert check_run_folder(run_dir, resume=False, overwrite=True, data_folder=None, cache_folder=tmp_path / "c")
    clear_run(run_dir)
    assert list(run_dir.iterdir()) == []


def test_mlflow_gets_the_recipe_and_every_logged_number_in_the_run_folder(tmp_path, monkeypatch):
    pytest.importorskip("mlflow", reason="mlflow is not installed (pip install mlflow)")
    pytest.importorskip("sqlalchemy", reason="mlflow's local store needs sqlalchemy (pip install mlflow)")
    from mlflow.tracking import MlflowClient

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    result = tiny_run(tmp_path / "run", max_steps=2, log_with="mlflow", set=NO_EVAL)
    client = MlflowClient(tracking_uri=f"sqlite:///{result.run_dir / 'trackers' / 'mlflow.db'}")
    (run,) = client.search_runs([client.get_experiment_by_name("distillkit").experiment_id])
    assert run.info.run_name == "run"
    saved = recipe_leaves(yaml.safe_load((result.run_dir / "recipe.yaml").read_text()))
    assert run.data.params.keys() == saved.keys() and float(run.data.params["train.lr"]) == saved["train.lr"]
    expected = expected_scalars(result.run_dir)
    assert run.data.metrics.keys() == expected.keys()
    for key, points in expected.items():
        assert [(m.step, m.value) for m in client.get_metric_history(run.info.run_id, key)] == points, key
