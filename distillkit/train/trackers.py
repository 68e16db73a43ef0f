"""Experiment trackers (`train.log_with`): TensorBoard, Weights & Biases and MLflow, through Accelerate's own.

metrics.jsonl stays the run's record (the report reads it); the trackers get the same numbers at the same
steps: every `train.log_every` optimiser steps the loss terms, loss, epoch, lr and images/s; at every epoch's
end the online k-NN (`online_knn_top1`, `online_knn_seconds`) and the epoch's `epoch_seconds`; at step 0 the
online k-NN's reference levels. The resolved recipe, flattened to dotted keys (`train.lr`), is the run's
config (TensorBoard: its hparams). Only the main process writes; Accelerate sees to that. Where they write:

    RUN/trackers/tensorboard/distillkit/   TensorBoard's event files (`tensorboard --logdir RUN/trackers`)
    RUN/trackers/wandb/                    W&B's local files (with WANDB_MODE=offline: `wandb sync` them later)
    RUN/trackers/mlflow.db                 MLflow's store, unless MLFLOW_TRACKING_URI names another one

A resumed run continues TensorBoard's folder, hiding what was logged after its checkpoint (the steps it trains
again, as metrics.jsonl drops them); W&B and MLflow get a new run of the same name, from the checkpoint's step.
"""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path
from typing import Any

from ..errors import UsageError
from ..messages import warn
from ..recipe import TRACKERS

PROJECT = "distillkit"  # the TensorBoard folder, the W&B project, the MLflow experiment
TRACKERS_DIR = "trackers"  # inside the run folder
# what is wrong when a tracker cannot start, and what to do
MISSING = {
    "tensorboard": "the tensorboard package is not installed; pip install tensorboard (or 'distillkit[trackers]')",
    "wandb": "the wandb package is not installed; pip install wandb",
    "mlflow": "the mlflow package is not installed, or mlflow-skinny is, which has no local store (it lacks "
    "sqlalchemy); pip install mlflow, or set MLFLOW_TRACKING_URI to a tracking server",
}


def tracker_names(log_with: list[str]) -> list[str]:
    """The trackers `train.log_with` starts: "all" = every one of tensorboard, wandb and mlflow that is
    installed. A tracker asked for by name whose package is missing is a UsageError naming its pip install."""
    import accelerate.utils as available

    installed = {
        "tensorboard": available.is_tensorboard_available(),
        "wandb": available.is_wandb_available(),
        # the run folder's SQLite store needs sqlalchemy (mlflow has it, mlflow-skinny not); a server does not
        "mlflow": available.is_mlflow_available()
        and bool(os.environ.get("MLFLOW_TRACKING_URI") or importlib.util.find_spec("sqlalchemy")),
    }
    for name in log_with:
        if name != "all" and not installed[name]:
            raise UsageError(f"train.log_with {name}: {MISSING[name]}")
    if "all" not in log_with:
        return list(log_with)
    names = [name for name in TRACKERS if installed[name]]
    if not names:
        raise UsageError(
            "train.log_with all: none of tensorboard, wandb and mlflow is installed; pip install tensorboard "
            "(or distillkit[trackers]), wandb or mlflow"
        )
    return names


def accelerator_options(log_with: list[str], run_dir: Path | None) -> dict[str, Any]:
    """`Accelerator(**...)`'s tracking arguments: the trackers, and the run folder as the project folder (the
    TensorBoard files under RUN/trackers/tensorboard); none without trackers or without a run folder."""
    names = tracker_names(log_with) if run_dir is not None else []
    if not names:
        return {}
    from accelerate.utils import ProjectConfiguration

    folder = Path(run_dir) / TRACKERS_DIR
    return {
        "log_with": names,
        "project_config": ProjectConfiguration(project_dir=str(run_dir), logging_dir=str(folder / "tensorboard")),
    }


def start_trackers(accelerator, run_dir: Path, recipe: dict[str, Any], resumed_at: int) -> None:
    """Start the accelerator's trackers with the recipe as config; `resumed_at`: the checkpoint's step a resume
    continues from (0 for a new run): TensorBoard hides the events logged after it, as metrics.jsonl drops them."""
    if not accelerator.log_with:
        return
    folder = Path(run_dir) / TRACKERS_DIR
    options = {
        "tensorboard": {"purge_step": resumed_at + 1} if resumed_at else {},
        "wandb": {"name": Path(run_dir).name, "dir": str(folder)},
        "mlflow": {"run_name": Path(run_dir).name},
    }
    names = [str(tracker) for tracker in accelerator.log_with]
    if accelerator.is_main_process:
        folder.mkdir(parents=True, exist_ok=True)
        if "mlflow" in names and not os.environ.get("MLFLOW_TRACKING_URI"):
            import mlflow

            mlflow.set_tracking_uri(f"sqlite:///{(folder / 'mlflow.db').resolve()}")
            options["mlflow"]["logging_dir"] = str((folder / "mlflow-artifacts").resolve())
    accelerator.init_trackers(PROJECT, config=flat_config(recipe), init_kwargs=options)


def finish_trackers(accelerator) -> None:
    """Close the trackers (flushing them), after training or when it failed. Not `accelerator.end_training()`:
    that also destroys the process group, which evaluation and a next run in this process still use. A tracker
    that fails to close is a warning: it must not hide the error that ended the training, if one did."""
    for tracker in accelerator.trackers:
        try:
            tracker.finish()
        except Exception as e:  # noqa: BLE001 - e.g. one that never started because another failed first
            warn(f"the {tracker.name} tracker did not close cleanly ({type(e).__name__}: {e})")
    accelerator.trackers = []


def flat_config(recipe: dict[str, Any], prefix: str = "") -> dict[str, bool | int | float | str]:
    """The recipe as dotted keys -> scalars, what every tracker's config takes: lists, null and empty sections
    as their JSON text (`[0.2, 1.0]`, `null`, `{}`)."""
    flat: dict[str, bool | int | float | str] = {}
    for key, value in recipe.items():
        if isinstance(value, dict) and value:
            flat |= flat_config(value, f"{prefix}{key}.")
        else:
            flat[f"{prefix}{key}"] = value if isinstance(value, (bool, int, float, str)) else json.dumps(value)
    return flat


def numbers(record: dict[str, Any]) -> dict[str, int | float]:
    """A metrics.jsonl record's numbers, as the trackers log them: its step (their x axis) and flags left out."""
    return {k: v for k, v in record.items() if type(v) in (int, float) and k != "step"}
