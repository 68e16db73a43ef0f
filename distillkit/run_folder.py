"""Which folders are distillkit's to write into and to clear: a run folder carries a marker file.

`compress` starts a run only in a new or empty folder, or in one its marker says is a run; `--overwrite`
then removes the entries a run writes (below), and refuses, listing them, when the folder holds anything
else; it never touches a folder without the marker (a project folder, `.`). A run folder may not hold its
training data or the user cache, nor sit inside either (its plots would become images of the next run).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from .errors import UsageError
from .io import write_text

MARKER = ".distillkit-run"
# every entry a run writes into its folder: what --overwrite may remove (trackers: train.log_with's files)
RUN_ENTRIES = (
    MARKER,
    "recipe.yaml",
    "metrics.jsonl",
    "result.json",
    "report.html",
    "plots",
    "checkpoints",
    "student",
    "trackers",
    "bootleg.pth",  # distillkit pretrain bootleg: the checkpoint and the exported target encoder
    "teacher",
)


def is_run_folder(path: Path) -> bool:
    return (path / MARKER).is_file()


def claim(run_dir: Path, version: str) -> None:
    """Make `run_dir` (if needed) and mark it as a run folder."""
    run_dir.mkdir(parents=True, exist_ok=True)
    if not is_run_folder(run_dir):
        write_text(run_dir / MARKER, json.dumps({"made_by": "distillkit", "version": version}) + "\n")


def check_run_folder(
    run_dir: Path, resume: bool, overwrite: bool, data_folder: Path | None, cache_folder: Path
) -> bool:
    """Refuse a folder a run may not use, with what to do instead; True when `--overwrite` has a previous
    run to clear (`clear_run`, on the main process only). Changes nothing: it runs before anything loads."""
    if resume and overwrite:
        raise UsageError("--resume and --overwrite contradict each other; pass one of them")
    if data_folder is not None:
        _check_apart(run_dir, data_folder, "the training data")
    _check_apart(run_dir, cache_folder, "distillkit's user cache (DISTILLKIT_CACHE)")
    if resume or not run_dir.exists():
        return False
    if not run_dir.is_dir():
        raise UsageError(f"--out {run_dir} is a file, not a folder; choose another --out")
    entries = sorted(p.name for p in run_dir.iterdir())
    if not entries:
        return False
    if not is_run_folder(run_dir):
        what = (
            "a run of an older distillkit (it has no " + MARKER + " marker)"
            if "recipe.yaml" in entries
            else f"not a distillkit run folder ({len(entries)} entries, e.g. {', '.join(entries[:3])})"
        )
        raise UsageError(
            f"--out {run_dir} is {what}; distillkit writes only into a new or empty folder or its "
            "own run folders, and --overwrite never deletes a folder it did not make. Choose "
            "another --out (or delete the folder yourself)"
        )
    if not overwrite:
        raise UsageError(
            f"{run_dir} already holds a run; pass --resume to continue it, --overwrite to "
            "replace it, or choose another --out"
        )
    foreign = [name for name in entries if name not in RUN_ENTRIES]
    if foreign:
        exports = [name for name in foreign if name.startswith("student-")]
        why = (
            f" ({', '.join(exports[:3])} {'is an export' if len(exports) == 1 else 'are exports'} of the run "
            "there, written by `distillkit export`: --overwrite keeps them, as they may be deployed)"
            if exports
            else ""
        )
        raise UsageError(
            f"--overwrite: {run_dir} holds files a run did not write: {', '.join(foreign[:10])}"
            f"{' ...' if len(foreign) > 10 else ''}{why}; move them out first (nothing was deleted), or "
            "choose another --out"
        )
    return True


def clear_run(run_dir: Path) -> None:
    """Remove what a run wrote into `run_dir` (after `check_run_folder` found nothing else there)."""
    for name in RUN_ENTRIES:
        path = run_dir / name
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        elif path.exists() or path.is_symlink():
            path.unlink()


def _check_apart(run_dir: Path, folder: Path, what: str) -> None:
    run, other = run_dir.expanduser().resolve(), folder.expanduser().resolve()
    if run == other or other in run.parents:
        raise UsageError(
            f"--out {run_dir} is inside {what} ({folder}): the run's files (plots, the exported "
            "student) would be read as its contents next time; choose an --out outside it"
        )
    if run in other.parents:
        raise UsageError(
            f"--out {run_dir} contains {what} ({folder}); a run folder must not hold it (a later "
            "clean-up of the run would delete it); choose another --out"
        )
