"""distillkit: compress frozen (self-supervised) teachers into small, deployable timm students.

import distillkit
result = distillkit.compress(teacher="efficientnet-lite0", student="mobilenetv3", strategy="seed")
model = distillkit.load_student(result.student_dir)
run = distillkit.pretrain("bootleg")      # a self-supervised ViT teacher of your own: run.checkpoint

`import distillkit` loads no torch: each public name is imported from its module on first use.
"""

from __future__ import annotations

import importlib
import sys
import types
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"  # the one source of the version: pyproject.toml reads it (hatch dynamic version)

# public name -> the module (of this package) that defines it
_EXPORTS = {
    "CompressResult": "api",
    "compress": "api",
    "DistillkitError": "errors",
    "RunError": "errors",
    "UsageError": "errors",
    "export": "export",
    "load_student": "export",
    "export_heads": "export_heads",
    "load_heads": "heads",
    "FeatureRequest": "features",
    "Features": "features",
    "PretrainResult": "pretrain",
    "pretrain": "pretrain",
    "push": "publish",
    "Recipe": "recipe",
    "list_recipes": "recipe",
    "resolve_recipe": "recipe",
    "report": "report",
    "list_strategies": "strategies",
    "list_students": "student",
    "Teacher": "teachers",
    "list_teachers": "teachers",
    "load_teacher": "teachers",
}

__all__ = [
    "CompressResult",
    "DistillkitError",
    "FeatureRequest",
    "Features",
    "PretrainResult",
    "Recipe",
    "RunError",
    "Teacher",
    "UsageError",
    "compress",
    "export",
    "export_heads",
    "list_recipes",
    "list_strategies",
    "list_students",
    "list_teachers",
    "load_heads",
    "load_student",
    "load_teacher",
    "pretrain",
    "push",
    "report",
    "resolve_recipe",
    "__version__",
]  # = _EXPORTS and __version__

if TYPE_CHECKING:  # what type checkers and IDEs see
    from .api import CompressResult, compress
    from .errors import DistillkitError, RunError, UsageError
    from .export import export, load_student
    from .export_heads import export_heads
    from .features import FeatureRequest, Features
    from .heads import load_heads
    from .pretrain import PretrainResult, pretrain
    from .publish import push
    from .recipe import Recipe, list_recipes, resolve_recipe
    from .report import report
    from .strategies import list_strategies
    from .student import list_students
    from .teachers import Teacher, list_teachers, load_teacher


class _Package(types.ModuleType):
    """distillkit's module type: public names load on first use, and `distillkit.export` / `distillkit.report`
    stay the functions even after their submodules (export.py, report.py, pretrain.py) are imported."""

    def __getattr__(self, name: str) -> Any:
        if name not in _EXPORTS:
            raise AttributeError(f"module 'distillkit' has no attribute {name!r}")
        value = getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
        super().__setattr__(name, value)
        return value

    def __setattr__(self, name: str, value: Any) -> None:
        if name in _EXPORTS and isinstance(value, types.ModuleType):
            return  # the import system naming a submodule `export` or `report`: the function keeps the name
        super().__setattr__(name, value)

    def __dir__(self) -> list[str]:
        return sorted(set(super().__dir__()) | set(__all__))


sys.modules[__name__].__class__ = _Package
