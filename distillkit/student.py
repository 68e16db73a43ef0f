"""Students: plain timm models described by `students/*.yaml` specs, a spec file of your own, or
any `timm:<name>`, and `Student`, the trainable network with its input configuration (the
counterpart of the frozen `Teacher`).

A spec names the timm architecture, its default input size, whether it runs channels_last and
extra `create_model` arguments. Students are created with `num_classes=0`, so `model(x)` is the
pooled embedding and the exported file is exactly the backbone.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

import timm
import torch
import yaml
from torch import nn

from .errors import UsageError
from .features import Extractor, FeatureRequest, Features, is_token_model
from .inputs import InputConfig, prepare_input
from .recipe import StudentConfig, _build_dataclass, _data_dir
from .registry import did_you_mean


@dataclass(frozen=True)
class StudentSpec:
    name: str
    timm: str
    description: str = ""
    input_size: int = 224
    channels_last: bool | None = None  # None = auto: conv nets yes, token models (ViTs) no
    model_args: dict[str, Any] = field(default_factory=dict)


def students_dir():
    return _data_dir("students")


def read_spec(path: Path) -> StudentSpec:
    """Validate one student spec file against `StudentSpec`."""
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as e:
        raise UsageError(f"cannot read student spec {path}: {e}") from None
    if not isinstance(data, dict):
        raise UsageError(f"student spec {path} must be a mapping with at least `timm: <model name>`")
    spec = _build_dataclass(StudentSpec, {**data, "name": data.get("name", path.stem)}, f"student spec {path.name}")
    if not timm.is_model(spec.timm):
        raise UsageError(
            f"student spec {path}: unknown timm model {spec.timm!r}: {did_you_mean(spec.timm, timm.list_models())}"
        )
    return spec


@lru_cache(maxsize=None)
def _shipped_specs() -> dict[str, StudentSpec]:
    return {path.stem: read_spec(path) for path in sorted(students_dir().glob("*.yaml"))}


def list_students() -> list[str]:
    return sorted(_shipped_specs()) + ["timm:<model name>"]


def student_spec(name: str) -> StudentSpec:
    if name.startswith("timm:"):
        timm_name = name[len("timm:") :]
        if not timm_name or not timm.is_model(timm_name):
            raise UsageError(
                f"unknown timm model {timm_name!r} in student {name!r}: {did_you_mean(timm_name, timm.list_models())}"
            )
        return StudentSpec(name=name, timm=timm_name, description=f"timm {timm_name}")
    if name.endswith((".yaml", ".yml")) and Path(name).expanduser().is_file():
        return read_spec(Path(name).expanduser())
    specs = _shipped_specs()
    if name not in specs:
        raise UsageError(f"unknown student {name!r}: {did_you_mean(name, list(specs) + ['timm:<model name>'])}")
    return specs[name]


def model_args_for(spec: StudentSpec, input_size: int) -> dict[str, Any]:
    """timm.create_model arguments, including the image size for models with a fixed input size (ViTs)."""
    args = dict(spec.model_args)
    cfg = timm.models.get_pretrained_cfg(spec.timm)
    if cfg is not None and cfg.fixed_input_size:
        args.setdefault("img_size", input_size)
    return args


def create_student(spec: StudentSpec, input_size: int, seed: int | None = None) -> nn.Module:
    """A fresh, randomly initialised student (deterministic when `seed` is given)."""
    if seed is not None:
        torch.manual_seed(seed)
    try:
        return timm.create_model(spec.timm, pretrained=False, num_classes=0, **model_args_for(spec, input_size))
    except (TypeError, ValueError, AssertionError) as e:
        raise UsageError(f"cannot build student {spec.name!r} ({spec.timm}) at {input_size} px: {e}") from None


def uses_channels_last(spec: StudentSpec, model: nn.Module, override: bool | None = None) -> bool:
    """The recipe's choice, else the spec's, else conv nets yes and token models no."""
    for choice in (override, spec.channels_last):
        if choice is not None:
            return choice
    return not is_token_model(model)


def student_input_config(model: nn.Module, input_size: int) -> InputConfig:
    """The student's normalisation: its architecture's default pretrained config (ImageNet mean/std)."""
    cfg = timm.data.resolve_data_config({}, model=model)
    return InputConfig(size=(input_size, input_size), mean=tuple(cfg["mean"]), std=tuple(cfg["std"]))


@dataclass
class Student:
    """The network being trained and how it reads views: raw [0, 1] views are resized and normalised to
    `input_config` (`prepare`), laid out channels_last for conv nets, and run through `extractor` (eager, or
    torch.compile for `student.compile`)."""

    model: nn.Module
    spec: StudentSpec
    input_config: InputConfig
    channels_last: bool
    extractor: Extractor = field(default_factory=Extractor)

    @classmethod
    def create(cls, config: StudentConfig, seed: int | None = None) -> "Student":
        """A fresh student from the recipe's `student:` section (deterministic when `seed` is given)."""
        spec = student_spec(config.name)
        size = config.input_size or spec.input_size
        model = create_student(spec, size, seed=seed)
        channels_last = uses_channels_last(spec, model, config.channels_last)
        if channels_last:
            model.to(memory_format=torch.channels_last)
        return cls(model, spec, student_input_config(model, size), channels_last, Extractor(compile=config.compile))

    def at_random_init(self, seed: int | None) -> "Student":
        """The same architecture, freshly initialised as `create` did: the reference a trained student is
        compared with."""
        model = create_student(self.spec, self.size, seed=seed).eval()
        if self.channels_last:
            model.to(memory_format=torch.channels_last)
        return Student(model, self.spec, self.input_config, self.channels_last)

    @property
    def size(self) -> int:
        return self.input_config.size[0]

    @property
    def model_args(self) -> dict[str, Any]:
        """The timm.create_model arguments that rebuild this architecture (what an export records)."""
        return model_args_for(self.spec, self.size)

    def prepare(self, views: torch.Tensor) -> torch.Tensor:
        return prepare_input(views, self.input_config, self.channels_last)

    def features(self, x: torch.Tensor, request: FeatureRequest) -> Features:
        """The requested features of prepared inputs `x`, through the student's extractor."""
        return self.extractor(self.model, x, request)

    def embed(self, views: torch.Tensor) -> torch.Tensor:
        """Raw [0, 1] views -> pooled embeddings (B, D), the exported backbone's output."""
        return self.model(self.prepare(views))
