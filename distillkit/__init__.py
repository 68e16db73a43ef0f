"""distillkit: compress frozen (self-supervised) teachers into small, deployable timm students.

import distillkit
result = distillkit.compress(teacher="efficientnet-lite0", student="mobilenetv3", strategy="seed")
model = distillkit.load_student(result.student_dir)
"""

__version__ = "0.1.0"

from .api import CompressResult, compress  # noqa: E402
from .errors import DistillkitError, RunError, UsageError  # noqa: E402
from .export import export, load_student  # noqa: E402
from .features import FeatureRequest, Features  # noqa: E402
from .recipe import Recipe, list_recipes, resolve_recipe  # noqa: E402
from .report import report  # noqa: E402
from .strategies import STRATEGIES  # noqa: E402
from .student import list_students  # noqa: E402
from .teachers import Teacher, list_teachers, load_teacher  # noqa: E402


def list_strategies() -> list[str]:
    return STRATEGIES.names()


__all__ = [
    "CompressResult",
    "DistillkitError",
    "FeatureRequest",
    "Features",
    "Recipe",
    "RunError",
    "Teacher",
    "UsageError",
    "compress",
    "export",
    "list_recipes",
    "list_strategies",
    "list_students",
    "list_teachers",
    "load_student",
    "load_teacher",
    "report",
    "resolve_recipe",
    "__version__",
]
