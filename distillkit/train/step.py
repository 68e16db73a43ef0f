"""One optimisation step: a batch's views -> the teachers' features (computed or read from the cache) ->
the student's features -> the objective's loss -> backward and optimiser step -> the strategies' state.

`DistillModule` (the student and the objective with its heads and queues) is everything that trains, so
it is what Accelerate prepares and DDP wraps; the frozen teachers are only moved to the device.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import Tensor, nn

from ..data import Batch
from ..data.views import BatchViews, SizePlan, ViewConfig, batch_views
from ..features import Features, split_batch
from ..roles import PRIMARY_TEACHER
from ..strategies import Objective, StepInputs
from ..student import Student
from ..teachers import Teacher
from .cache import TeacherCache
from .sync import finite_on_every_process


class DistillModule(nn.Module):
    """The student and the objective (strategy heads, queues): everything that trains. `io` is the
    `Student` itself (its input configuration and extractor); its network is registered as `student`."""

    def __init__(self, student: Student, objective: Objective):
        super().__init__()
        self.student = student.model
        self.objective = objective
        self.io = student
        self.student_request = objective.student_request()

    def forward(
        self, views: list[Tensor], teachers: dict[str, list[Features]], labels: Tensor | None, progress: float
    ) -> tuple[Tensor, dict[str, Tensor], StepInputs]:
        """`teachers`: role -> that teacher's Features of each view (the primary role first)."""
        if self.objective.runs_student:
            student_views = self._student_views_by_strategy(views, teachers, progress)
        else:
            student_views = self._student_views_joined(views)
        step = StepInputs(
            teacher_views=teachers.get(PRIMARY_TEACHER, []),
            student_views=student_views,
            labels=labels,
            progress=progress,
            other_teachers={role: f for role, f in teachers.items() if role != PRIMARY_TEACHER},
        )
        loss, terms = self.objective(step)
        return loss, terms, step

    def _student_views_joined(self, views: list[Tensor]) -> list[Features]:
        """Each view's student Features, consecutive views of one shape run as one batch: the batch-norm
        statistics of a training step cover all its views of that size, as in the official code of SimCLR
        (the 2N views in one batch), SSKD (an image and its 3 rotations, 4B images) and DINO (crops grouped by
        resolution); and a small student keeps its cores busier on one larger batch than on several small
        ones (MobileNetV3-Small at 32 px, 4 x 128 images: forward and backward ~18 % faster)."""
        student_views: list[Features] = []
        for group in _same_shape_runs(views):
            x = self.io.prepare(torch.cat(group) if len(group) > 1 else group[0])
            features = self.io.extractor(self.student, x, self.student_request)
            student_views += split_batch(features, [view.shape[0] for view in group])
        return student_views

    def _student_views_by_strategy(self, views: list[Tensor], teachers, progress: float) -> list[Features]:
        """Each view's student Features, one view at a time: a strategy runs the student itself (masking its
        tokens from the teacher's features of that view, for instance)."""
        student_views = []
        for v, view in enumerate(views):
            x = self.io.prepare(view)
            of_view = {role: features[v] for role, features in teachers.items()}
            features = self.objective.student_features(self.student, x, of_view, self.student_request, progress)
            student_views.append(
                features if features is not None else self.io.extractor(self.student, x, self.student_request)
            )
        return student_views


def _same_shape_runs(views: list[Tensor]) -> list[list[Tensor]]:
    """`views` cut into runs of consecutive tensors of one shape."""
    runs: list[list[Tensor]] = []
    for view in views:
        if runs and runs[-1][0].shape == view.shape:
            runs[-1].append(view)
        else:
            runs.append([view])
    return runs


@dataclass
class StepContext:
    """What every step of a run uses: the prepared module and optimiser, the teachers and what the strategies
    read from them, their caches, the views' sizes and settings, and the learning-rate schedule."""

    accelerator: object
    module: nn.Module  # the prepared DistillModule (DDP-wrapped under several processes)
    optimizer: object
    teachers: dict[str, Teacher]
    requests: dict[str, object]  # role -> FeatureRequest
    caches: dict[str, TeacherCache]
    sizes: SizePlan
    views: ViewConfig
    view_seed: int
    lr: Callable[[int], float]  # optimiser step -> learning rate
    clip_grad: float | None = None
    weight_decay: Callable[[int], float] | None = None  # optimiser step -> weight decay; None = the recipe's, constant
    skip: "DeviceSkip" = field(default_factory=lambda: DeviceSkip())

    @property
    def objective(self) -> Objective:
        return self.accelerator.unwrap_model(self.module).objective


@dataclass
class StepOutcome:
    loss: Tensor
    terms: dict[str, Tensor]  # the objective's named terms, detached
    finite: Tensor  # 1.0, or 0.0 when the loss was not finite on some process: a device tensor, not read here
    skipped: Tensor | None  # at an optimiser step: 1.0 when it was skipped (a micro-batch not finite); else None


class DeviceSkip:
    """Skips an optimiser step whose loss was not finite without asking the host: every micro-batch's verdict
    (finite_on_every_process) is folded into `pending` on the device; the fused optimiser reads it as its
    `found_inf` (the attribute torch's GradScaler sets) and leaves parameters and state untouched when it is 1.
    A skipped step's gradients are computed, not applied."""

    def __init__(self):
        self.pending: Tensor | None = None  # 1.0 when a micro-batch of the coming optimiser step was not finite
        self._momentum_ready = False

    def add(self, finite: Tensor) -> None:
        bad = 1.0 - finite
        self.pending = bad if self.pending is None else torch.maximum(self.pending, bad)

    def arm(self, optimizer) -> bool:
        """Before `optimizer.step()`: hand it the verdict (through Accelerate's wrapper to torch's optimiser).
        True: call its step. An optimiser that is not fused cannot skip on the device: it reads the verdict here
        (one host read) and is stepped only when the loss was finite."""
        inner = getattr(optimizer, "optimizer", optimizer)
        if not inner.defaults.get("fused"):
            return not bool(self.pending.item())
        if not self._momentum_ready:
            _zero_momentum_buffers(inner)
            self._momentum_ready = True
        inner.grad_scale, inner.found_inf = None, self.pending
        return True

    def stepped(self) -> Tensor:
        """After the optimiser step: 1.0 when it was skipped; the next step starts clean."""
        bad, self.pending = self.pending, None
        return bad


def _zero_momentum_buffers(optimizer) -> None:
    """SGD's momentum buffers as zeros where none exist yet: the same first update as torch's own (buffer =
    gradient, dampening 0), and fused SGD skipping a first step would otherwise leave them uninitialised."""
    if not isinstance(optimizer, torch.optim.SGD):
        return
    for group in optimizer.param_groups:
        if group["momentum"]:
            for param in group["params"]:
                state = optimizer.state[param]
                if state.get("momentum_buffer") is None:
                    state["momentum_buffer"] = torch.zeros_like(param, memory_format=torch.preserve_format)


def train_step(ctx: StepContext, batch: Batch, view_epoch: int, step: int, progress: float) -> StepOutcome:
    """One micro-batch: forward, backward, the optimiser step (Accelerate holds it back until the last
    micro-batch of an accumulation; skipped on the device when a micro-batch's loss was not finite on some
    process) and the strategies' updates. Nothing here reads the device."""
    accelerator, objective = ctx.accelerator, ctx.objective
    views = batch_views(
        batch.images,
        batch.indices,
        ctx.views,
        seed=ctx.view_seed,
        epoch=view_epoch,
        num_views=objective.num_views,
        expand=objective.expand_views,
    )
    with accelerator.accumulate(ctx.module):
        with accelerator.autocast():
            teachers = teacher_features(ctx, views, batch, view_epoch)
            loss, terms, inputs = ctx.module(views.at(ctx.sizes.student), teachers, batch.labels, progress)
        finite = finite_on_every_process(accelerator, loss)
        ctx.skip.add(finite)
        accelerator.backward(loss)
        if accelerator.sync_gradients and ctx.clip_grad:
            accelerator.clip_grad_norm_(ctx.module.parameters(), ctx.clip_grad)
        for group in ctx.optimizer.param_groups:
            group["lr"] = ctx.lr(step)
            if ctx.weight_decay is not None and group.get("decays"):
                group["weight_decay"] = ctx.weight_decay(step)
        if ctx.skip.arm(ctx.optimizer):
            ctx.optimizer.step()
        skipped = ctx.skip.stepped() if accelerator.sync_gradients else None
        inputs.optimizer_stepped = accelerator.sync_gradients
        objective.after_step(inputs, _finite_rows(accelerator.gather))
        ctx.optimizer.zero_grad(set_to_none=True)
    return StepOutcome(loss, terms, finite, skipped)


def _finite_rows(gather: Callable[[Tensor], Tensor]) -> Callable[[Tensor], Tensor]:
    """The strategies' state updates (queues, moments) take a step's teacher outputs whether or not its loss was
    finite; a non-finite value among them (an overflowing teacher) is fed as 0 so it cannot poison the state."""
    return lambda tensor: torch.nan_to_num(gather(tensor), nan=0.0, posinf=0.0, neginf=0.0)


def teacher_features(ctx: StepContext, views: BatchViews, batch: Batch, view_epoch: int) -> dict[str, list[Features]]:
    """Each teacher role's Features of every view: read from its cache when it has one (filled on a miss),
    else computed on the views rendered at that teacher's size."""
    out = {}
    for role, request in ctx.requests.items():
        teacher, size = ctx.teachers[role], ctx.sizes.teachers[role]

        def compute(teacher=teacher, request=request, size=size) -> list[Features]:
            return [teacher(v, request) for v in views.at(size)]

        cache = ctx.caches.get(role)
        out[role] = (
            cache.features(batch.indices, _host_images(batch), view_epoch, compute, ctx.accelerator.device)
            if cache is not None
            else compute()
        )
    return out


def _host_images(batch: Batch):
    """The batch's images on the host (kept there by `Batch.to`): the cache hashes them without a device copy."""
    return batch.host_images if batch.host_images is not None else batch.images
