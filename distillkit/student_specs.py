"""Student specs: `students/*.yaml` (shipped) or a spec file of your own, read and checked against the
schema. This module loads no torch or timm (`distillkit list students` reads it); student.py checks the timm
name and builds the model."""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

import yaml

from .errors import UsageError
from .recipe import _build_dataclass, _data_dir


@dataclass(frozen=True)
class StudentSpec:
    name: str
    timm: str
    description: str = ""
    input_size: int = 224
    channels_last: bool | None = None  # None = auto: conv nets yes, token models (ViTs) no
    model_args: dict[str, Any] = field(default_factory=dict)


def students_dir() -> Path:
    """Where the shipped student specs are: inside the wheel, or at the top of a source checkout."""
    return _data_dir("students")


def parse_spec(path: Path) -> StudentSpec:
    """One spec file checked against `StudentSpec` (its timm name is not checked here: see student.read_spec)."""
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as e:
        raise UsageError(f"cannot read student spec {path}: {e}") from None
    if not isinstance(data, dict):
        raise UsageError(f"student spec {path} must be a mapping with at least `timm: <model name>`")
    return _build_dataclass(StudentSpec, {**data, "name": data.get("name", path.stem)}, f"student spec {path.name}")


@lru_cache(maxsize=None)
def shipped_specs() -> dict[str, StudentSpec]:
    """The shipped specs by name, as their files say."""
    return {path.stem: parse_spec(path) for path in sorted(students_dir().glob("*.yaml"))}
