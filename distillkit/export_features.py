"""The student as a timm `features_only` backbone (`distillkit export --features-only`): the feature maps of
several stages (CNN) or blocks (ViT) instead of the pooled embedding, for detection or segmentation necks.

timm builds any exported student as one: `timm.create_model("local-dir:<student>", pretrained=True,
features_only=True)` (a CNN's own features class or timm's FeatureListNet; a ViT's FeatureGetterNet, whose
maps are its blocks' patch tokens as (B, C, H, W), before the final norm). A features-only export writes
that choice into the folder, so it loads as the backbone with no arguments:

- safetensors: config.json's model_args gain `features_only: true` and the `out_indices` timm chose (all
  of a CNN's stages, a ViT's last 3 blocks), so `timm.create_model("local-dir:<dir>", pretrained=True)` is
  the backbone; model.safetensors holds the weights timm loads into it (a features class of its own, like
  MobileNetV3's, has no head: the head's weights are left out; timm's wrappers load the whole student
  before wrapping it, so theirs stay).
- onnx: one output per map, `stage0`, `stage1`, ... (B, C_i, H_i, W_i), batch dimension free.
- torchscript: the traced backbone, returning the list of maps.

config.json's distillkit.export section records `features_only`, `out_indices` and `feature_info`: per
output its name, the index timm taps, the module, its channels and its reduction (input size / map size).
"""

from __future__ import annotations

import contextlib
import logging
from pathlib import Path
from typing import Any, Callable, Iterator

import timm
import torch
from timm.models import FeatureGraphNet
from timm.models._features import FeatureDictNet, FeatureGetterNet, FeatureHookNet
from torch import Tensor, nn

from .errors import RunError, UsageError
from .io import atomic_path
from .runtimes import EXTERNAL_DATA_BYTES, ONNX_OPSET

# timm wraps a model in one of these after loading its weights (so they are the whole model's); a model with
# a features class of its own loads its weights into that class
TIMM_WRAPPERS = (FeatureDictNet, FeatureHookNet, FeatureGetterNet, FeatureGraphNet)  # FeatureListNet: a DictNet

MapsRunner = Callable[[Tensor], list[Tensor]]  # a batch of images -> the feature maps, on the CPU


@contextlib.contextmanager
def _timm_head_notice_silenced() -> Iterator[None]:
    """timm warns of the head's weights a features class does not take ("Unexpected keys (conv_head...)"):
    building the backbone from a whole student, that is expected."""
    builder = logging.getLogger("timm.models._builder")
    level = builder.level
    builder.setLevel(logging.ERROR)
    try:
        yield
    finally:
        builder.setLevel(level)


def features_model(folder: Path, architecture: str) -> nn.Module:
    """The exported student in `folder` as timm's features_only backbone (timm's out_indices), eval mode."""
    try:
        with _timm_head_notice_silenced():
            model = timm.create_model(f"local-dir:{folder}", pretrained=True, features_only=True)
    except (RuntimeError, AssertionError, NotImplementedError, TypeError) as e:
        raise UsageError(
            f"timm {timm.__version__} cannot build {architecture} as a features_only backbone ({e}); export the "
            "whole student instead (without --features-only), or upgrade timm"
        ) from None
    return model.eval()


def feature_args(model: nn.Module) -> dict[str, Any]:
    """The timm.create_model arguments that build `model` (a features_only backbone) again."""
    return {"features_only": True, "out_indices": list(model.feature_info.out_indices)}


def output_names(model: nn.Module) -> list[str]:
    return [f"stage{i}" for i in range(len(model.feature_info.out_indices))]


def feature_info(model: nn.Module) -> list[dict[str, Any]]:
    """Per output map: its name, the index timm taps, the module, its channels and its reduction."""
    info = model.feature_info
    return [
        {"output": name, "index": index, "module": module, "channels": channels, "reduction": reduction}
        for name, index, module, channels, reduction in zip(
            output_names(model), info.out_indices, info.module_name(), info.channels(), info.reduction()
        )
    ]


def features_weights(student: nn.Module, backbone: nn.Module) -> dict[str, Tensor]:
    """The weights timm loads into `backbone` when it builds it from a folder: the whole student's for
    timm's wrappers, else only the ones the backbone's own class has."""
    state = student.state_dict()
    if isinstance(backbone, TIMM_WRAPPERS):
        return state
    return {name: state[name] for name in backbone.state_dict()}


def write_features_onnx(model: nn.Module, path: Path, input_size: tuple[int, int]) -> None:
    """`model`'s maps as an ONNX file: input `images`, outputs stage0.. , a free batch dimension; checked by
    onnx's checker. An earlier file at `path` stays as it was when exporting fails."""
    import onnx

    size = sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])
    if size > EXTERNAL_DATA_BYTES:
        raise UsageError(
            f"a features-only ONNX export holds at most {EXTERNAL_DATA_BYTES >> 30} GiB of weights (this student "
            f"has {size / (1 << 30):.1f} GiB); export it as --format safetensors"
        )
    with atomic_path(path) as tmp:
        try:
            torch.onnx.export(
                model,
                (torch.rand(2, 3, *input_size),),
                str(tmp),
                dynamo=True,
                dynamic_shapes=({0: torch.export.Dim("batch")},),
                input_names=["images"],
                output_names=output_names(model),
                opset_version=ONNX_OPSET,
                external_data=False,  # one self-contained file (the weights are at most EXTERNAL_DATA_BYTES)
                verbose=False,
            )
        except torch.onnx.errors.OnnxExporterError as e:
            raise RunError(
                f"PyTorch's ONNX exporter cannot export this features-only backbone ({type(e).__name__}: "
                f"{str(e).splitlines()[0] if str(e) else ''}); export it as --format safetensors or torchscript"
            ) from None
        onnx.checker.check_model(str(tmp))


def run_features_onnx(path: Path) -> MapsRunner:
    import onnxruntime

    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return lambda images: [torch.from_numpy(m) for m in session.run(None, {"images": images.numpy()})]


def concatenated(run: MapsRunner) -> Callable[[Tensor], Tensor]:
    """A runner of maps as one runner of (B, sum of C_i H_i W_i): what `runtimes.max_abs_diff` compares."""
    return lambda images: torch.cat([m.flatten(1) for m in run(images)], dim=1)
