"""Run checkpoints: everything needed to continue a run, written so a crash never loses the last one.

    checkpoints/last/model.safetensors   the trainable module: student.* and objective.* (heads, queues)
    checkpoints/last/train_state.pt      optimizer state, epoch, step, RNG states (torch.load weights_only)
    checkpoints/last/recipe.yaml         the recipe that made it, to refuse resuming with another one

A new checkpoint is written to a temporary folder and swapped in by renames; if a crash hits
between the renames, `last.old` still holds the previous good checkpoint and is used.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
import yaml
from torch import nn

from ..errors import UsageError
from ..io import atomic_path, permissions, save_safetensors, write_text

MODEL_FILE = "model.safetensors"
STATE_FILE = "train_state.pt"
RECIPE_FILE = "recipe.yaml"


def checkpoint_dir(run_dir: Path) -> Path:
    return run_dir / "checkpoints" / "last"


def save_checkpoint(
    run_dir: Path, module: nn.Module, optimizer: torch.optim.Optimizer, state: dict[str, Any], recipe: dict[str, Any]
) -> Path:
    final = checkpoint_dir(run_dir)
    final.parent.mkdir(parents=True, exist_ok=True)
    for stale in final.parent.glob("last.*.tmp"):  # a save killed before its swap: never a good checkpoint
        shutil.rmtree(stale, ignore_errors=True)
    tmp = Path(tempfile.mkdtemp(prefix="last.", suffix=".tmp", dir=final.parent))
    tmp.chmod(permissions(directory=True))  # mkdtemp's 0700 would hide the checkpoint from everyone else
    try:
        save_safetensors(tmp / MODEL_FILE, module.state_dict())
        payload = {"optimizer": optimizer.state_dict(), "rng": _rng_state(), **state}
        with atomic_path(tmp / STATE_FILE) as path:
            torch.save(payload, path)
        write_text(tmp / RECIPE_FILE, yaml.safe_dump(recipe, sort_keys=False))
        old = final.with_name("last.old")
        if final.exists():  # else a crash between the renames left `old` as the only good one: keep it
            if old.exists():
                shutil.rmtree(old)
            final.rename(old)
        tmp.rename(final)
        _fsync_dir(final.parent)
        shutil.rmtree(old, ignore_errors=True)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return final


def _fsync_dir(path: Path) -> None:
    """Make the renames in `path` durable (a power loss must not undo the swap)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def find_checkpoint(run_dir: Path) -> Path | None:
    final = checkpoint_dir(run_dir)
    for candidate in (final, final.with_name("last.old")):
        if all((candidate / f).is_file() for f in (MODEL_FILE, STATE_FILE, RECIPE_FILE)):
            return candidate
    return None


def load_checkpoint(path: Path, module: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    from safetensors.torch import load_file

    try:
        weights = load_file(str(path / MODEL_FILE), device="cpu")
        state = torch.load(path / STATE_FILE, map_location="cpu", weights_only=True)
    except Exception as e:  # a damaged checkpoint: say which and what to do
        raise UsageError(f"the checkpoint in {path} is damaged ({e}); delete it to start the run afresh") from None
    missing, unexpected = module.load_state_dict(weights, strict=False)
    if missing or unexpected:
        raise UsageError(
            f"the checkpoint in {path} does not match this run's student and strategy "
            f"(missing {missing[:3]}, unexpected {unexpected[:3]})"
        )
    optimizer.load_state_dict(state.pop("optimizer"))
    _set_rng_state(state.pop("rng"))
    return state


def saved_recipe(path: Path) -> dict[str, Any]:
    return yaml.safe_load((path / RECIPE_FILE).read_text(encoding="utf-8")) or {}


# Keys that may change between a run and its resumption: length, output (logging, trackers) and evaluation settings.
RESUMABLE_CHANGES = (
    "train.epochs",
    "train.max_steps",
    "train.checkpoint_every",
    "train.log_every",
    "train.log_with",
    "out",
    "eval.",
)


def recipe_changes(old: dict[str, Any], new: dict[str, Any], prefix: str = "") -> list[str]:
    """Dotted keys whose values differ, ignoring the ones a resume may change."""
    changes = []
    for key in sorted(set(old) | set(new)):
        path = f"{prefix}{key}"
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            changes += recipe_changes(a, b, path + ".")
        elif a != b and not any(path == k or path.startswith(k) for k in RESUMABLE_CHANGES):
            changes.append(f"{path}: {a!r} -> {b!r}")
    return changes


def resume_point(run_dir: Path, recipe: dict[str, Any], force: bool) -> tuple[Path, list[str]]:
    """The checkpoint to resume `run_dir` from and the recipe changes since it was made (those a resume may
    not change refused unless `force`). Checked before anything is written, so a refusal changes nothing."""
    checkpoint = find_checkpoint(run_dir)
    if checkpoint is None:
        raise UsageError(f"--resume: no checkpoint in {run_dir / 'checkpoints'}; start the run without --resume")
    changes = recipe_changes(saved_recipe(checkpoint), recipe)
    if changes and not force:
        raise UsageError(
            "cannot resume: the recipe differs from the run's:\n  "
            + "\n  ".join(changes)
            + "\nundo the changes, or pass --force-resume to continue with the new recipe"
        )
    return checkpoint, changes


def _rng_state() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
