"""Which folders are distillkit's to write into and to clear: a run folder carries a marker file.

`compress` starts a run only in a new or empty folder, or in one its marker says is a run; `--overwrite`
then removes only the entries a run writes (below), never a user's other files, and never a folder without
the marker (a project folder, `.`, a folder that holds the data). A run folder may not hold its own
training data, nor sit inside it (its plots would become images of the next run).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from .errors import UsageError
from .io import write_text

MARKER = ".distillkit-run"
# every entry a run writes into its folder: what --overwrite may remove
RUN_ENTRIES = (MARKER, "recipe.yaml", "metrics.jsonl", "result.json", "report.html", "plots", "checkpoints",
               "student")


def is_run_folder(path: Path) -> bool:
    return (path / MARKER).is_file()


def claim(run_dir: Path, version: str) -> None:
    """Make `run_dir` (if needed) and mark it as a run folder."""
    run_dir.mkdir(parents=True, exist_ok=True)
    if not is_run_folder(run_dir):
        write_text(run_dir / MARKER, json.dumps({"made_by": "distillkit", "version": version}) + "\n")


def check_run_folder(run_dir: Path, resume: bool, overwrite: bool, data_folder: Path | None) -> None:
    """Refuse a folder a run may not use, with what to do instead; `--overwrite` clears a previous run.

    Called before anything loads, so a refusal costs nothing and leaves the folder as it was."""
    if resume and overwrite:
        raise UsageError("--resume and --overwrite contradict each other; pass one of them")
    if data_folder is not None:
        _check_apart_from_data(run_dir, data_folder)
    if resume or not run_dir.exists():
        return
    if not run_dir.is_dir():
        raise UsageError(f"--out {run_dir} is a file, not a folder; choose another --out")
    entries = sorted(p.name for p in run_dir.iterdir())
    if not entries:
        return
    if not is_run_folder(run_dir):
        what = ("a run of an older distillkit (it has no " + MARKER + " marker)" if "recipe.yaml" in entries
                else f"not a distillkit run folder ({len(entries)} entries, e.g. {', '.join(entries[:3])})")
        raise UsageError(f"--out {run_dir} is {what}; distillkit writes only into a new or empty folder or its "
                         "own run folders, and --overwrite never deletes a folder it did not make. Choose "
                         "another --out (or delete the folder yourself)")
    if not overwrite:
        raise UsageError(f"{run_dir} already holds a run; pass --resume to continue it, --overwrite to "
                         "replace it, or choose another --out")
    clear_run(run_dir)


def clear_run(run_dir: Path) -> list[str]:
    """Remove what a run wrote into `run_dir` (not its marker's siblings it did not write); returns the
    names of the other entries, which stay."""
    for name in RUN_ENTRIES:
        path = run_dir / name
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        elif path.exists() or path.is_symlink():
            path.unlink()
    return sorted(p.name for p in run_dir.iterdir())


def _check_apart_from_data(run_dir: Path, data_folder: Path) -> None:
    run, data = run_dir.resolve(), data_folder.resolve()
    if run == data or data in run.parents:
        raise UsageError(f"--out {run_dir} is inside the training data {data_folder}: the run's files (plots, "
                         "the exported student) would be read as training images next time; choose an --out "
                         "outside the data folder")
    if run in data.parents:
        raise UsageError(f"--out {run_dir} contains the training data {data_folder}; a run folder must not "
                         "hold its data (--overwrite would have to leave it, a later clean-up could delete "
                         "it); choose another --out")
