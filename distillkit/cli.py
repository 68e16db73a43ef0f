"""The `distillkit` command: a thin typer shell over the Python API, with the same option names.

Exit codes: 0 success, 2 bad input (a flag, a recipe value, a name, a path), 1 a failure during the run.
"""

from __future__ import annotations

import functools
import sys
from enum import Enum
from pathlib import Path
from typing import Callable, List, Optional

import typer
from rich.console import Console
from rich.table import Table

from .errors import DistillkitError, UsageError

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help="Compress frozen self-supervised teachers into small, deployable timm students.",
    rich_markup_mode="rich",
)
err_console = Console(stderr=True)


def reports_errors(command: Callable) -> Callable:
    """Print distillkit errors as one clear message and exit with their code (2 input, 1 run)."""

    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        try:
            return command(*args, **kwargs)
        except DistillkitError as e:
            err_console.print(f"[bold red]error:[/] {e}", highlight=False)
            raise typer.Exit(e.exit_code) from None
        except KeyboardInterrupt:
            err_console.print("[yellow]interrupted[/]")
            raise typer.Exit(130) from None
        except MemoryError:
            err_console.print("[bold red]error:[/] out of memory; lower --batch-size or the input sizes")
            raise typer.Exit(1) from None

    return wrapper


class Precision(str, Enum):
    fp32 = "fp32"
    bf16 = "bf16"
    fp16 = "fp16"


COMPRESS_HELP = {
    "teacher": "Teacher: a zoo name (see `distillkit list teachers`), timm:<model> or file:<path>.",
    "teacher_weights": "Local teacher checkpoint (.safetensors/.pth); works offline.",
    "arch": "timm architecture of a file:<path> teacher, e.g. vit_small_patch16_224.",
    "student": "Student: a spec name (see `distillkit list students`), a spec .yaml, or timm:<model>.",
    "strategy": "Strategy name, or several joined by '+' (see `distillkit list strategies`).",
    "data": "Image folder (class subfolders or flat) or builtin:fashion-mnist.",
    "epochs": "Training epochs.",
    "max_steps": "Stop after this many optimiser steps.",
    "limit": "Use only N training images (quick runs).",
    "batch_size": "Global batch size, summed over all processes.",
    "lr": "Peak learning rate.",
    "out": "Run folder (default runs/<time>-<teacher>-<student>-<strategy>).",
    "recipe": "Recipe: a YAML file or a shipped name (see `distillkit list recipes`).",
    "set": "Override a recipe key: --set train.lr=0.1 (repeatable).",
    "resume": "Continue the run in --out from its last checkpoint.",
    "force_resume": "With --resume: continue even though the recipe changed.",
    "overwrite": "Replace a run already in --out.",
    "seed": "Random seed (data order, views, initialisation).",
    "precision": "Numeric precision of the training step.",
    "teacher_cache": "Folder caching the teacher's outputs on a fixed set of views per image (data.view_slots; 4 "
    "when the recipe leaves it unset), reused across epochs and students. Default (data.teacher_cache auto): the "
    "user cache, whenever the run has more epochs than view slots.",
    "no_teacher_cache": "Never cache the teacher's outputs: run the teacher on every step.",
    "quiet": "Print nothing but errors.",
}
H = COMPRESS_HELP


@app.command()
@reports_errors
def compress(
    teacher: Optional[str] = typer.Option(None, help=H["teacher"]),
    teacher_weights: Optional[Path] = typer.Option(None, help=H["teacher_weights"]),
    arch: Optional[str] = typer.Option(None, help=H["arch"]),
    student: Optional[str] = typer.Option(None, help=H["student"]),
    strategy: Optional[str] = typer.Option(None, help=H["strategy"]),
    data: Optional[str] = typer.Option(None, help=H["data"]),
    epochs: Optional[int] = typer.Option(None, help=H["epochs"]),
    max_steps: Optional[int] = typer.Option(None, help=H["max_steps"]),
    limit: Optional[int] = typer.Option(None, help=H["limit"]),
    batch_size: Optional[int] = typer.Option(None, help=H["batch_size"]),
    lr: Optional[float] = typer.Option(None, help=H["lr"]),
    out: Optional[Path] = typer.Option(None, help=H["out"]),
    recipe: Optional[str] = typer.Option(None, help=H["recipe"]),
    set_: Optional[List[str]] = typer.Option(None, "--set", help=H["set"]),
    resume: bool = typer.Option(False, help=H["resume"]),
    force_resume: bool = typer.Option(False, help=H["force_resume"]),
    overwrite: bool = typer.Option(False, help=H["overwrite"]),
    seed: Optional[int] = typer.Option(None, help=H["seed"]),
    precision: Optional[Precision] = typer.Option(None, help=H["precision"]),
    teacher_cache: Optional[Path] = typer.Option(None, help=H["teacher_cache"]),
    no_teacher_cache: bool = typer.Option(False, "--no-teacher-cache", help=H["no_teacher_cache"]),
    quiet: bool = typer.Option(False, help=H["quiet"]),
) -> None:
    """Distil a frozen teacher into a student, evaluate it and export it as safetensors.

    With no options: EfficientNet-Lite0 -> MobileNetV3-Small with SEED on Fashion-MNIST (offline).
    """
    from .api import compress as run_compress

    if no_teacher_cache and teacher_cache is not None:
        raise UsageError("--teacher-cache and --no-teacher-cache contradict each other; pass one of them")
    # every other option has the API's name and meaning
    options = {k: v for k, v in locals().items() if k in COMPRESS_HELP and k not in ("recipe", "precision")}
    options |= {"set": set_, "precision": precision.value if precision else None}
    options["teacher_cache"] = False if no_teacher_cache else teacher_cache
    options.pop("no_teacher_cache")
    run_compress(recipe, **options)


class ListWhat(str, Enum):
    teachers = "teachers"
    students = "students"
    strategies = "strategies"
    recipes = "recipes"


@app.command("list")
@reports_errors
def list_(what: ListWhat = typer.Argument(..., help="What to list.")) -> None:
    """List teachers, students, strategies or recipes."""
    console = Console()
    table = Table(title=f"distillkit {what.value}")
    if what is ListWhat.teachers:
        from .teachers import TEACHERS

        for column in ("name", "architecture", "embedding", "weights", "license"):
            table.add_column(column, no_wrap=column == "name")
        for name in TEACHERS:
            spec = TEACHERS.get(name)
            table.add_row(name, spec.architecture, spec.embedding_dims, spec.weights_source, spec.license or "-")
        table.add_row("timm:<model name>", "any timm model", "-", "timm hub, or a file", "-")
        table.add_row("file:<path>", "--arch <timm name>", "-", "the file", "-")
    elif what is ListWhat.students:
        from .student import _shipped_specs

        for column in ("name", "timm model", "input size", "description"):
            table.add_column(column)
        for name, spec in _shipped_specs().items():
            table.add_row(name, spec.timm, str(spec.input_size), spec.description)
        table.add_row("timm:<model name>", "any timm model", "224", "or a spec .yaml file of your own")
    elif what is ListWhat.strategies:
        from .strategies import STRATEGIES

        table.add_column("name")
        table.add_column("what it does")
        for name in STRATEGIES:
            table.add_row(name, STRATEGIES.get(name).summary)
    else:
        from .recipe import find_recipe, list_recipes

        table.add_column("name")
        table.add_column("description")
        for name in list_recipes():
            lines = find_recipe(name).read_text(encoding="utf-8").splitlines()
            first = next((line.lstrip("# ") for line in lines if line.startswith("#")), "")
            table.add_row(name, first)
    console.print(table)


@app.command("eval")
@reports_errors
def eval_(
    student: str = typer.Argument(
        ...,
        help="An exported student (safetensors, ONNX or TorchScript folder or file, or a run folder), "
        "or timm:<model name>.",
    ),
    data: str = typer.Option(
        "builtin:fashion-mnist", help="Labelled images: a folder with class subfolders or builtin:<name>."
    ),
    weights: Optional[Path] = typer.Option(
        None, help="With timm:<name>: a local state dict file instead of timm's hub weights."
    ),
    per_block: bool = typer.Option(False, help="Also the k-NN accuracy at every block / stage (the early-exit curve)."),
    max_train: int = typer.Option(10000, min=1, help="Training images used as the k-NN bank / probe training set."),
    max_test: int = typer.Option(10000, min=1, help="Held-out images scored."),
    seed: int = typer.Option(0, help="Seed of the subsets and the held-out split."),
) -> None:
    """k-NN and linear-probe accuracy, classifier top-1, parameters and CPU latency of a student or timm model."""
    from .evaluate import evaluate_student
    from .summary import results_table

    metrics = evaluate_student(
        student, data=data, max_train=max_train, max_test=max_test, seed=seed, weights=weights, per_block=per_block
    )
    console = Console()
    console.print(results_table({"student": metrics}))
    if "top1" in metrics:
        console.print(f"classifier head top-1: {metrics['top1']:.2%}")
    else:
        console.print(f"classifier head top-1: skipped ({metrics['top1_skipped']})")
    if per_block:
        table = Table(title="k-NN top-1 at each block (early exits)")
        table.add_column("block", justify="right")
        table.add_column("k-NN top-1", justify="right")
        for row in metrics["per_block"]:
            table.add_row(str(row["block"]), f"{row['knn_top1']:.2%}")
        console.print(table)


class ExportFormat(str, Enum):
    safetensors = "safetensors"
    onnx = "onnx"
    torchscript = "torchscript"


@app.command("export")
@reports_errors
def export_(
    run_dir: Path = typer.Argument(..., help="A compress run folder, or an exported student folder."),
    format_: ExportFormat = typer.Option(ExportFormat.safetensors, "--format", help="What to write."),
    out: Optional[Path] = typer.Option(
        None, help="Output folder (default: <student folder>-<format>[-exit<BLOCK>] beside it)."
    ),
    exit_at: Optional[int] = typer.Option(
        None,
        help="Cut the student after this block / stage (0 = first; negative counts from the end): an early-exit model.",
    ),
) -> None:
    """Export a distilled student as safetensors (timm), ONNX or TorchScript, checked against PyTorch."""
    from .export import export

    result = export(run_dir, format=format_.value, out=out, exit_at=exit_at)
    what = "the whole student" if result.exit_at is None else f"the student cut after block {result.exit_at}"
    console = Console()
    console.print(f"exported {what} as {result.format} to {result.out_dir}")
    console.print(f"max abs diff vs the PyTorch model (random batches of 2 and 3 images): {result.max_abs_diff:.3g}")


@app.command("report")
@reports_errors
def report_(run_dir: Path = typer.Argument(..., help="A compress run folder.")) -> None:
    """Write (again) a run's report.html and plots/*.png from its recipe.yaml, metrics.jsonl and result.json."""
    from .report import report

    Console().print(f"report written to {report(run_dir)}", highlight=False)


def main() -> None:
    try:
        app()
    except SystemExit as e:  # click exits 2 on bad usage already; keep codes as they are
        sys.exit(e.code)


if __name__ == "__main__":
    main()
