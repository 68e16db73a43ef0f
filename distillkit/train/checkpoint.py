"""Run checkpoints: everything needed to continue a run, written so a crash never loses the last one.

    checkpoints/last/model.safetensors   the trainable module: student.* and objective.* (heads, queues)  } Accelerate's
    checkpoints/last/optimizer.bin       the optimiser's state (scaler.pt: fp16's gradient scaler)         } save_state
    checkpoints/last/random_states_*.pkl Accelerate's RNG states, one per process                          }
    checkpoints/last/train_state.pt      epoch, step, micro-batch, RNG states (torch.load weights_only)
    checkpoints/last/recipe.yaml         the recipe that made it (resolved), to refuse resuming with another

The model, optimiser and scaler go through `accelerator.save_state` / `load_state`, so FSDP and DeepSpeed
write (and read) their sharded states their own way, from every process: instead of model.safetensors and
optimizer.bin, FSDP writes pytorch_model_fsdp* and optimizer_* files, DeepSpeed a pytorch_model/ folder.
A new checkpoint is written to a temporary folder and swapped in by renames; if a crash hits between the
renames, `last.old` still holds the previous good checkpoint and is used. Checkpoints of distillkit before
this layout (the optimiser inside train_state.pt) are still read.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

import torch
import yaml
from torch import nn

from ..errors import RunError, UsageError
from ..io import atomic_path, disk_full, permissions, write_text

MODEL_FILE = "model.safetensors"  # = Accelerate's SAFE_WEIGHTS_NAME
STATE_FILE = "train_state.pt"
RECIPE_FILE = "recipe.yaml"


def sharded(accelerator) -> bool:
    """True under FSDP or DeepSpeed: between steps no process holds the whole model."""
    from accelerate.utils import DistributedType

    return accelerator.distributed_type in (DistributedType.FSDP, DistributedType.DEEPSPEED)


def whole_student_state(accelerator, module: nn.Module) -> dict[str, torch.Tensor] | None:
    """The trained student's whole state dict, gathered from every process's shards, on the main process (None
    on the others): a collective every process must enter. None everywhere when the model is not sharded (every
    process then holds the whole student)."""
    if not sharded(accelerator):
        return None
    state = accelerator.get_state_dict(module)  # FSDP / DeepSpeed gather the full dict onto the main process
    if not accelerator.is_main_process:
        return None
    return {name.removeprefix("student."): tensor for name, tensor in state.items() if name.startswith("student.")}


def checkpoint_dir(run_dir: Path) -> Path:
    return run_dir / "checkpoints" / "last"


def save_checkpoint(run_dir: Path, accelerator, state: dict[str, Any], recipe: dict[str, Any]) -> Path:
    """Save the prepared model and optimiser (`accelerator.save_state`), `state` (the position) and the RNG
    states, and `recipe`, into `run_dir`'s `checkpoints/last`. Every process calls it; the main one swaps."""
    final, main = checkpoint_dir(run_dir), accelerator.is_main_process
    tmp = final.with_name(f"last.step-{state['step']}.tmp")  # one name every process agrees on
    if main:
        final.parent.mkdir(parents=True, exist_ok=True)
        for stale in final.parent.glob("last.*.tmp"):  # a save killed before its swap: never a good checkpoint
            shutil.rmtree(stale, ignore_errors=True)
        tmp.mkdir()
    accelerator.wait_for_everyone()
    try:
        _save_state(accelerator, tmp)
        accelerator.wait_for_everyone()  # every process's share is written
        if main:
            with atomic_path(tmp / STATE_FILE) as path:
                torch.save({"rng": _rng_state(), **state}, path)
            write_text(tmp / RECIPE_FILE, yaml.safe_dump(recipe, sort_keys=False))  # the last file: complete
            _fsync_tree(tmp)
            _swap(tmp, final)
    finally:
        if main and tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def _save_state(accelerator, folder: Path) -> None:
    """`accelerator.save_state`, the plain model's weights under their own names (no DDP `module.` prefix), so
    one process and several write the same model.safetensors; a full disk is one clear error."""

    def unwrapped_weights(models, weights, output_dir) -> None:
        if weights:  # FSDP and DeepSpeed save their models themselves and leave `weights` empty
            weights[:] = [accelerator.unwrap_model(model).state_dict() for model in models]

    handle = accelerator.register_save_state_pre_hook(unwrapped_weights)
    try:
        accelerator.save_state(str(folder))
    except Exception as e:
        if disk_full(e):
            raise RunError(
                f"the disk is full (or a file-size or quota limit was reached): could not write the checkpoint "
                f"in {folder.parent}; free some space and retry"
            ) from None
        raise
    finally:
        handle.remove()


def _swap(tmp: Path, final: Path) -> None:
    old = final.with_name("last.old")
    if final.exists():  # else a crash between the renames left `old` as the only good one: keep it
        if old.exists():
            shutil.rmtree(old)
        final.rename(old)
    tmp.rename(final)
    _fsync_dir(final.parent)
    shutil.rmtree(old, ignore_errors=True)


def _fsync_tree(folder: Path) -> None:
    """Make every file in `folder` durable before the swap (Accelerate's writers do not fsync), with the mode
    the umask gives (safetensors writes 0600)."""
    for path in sorted(folder.rglob("*")):
        path.chmod(permissions(directory=path.is_dir()))
        if path.is_file():
            with open(path, "rb") as f:
                os.fsync(f.fileno())
    _fsync_dir(folder)


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
        if all((candidate / f).is_file() for f in (STATE_FILE, RECIPE_FILE)):
            return candidate
    return None


def load_checkpoint(path: Path, accelerator) -> dict[str, Any]:
    """Load the checkpoint in `path` into the accelerator's prepared model and optimiser and set the RNG
    states; returns the saved position. Every process calls it."""
    try:
        state = torch.load(path / STATE_FILE, map_location="cpu", weights_only=True)
    except Exception as e:  # a damaged checkpoint: say which and what to do
        raise _damaged(path, e) from None
    if "optimizer" in state:  # the earlier layout: weights and optimiser saved by hand
        _load_earlier_layout(path, accelerator, state.pop("optimizer"))
    else:
        _load_state(path, accelerator)
    _set_rng_state(state.pop("rng"))  # the main process's, on every process, as the run was saved
    return state


def _load_state(path: Path, accelerator) -> None:
    """`accelerator.load_state`, the plain model's weights read by `_load_weights` (its names, a clear message on
    a mismatch); FSDP and DeepSpeed load theirs themselves."""

    def load_weights(models, input_dir) -> None:
        for model in list(models):
            _load_weights(path, accelerator.unwrap_model(model))
            models.remove(model)

    handle = accelerator.register_load_state_pre_hook(load_weights)
    try:
        accelerator.load_state(str(path))
    except UsageError:
        raise
    except Exception as e:
        raise _damaged(path, e) from None
    finally:
        handle.remove()


def _load_earlier_layout(path: Path, accelerator, optimizer_state: dict) -> None:
    if sharded(accelerator):
        raise UsageError(
            f"the checkpoint in {path} was written by an earlier distillkit, which cannot resume under "
            f"{accelerator.distributed_type.value}; resume it without FSDP / DeepSpeed"
        )
    (model,) = accelerator._models
    _load_weights(path, accelerator.unwrap_model(model))
    try:
        accelerator._optimizers[0].load_state_dict(optimizer_state)
    except Exception as e:
        raise _damaged(path, e) from None


def _load_weights(path: Path, module: nn.Module) -> None:
    from safetensors.torch import load_file

    try:
        weights = load_file(str(path / MODEL_FILE), device="cpu")
    except Exception as e:
        raise _damaged(path, e) from None
    missing, unexpected = module.load_state_dict(weights, strict=False)
    if missing or unexpected:
        raise UsageError(
            f"the checkpoint in {path} does not match this run's student and strategy "
            f"(missing {missing[:3]}, unexpected {unexpected[:3]})"
        )


def _damaged(path: Path, error: Exception) -> UsageError:
    return UsageError(f"the checkpoint in {path} is damaged ({error}); delete it to start the run afresh")


def saved_recipe(path: Path) -> dict[str, Any]:
    return yaml.safe_load((path / RECIPE_FILE).read_text(encoding="utf-8")) or {}


# Keys that may change between a run and its resumption: length, output (logging, trackers) and evaluation settings.
RESUMABLE_CHANGES = (
    "train.epochs",
    "train.max_steps",
    "train.checkpoint_every",
    "train.log_every",
    "train.log_with",
    "data.num_workers",  # workers change no result (items depend only on their index)
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
    if hasattr(torch, "xpu") and torch.xpu.is_available():
        state["xpu"] = torch.xpu.get_rng_state_all()
    if torch.backends.mps.is_available():
        state["mps"] = torch.mps.get_rng_state()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    if "xpu" in state and hasattr(torch, "xpu") and torch.xpu.is_available():
        torch.xpu.set_rng_state_all(state["xpu"])
    if "mps" in state and torch.backends.mps.is_available():
        torch.mps.set_rng_state(state["mps"])
