"""The `distillkit` command: a thin typer shell over the Python API, with the same option names.

Exit codes: 0 success, 2 bad input (a flag, a recipe value, a name, a path), 1 a failure during the run.
"""

from __future__ import annotations

import functools
import inspect
import json
import sys
from enum import Enum
from pathlib import Path
from typing import Callable, List, Optional

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from . import __version__, messages
from .errors import DistillkitError, UsageError

# Heavy modules (torch, timm: seconds to import) load inside the commands that need them, so that --help,
# --version, `list` and shell completion answer at once.
app = typer.Typer(
    no_args_is_help=True,
    help="Compress frozen self-supervised teachers into small, deployable timm students.",
    rich_markup_mode="rich",
)
err_console = Console(stderr=True)


def _print_version(value: bool) -> None:
    if value:
        typer.echo(f"distillkit {__version__}")
        raise typer.Exit()


@app.callback()
def _main(
    version: bool = typer.Option(
        False, "--version", callback=_print_version, is_eager=True, help="Print distillkit's version and exit."
    ),
) -> None:
    messages.show_on(err_console)  # distillkit's warnings: `warning: <message>` on stderr


def reports_errors(command: Callable) -> Callable:
    """Print distillkit errors as one clear message and exit with their code (2 input, 1 run)."""

    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        try:
            return command(*args, **kwargs)
        except DistillkitError as e:
            err_console.print(f"[bold red]error:[/] {escape(str(e))}", highlight=False, soft_wrap=True)
            raise typer.Exit(e.exit_code) from None
        except KeyboardInterrupt:
            err_console.print("[yellow]interrupted[/]")
            raise typer.Exit(130) from None
        except MemoryError:
            err_console.print("[bold red]error:[/] out of memory; lower --batch-size or the input sizes")
            raise typer.Exit(1) from None

    return wrapper


class Precision(str, Enum):
    auto = "auto"
    fp32 = "fp32"
    bf16 = "bf16"
    fp16 = "fp16"


COMPRESS_HELP = {
    "teacher": "Teacher: a zoo name (see `distillkit list teachers`), timm:<model> or file:<path>.",
    "teacher_weights": "Local teacher checkpoint (.safetensors/.pth); works offline.",
    "arch": "timm architecture of a file:<path> teacher, e.g. vit_small_patch16_224.",
    "student": "Student: a spec name (see `distillkit list students`), a spec .yaml, or timm:<model>.",
    "student_weights": "Weights file the student starts from instead of random init (a timm state dict of its "
    "architecture); --set student.pretrained=true starts it from timm's pretrained weights.",
    "strategy": "Strategy name, or several joined by '+' (see `distillkit list strategies`).",
    "data": "Image folder (class subfolders or flat), webdataset shards ('dir/train-{000000..000009}.tar'), "
    "hf:<dataset>[:split] or builtin:fashion-mnist.",
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
    "precision": "Numeric precision of the training step; auto = accelerate launch's --mixed_precision, else fp32.",
    "teacher_cache": "Folder caching the teacher's outputs on a fixed set of views per image (data.view_slots; 4 "
    "when the recipe leaves it unset), reused across epochs and students. Default (data.teacher_cache auto): the "
    "user cache, whenever the run has more epochs than view slots.",
    "no_teacher_cache": "Never cache the teacher's outputs: run the teacher on every step.",
    "log_with": "Experiment tracker: tensorboard, wandb, mlflow, or all (every one of them that is installed); "
    "repeatable or comma-separated. Files under <run folder>/trackers; metrics.jsonl is written either way.",
    "quiet": "Print nothing but errors.",
}
H = COMPRESS_HELP


def shows_recipe_defaults(command: Callable) -> Callable:
    """In `--help`, each option that defaults to None ("the recipe decides") and sets a recipe key (its name in
    recipe.OPTION_KEYS) shows the default recipe's value, e.g. `[default: recipe: 0.15]`: a new option gets this
    by its OPTION_KEYS entry alone. Read from recipes/default.yaml and the schema, without importing torch."""
    from .recipe import OPTION_KEYS, default_values

    values = default_values([*OPTION_KEYS.values(), "train.images"])
    for name, parameter in inspect.signature(command).parameters.items():
        info = parameter.default
        value = values.get(OPTION_KEYS.get(name, ""))
        if isinstance(info, typer.models.OptionInfo) and info.default is None and value is not None:
            if name == "epochs" and values["train.images"] is not None:
                info.show_default = f"recipe: set by train.images={values['train.images']}"
            else:
                info.show_default = f"recipe: {value}"
    return command


@app.command()
@shows_recipe_defaults
@reports_errors
def compress(
    teacher: Optional[str] = typer.Option(None, help=H["teacher"]),
    teacher_weights: Optional[Path] = typer.Option(None, help=H["teacher_weights"]),
    arch: Optional[str] = typer.Option(None, help=H["arch"]),
    student: Optional[str] = typer.Option(None, help=H["student"]),
    student_weights: Optional[Path] = typer.Option(None, help=H["student_weights"]),
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
    log_with: Optional[List[str]] = typer.Option(None, help=H["log_with"]),
    quiet: bool = typer.Option(False, help=H["quiet"]),
) -> None:
    """Distil a frozen teacher into a student, evaluate it and export it as safetensors.

    With no options: EfficientNet-Lite0 -> MobileNetV3-Small with SEED on Fashion-MNIST (offline).
    """
    from .api import compress as run_compress

    messages.show_on(err_console, quiet=quiet)
    if no_teacher_cache and teacher_cache is not None:
        raise UsageError("--teacher-cache and --no-teacher-cache contradict each other; pass one of them")
    # every other option has the API's name and meaning
    options = {k: v for k, v in locals().items() if k in COMPRESS_HELP and k not in ("recipe", "precision")}
    options |= {"set": set_, "precision": precision.value if precision else None}
    options["teacher_cache"] = False if no_teacher_cache else teacher_cache
    options["log_with"] = log_with or None  # not given: the recipe's train.log_with
    options.pop("no_teacher_cache")
    run_compress(recipe, **options)


class PretrainMethod(str, Enum):
    bootleg = "bootleg"


PRETRAIN_HELP = {
    **{k: H[k] for k in ("data", "epochs", "max_steps", "limit", "batch_size", "lr", "set", "resume")},
    **{k: H[k] for k in ("force_resume", "overwrite", "seed", "precision", "log_with", "quiet")},
    "arch": "The ViT to pretrain: a timm model name (vit_small_patch16_224), timm:<name>, a student spec name or "
    ".yaml; the recipe's student.model_args (no class token, average pooling) apply.",
    "out": "Run folder (default runs/<time>-pretrain-<method>-<arch>).",
    "recipe": "Pretraining recipe: a YAML file or a shipped name (default pretrain-bootleg-tiny; "
    "pretrain-bootleg-vitb for ViT-B/16 on 8 GPUs).",
}
P = PRETRAIN_HELP


@app.command()
@reports_errors
def pretrain(
    method: PretrainMethod = typer.Argument(..., help="The self-supervised method: bootleg."),
    arch: Optional[str] = typer.Option(None, help=P["arch"]),
    data: Optional[str] = typer.Option(None, help=P["data"]),
    epochs: Optional[int] = typer.Option(None, help=P["epochs"]),
    max_steps: Optional[int] = typer.Option(None, help=P["max_steps"]),
    limit: Optional[int] = typer.Option(None, help=P["limit"]),
    batch_size: Optional[int] = typer.Option(None, help=P["batch_size"]),
    lr: Optional[float] = typer.Option(None, help=P["lr"]),
    out: Optional[Path] = typer.Option(None, help=P["out"]),
    recipe: Optional[str] = typer.Option(None, help=P["recipe"]),
    set_: Optional[List[str]] = typer.Option(None, "--set", help=P["set"]),
    resume: bool = typer.Option(False, help=P["resume"]),
    force_resume: bool = typer.Option(False, help=P["force_resume"]),
    overwrite: bool = typer.Option(False, help=P["overwrite"]),
    seed: Optional[int] = typer.Option(None, help=P["seed"]),
    precision: Optional[Precision] = typer.Option(None, help=P["precision"]),
    log_with: Optional[List[str]] = typer.Option(None, help=P["log_with"]),
    quiet: bool = typer.Option(False, help=P["quiet"]),
) -> None:
    """Pretrain a self-supervised ViT teacher; writes RUN/bootleg.pth (I-JEPA layout) and RUN/teacher/ (timm).

    With no options: a small ViT pretrained with Bootleg on Fashion-MNIST (offline, 2 CPU cores). Distil from
    it with: distillkit compress --teacher bootleg --teacher-weights RUN/bootleg.pth
    """
    from .pretrain import pretrain as run_pretrain

    messages.show_on(err_console, quiet=quiet)
    options = {k: v for k, v in locals().items() if k in PRETRAIN_HELP and k not in ("recipe", "precision", "set")}
    options |= {"set": set_, "precision": precision.value if precision else None, "log_with": log_with or None}
    run_pretrain(method.value, recipe, **options)


class ListWhat(str, Enum):
    teachers = "teachers"
    students = "students"
    strategies = "strategies"
    recipes = "recipes"


@app.command("list")
@reports_errors
def list_(
    what: ListWhat = typer.Argument(..., help="What to list."),
    as_json: bool = typer.Option(False, "--json", help="Print the rows as a JSON list of objects, nothing else."),
) -> None:
    """List teachers, students, strategies or recipes."""
    from .listing import COLUMNS, ROWS

    rows, columns = ROWS[what.value](), COLUMNS[what.value]
    console = Console()
    if as_json:
        typer.echo(json.dumps(rows, indent=2))
    elif not console.is_terminal:  # piped: plain aligned columns, nothing wrapped or cut
        cells = [list(columns.values())] + [[str(row[key]) for key in columns] for row in rows]
        widths = [max(len(line[i]) for line in cells) for i in range(len(columns))]
        for line in cells:
            typer.echo("  ".join(cell.ljust(width) for cell, width in zip(line, widths)).rstrip())
    else:  # a terminal of any width: long cells wrap, long words fold; nothing is cut
        table = Table(title=f"distillkit {what.value}")
        for key, header in columns.items():  # names whole, the rest wrapped and folded as the width needs
            table.add_column(header, overflow="fold", no_wrap=key == "name")
        for row in rows:
            table.add_row(*(escape(str(row[key])) for key in columns))
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
        "builtin:fashion-mnist",
        help="Labelled images: a folder with class subfolders, .cls-labelled tar shards, hf:<dataset> or "
        "builtin:<name>.",
    ),
    weights: Optional[Path] = typer.Option(
        None, help="With timm:<name>: a local state dict file instead of timm's hub weights."
    ),
    per_block: bool = typer.Option(False, help="Also the k-NN accuracy at every block / stage (the early-exit curve)."),
    max_train: int = typer.Option(10000, min=1, help="Training images used as the k-NN bank / probe training set."),
    max_test: int = typer.Option(10000, min=1, help="Held-out images scored."),
    seed: int = typer.Option(0, help="Seed of the subsets and the held-out split."),
    as_json: bool = typer.Option(False, "--json", help="Print the metrics as one JSON object, nothing else."),
    device: Optional[str] = typer.Option(
        None,
        help="Where to embed and score: cpu, cuda, cuda:1, mps. Default: a GPU when there is one, else the CPU "
        "(an ONNX file always runs on the CPU; latency is always the CPU's).",
    ),
) -> None:
    """k-NN and linear-probe accuracy, classifier top-1, parameters and CPU latency of a student or timm model."""
    from .evaluate import evaluate_student
    from .summary import results_table

    metrics = evaluate_student(
        student,
        data=data,
        max_train=max_train,
        max_test=max_test,
        seed=seed,
        weights=weights,
        per_block=per_block,
        device=device,
    )
    if as_json:
        typer.echo(json.dumps(metrics, indent=2))
        return
    console = Console()
    console.print(results_table({"student": metrics}))
    if "top1" in metrics:
        console.print(f"classifier head top-1: {metrics['top1']:.2%}")
    else:
        console.print(f"classifier head top-1: skipped ({escape(metrics['top1_skipped'])})")
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
    features_only: bool = typer.Option(
        False,
        "--features-only",
        help="Write the student as a timm features_only backbone: the feature maps of its stages (CNN) or last "
        "blocks (ViT) instead of the embedding; timm.create_model('local-dir:OUT', pretrained=True) loads it as "
        "one, ONNX gives one output per map (stage0, stage1, ...).",
    ),
    heads: bool = typer.Option(
        False,
        "--heads",
        help="Also write the adaptor heads of a run trained with strategy agglomerate, which map the student's "
        "embedding and last feature map to each teacher's: OUT/heads/<role>.safetensors and <role>.json "
        "(load them with distillkit.heads.load_heads). RUN_DIR must be the run folder.",
    ),
) -> None:
    """Export a distilled student as safetensors (timm), ONNX or TorchScript, checked against PyTorch."""
    from .export import export

    if heads and (exit_at is not None or features_only):
        raise UsageError(
            "the adaptor heads read the whole student's embedding and last feature map, so --heads exports them "
            "with the whole student; leave out --exit-at and --features-only"
        )
    if heads:
        from .export_heads import export_heads
        from .heads import HEADS_FOLDER

        with_heads = export_heads(run_dir, format=format_.value, out=out)
        result = with_heads.export
    else:
        result = export(run_dir, format=format_.value, out=out, exit_at=exit_at, features_only=features_only)
    what = "the whole student" if result.exit_at is None else f"the student cut after block {result.exit_at}"
    if result.features_only:
        what = "the student's features_only backbone"
    console = Console()
    console.print(
        f"exported {what} as {result.format} to {escape(str(result.out_dir))}", highlight=False, soft_wrap=True
    )
    console.print(f"max abs diff vs the PyTorch model (random batches of 2 and 3 images): {result.max_abs_diff:.3g}")
    if heads:
        diffs = ", ".join(f"{escape(role)} {diff:.3g}" for role, diff in with_heads.max_abs_diff.items())
        console.print(
            f"adaptor heads of {', '.join(map(escape, with_heads.heads))} in "
            f"{escape(str(result.out_dir / HEADS_FOLDER))}; max abs diff vs the trained heads: {diffs}",
            highlight=False,
            soft_wrap=True,
        )


@app.command("report")
@reports_errors
def report_(run_dir: Path = typer.Argument(..., help="A compress run folder.")) -> None:
    """Write (again) a run's report.html and plots/*.png from its recipe.yaml, metrics.jsonl and result.json."""
    from .report import report

    Console().print(f"report written to {escape(str(report(run_dir)))}", highlight=False, soft_wrap=True)


@app.command("push")
@reports_errors
def push_(
    run_dir: Path = typer.Argument(..., help="A compress run folder, or an exported (safetensors) student folder."),
    repo_id: str = typer.Option(..., help="The Hub model repository: ORG/NAME (created when missing)."),
    private: bool = typer.Option(False, help="Create the repository private (an existing one keeps its visibility)."),
    token: Optional[str] = typer.Option(None, help="Token with write access (default: HF_TOKEN or `hf auth login`)."),
) -> None:
    """Upload a distilled student (model.safetensors, config.json, the model card) to the Hugging Face Hub."""
    from .publish import push

    result = push(run_dir, repo_id, private=private, token=token)
    console = Console()
    console.print(f"pushed {', '.join(result.files)} to {result.url}", highlight=False, soft_wrap=True)
    console.print(
        f"load it with timm.create_model('hf-hub:{result.repo_id}', pretrained=True)", highlight=False, soft_wrap=True
    )


def main() -> None:
    try:
        app()
    except SystemExit as e:  # click exits 2 on bad usage already; keep codes as they are
        code = e.code
    else:
        code = 0
    finally:
        _close_process_group()
    sys.exit(code)


def _close_process_group() -> None:
    """Destroy the torch.distributed process group a multi-process run opened (Accelerate leaves it open: the
    run's evaluation and a next run in the process use it), so that each process exits with its communication
    threads stopped instead of tearing them down at interpreter exit, where gloo can abort ("terminate called
    without an active exception")."""
    distributed = sys.modules.get("torch.distributed")  # only a command that imported torch can have opened one
    if distributed is not None and distributed.is_available() and distributed.is_initialized():
        distributed.destroy_process_group()


if __name__ == "__main__":
    main()
