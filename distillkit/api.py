"""`compress(...)`: one distillation run from recipe to exported student. The CLI is a thin shell
over it, with the same option names and defaults (None = take the recipe's value)."""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from . import __version__
from .data import check_data_source
from .errors import UsageError
from .evaluate import OnlineKnn, evaluate_run
from .export import export_student
from .io import cache_dir, write_json, write_text
from .messages import warn
from .recipe import Recipe, parse_set, recipe_to_yaml, resolve_recipe
from .report import report
from .roles import PRIMARY_TEACHER
from .run import Run
from .run_folder import check_run_folder, claim, clear_run
from .student import check_student_start, student_spec
from .summary import print_results, results_table  # noqa: F401 - results_table: importable from here as before
from .teachers import check_teacher_name
from .train.checkpoint import find_checkpoint, resume_point
from .train.launch import resolve_launch
from .train.loop import explain_out_of_memory, make_accelerator, train
from .train.trackers import tracker_names


@dataclass
class CompressResult:
    run_dir: Path
    student_dir: Path  # model.safetensors + config.json + README.md
    metrics: dict[str, Any]  # teacher / student / student_random_init -> knn_top1, probe_top1, params, latency_ms
    timings: dict[str, float]  # seconds: setup, train, online_eval, evaluate, export, total
    steps: int
    data_source: str
    recipe: Recipe = field(repr=False)
    train_images: int = 0  # distinct images trained on (after --limit)
    images_seen: int = 0  # optimiser steps x global batch x grad_accum
    teacher_cache: str | None = None  # where the teachers' outputs were cached, if they were
    skipped_steps: int = 0  # optimiser steps skipped for a non-finite loss (counted in `steps`)

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["run_dir"], out["student_dir"] = str(self.run_dir), str(self.student_dir)
        out["recipe"] = self.recipe.to_dict()
        return out


RECIPE_OPTIONS = (
    "teacher",
    "teacher_weights",
    "arch",
    "student",
    "student_weights",
    "data",
    "epochs",
    "max_steps",
    "limit",
    "batch_size",
    "lr",
    "out",
    "seed",
    "precision",
    "teacher_cache",
    "log_with",
)


def compress(
    recipe: str | Path | dict | Recipe | None = None,
    *,
    teacher: str | None = None,
    teacher_weights: str | Path | None = None,
    arch: str | None = None,
    student: str | None = None,
    student_weights: str | Path | None = None,
    strategy: str | None = None,
    data: str | Path | None = None,
    epochs: int | None = None,
    max_steps: int | None = None,
    limit: int | None = None,
    batch_size: int | None = None,
    lr: float | None = None,
    out: str | Path | None = None,
    set: list[str] | dict[str, Any] | None = None,  # noqa: A002 - the CLI's --set
    resume: bool = False,
    force_resume: bool = False,
    overwrite: bool = False,
    seed: int | None = None,
    precision: str | None = None,
    teacher_cache: str | Path | bool | None = None,
    log_with: str | list[str] | None = None,
    quiet: bool = False,
) -> CompressResult:
    """Distil `teacher` into `student` with `strategy` on `data`; export and evaluate the student.

    `recipe` is a shipped recipe name, a YAML path, a dict or a `Recipe` (default: the embedded
    default recipe). Keyword options override it, then `set` ("train.lr=0.1" items) overrides those.
    `student_weights`: a weights file the student starts from (`student.weights`; `student.pretrained: true`
    starts it from timm's pretrained weights instead); the report then also scores that starting point.
    `resume` continues the run in `out` exactly where its last checkpoint left it; a changed recipe
    is refused unless `force_resume`. `teacher_cache`: a folder, False (never cache), or None = the recipe's
    `data.teacher_cache` ("auto": the user cache whenever the run has more epochs than view slots).
    `log_with`: experiment trackers (`train.log_with`): "tensorboard", "wandb", "mlflow", several (a list or
    comma-separated) or "all" (every one of them that is installed), logging what metrics.jsonl records.
    """
    if teacher_cache is False:
        set = {**parse_set(set), "data.teacher_cache": None}  # noqa: A001 - wins over the recipe, like --set
        teacher_cache = None
    # the options that set recipe keys, by the API's names (strategy, set and the run flags are separate)
    options = {name: value for name, value in locals().items() if name in RECIPE_OPTIONS}
    with explain_out_of_memory():
        return _compress(recipe, options, strategy, set, resume, force_resume, overwrite, quiet)


def _compress(
    recipe,
    options: dict[str, Any],
    strategy: str | None,
    overrides,
    resume: bool,
    force_resume: bool,
    overwrite: bool,
    quiet: bool,
) -> CompressResult:
    started = time.perf_counter()
    resolved = resolve_recipe(resumed_recipe(recipe, options, resume), options, strategy=strategy, overrides=overrides)
    resolved = resolve_launch(resolved)  # precision and grad_accum as they run (accelerate launch's when left to it)
    run_dir = Path(resolved.out) if resolved.out else _default_run_dir(resolved)
    clear_previous_run = validate_before_loading(resolved, run_dir, resume, overwrite)
    accelerator = make_accelerator(resolved, run_dir)
    main = accelerator.is_main_process
    if clear_previous_run:  # one process deletes; the others wait until it has
        if main:
            clear_run(run_dir)
        accelerator.wait_for_everyone()
    console = Console(quiet=quiet or not main)  # one process speaks
    console.print(
        f"[bold]distillkit[/] {__version__}: {escape(resolved.teacher.name)} -> {escape(resolved.student.name)} with "
        f"{' + '.join(resolved.strategy)}; run folder {escape(str(run_dir))}"
    )
    run = Run.from_recipe(resolved, run_dir, accelerator, say=console.print)
    claim_run(run, resume, force_resume)
    timings = {"setup": time.perf_counter() - started}
    with training_progress(console) as progress:
        result = train(run, progress, resume, force_resume, online_knn=OnlineKnn.from_recipe(resolved, run.images))
    timings |= {"train": result.seconds, "online_eval": result.online_eval_seconds}
    console.print(trained_line(result))
    metrics = _evaluate_and_export(run, result, console, timings) if main else {}
    accelerator.wait_for_everyone()
    timings["total"] = time.perf_counter() - started
    final = CompressResult(
        run_dir=run_dir,
        student_dir=run_dir / "student",
        metrics=metrics,
        timings=timings,
        steps=result.steps,
        data_source=run.images.source,
        recipe=resolved,
        train_images=len(run.images.train),
        images_seen=result.images_seen,
        skipped_steps=result.skipped_steps,
        teacher_cache=result.teacher_cache,
    )
    if main:
        write_json(run_dir / "result.json", final.to_dict())
        console.print(
            f"student exported to {final.student_dir} (timm: create_model('local-dir:{final.student_dir}', "
            "pretrained=True))",
            markup=False,
        )
        write_report(run_dir, console)
    return final


def claim_run(run: Run, resume: bool, force_resume: bool) -> None:
    """Check a resume against the run's checkpoint, then mark the folder as a run and save its recipe: only
    now, so a start that fails while loading (or a refused resume) leaves the folder as it was."""
    if resume:
        _, changes = resume_point(run.run_dir, run.recipe.to_dict(), force_resume)
        if changes:
            warn("resuming with a changed recipe: " + "; ".join(changes))
    if run.accelerator.is_main_process:
        claim(run.run_dir, __version__)
        write_text(run.run_dir / "recipe.yaml", recipe_to_yaml(run.recipe))


def trained_line(result) -> str:
    return (
        f"trained {result.steps} steps ({result.images_seen:,} images seen) in {result.seconds:.0f} s "
        f"({result.images_per_second:.0f} img/s)"
        + (f", resumed from step {result.resumed_from_step}" if result.resumed_from_step else "")
        + (f"; {result.bad_images} unreadable images skipped" if result.bad_images else "")
        + (f"; {result.skipped_steps} steps skipped for non-finite losses" if result.skipped_steps else "")
    )


def _evaluate_and_export(run: Run, result, console: Console, timings: dict[str, float]) -> dict[str, Any]:
    """The main process scores teacher, student and random init on the training device (a GPU when training
    ran on one; latency on the CPU), then exports the student: under FSDP / DeepSpeed a whole copy built from the
    state gathered from every process's shards (the run's own student holds only this process's shard)."""
    student = run.student if result.student_state is None else run.student.with_state(result.student_state)
    student.model.to(run.accelerator.device)
    student.model.float().eval()
    teacher = run.teachers[PRIMARY_TEACHER]
    teacher.unprune()  # evaluation embeds with the whole teacher
    tick = time.perf_counter()
    with training_progress(console) as progress:
        metrics = evaluate_run(run.recipe, teacher, student, run.images, run.accelerator.device, progress)
    student.model.cpu()
    teacher.cpu()
    print_results(console, metrics)
    timings["evaluate"] = time.perf_counter() - tick
    tick = time.perf_counter()
    others = {role: t.describe() for role, t in run.teachers.items() if role != PRIMARY_TEACHER}
    export_student(
        student.model,
        run.run_dir / "student",
        architecture=student.spec.timm,
        model_args=student.model_args,
        input_size=student.size,
        mean=student.input_config.mean,
        std=student.input_config.std,
        provenance={
            "distillkit_version": __version__,
            "teacher": teacher.describe(),
            **({"other_teachers": others} if others else {}),
            "strategy": run.recipe.to_dict()["strategy"],
            "data": run.images.source,
            "data_source": run.recipe.data.source,  # the recipe's value: the model card names a Hub dataset from it
            "steps": result.steps,
            "metrics": metrics,
        },
    )
    timings["export"] = time.perf_counter() - tick
    return metrics


def write_report(run_dir: Path, console: Console) -> None:
    """report.html and its plots; the run is already saved, so a failure here only warns."""
    try:
        console.print(f"report: {report(run_dir)}", markup=False)
    except Exception as e:  # noqa: BLE001 - any failure: the run must not be lost over its report
        warn(
            f"the run is saved, but its report could not be written ({type(e).__name__}: {e}); "
            f"retry with: distillkit report {run_dir}"
        )


def resumed_recipe(recipe, options: dict[str, Any], resume: bool):
    """What `--resume` builds on: the run's own saved recipe.yaml, unless a recipe is given explicitly;
    the flags given with --resume then apply on top of it, as they would to any recipe."""
    if resume and recipe is None and options.get("out") is not None:
        saved = Path(options["out"]).expanduser() / "recipe.yaml"
        if saved.is_file():
            return saved
    return recipe


def validate_before_loading(recipe: Recipe, run_dir: Path, resume: bool, overwrite: bool) -> bool:
    """Name checks and run-folder checks, before any model or data loads; True when --overwrite is to clear
    a previous run."""
    if recipe.teacher is None:
        raise UsageError(
            "the recipe has no teacher (teacher: null belongs to `distillkit pretrain` recipes); "
            "name one with --teacher NAME (`distillkit list teachers`)"
        )
    for role, t in recipe.all_teachers().items():
        try:
            check_teacher_name(t.name, variant=t.variant, arch=t.arch, weights=t.weights)
        except UsageError as e:
            raise UsageError(f"teachers.{role}: {e}" if role != PRIMARY_TEACHER else str(e)) from None
    return check_run_start(recipe, run_dir, resume, overwrite)


def check_run_start(recipe: Recipe, run_dir: Path, resume: bool, overwrite: bool) -> bool:
    """The checks every run (distillation or pretraining) passes before loading: the student, the data, the
    trackers and the run folder; True when --overwrite is to clear a previous run."""
    student_spec(recipe.student.name)
    check_student_start(recipe.student)
    check_data_source(recipe.data.source)
    tracker_names(recipe.train.log_with)  # a tracker asked for but not installed
    data_folder = None if recipe.data.source.startswith("builtin:") else Path(recipe.data.source).expanduser()
    clear = check_run_folder(run_dir, resume, overwrite, data_folder, cache_dir())
    if resume and find_checkpoint(run_dir) is None:
        raise UsageError(f"--resume: {run_dir} holds no checkpoint to resume from")
    return clear


def training_progress(console: Console) -> Progress:
    """The training progress bar. Its refresh thread rebuilds the bar on every tick, on the training's
    cores: twice a second is plenty for steps that take tenths of a second, and costs less than rich's 10."""
    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[terms]}"),
        TextColumn("{task.fields[speed]}"),
        TimeRemainingColumn(),
        console=console,
        transient=False,
        refresh_per_second=2,
    )


def _default_run_dir(recipe: Recipe) -> Path:
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    safe = lambda s: s.replace(":", "-").replace("/", "-")  # noqa: E731
    return Path("runs") / f"{stamp}-{safe(recipe.teacher.name)}-{safe(recipe.student.name)}-{'+'.join(recipe.strategy)}"


# `distillkit eval` lives in evaluate/exported.py; importable from here as before.
from .evaluate import evaluate_student  # noqa: E402, F401
