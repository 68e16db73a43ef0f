"""`Run`: everything one distillation run trains with, built once from a validated recipe.

    run = Run.from_recipe(recipe, run_dir)     teachers, student, sizes, data, objective
    train(run, progress)                       (distillkit.train.loop) trains run.student in place

Teachers are loaded with their precision and compile settings, the student is created, the view sizes
are planned once (`data.views.plan_sizes`), the data opened at the load size they need, the strategies'
data-dependent sizes fitted to the data, the objective built by dry forwards, and every teacher pruned
to the blocks the strategies read. Benchmarks and tests build runs the same way.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from rich.markup import escape
from torch import nn

from .data import ImageData, open_data
from .data.views import SizePlan, plan_sizes
from .recipe import Recipe
from .strategies import Objective, fit_to_data
from .student import Student
from .teachers import Teacher, load_teacher
from .train.loop import make_accelerator


@dataclass
class Run:
    recipe: Recipe  # as it runs: the strategies' sizes fitted to the data
    run_dir: Path
    accelerator: Any
    teachers: dict[str, Teacher]  # role -> frozen teacher, the primary ("teacher") first
    student: Student
    objective: Objective
    sizes: SizePlan
    images: ImageData
    command: str = "distillkit compress"  # what resumes it (said when a signal stops the run)

    @classmethod
    def from_recipe(
        cls,
        recipe: Recipe,
        run_dir: str | Path,
        accelerator=None,
        images: ImageData | None = None,
        say: Callable[[str], None] = lambda text: None,
    ) -> "Run":
        """Build the run `recipe` describes (validated, e.g. by `resolve_recipe`); `images` replaces the
        recipe's data source (e.g. images in memory); `say` hears what was adapted on the way (a queue shrunk
        to the data, a teacher pruned). Writes nothing."""
        accelerator = accelerator or make_accelerator(recipe, Path(run_dir))
        teachers = {
            role: load_teacher(
                t.name,
                t.weights,
                t.input_size,
                t.channels_last,
                variant=t.variant,
                arch=t.arch,
                precision=t.precision,
                compile=t.compile,
            )
            for role, t in recipe.all_teachers().items()
        }
        student = Student.create(recipe.student, seed=recipe.train.seed)
        sizes = plan_sizes(
            recipe.data, {role: t.input_config.size for role, t in teachers.items()}, student.input_config.size
        )
        images = images or open_data(
            recipe.data.source,
            limit=recipe.data.limit,
            seed=recipe.train.seed,
            val_fraction=recipe.data.val_fraction,
            load_size=sizes.load_size,
        )
        say(f"data: {escape(images.source)}; training on {len(images.train):,} images")
        for note in fit_to_data(recipe.strategy, len(images.train), recipe.train.batch_size):
            say(f"[yellow]{escape(note)}[/]")
        objective = Objective.build(recipe.strategy, teachers, student.model, student.size)
        for role, request in objective.teacher_requests(teachers, student.model).items():
            if teachers[role].prune(request):  # blocks no strategy reads
                say(
                    f"{role} {escape(teachers[role].name)}: training runs {teachers[role].pruned_to} of its "
                    f"{teachers[role].num_layers} layers, without the final norm and head"
                )
        if recipe.train.sync_bn:
            student.model = nn.SyncBatchNorm.convert_sync_batchnorm(student.model)
        return cls(recipe, Path(run_dir), accelerator, teachers, student, objective, sizes, images)
