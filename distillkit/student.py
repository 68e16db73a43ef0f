"""Students: plain timm models described by `students/*.yaml` specs, a spec file of your own, or
any `timm:<name>`, and `Student`, the trainable network with its input configuration (the
counterpart of the frozen `Teacher`).

A spec names the timm architecture, its default input size, whether it runs channels_last and
extra `create_model` arguments. Students are created with `num_classes=0`, so `model(x)` is the
pooled embedding and the exported file is exactly the backbone.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

import timm
import torch
from torch import nn

from .errors import UsageError
from .features import Extractor, FeatureRequest, Features, is_token_model
from .hub import create_pretrained
from .inputs import InputConfig, prepare_input
from .recipe import StudentConfig
from .registry import did_you_mean
from .student_specs import StudentSpec, parse_spec, shipped_specs, students_dir
from .teachers.checkpoint import read_checkpoint, unwrap_state_dict


def read_spec(path: Path) -> StudentSpec:
    """Validate one student spec file against `StudentSpec`, and its timm model name."""
    return _checked(parse_spec(path), path)


def _checked(spec: StudentSpec, path: Path) -> StudentSpec:
    if not timm.is_model(spec.timm):
        raise UsageError(
            f"student spec {path}: unknown timm model {spec.timm!r}: {did_you_mean(spec.timm, timm.list_models())}"
        )
    return spec


@lru_cache(maxsize=None)
def _shipped_specs() -> dict[str, StudentSpec]:
    return {name: _checked(spec, students_dir() / f"{name}.yaml") for name, spec in shipped_specs().items()}


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
        hint = did_you_mean(name, list(specs) + ["timm:<model name>"])
        if timm.is_model(name):  # timm's own spelling, without the prefix that says so
            hint = f"{name!r} is a timm model: use 'timm:{name}'; or {hint}"
        raise UsageError(f"unknown student {name!r}: {hint}")
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


def check_student_start(config: StudentConfig) -> None:
    """Refuse contradictory or missing starting weights before anything loads."""
    if config.pretrained and config.weights:
        raise UsageError("student.pretrained and student.weights (--student-weights) are both set: choose one")
    if config.weights and not Path(config.weights).expanduser().is_file():
        raise UsageError(
            f"student weights {config.weights} (--student-weights) do not exist or are not a file; check the path"
        )


def starting_student(spec: StudentSpec, input_size: int, config: StudentConfig) -> nn.Module | None:
    """The student at the starting weights the recipe asks for (`student.pretrained`: timm's pretrained
    weights; `student.weights`: a local file), None for random init. Both go through timm's pretrained
    loading, so its per-architecture fixes apply (a ViT's position embeddings resampled to `input_size`, the
    classifier dropped) and every backbone tensor must fit."""
    check_student_start(config)
    if not config.pretrained and not config.weights:
        return None
    args = {"num_classes": 0, **model_args_for(spec, input_size)}
    if config.pretrained:
        hint = "Download them on a machine with internet, save the state dict, and pass --student-weights FILE."
        return create_pretrained(spec.timm, f"student {spec.name} (student.pretrained)", hint, **args)
    path = Path(config.weights).expanduser()
    state_dict = unwrap_state_dict(read_checkpoint(path), path)
    try:
        return timm.create_model(spec.timm, pretrained=True, pretrained_cfg_overlay={"state_dict": state_dict}, **args)
    except (RuntimeError, KeyError, ValueError) as e:
        raise UsageError(
            f"student weights {path} do not fit student {spec.name!r} (timm {spec.timm}, {input_size} px): "
            f"{str(e).strip().splitlines()[0][:300]}; the file must be a state dict of that architecture"
        ) from None


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
    start: StudentConfig | None = None  # the recipe section it was created from, when it started pretrained

    @classmethod
    def create(cls, config: StudentConfig, seed: int | None = None) -> "Student":
        """A fresh student from the recipe's `student:` section (deterministic when `seed` is given)."""
        spec = student_spec(config.name)
        if config.model_args:
            spec = dataclasses.replace(spec, model_args={**spec.model_args, **config.model_args})
        size = config.input_size or spec.input_size
        model = create_student(spec, size, seed=seed)  # the random draws happen either way: seeds stay aligned
        model = starting_student(spec, size, config) or model
        channels_last = uses_channels_last(spec, model, config.channels_last)
        if channels_last:
            model.to(memory_format=torch.channels_last)
        start = config if config.pretrained or config.weights else None
        return cls(model, spec, student_input_config(model, size), channels_last, Extractor(config.compile), start)

    def at_start(self) -> "Student | None":
        """The student at the pretrained weights it started from (None when it started at random init): the
        second reference a trained student is compared with."""
        if self.start is None:
            return None
        model = starting_student(self.spec, self.size, self.start).eval()
        if self.channels_last:
            model.to(memory_format=torch.channels_last)
        return Student(model, self.spec, self.input_config, self.channels_last)

    def at_random_init(self, seed: int | None) -> "Student":
        """The same architecture, freshly initialised as `create` did: the reference a trained student is
        compared with."""
        model = create_student(self.spec, self.size, seed=seed).eval()
        if self.channels_last:
            model.to(memory_format=torch.channels_last)
        return Student(model, self.spec, self.input_config, self.channels_last)

    def with_state(self, state: dict[str, torch.Tensor]) -> "Student":
        """A whole copy of this student holding `state` (its full state dict, e.g. gathered from the shards of an
        FSDP / DeepSpeed run, whose own model holds only this process's shard)."""
        model = create_student(self.spec, self.size).eval()
        model.load_state_dict(state)
        if self.channels_last:
            model.to(memory_format=torch.channels_last)
        return Student(model, self.spec, self.input_config, self.channels_last, start=self.start)

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
