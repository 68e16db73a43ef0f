"""The training loop, on Accelerate: teacher features -> student features -> losses -> step.

One trainable module (`DistillModule` = student + objective with its heads and queues) is what
Accelerate prepares, so DDP wraps exactly that; the frozen teacher is only moved to the device.
Views are rendered from parameters that depend on (seed, epoch, image index, view), so the data
a step sees does not depend on the number of processes.
"""

from __future__ import annotations

import json
import math
import shutil
import signal
import threading
import time
import warnings
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
from rich.markup import escape
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, Sampler

from ..conv_taps import cropped_taps
from ..data import BatchViews, ViewConfig, collate_skipping_bad, sample_view_params
from ..data.augment import is_active, sample_augment_params
from ..errors import RunError, UsageError
from ..features import Extractor, FeatureRequest, Features
from ..recipe import Recipe
from ..roles import PRIMARY_TEACHER
from ..strategies import Objective, StepInputs
from ..inputs import InputConfig, prepare_input
from ..teachers import Teacher
from ..io import cache_dir
from .budget import Budget, plan_budget
from .cache import TeacherCache, cache_key
from .checkpoint import load_checkpoint, resume_point, save_checkpoint
from .metrics_log import append_record, trim_to_step
from .online import OnlineKnn

class DistillModule(nn.Module):
    """The student and the objective (strategy heads, queues): everything that trains."""

    def __init__(self, student: nn.Module, objective: Objective, student_input: InputConfig, channels_last: bool,
                 student_request: FeatureRequest, extractor: Extractor | None = None):
        super().__init__()
        self.extractor = extractor or Extractor()  # Extractor(compile=True) for student.compile
        self.student = student
        self.objective = objective
        self.student_input = student_input
        self.channels_last = channels_last
        self.student_request = student_request

    def forward(self, views: list[Tensor], teachers: dict[str, list[Features]], labels: Tensor | None,
                progress: float) -> tuple[Tensor, dict[str, Tensor], StepInputs]:
        """`teachers`: role -> that teacher's Features of each view (the primary role first)."""
        student_views = []
        for v, view in enumerate(views):
            x = prepare_input(view, self.student_input, self.channels_last)
            of_view = {role: features[v] for role, features in teachers.items()}
            features = self.objective.student_features(self.student, x, of_view, self.student_request, progress)
            student_views.append(features if features is not None
                                 else self.extractor(self.student, x, self.student_request))
        step = StepInputs(teacher_views=teachers.get(PRIMARY_TEACHER, []), student_views=student_views, labels=labels, progress=progress,
                          other_teachers={role: f for role, f in teachers.items() if role != PRIMARY_TEACHER})
        loss, terms = self.objective(step)
        return loss, terms, step


class EpochSampler(Sampler[int]):
    """A shuffle that depends only on (seed, epoch): the same order on every process and after a resume."""

    def __init__(self, size: int, seed: int):
        self.size = size
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Iterator[int]:
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        return iter(torch.randperm(self.size, generator=generator).tolist())

    def __len__(self) -> int:
        return self.size


def lr_factor(step: int, total_steps: int, warmup_steps: int) -> float:
    """Linear warm-up from 0, then cosine decay to 0."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def build_optimizer(module: nn.Module, recipe: Recipe) -> torch.optim.Optimizer:
    """SGD or AdamW; no weight decay on biases and norm parameters (1-D tensors)."""
    decay, no_decay = [], []
    for param in module.parameters():
        if param.requires_grad:
            (no_decay if param.ndim <= 1 else decay).append(param)
    groups = [{"params": decay, "weight_decay": recipe.train.weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    if recipe.train.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=recipe.train.lr, momentum=recipe.train.momentum)
    return torch.optim.AdamW(groups, lr=recipe.train.lr)


@dataclass
class TrainResult:
    steps: int
    epochs: int
    seconds: float
    images_per_second: float
    resumed_from_step: int
    final_terms: dict[str, float] = field(default_factory=dict)
    skipped_steps: int = 0
    bad_images: int = 0
    online_eval_seconds: float = 0.0  # online k-NN time, left out of `seconds` and `images_per_second`
    images_seen: int = 0  # optimiser steps x global batch x grad_accum, over the whole run (resumes included)
    teacher_cache: str | None = None  # the folder the teachers' outputs were cached in, or None


class StopSignals:
    """SIGINT / SIGTERM ask the loop to finish its step, save a checkpoint and stop.

    A second signal while stopping raises KeyboardInterrupt at once.
    """

    def __init__(self):
        self.received: int | None = None
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> "StopSignals":
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def _handle(self, signum, frame) -> None:
        if self.received is not None:
            raise KeyboardInterrupt
        self.received = signum


def make_accelerator(recipe: Recipe):
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, GradientState

    mixed = {"fp32": "no", "bf16": "bf16", "fp16": "fp16"}[recipe.train.precision]
    # Accelerate keeps its settings in process-wide singletons; a pipeline calling compress() twice
    # (say fp32, then bf16) must get the second run's settings. The process group (PartialState) stays.
    AcceleratorState._reset_state()
    GradientState._reset_state()
    try:
        # cpu=True when there is no GPU: that is what makes Accelerate set up gloo under torchrun on CPUs
        accelerator = Accelerator(mixed_precision=mixed, gradient_accumulation_steps=recipe.train.grad_accum,
                                  cpu=not torch.cuda.is_available())
    except (ValueError, RuntimeError) as e:
        raise UsageError(f"--precision {recipe.train.precision} is not available on this machine ({e}); "
                         "use fp32, or bf16 on a CPU") from None
    if recipe.train.sync_bn and accelerator.device.type == "cpu" and accelerator.num_processes > 1:
        raise UsageError("train.sync_bn needs GPUs: torch's SyncBatchNorm does not run on CPU processes")
    if recipe.train.deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
    return accelerator


@dataclass
class Position:
    """Where the run is: optimiser steps done, the current epoch, micro-batches done in it."""

    step: int = 0
    epoch: int = 0
    batch: int = 0


def train(recipe: Recipe, accelerator, teachers: dict[str, Teacher], module: DistillModule, train_set: Dataset,
          run_dir: Path, resume: bool, progress, force_resume: bool = False,
          online_knn: OnlineKnn | None = None) -> TrainResult:
    """Run the optimisation, checkpointing every `train.checkpoint_every` steps and every epoch.

    `teachers`: role -> frozen teacher, the primary ("teacher") first. `online_knn`: scored on the
    main process at every epoch's end into that epoch's metrics.jsonl line, its time left out of the speed."""
    world = accelerator.num_processes
    if recipe.train.batch_size % world:
        raise UsageError(f"train.batch_size {recipe.train.batch_size} is global and must divide evenly over "
                         f"{world} processes")
    if len(train_set) < recipe.train.batch_size:
        raise UsageError(f"only {len(train_set)} training images, fewer than one batch of "
                         f"{recipe.train.batch_size}; lower --batch-size or use more images")
    if recipe.train.sync_bn:
        module.student = nn.SyncBatchNorm.convert_sync_batchnorm(module.student)
    sampler = EpochSampler(len(train_set), recipe.train.seed)
    loader = DataLoader(train_set, batch_size=recipe.train.batch_size // world, sampler=sampler, drop_last=True,
                        num_workers=recipe.data.num_workers, collate_fn=collate_skipping_bad,
                        persistent_workers=recipe.data.num_workers > 0)
    optimizer = build_optimizer(module, recipe)
    module, optimizer, loader = accelerator.prepare(module, optimizer, loader)
    for teacher in teachers.values():
        teacher.to(accelerator.device)
    inner: DistillModule = accelerator.unwrap_model(module)

    micro_batches = len(loader)
    budget = plan_budget(recipe.train, micro_batches)
    total_steps = budget.total_steps
    warmup_steps = int(recipe.train.warmup_fraction * total_steps)
    recipe_dict = recipe.to_dict()
    position = _resume(run_dir, recipe_dict, inner, optimizer, force_resume) if resume else Position()
    resumed_from = position.step

    teacher_requests = inner.objective.teacher_requests(teachers, inner.student)
    augment = recipe.data.augment if is_active(recipe.data.augment) else None
    view_config = ViewConfig(crop_scale=recipe.data.crop_scale, crop_ratio=recipe.data.crop_ratio,
                             flip=recipe.data.flip, augment=augment)
    shared = max(*(s for t in teachers.values() for s in t.input_config.size), *inner.student_input.size)
    student_size = render_size(recipe, inner.student_input.size, shared)
    teacher_sizes = {role: render_size(recipe, t.input_config.size, shared) for role, t in teachers.items()}
    # auto sizes the views a teacher cache replays: a run that reads no teacher (simclr) keeps fresh views
    slots = view_slots(recipe, budget, len(train_set)) if teacher_requests or recipe.data.view_slots != "auto" else None
    main = accelerator.is_main_process
    say = progress.console.print if main else (lambda *a, **k: None)
    cache_root = teacher_cache_root(recipe, budget.epochs, slots) if teacher_requests else None
    caches = open_caches(recipe, accelerator, teachers, teacher_requests, inner.objective, view_config,
                         teacher_sizes, train_set, slots, cache_root, min(slots, budget.epochs), say) \
        if cache_root is not None else {}
    metrics_path = run_dir / "metrics.jsonl"
    if resume and main:  # the steps logged after the checkpoint are trained (and logged) again
        trim_to_step(metrics_path, position.step)
    reference_seconds = 0.0
    if online_knn is not None and position.step == 0 and main:
        tick = time.perf_counter()
        append_record(metrics_path, online_knn.references(teachers[PRIMARY_TEACHER], inner.student,
                                                          inner.student_input, inner.channels_last))
        reference_seconds = time.perf_counter() - tick
    task = progress.add_task("distilling", total=total_steps, completed=position.step, terms="",
                             speed="") if main else None

    def checkpoint() -> None:
        for cache in caches.values():
            cache.flush()
        if main:
            save_checkpoint(run_dir, inner, optimizer, asdict(position), recipe_dict)
        accelerator.wait_for_everyone()

    start_time = time.perf_counter()
    images_seen, nonfinite_run, skipped, bad_seen = 0, 0, 0, []
    online_seconds = 0.0
    terms_mean: dict[str, float] = {}
    module.train()
    # on the CPU, convolutions skip their padding-only taps while training (exact; 2x faster 32 px students)
    with StopSignals() as signals, cropped_taps(inner):
        while position.step < total_steps and position.epoch < budget.epochs:
            loader.set_epoch(position.epoch)  # through Accelerate's loader: it re-sets the sampler's epoch
            epoch_loader = accelerator.skip_first_batches(loader, position.batch) if position.batch else loader
            epoch_start = time.perf_counter()
            view_epoch = position.epoch % slots if slots else position.epoch  # which views this epoch renders
            for batch in epoch_loader:
                position.batch += 1
                bad_seen += batch.bad
                _check_bad_images(bad_seen, len(train_set), recipe.data.max_bad_fraction)
                if batch.images is None:
                    continue
                draws = dict(seed=view_seed(recipe), epoch=view_epoch)
                views = BatchViews(batch.images, [
                    sample_view_params(batch.indices, batch.images.shape[-2], batch.images.shape[-1], view_config,
                                       view=v, **draws) for v in range(inner.objective.num_views)],
                    inner.objective.expand_views,
                    augment=[sample_augment_params(batch.indices, augment, view=v, **draws)
                             for v in range(inner.objective.num_views)] if augment else None,
                    augment_config=augment)
                with accelerator.accumulate(module):
                    with accelerator.autocast():
                        teacher_views = {}
                        for role, request in teacher_requests.items():
                            compute = lambda role=role, request=request: [  # noqa: E731
                                teachers[role](v, request) for v in views.at(teacher_sizes[role])]
                            teacher_views[role] = (caches[role].features(batch.indices, batch.images, view_epoch,
                                                                         compute, accelerator.device)
                                                   if role in caches else compute())
                        loss, terms, step_inputs = module(views.at(student_size), teacher_views, batch.labels,
                                                          position.step / total_steps)
                    finite = _all_finite(accelerator, loss)
                    if finite:
                        accelerator.backward(loss)
                        if accelerator.sync_gradients and recipe.train.clip_grad:
                            accelerator.clip_grad_norm_(module.parameters(), recipe.train.clip_grad)
                        for group in optimizer.param_groups:
                            group["lr"] = recipe.train.lr * lr_factor(position.step, total_steps, warmup_steps)
                        optimizer.step()
                        inner.objective.after_step(step_inputs, accelerator.gather)
                    optimizer.zero_grad(set_to_none=True)
                images_seen += batch.images.shape[0] * world
                if not finite:
                    skipped += 1
                    nonfinite_run += 1
                    warnings.warn(f"step {position.step}: the loss is not finite ({loss.item()}); step skipped")
                    if nonfinite_run >= recipe.train.max_nonfinite_steps:
                        raise RunError(
                            f"{nonfinite_run} steps in a row had a non-finite loss; stopping. The last good "
                            f"checkpoint is in {run_dir / 'checkpoints'}; lower --lr, clip gradients "
                            "(--set train.clip_grad=1.0) or use --precision fp32")
                    continue
                nonfinite_run = 0
                if not accelerator.sync_gradients:
                    continue
                position.step += 1
                values = {k: v.item() for k, v in terms.items()} | {"loss": loss.item()}
                terms_mean = {k: 0.9 * terms_mean.get(k, v) + 0.1 * v for k, v in values.items()}
                log_now = position.step % recipe.train.log_every == 0 or position.step == total_steps
                if log_now and world > 1:  # the global batch's losses, not this process's share
                    values = _mean_over_processes(accelerator, terms | {"loss": loss.detach()})
                if main:
                    speed = images_seen / (time.perf_counter() - start_time - online_seconds)
                    _report(progress, task, position, total_steps, terms_mean, speed)
                    if log_now:
                        append_record(metrics_path, {"step": position.step, "epoch": position.epoch, **values,
                                                     "lr": optimizer.param_groups[0]["lr"],
                                                     "images_per_s": round(speed, 1)})
                every = recipe.train.checkpoint_every
                stop = _agreed(accelerator, signals.received is not None)
                if (every and position.step % every == 0) or stop:
                    checkpoint()
                if stop:
                    raise RunError(
                        f"stopped by signal {signals.received} at step {position.step}; the run is saved. "
                        f"Resume it with: distillkit compress --out {run_dir} --resume")
                if position.step >= total_steps:
                    break
            if position.batch >= micro_batches:  # the epoch ran to its end
                if main:
                    record = {"epoch_end": position.epoch + 1, "step": position.step,
                              "seconds": round(time.perf_counter() - epoch_start, 2),
                              **{k: round(v, 6) for k, v in terms_mean.items()}}
                    if online_knn is not None:
                        record.update(online_knn(inner.student, inner.student_input, inner.channels_last))
                        online_seconds += record["online_knn_seconds"]
                    append_record(metrics_path, record)
                position.epoch += 1
                position.batch = 0
            checkpoint()  # after every epoch, and where max_steps stopped inside one

    seconds = time.perf_counter() - start_time - online_seconds
    if bad_seen:
        warnings.warn(f"{len(bad_seen)} unreadable images were skipped, e.g. "
                      + "; ".join(f"{b.path} ({b.reason})" for b in bad_seen[:3]))
    return TrainResult(steps=position.step, epochs=position.epoch, seconds=seconds,
                       images_per_second=images_seen / seconds if seconds > 0 else 0.0,
                       resumed_from_step=resumed_from, final_terms=terms_mean, skipped_steps=skipped,
                       bad_images=len(bad_seen), online_eval_seconds=online_seconds + reference_seconds,
                       images_seen=position.step * recipe.train.batch_size * recipe.train.grad_accum,
                       teacher_cache=str(cache_root) if caches else None)


def _resume(run_dir: Path, recipe_dict: dict, inner: nn.Module, optimizer, force: bool) -> Position:
    checkpoint, _ = resume_point(run_dir, recipe_dict, force)
    state = load_checkpoint(checkpoint, inner, optimizer)
    return Position(step=state["step"], epoch=state["epoch"], batch=state.get("batch", 0))


def _check_bad_images(bad: list, dataset_size: int, max_fraction: float) -> None:
    if bad and len(bad) > max_fraction * dataset_size:
        examples = "; ".join(f"{b.path} ({b.reason})" for b in bad[:3])
        raise RunError(f"{len(bad)} of {dataset_size} training images are unreadable, more than "
                       f"data.max_bad_fraction = {max_fraction}; e.g. {examples}. Remove or fix them, or "
                       "raise data.max_bad_fraction")


@contextmanager
def explain_out_of_memory():
    """Turn an allocation failure (GPU or CPU) into a `RunError` that says what to change."""
    try:
        yield
    except (torch.OutOfMemoryError, MemoryError) as e:
        raise RunError(_OOM_ADVICE) from e
    except RuntimeError as e:
        if "can't allocate memory" not in str(e) and "out of memory" not in str(e):
            raise
        raise RunError(_OOM_ADVICE) from e


_OOM_ADVICE = ("the batch does not fit in memory; lower --batch-size (or use --set train.grad_accum=N with a "
               "smaller batch), or lower the input sizes")


def _report(progress, task, position: Position, total_steps: int, terms: dict[str, float], speed: float) -> None:
    text = " ".join(f"{k} {v:.4f}" for k, v in terms.items())
    progress.update(task, completed=position.step, speed=f"{speed:.0f} img/s", terms=text)
    if not progress.console.is_terminal and (position.step % max(1, total_steps // 10) == 0
                                             or position.step == total_steps):
        progress.console.print(f"step {position.step}/{total_steps} epoch {position.epoch + 1} {text} "
                               f"{speed:.0f} img/s", highlight=False)


def _mean_over_processes(accelerator, values: dict[str, Tensor]) -> dict[str, float]:
    stacked = torch.stack([v.detach().float().reshape(()) for v in values.values()]).to(accelerator.device)
    means = accelerator.reduce(stacked, reduction="mean")
    return dict(zip(values, means.tolist()))


def _agreed(accelerator, flag: bool) -> bool:
    """True on every process when it is true on any (a signal may reach only some of them)."""
    if accelerator.num_processes == 1:
        return flag
    return bool(accelerator.gather(torch.tensor([float(flag)], device=accelerator.device)).max().item())


def view_seed(recipe: Recipe) -> int:
    """The seed the views' crop parameters are hashed from."""
    return recipe.train.seed if recipe.data.view_seed is None else recipe.data.view_seed


DEFAULT_CACHE_SLOTS = 4  # views per image a teacher cache stores when data.view_slots is not set


AUTO_SLOTS_SHARE = 8  # view_slots auto: the teacher renders 1 / AUTO_SLOTS_SHARE of the images seen


def view_slots(recipe: Recipe, budget: Budget | None = None, num_images: int | None = None) -> int | None:
    """How many distinct views per image (and view index) the run cycles through; None = new ones every epoch.
    A cache folder given explicitly without `data.view_slots` gets DEFAULT_CACHE_SLOTS. `auto` sizes K to the
    data: enough fixed views for the teacher to render an eighth of the images the run sees (one slot for a
    large dataset, more for a small one, never more than the epochs), so a small dataset is not one fixed
    crop per image repeated every epoch."""
    slots = recipe.data.view_slots
    if slots == "auto":
        if budget is None or not num_images:
            raise ValueError("view_slots auto needs the run's budget and data size")
        seen = budget.total_steps * recipe.train.batch_size * recipe.train.grad_accum
        return max(1, min(budget.epochs, round(seen / (AUTO_SLOTS_SHARE * num_images))))
    if slots is not None:
        return slots
    return DEFAULT_CACHE_SLOTS if recipe.data.teacher_cache not in (None, "auto") else None


def teacher_cache_root(recipe: Recipe, epochs: int, slots: int | None) -> Path | None:
    """Where the teachers' outputs are cached, or None. `data.teacher_cache` "auto" caches in the user cache
    exactly when it pays: the run has a fixed set of views (`data.view_slots`) and more epochs than slots,
    so every epoch after the first `slots` reads the teacher's outputs instead of recomputing them."""
    setting = recipe.data.teacher_cache
    if setting is None:
        return None
    if setting == "auto":
        return cache_dir() / "teacher-outputs" if slots is not None and epochs > slots else None
    return Path(setting).expanduser()


def open_caches(recipe: Recipe, accelerator, teachers: dict[str, Teacher], requests: dict[str, FeatureRequest],
                objective: Objective, view_config: ViewConfig, sizes: dict[str, tuple[int, int]], train_set: Dataset,
                slots: int, root: Path, slots_used: int, say: Callable[[str], None]) -> dict[str, TeacherCache]:
    """One cache entry per teacher role under `root`, created by the main process, each announced by `say`.
    `sizes`: role -> the size that teacher's views are rendered at; `slots_used`: the slots this run fills.
    When the disk lacks the room for what the run would write, an automatic cache ("auto") is skipped
    with a message (the teacher is recomputed every epoch) and an explicit folder is refused."""
    # the strategies that derive views (kdss' rotations) change what is cached; the others do not, so
    # students trained with seed and with feature share the teacher's embeddings
    expand = "+".join(type(s).__name__ for s in objective.strategies.values() if type(s).derives_views())
    main = accelerator.is_main_process

    def open_all(create: bool) -> dict[str, TeacherCache]:
        caches = {}
        for role, request in requests.items():
            teacher = teachers[role]
            views = objective.expand_views([torch.zeros(1, 3, *sizes[role]) for _ in range(objective.num_views)])
            probe = teacher(views[0].to(accelerator.device), request)
            key = cache_key(teacher, request, view_config, sizes[role], view_seed(recipe), slots, len(views),
                            recipe.data.cache_dtype, expand) | {"role": role}
            caches[role] = TeacherCache(root, key, probe, index_space(train_set), slots,
                                        len(views), recipe.data.cache_dtype, create=create)
        return caches

    def fits() -> bool:
        needed = sum(_cache_bytes(teachers[role], request, views_per_step, sizes[role], recipe.data.cache_dtype,
                                  accelerator.device) for role, request in requests.items()) * len(train_set) * slots_used
        root.mkdir(parents=True, exist_ok=True)
        free = shutil.disk_usage(root).free
        where = f"{escape(str(root))} ({_gb(needed)} for {len(train_set):,} images x {slots_used} view slots)"
        if needed * 1.05 + (256 << 20) <= free:
            say(f"teacher cache: {where}; epochs after the first {slots_used} read the teachers' outputs "
                "instead of running them (--no-teacher-cache to turn it off)")
            return True
        if recipe.data.teacher_cache == "auto":
            say(f"[yellow]teacher cache skipped: {where} needs more than the {_gb(free)} free there; the teacher "
                "runs every epoch (free space, or set data.teacher_cache to a folder with room)[/]")
            return False
        raise UsageError(f"--teacher-cache {where} needs more than the {_gb(free)} free there; free space, choose "
                         "another folder or pass --no-teacher-cache")

    views_per_step = len(objective.expand_views([torch.zeros(1, 3, 1, 1) for _ in range(objective.num_views)]))
    skip = not fits() if main else False
    if _agreed(accelerator, skip):  # every process learns the main process's decision
        return {}
    caches = open_all(create=True) if main else {}
    accelerator.wait_for_everyone()  # the main process creates the files; the others open them
    return caches if main else open_all(create=False)


def _cache_bytes(teacher: Teacher, request: FeatureRequest, views: int, size: tuple[int, int], dtype: str,
                 device) -> int:
    """Bytes one image's cached outputs take for one view slot: every stored tensor, every view."""
    probe = teacher(torch.zeros(1, 3, *size, device=device), request)
    itemsize = 2 if dtype == "float16" else 4
    return views * itemsize * sum(t.numel() for t in probe.named().values())  # the probe is one image


def _gb(size: float) -> str:
    return f"{size / 1e9:.2f} GB" if size >= 1e8 else f"{size / 1e6:.1f} MB"


def index_space(dataset: Dataset) -> int:
    """How many image indices the dataset's items can carry (a Subset keeps its base's indices)."""
    base = getattr(dataset, "base", None)
    return index_space(base) if base is not None else len(dataset)


def render_size(recipe: Recipe, network_size: tuple[int, int], shared: int) -> tuple[int, int]:
    """The size a network's views are rendered at: `data.view_size` when set; else `shared` (the largest
    network input) for `data.render` shared, or the network's own input size for per_network. A network
    resizes views of another size itself."""
    if recipe.data.view_size:
        return recipe.data.view_size, recipe.data.view_size
    return (shared, shared) if recipe.data.render == "shared" else tuple(network_size)


def _all_finite(accelerator, loss: Tensor) -> bool:
    finite = torch.isfinite(loss.detach()).float().reshape(1)
    if accelerator.num_processes > 1:
        finite = accelerator.gather(finite).min()
    return bool(finite.item())
