"""The training loop, on Accelerate: epochs of `train_step`s, checkpoints, signals, epoch-end records.

Views are rendered from parameters that depend on (seed, epoch or view slot, image index, view), so the
data a step sees does not depend on the number of processes. A run is built once (`distillkit.run.Run`);
`train` trains its student in place.
"""

from __future__ import annotations

import math
import signal
import threading
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Sampler

from ..conv_taps import cropped_taps
from ..data import collate_skipping_bad
from ..data.loading import loader_options
from ..data.sources import ReplacingBad
from ..data.views import view_config, view_seed, view_slots
from ..errors import RunError, UsageError
from ..evaluate.online import OnlineKnn
from ..messages import warn
from ..recipe import Recipe
from ..roles import PRIMARY_TEACHER
from .bad_images import BadImageTally
from .budget import plan_budget
from .cache import CacheSetup, open_caches
from .checkpoint import load_checkpoint, resume_point, save_checkpoint, sharded, whole_student_state
from .launch import TO_ACCELERATE, cpu_processes, resolve_launch, warn_if_precision_overridden
from .metrics_log import append_record, trim_to_step
from .step import DistillModule, StepContext, train_step
from .step_log import StepLog
from .sync import agreed
from .trackers import accelerator_options, finish_trackers, start_trackers

if TYPE_CHECKING:
    from ..run import Run


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


def weight_decay_factor(step: int, total_steps: int) -> float:
    """I-JEPA's `CosineWDSchedule` as a weight: 1 at the first step -> 0 at the last, on a half cosine; the decay
    is end + (start - end) * factor."""
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, step / max(1, total_steps))))


def build_optimizer(module: nn.Module, recipe: Recipe) -> torch.optim.Optimizer:
    """SGD or AdamW, fused: one kernel per step, and a step whose loss was not finite is skipped on the device
    (train/step.py sets the optimiser's `found_inf`, as torch's GradScaler does), leaving parameters and state
    untouched without a host read. No weight decay on biases and norm parameters (1-D tensors), whose group is
    marked `decays: False` so a weight-decay schedule leaves it alone."""
    decay, no_decay = [], []
    for param in module.parameters():
        if param.requires_grad:
            (no_decay if param.ndim <= 1 else decay).append(param)
    groups = [
        {"params": decay, "weight_decay": recipe.train.weight_decay, "decays": True},
        {"params": no_decay, "weight_decay": 0.0, "decays": False},
    ]
    if recipe.train.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=recipe.train.lr, momentum=recipe.train.momentum, fused=True)
    return torch.optim.AdamW(groups, lr=recipe.train.lr, fused=True)


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
    # FSDP / DeepSpeed: the student's whole state dict, gathered from the shards, on the main process (else None)
    student_state: dict[str, Tensor] | None = None


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


SIGNAL_CHECK_EVERY = 10  # optimiser steps between the processes' agreement on a stop signal


def make_accelerator(recipe: Recipe, run_dir: Path | None = None):
    """The run's Accelerator: precision and gradient accumulation (the recipe's, or `accelerate launch`'s when
    the recipe leaves them to it: `launch.resolve_launch`), the device Accelerate picks (CUDA, MPS, XPU, else the
    CPU), and the experiment trackers of `train.log_with` (writing into `run_dir`; none without it)."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, GradientState
    from accelerate.utils import DataLoaderConfiguration

    warn_if_precision_overridden(recipe.train.precision)
    train_config = resolve_launch(recipe).train
    # Accelerate keeps its settings in process-wide singletons; a pipeline calling compress() twice
    # (say fp32, then bf16) must get the second run's settings. The process group (PartialState) stays.
    AcceleratorState._reset_state()
    GradientState._reset_state()
    try:
        accelerator = Accelerator(
            mixed_precision=TO_ACCELERATE[train_config.precision],
            gradient_accumulation_steps=train_config.grad_accum,
            cpu=cpu_processes(),  # several processes without GPUs: what makes Accelerate set up gloo
            # pinned batches (on CUDA) reach the device without the host waiting for the copy
            dataloader_config=DataLoaderConfiguration(non_blocking=True),
            **accelerator_options(recipe.train.log_with, run_dir),
        )
    except (ValueError, RuntimeError) as e:
        raise UsageError(
            f"--precision {train_config.precision} is not available on this machine ({e}); use fp32, or bf16 on a CPU"
        ) from None
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


def train(
    run: "Run", progress, resume: bool = False, force_resume: bool = False, online_knn: OnlineKnn | None = None
) -> TrainResult:
    """Train `run`'s student in place, checkpointing every `train.checkpoint_every` steps and every epoch;
    `resume` continues from the run folder's last checkpoint. `online_knn`: scored on the main process at
    every epoch's end into that epoch's metrics.jsonl line, its time left out of the speed."""
    if online_knn is not None and sharded(run.accelerator):
        warn(
            "online k-NN is off under FSDP / DeepSpeed: between steps no process holds the whole student; "
            "it is scored after training, from the gathered weights"
        )
        online_knn = None
    training = _Training(run, progress, resume, force_resume)
    position = training.position
    try:
        with StopSignals() as signals, cropped_taps(training.inner):
            training.start(online_knn)
            while position.step < training.budget.total_steps and position.epoch < training.budget.epochs:
                epoch_start = time.perf_counter()
                for batch in training.epoch_batches():
                    if training.step(batch) and training.after_step(signals):
                        break
                if position.batch >= training.micro_batches:  # the epoch ran to its end
                    training.end_epoch(time.perf_counter() - epoch_start, online_knn)
                training.checkpoint()  # after every epoch, and where max_steps stopped inside one
    finally:  # the trackers are closed (flushed) on success and on failure alike
        finish_trackers(run.accelerator)
    return training.result()


class NonfiniteSteps:
    """The optimiser steps skipped for a non-finite loss, counted on the device (no host read per step): the
    total and the current run of consecutive ones. The loop reads them back with the logged values."""

    def __init__(self):
        self.total: Tensor | None = None
        self.run: Tensor | None = None

    def add(self, skipped: Tensor) -> None:
        if self.total is None:
            self.total, self.run = skipped.clone(), skipped.clone()
        else:
            self.total = self.total + skipped
            self.run = (self.run + skipped) * skipped

    def counters(self) -> dict[str, Tensor]:
        return {"skipped_total": self.total, "skipped_run": self.run}

    def total_read(self) -> int:
        """The total as a number (one read: at the end of training)."""
        return 0 if self.total is None else int(self.total.item())


class _Training:
    """One run's training state: the prepared module, optimiser and loader, the step context, the position,
    the log and the counters of skipped steps and unreadable images. `train` drives it."""

    def __init__(self, run: "Run", progress, resume: bool, force_resume: bool):
        recipe, accelerator = resolve_launch(run.recipe), run.accelerator  # the precision and grad_accum it runs
        self.recipe, self.accelerator, self.run_dir, self.train_set = recipe, accelerator, run.run_dir, run.images.train
        _check_batch(recipe, accelerator.num_processes, len(self.train_set))
        module = DistillModule(run.student, run.objective)
        module, optimizer, self.loader = accelerator.prepare(
            module, build_optimizer(module, recipe), _loader(recipe, self.train_set, accelerator)
        )
        for teacher in run.teachers.values():
            teacher.to(accelerator.device)
        self.inner: DistillModule = accelerator.unwrap_model(module)
        self.micro_batches = len(self.loader)
        self.grad_accum = _accumulation(recipe, accelerator)
        self.budget = budget = plan_budget(recipe.train, self.micro_batches, self.grad_accum)
        self.recipe_dict = recipe.to_dict()
        self.position = _resume(run.run_dir, self.recipe_dict, accelerator, force_resume) if resume else Position()
        self.resumed_from = self.position.step
        self.resume = resume
        requests = run.objective.teacher_requests(run.teachers, run.student.model)
        self.caches = self._open_caches(run, requests, progress)
        warmup = int(recipe.train.warmup_fraction * budget.total_steps)
        schedule = lambda step: recipe.train.lr * lr_factor(step, budget.total_steps, warmup)  # noqa: E731
        self.ctx = StepContext(accelerator, module, optimizer, run.teachers, requests, self.caches, run.sizes,
                               view_config(recipe.data), view_seed(recipe.data, recipe.train.seed), schedule,
                               recipe.train.clip_grad, _decay_schedule(recipe, budget.total_steps))  # fmt: skip
        self.teacher = run.teachers.get(PRIMARY_TEACHER)  # None when pretraining
        self.command = run.command
        self.log = StepLog(
            accelerator,
            progress,
            run.run_dir / "metrics.jsonl",
            budget.total_steps,
            recipe.train.log_every,
            self.position.step,
        )
        self.bad_images = BadImageTally(accelerator, len(self.train_set), recipe.data.max_bad_fraction)
        self.skipped, self.reference_seconds = 0, 0.0  # skipped: the non-finite steps counted when last read
        self.nonfinite = NonfiniteSteps()
        self.unhealthy: set[str] = set()  # strategies whose health warning stands

    def _open_caches(self, run: "Run", requests: dict, progress) -> dict:
        """The view slots (auto sizes the views a teacher cache replays; a run that reads no teacher, simclr,
        keeps fresh views) and the teachers' caches when they pay."""
        recipe, budget = self.recipe, self.budget
        seen = budget.total_steps * recipe.train.batch_size * self.grad_accum
        self.slots = (
            view_slots(recipe.data, seen, budget.epochs, len(self.train_set))
            if requests or recipe.data.view_slots != "auto"
            else None
        )
        say = progress.console.print if self.accelerator.is_main_process else (lambda *a, **k: None)
        load_size = None if recipe.data.source.startswith("builtin:") else run.sizes.load_size
        setup = CacheSetup(run.teachers, requests, run.objective, run.sizes.teachers, self.train_set, self.slots,
                           load_size=load_size)  # fmt: skip
        caches, self.cache_root = open_caches(recipe, self.accelerator, setup, budget.epochs, say)
        return caches

    def start(self, online_knn: OnlineKnn | None) -> None:
        """Before the first step: the trackers start; a resume drops the log records after its checkpoint; a new
        run records the online k-NN's reference levels (teacher, random init), at step 0 for the trackers."""
        main, metrics_path = self.accelerator.is_main_process, self.run_dir / "metrics.jsonl"
        start_trackers(self.accelerator, self.run_dir, self.recipe_dict, self.resumed_from)
        if self.resume and main:  # the steps logged after the checkpoint are trained (and logged) again
            trim_to_step(metrics_path, self.position.step)
        if online_knn is not None and self.position.step == 0 and main:
            tick = time.perf_counter()
            record = online_knn.references(self.teacher, self.inner.io)
            append_record(metrics_path, record)
            self.log.track(record, 0)
            self.reference_seconds = time.perf_counter() - tick
        self.log.started = time.perf_counter()
        self.ctx.module.train()

    def epoch_batches(self):
        """This epoch's batches from where the position stands (a mid-epoch resume skips the ones done)."""
        self.loader.set_epoch(self.position.epoch)  # through Accelerate's loader: it re-sets the sampler's epoch
        batch = self.position.batch
        return _apart_from_the_rng(self.accelerator.skip_first_batches(self.loader, batch) if batch else self.loader)

    def step(self, batch) -> bool:
        """One micro-batch; True when it completed an optimiser step."""
        position = self.position
        position.batch += 1
        self.bad_images.add(batch.bad)
        if batch.images is None:
            return False
        view_epoch = position.epoch % self.slots if self.slots else position.epoch  # the views this epoch renders
        outcome = train_step(self.ctx, batch, view_epoch, position.step, position.step / self.budget.total_steps)
        self.log.images_seen += batch.images.shape[0] * self.accelerator.num_processes
        if outcome.skipped is None:  # a micro-batch of an accumulation
            return False
        position.step += 1
        self.nonfinite.add(outcome.skipped)
        lr = self.ctx.optimizer.param_groups[0]["lr"]
        self.log.step(position.step, position.epoch, outcome.loss, outcome.terms, lr, outcome.skipped,
                      self.nonfinite.counters())  # fmt: skip
        logged = self.log.take_logged()
        if logged is not None:  # a logging step: what it read back
            self._check_nonfinite()
            self._check_health(logged)
        return True

    def _check_nonfinite(self) -> None:
        """At logging steps (the counts are read back with the logged values, so the step itself never waits for
        the device): say how many steps since the last logging step were skipped for a non-finite loss, and stop
        once `train.max_nonfinite_steps` in a row were (seen at the first logging step after they happened)."""
        total, run = (int(self.log.counters[name]) for name in ("skipped_total", "skipped_run"))
        if total > self.skipped:
            warn(
                f"step {self.position.step}: {total - self.skipped} of the steps since the last log had a loss that "
                "is not finite; they were skipped (the student and optimiser are unchanged by them)"
            )
        self.skipped = total
        if run >= self.recipe.train.max_nonfinite_steps:
            raise RunError(
                f"{run} steps in a row had a non-finite loss; stopping. The checkpoints in "
                f"{self.run_dir / 'checkpoints'} hold the student as it was before them; lower --lr, clip gradients "
                "(--set train.clip_grad=1.0) or use --precision fp32"
            )

    def _check_health(self, logged: dict[str, float]) -> None:
        """At logging steps, the strategies' warnings about what was logged (a collapsing target): said when
        they first appear, not again while they last."""
        warnings = self.inner.objective.health(logged)
        if self.accelerator.is_main_process:
            for warning in warnings:
                if warning.split(":")[0] not in self.unhealthy:
                    warn(f"step {self.position.step}: {warning}")
        self.unhealthy = {warning.split(":")[0] for warning in warnings}

    def after_step(self, signals: "StopSignals") -> bool:
        """Checkpoint when due or asked to stop (a signal: saved, then RunError); True when the budget is done."""
        every, step = self.recipe.train.checkpoint_every, self.position.step
        stop = self._stop_requested(signals)
        if (every and step % every == 0) or stop:
            self.checkpoint()
        if stop:
            raise RunError(
                f"stopped by signal {signals.received} at step {step}; the run is saved. "
                f"Resume it with: {self.command} --out {self.run_dir} --resume"
            )
        return step >= self.budget.total_steps

    def _stop_requested(self, signals: "StopSignals") -> bool:
        """Whether every process stops now. A signal may reach only some processes, so several processes agree
        (one small all-gather, a wait for the device) every `SIGNAL_CHECK_EVERY` steps only: a signal waits at
        most that many steps. One process answers at once, without touching the device."""
        received = signals.received is not None
        if self.accelerator.num_processes == 1:
            return received
        if self.position.step % SIGNAL_CHECK_EVERY:
            return False
        return agreed(self.accelerator, received)

    def end_epoch(self, seconds: float, online_knn: OnlineKnn | None) -> None:
        self.bad_images.merge()  # every process has met every image once: the union of their bad files
        extra = {}
        if online_knn is not None and self.accelerator.is_main_process:
            extra = online_knn(self.inner.io)
            self.log.paused_seconds += extra["online_knn_seconds"]
        self.log.epoch_end(self.position.epoch + 1, self.position.step, seconds, extra)
        self.position.epoch += 1
        self.position.batch = 0

    def checkpoint(self) -> None:
        """Every process saves (a sharded model or optimiser saves its shards); the teachers' caches first."""
        for cache in self.caches.values():
            cache.flush()
        save_checkpoint(self.run_dir, self.accelerator, asdict(self.position), self.recipe_dict)

    def result(self) -> TrainResult:
        seconds, train = self.log.seconds, self.recipe.train
        self.skipped = self.nonfinite.total_read()
        self.bad_images.merge()
        if self.bad_images.summary():
            warn(self.bad_images.summary())
        return TrainResult(
            steps=self.position.step,
            epochs=self.position.epoch,
            seconds=seconds,
            images_per_second=self.log.speed,
            resumed_from_step=self.resumed_from,
            final_terms=self.log.terms_mean,
            skipped_steps=self.skipped,
            bad_images=len(self.bad_images.found),
            online_eval_seconds=self.log.paused_seconds + self.reference_seconds,
            images_seen=self.position.step * train.batch_size * self.grad_accum,
            teacher_cache=str(self.cache_root) if self.caches else None,
            student_state=whole_student_state(self.accelerator, self.ctx.module),
        )


def _decay_schedule(recipe: Recipe, total_steps: int):
    """Optimiser step -> weight decay, when `train.weight_decay_end` schedules it (None: constant)."""
    start, end = recipe.train.weight_decay, recipe.train.weight_decay_end
    if end is None:
        return None
    return lambda step: end + (start - end) * weight_decay_factor(step, total_steps)


def _apart_from_the_rng(loader):
    """The loader's batches, fetched without moving the global CPU random state that training draws from
    (masks, token drops, dropout): a DataLoader draws a seed from it for every new iterator, and a resumed
    run makes its iterator at another point of the stream than the run it continues."""
    batches = iter(loader)
    while True:
        with torch.random.fork_rng(devices=[]):
            try:
                batch = next(batches)
            except StopIteration:
                return
        yield batch


def _check_batch(recipe: Recipe, world: int, num_images: int) -> None:
    if recipe.train.batch_size % world:
        raise UsageError(
            f"train.batch_size {recipe.train.batch_size} is global and must divide evenly over {world} processes"
        )
    if num_images < recipe.train.batch_size:
        raise UsageError(
            f"only {num_images} training images, fewer than one batch of "
            f"{recipe.train.batch_size}; lower --batch-size or use more images"
        )


def _loader(recipe: Recipe, train_set, accelerator) -> DataLoader:
    """The training loader: each process's share of the global batch, in the sampler's order; `data.num_workers`
    workers (auto: see data/loading.py), pinned and persistent on CUDA. Workers change no result: items depend
    only on their index, the sampler runs in this process, and `_apart_from_the_rng` keeps the seed a new
    iterator draws off training's random stream."""
    return DataLoader(
        ReplacingBad(train_set),
        batch_size=recipe.train.batch_size // accelerator.num_processes,
        sampler=EpochSampler(len(train_set), recipe.train.seed),
        drop_last=True,
        collate_fn=collate_skipping_bad,
        **loader_options(recipe.data.num_workers, train_set, accelerator.device, persistent=True),
    )


def _accumulation(recipe: Recipe, accelerator) -> int:
    """The gradient accumulation Accelerate steps with, after `prepare` (a DeepSpeed config may set its own):
    the one the budget counts. It must be the recipe's resolved `train.grad_accum`, which the run records."""
    steps = accelerator.gradient_accumulation_steps
    if steps != recipe.train.grad_accum:
        raise UsageError(
            f"Accelerate accumulates gradients over {steps} micro-batches (e.g. from a DeepSpeed config's "
            f"gradient_accumulation_steps) but train.grad_accum is {recipe.train.grad_accum}; make them agree"
        )
    return steps


def _resume(run_dir: Path, recipe_dict: dict, accelerator, force: bool) -> Position:
    checkpoint, _ = resume_point(run_dir, recipe_dict, force)
    state = load_checkpoint(checkpoint, accelerator)
    return Position(step=state["step"], epoch=state["epoch"], batch=state.get("batch", 0))


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


_OOM_ADVICE = (
    "the batch does not fit in memory; lower --batch-size (or use --set train.grad_accum=N with a "
    "smaller batch), or lower the input sizes"
)
