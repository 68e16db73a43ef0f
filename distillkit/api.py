"""`compress(...)`: one distillation run from recipe to exported student. The CLI is a thin shell
over it, with the same option names and defaults (None = take the recipe's value)."""

from __future__ import annotations

import time
import warnings
from dataclasses import asdict, dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, Mapping

import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table

from . import __version__
from .data import check_data_source, open_data
from .io import cache_dir
from .errors import UsageError
from .evaluate import count_params, cpu_latency_ms, embed_dataset, eval_subset, score_embeddings
from .export import export_student
from .features import Extractor, FeatureRequest, probe_features
from .io import write_json, write_text
from .roles import PRIMARY_TEACHER
from .recipe import Recipe, parse_set, recipe_to_yaml, resolve_recipe
from .report import report
from .verdict import GAP_METRICS, gap_recovered, verdict
from .strategies import Objective, fit_to_data
from .run_folder import check_run_folder, claim, clear_run
from .student import create_student, model_args_for, student_input_config, student_spec, uses_channels_last
from .inputs import prepare_input
from .teachers import Teacher, check_teacher_name, load_teacher
from .train.checkpoint import find_checkpoint, resume_point
from .train.loop import DistillModule, explain_out_of_memory, make_accelerator, train
from .train.online import OnlineKnn


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

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["run_dir"], out["student_dir"] = str(self.run_dir), str(self.student_dir)
        out["recipe"] = self.recipe.to_dict()
        return out


def compress(
    recipe: str | Path | dict | Recipe | None = None,
    *,
    teacher: str | None = None,
    teacher_weights: str | Path | None = None,
    arch: str | None = None,
    student: str | None = None,
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
    quiet: bool = False,
) -> CompressResult:
    """Distil `teacher` into `student` with `strategy` on `data`; export and evaluate the student.

    `recipe` is a shipped recipe name, a YAML path, a dict or a `Recipe` (default: the embedded
    default recipe). Keyword options override it, then `set` ("train.lr=0.1" items) overrides those.
    `resume` continues the run in `out` exactly where its last checkpoint left it; a changed recipe
    is refused unless `force_resume`. `teacher_cache`: a folder, False (never cache), or None = the recipe's
    `data.teacher_cache` ("auto": the user cache whenever the run has more epochs than view slots).
    """
    if teacher_cache is False:
        set = {**parse_set(set), "data.teacher_cache": None}  # noqa: A001 - wins over the recipe, like --set
        teacher_cache = None
    with explain_out_of_memory():
        return _compress(recipe, dict(teacher=teacher, teacher_weights=teacher_weights, arch=arch, student=student, data=data,
                                      epochs=epochs, max_steps=max_steps, limit=limit, batch_size=batch_size, lr=lr,
                                      out=out, seed=seed, precision=precision, teacher_cache=teacher_cache),
                         strategy, set, resume, force_resume, overwrite, quiet)


def _compress(recipe, options: dict[str, Any], strategy: str | None, overrides, resume: bool, force_resume: bool,
              overwrite: bool, quiet: bool) -> CompressResult:
    started = time.perf_counter()
    resolved = resolve_recipe(_resumed_recipe(recipe, options, resume), options, strategy=strategy,
                              overrides=overrides)
    run_dir = Path(resolved.out) if resolved.out else _default_run_dir(resolved)
    clear_previous_run = validate_before_loading(resolved, run_dir, resume, overwrite)
    accelerator = make_accelerator(resolved)
    main = accelerator.is_main_process
    if clear_previous_run:  # one process deletes; the others wait until it has
        if main:
            clear_run(run_dir)
        accelerator.wait_for_everyone()
    console = Console(quiet=quiet or not main)  # one process speaks
    console.print(f"[bold]distillkit[/] {__version__}: {resolved.teacher.name} -> {resolved.student.name} with "
                  f"{' + '.join(resolved.strategy)}; run folder {run_dir}")

    teachers = {role: load_teacher(t.name, t.weights, t.input_size, t.channels_last, variant=t.variant, arch=t.arch)
                for role, t in resolved.all_teachers().items()}
    for role, t in resolved.all_teachers().items():
        teachers[role].precision = t.precision
        teachers[role].extractor = Extractor(compile=t.compile)
    teacher_model = teachers[PRIMARY_TEACHER]
    spec = student_spec(resolved.student.name)
    student_size = resolved.student.input_size or spec.input_size
    student_model = create_student(spec, student_size, seed=resolved.train.seed)
    channels_last = uses_channels_last(spec, student_model, resolved.student.channels_last)
    if channels_last:
        student_model.to(memory_format=torch.channels_last)
    student_input = student_input_config(student_model, student_size)
    view_size = resolved.data.view_size or max(*(s for t in teachers.values() for s in t.input_config.size),
                                               student_size)
    images = open_data(resolved.data.source, limit=resolved.data.limit, seed=resolved.train.seed,
                       val_fraction=resolved.data.val_fraction,
                       load_size=resolved.data.load_size or int(round(view_size * 1.15)))
    console.print(f"data: {images.source}; training on {len(images.train):,} images")
    for note in fit_to_data(resolved.strategy, len(images.train), resolved.train.batch_size):
        console.print(f"[yellow]{note}[/]")
    objective = Objective.build(resolved.strategy, teachers, student_model, student_size)
    student_request = objective.student_request()
    if resume:  # refused before anything is written: a refused resume leaves the run as it was
        _, changes = resume_point(run_dir, resolved.to_dict(), force_resume)
        if changes:
            warnings.warn("resuming with a changed recipe: " + "; ".join(changes))
    if main:  # only now: a start that fails while loading leaves no half-made run folder behind
        claim(run_dir, __version__)
        write_text(run_dir / "recipe.yaml", recipe_to_yaml(resolved))
    for role, request in objective.teacher_requests(teachers, student_model).items():
        if teachers[role].prune(request):  # blocks no strategy reads
            console.print(f"{role} {teachers[role].name}: training runs {teachers[role].pruned_to} of its "
                          f"{teachers[role].num_layers} layers, without the final norm and head")
    module = DistillModule(student_model, objective, student_input, channels_last, student_request,
                           Extractor(compile=resolved.student.compile))

    timings = {"setup": time.perf_counter() - started}

    with _progress(console) as progress:
        result = train(resolved, accelerator, teachers, module, images.train, run_dir, resume, progress,
                       force_resume=force_resume, online_knn=OnlineKnn.from_recipe(resolved, images))
    timings["train"] = result.seconds
    for teacher in teachers.values():
        teacher.extractor = Extractor()  # evaluation's requests need no compiled graphs of their own
    timings["online_eval"] = result.online_eval_seconds
    console.print(f"trained {result.steps} steps ({result.images_seen:,} images seen) in {result.seconds:.0f} s "
                  f"({result.images_per_second:.0f} img/s)"
                  + (f", resumed from step {result.resumed_from_step}" if result.resumed_from_step else "")
                  + (f"; {result.bad_images} unreadable images skipped" if result.bad_images else "")
                  + (f"; {result.skipped_steps} steps skipped for non-finite losses" if result.skipped_steps else ""))

    metrics: dict[str, Any] = {}
    student_dir = run_dir / "student"
    if main:
        trained = accelerator.unwrap_model(module).student.float().cpu().eval()
        tick = time.perf_counter()
        teacher_model.unprune()  # evaluation embeds with the whole teacher
        metrics = evaluate_run(resolved, teacher_model.cpu(), trained, spec, student_size, student_input,
                               channels_last, images, console)
        timings["evaluate"] = time.perf_counter() - tick
        tick = time.perf_counter()
        export_student(trained, student_dir, architecture=spec.timm,
                       model_args=model_args_for(spec, student_size), input_size=student_size,
                       mean=student_input.mean, std=student_input.std,
                       provenance={
                           "distillkit_version": __version__,
                           "teacher": teacher_model.describe(),
                           **({"other_teachers": {role: t.describe() for role, t in teachers.items()
                                                  if role != PRIMARY_TEACHER}} if len(teachers) > 1 else {}),
                           "strategy": resolved.to_dict()["strategy"],
                           "data": images.source,
                           "steps": result.steps,
                           "metrics": metrics,
                       })
        timings["export"] = time.perf_counter() - tick
    accelerator.wait_for_everyone()
    timings["total"] = time.perf_counter() - started
    final = CompressResult(run_dir=run_dir, student_dir=student_dir, metrics=metrics, timings=timings,
                           steps=result.steps, data_source=images.source, recipe=resolved,
                           train_images=len(images.train), images_seen=result.images_seen,
                           teacher_cache=result.teacher_cache)
    if main:
        write_json(run_dir / "result.json", final.to_dict())
        console.print(f"student exported to {student_dir} (timm: create_model('local-dir:{student_dir}', "
                      "pretrained=True))")
        _write_report(run_dir, console)
    return final


def _write_report(run_dir: Path, console: Console) -> None:
    """report.html and its plots; the run is already saved, so a failure here only warns."""
    try:
        console.print(f"report: {report(run_dir)}")
    except Exception as e:  # noqa: BLE001 - any failure: the run must not be lost over its report
        warnings.warn(f"the run is saved, but its report could not be written ({type(e).__name__}: {e}); "
                      f"retry with: distillkit report {run_dir}")


def _resumed_recipe(recipe, options: dict[str, Any], resume: bool):
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
    for role, t in recipe.all_teachers().items():
        try:
            check_teacher_name(t.name, variant=t.variant, arch=t.arch, weights=t.weights)
        except UsageError as e:
            raise UsageError(f"teachers.{role}: {e}" if role != PRIMARY_TEACHER else str(e)) from None
    student_spec(recipe.student.name)
    check_data_source(recipe.data.source)
    data_folder = None if recipe.data.source.startswith("builtin:") else Path(recipe.data.source).expanduser()
    clear = check_run_folder(run_dir, resume, overwrite, data_folder, cache_dir())
    if resume and find_checkpoint(run_dir) is None:
        raise UsageError(f"--resume: {run_dir} holds no checkpoint to resume from")
    return clear


def evaluate_run(recipe: Recipe, teacher: Teacher, student: torch.nn.Module, spec, student_size: int,
                 student_input, channels_last: bool, images, console: Console) -> dict[str, Any]:
    """k-NN / probe accuracy for teacher, trained student and the same student at its random init."""
    random_init = create_student(spec, student_size, seed=recipe.train.seed).eval()
    if channels_last:
        random_init.to(memory_format=torch.channels_last)
    networks = {
        "teacher": (lambda v: teacher(v, FeatureRequest(embedding=True)).embedding, teacher.model,
                    teacher.input_config.size, teacher.channels_last),
        "student": (_student_embed(student, student_input, channels_last), student,
                    (student_size, student_size), channels_last),
        "student_random_init": (_student_embed(random_init, student_input, channels_last), random_init,
                                (student_size, student_size), channels_last),
    }
    metrics: dict[str, Any] = {}
    labelled = recipe.eval.enabled and images.test is not None and images.num_classes
    if labelled:
        bank = eval_subset(images.train_all, recipe.eval.max_train, recipe.train.seed)
        test = eval_subset(images.test, recipe.eval.max_test, recipe.train.seed)
        metrics["eval_split"] = {"train_images": len(bank), "test_images": len(test)}
    for name, (embed, model, size, cl) in networks.items():
        row: dict[str, Any] = {}
        if labelled:
            train_set = embed_dataset(embed, bank, num_workers=recipe.data.num_workers)
            test_set = embed_dataset(embed, test, num_workers=recipe.data.num_workers)
            row.update(score_embeddings(train_set, test_set, recipe.eval.knn_k, recipe.eval.knn_temperature,
                                        recipe.eval.probe_steps, seed=recipe.train.seed))
        row["params"] = count_params(model)
        row["latency_ms"] = round(cpu_latency_ms(model, size, cl, recipe.eval.latency_runs), 3)
        metrics[name] = row
    if not labelled:
        console.print("[yellow]no labelled held-out split: k-NN and linear-probe accuracy were skipped[/]")
    gap = gap_recovered(metrics)
    if gap:
        metrics["gap_recovered"] = gap
    console.print(results_table(metrics))
    said = verdict(metrics)
    if said is not None:
        colour = {"good": "green", "fair": "yellow", "bad": "bold red"}[said["level"]]
        console.print(f"[{colour}]{said['text']}[/]", highlight=False)
        if said["advice"]:
            console.print(f"[bold red]warning: {said['advice']}[/]", highlight=False)
    return metrics


def _student_embed(model, input_config, channels_last):
    return lambda v: model(prepare_input(v, input_config, channels_last))


def results_table(metrics: dict[str, Any]) -> Table:
    table = Table(title="distillkit results (held-out split)")
    table.add_column("model")
    gap = gap_recovered(metrics)
    for column in ("k-NN top-1", "linear probe top-1", "params", "CPU latency (1 image)") + (
            ("gap recovered (k-NN / probe)",) if gap else ()):
        table.add_column(column, justify="right")
    for name in ("teacher", "student", "student_random_init"):
        row = metrics.get(name)
        if row is None:
            continue
        table.add_row(
            name.replace("_", " "),
            f"{row['knn_top1']:.2%}" if "knn_top1" in row else "-",
            f"{row['probe_top1']:.2%}" if "probe_top1" in row else "-",
            f"{row['params'] / 1e6:.2f} M",
            f"{row['latency_ms']:.1f} ms",
            *((" / ".join(f"{gap[k]:.0%}" if k in gap else "-" for k in GAP_METRICS) if name == "student" else "",)
              if gap else ()),
        )
    return table


def _progress(console: Console) -> Progress:
    """The training progress bar. Its refresh thread rebuilds the bar on every tick, on the training's
    cores: twice a second is plenty for steps that take tenths of a second, and costs less than rich's 10."""
    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                    TextColumn("{task.fields[terms]}"), TextColumn("{task.fields[speed]}"), TimeRemainingColumn(),
                    console=console, transient=False, refresh_per_second=2)


def _default_run_dir(recipe: Recipe) -> Path:
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    safe = lambda s: s.replace(":", "-").replace("/", "-")  # noqa: E731
    return Path("runs") / f"{stamp}-{safe(recipe.teacher.name)}-{safe(recipe.student.name)}-{'+'.join(recipe.strategy)}"


# `distillkit eval` lives in evaluate_model.py; importable from here as before.
from .evaluate_model import evaluate_student  # noqa: E402, F401
