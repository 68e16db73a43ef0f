"""Frozen teachers: the named zoo and `load_teacher`."""

from ..inputs import InputConfig, prepare_input
from .base import Teacher
from .zoo import TEACHERS, TeacherSpec, check_teacher_name, list_teachers, load_teacher

__all__ = [
    "InputConfig",
    "Teacher",
    "TEACHERS",
    "TeacherSpec",
    "check_teacher_name",
    "list_teachers",
    "load_teacher",
    "prepare_input",
]
