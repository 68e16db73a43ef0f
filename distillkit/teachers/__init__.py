"""Frozen teachers: the named zoo and `load_teacher`.

Names load on first use: importing `distillkit.teachers.catalog` (the zoo's names) loads no torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

# public name -> the module that defines it
_EXPORTS = {
    "InputConfig": "distillkit.inputs",
    "prepare_input": "distillkit.inputs",
    "Teacher": "distillkit.teachers.base",
    "TEACHERS": "distillkit.teachers.zoo",
    "TeacherSpec": "distillkit.teachers.zoo",
    "check_teacher_name": "distillkit.teachers.zoo",
    "list_teachers": "distillkit.teachers.zoo",
    "load_teacher": "distillkit.teachers.zoo",
}

__all__ = [
    "InputConfig",
    "TEACHERS",
    "Teacher",
    "TeacherSpec",
    "check_teacher_name",
    "list_teachers",
    "load_teacher",
    "prepare_input",
]

if TYPE_CHECKING:
    from ..inputs import InputConfig, prepare_input
    from .base import Teacher
    from .zoo import TEACHERS, TeacherSpec, check_teacher_name, list_teachers, load_teacher


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value
    return value
