"""`pretrain(method="bootleg", ...)`: pretrain a self-supervised ViT teacher (`distillkit pretrain bootleg`).

The run is a distillkit run like `compress`'s (the same recipe schema, Accelerate loop, checkpoints, resume,
signals, run-folder safety, metrics.jsonl, online k-NN and report) whose recipe has no teacher
(`teacher: null`) and one strategy, `bootleg` (strategies/bootleg.py), which trains the student against its
own EMA copy. What it leaves in the run folder:

    bootleg.pth   the I-JEPA-layout checkpoint (ijepa_layout.py): encoder, predictor, target_encoder, args
    teacher/      the target encoder as a timm local-dir export (model.safetensors + config.json + README.md)
    result.json   k-NN / probe accuracy of the target encoder, the context encoder and their random init

`distillkit compress --teacher bootleg --teacher-weights RUN/bootleg.pth` then distils from it.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import timm
from rich.console import Console
from rich.markup import escape

from . import __version__
from .api import check_run_start, claim_run, resumed_recipe, trained_line, training_progress, write_report
from .errors import UsageError
from .evaluate import OnlineKnn, score_networks
from .export import export_student
from .ijepa_layout import write_ijepa_checkpoint
from .io import write_json
from .recipe import Recipe, parse_set, resolve_recipe
from .run import Run
from .student import Student
from .summary import print_results
from .train.launch import resolve_launch
from .train.loop import explain_out_of_memory, make_accelerator, train

METHODS = {"bootleg": "pretrain-bootleg-tiny"}  # method -> its default recipe
CHECKPOINT_FILE = {"bootleg": "bootleg.pth"}
TEACHER_FOLDER = "teacher"

PRETRAIN_OPTIONS = ("data", "epochs", "max_steps", "limit", "batch_size", "lr", "out", "seed", "precision", "log_with")


@dataclass
class PretrainResult:
    run_dir: Path
    checkpoint: Path  # RUN/bootleg.pth
    teacher_dir: Path  # RUN/teacher: the target encoder, timm local-dir
    metrics: dict[str, Any]  # target_encoder / encoder / random_init -> knn_top1, probe_top1, params, latency_ms
    timings: dict[str, float]
    steps: int
    data_source: str
    recipe: Recipe = field(repr=False)
    images_seen: int = 0
    train_images: int = 0  # distinct images trained on (after --limit)

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out.update(run_dir=str(self.run_dir), checkpoint=str(self.checkpoint), teacher_dir=str(self.teacher_dir))
        out["recipe"] = self.recipe.to_dict()
        return out


def pretrain(
    method: str = "bootleg",
    recipe: str | Path | dict | Recipe | None = None,
    *,
    arch: str | None = None,
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
    log_with: str | list[str] | None = None,
    quiet: bool = False,
) -> PretrainResult:
    """Pretrain a ViT with `method` ("bootleg") on `data`; write RUN/bootleg.pth and RUN/teacher/.

    `recipe`: a shipped recipe name, a YAML path, a dict or a `Recipe` (default: `pretrain-bootleg-tiny`, a small
    ViT on Fashion-MNIST that trains on 2 CPU cores). `arch` is the ViT: a timm model name
    (`vit_small_patch16_224`), `timm:<name>`, a shipped student name or a student spec file; the recipe's
    `student.model_args` (no class token, average pooling by default) apply to it. The other options are
    `compress`'s, with the same names and defaults (None = the recipe's value)."""
    if method not in METHODS:
        raise UsageError(f"unknown pretraining method {method!r}; choose one of {', '.join(METHODS)}")
    options = {name: value for name, value in locals().items() if name in PRETRAIN_OPTIONS}
    overrides = {**parse_set(set), "teacher": None}  # the strategy is its own teacher
    if arch is not None:
        overrides["student.name"] = student_name(arch)
    with explain_out_of_memory():
        return _pretrain(method, recipe, options, overrides, resume, force_resume, overwrite, quiet)


def student_name(arch: str) -> str:
    """`--arch`: a bare timm model name becomes `timm:<name>`; shipped students, spec files and timm: stay."""
    if arch.startswith("timm:") or arch.endswith((".yaml", ".yml")) or not timm.is_model(arch):
        return arch
    return f"timm:{arch}"


def _pretrain(method, recipe, options, overrides, resume, force_resume, overwrite, quiet) -> PretrainResult:
    started = time.perf_counter()
    source = resumed_recipe(recipe, options, resume) or METHODS[method]
    resolved = resolve_launch(resolve_recipe(source, options, overrides=overrides))
    _check_pretraining_recipe(resolved, method)
    run_dir = Path(resolved.out) if resolved.out else _default_run_dir(method, resolved)
    clear_previous_run = check_run_start(resolved, run_dir, resume, overwrite)
    accelerator = make_accelerator(resolved, run_dir)
    main = accelerator.is_main_process
    if clear_previous_run:
        if main:
            from .run_folder import clear_run

            clear_run(run_dir)
        accelerator.wait_for_everyone()
    console = Console(quiet=quiet or not main)
    console.print(
        f"[bold]distillkit[/] {__version__}: pretraining {escape(resolved.student.name)} with {method}; "
        f"run folder {escape(str(run_dir))}"
    )
    run = Run.from_recipe(resolved, run_dir, accelerator, say=console.print)
    run.command = f"distillkit pretrain {method}"
    claim_run(run, resume, force_resume)
    timings = {"setup": time.perf_counter() - started}
    with training_progress(console) as progress:
        result = train(run, progress, resume, force_resume, online_knn=OnlineKnn.from_recipe(resolved, run.images))
    timings |= {"train": result.seconds, "online_eval": result.online_eval_seconds}
    console.print(trained_line(result))
    strategy = run.objective.strategies[method]
    checkpoint, teacher_dir = run_dir / CHECKPOINT_FILE[method], run_dir / TEACHER_FOLDER
    metrics: dict[str, Any] = {}
    if main:  # evaluated first, as compress does, so the teacher's model card carries its accuracies
        tick = time.perf_counter()
        metrics = _evaluate(run, strategy, console)
        timings["evaluate"] = time.perf_counter() - tick
        tick = time.perf_counter()
        _write_outputs(run, strategy, result, checkpoint, teacher_dir, metrics)
        timings["export"] = time.perf_counter() - tick
    accelerator.wait_for_everyone()
    timings["total"] = time.perf_counter() - started
    final = PretrainResult(
        run_dir, checkpoint, teacher_dir, metrics, timings, result.steps, run.images.source, resolved,
        result.images_seen, len(run.images.train),
    )  # fmt: skip
    if main:
        write_json(run_dir / "result.json", final.to_dict())
        console.print(
            f"checkpoint: {checkpoint}\nteacher (timm local-dir): {teacher_dir}\n"
            f"distil from it: distillkit compress --teacher bootleg --teacher-weights {checkpoint}",
            markup=False,
        )
        write_report(run_dir, console)
    return final


def _check_pretraining_recipe(recipe: Recipe, method: str) -> None:
    if list(recipe.strategy) != [method]:
        raise UsageError(
            f"`distillkit pretrain {method}` trains strategy {method} alone, but the recipe's strategy section is "
            f"{' + '.join(recipe.strategy)}; use a pretraining recipe (e.g. --recipe {METHODS[method]}) or "
            f"remove the other strategies"
        )
    if recipe.teachers:
        raise UsageError(
            f"pretraining reads no teacher, but the recipe has teachers.{next(iter(recipe.teachers))}; remove it"
        )


def _write_outputs(run: Run, strategy, result, checkpoint: Path, teacher_dir: Path, metrics: dict) -> None:
    """RUN/bootleg.pth and RUN/teacher/, from the trained student, its EMA target encoder and the predictor;
    `metrics` (target_encoder / encoder / random_init accuracies) go into the teacher's model card."""
    student, recipe = run.student, run.recipe
    for network in (student.model, strategy.target_encoder, strategy.predictor):
        network.float().eval().cpu()
    args = {
        "method": strategy.name,
        "arch": student.spec.timm,
        "model_kwargs": student.model_args,
        "input_size": student.size,
        "mean": list(student.input_config.mean),
        "std": list(student.input_config.std),
        "target_layers": list(strategy.layers),
        "strategy": recipe.to_dict()["strategy"][strategy.name],
        "data": run.images.source,
        "distillkit_version": __version__,
    }
    write_ijepa_checkpoint(
        checkpoint,
        encoder=student.model,
        target_encoder=strategy.target_encoder,
        predictor=strategy.predictor,
        args=args,
        epoch=result.epochs,
        step=result.steps,
        loss=result.final_terms.get("loss"),
        batch_size=recipe.train.batch_size,
        world_size=run.accelerator.num_processes,
        lr=recipe.train.lr,
    )
    export_student(
        strategy.target_encoder,
        teacher_dir,
        architecture=student.spec.timm,
        model_args=student.model_args,
        input_size=student.size,
        mean=student.input_config.mean,
        std=student.input_config.std,
        provenance={
            "distillkit_version": __version__,
            "pretrained_with": strategy.name,
            "network": "EMA target encoder",
            "strategy": recipe.to_dict()["strategy"],
            "data": run.images.source,
            "data_source": recipe.data.source,
            "steps": result.steps,
            "metrics": metrics,
        },
    )


def _evaluate(run: Run, strategy, console: Console) -> dict[str, Any]:
    """k-NN / probe of the target encoder (the teacher it becomes), the context encoder and their random init."""
    student = run.student
    target = Student(strategy.target_encoder, student.spec, student.input_config, student.channels_last)
    networks = {
        "target_encoder": target,
        "encoder": student,
        "random_init": student.at_random_init(run.recipe.train.seed),
    }
    with training_progress(console) as progress:
        metrics = score_networks(run.recipe, networks, run.images, run.accelerator.device, progress)
    for network in networks.values():
        network.model.cpu()
    print_results(console, metrics)
    return metrics


def _default_run_dir(method: str, recipe: Recipe) -> Path:
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    return Path("runs") / f"{stamp}-pretrain-{method}-{recipe.student.name.replace(':', '-').replace('/', '-')}"
