"""Writing a student as an ONNX or TorchScript file, and running such a file to check it.

Both files take `images` (B, 3, H, W) float32, already resized and normalised, with a free batch
dimension, and return the embedding (B, D).

ONNX uses PyTorch's TorchScript-based exporter (`dynamo=False`): it exports a timm student in about
a second and needs only `onnx`, where the torch.export-based exporter takes 5-12 s per model and
needs `onnxscript`; both gave the same outputs (max abs diff ~3e-6 for ViT-Tiny) when this was chosen.
"""

from __future__ import annotations

import importlib
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator

import torch
from torch import Tensor, nn

from .errors import RunError, UsageError
from .io import atomic_path

ONNX_FILE = "model.onnx"
TORCHSCRIPT_FILE = "model.pt"
ONNX_OPSET = 17
ONNX_INSTALL = "pip install 'distillkit[onnx]'"

Runner = Callable[[Tensor], Tensor]  # a batch of images -> embeddings, on the CPU


def require_onnx() -> None:
    """Fail early and clearly when the optional ONNX packages are missing."""
    for module in ("onnx", "onnxruntime"):
        try:
            importlib.import_module(module)
        except ImportError:
            raise UsageError(
                f"the onnx format needs the {module!r} package, which is not installed: {ONNX_INSTALL}"
            ) from None


def write_onnx(model: nn.Module, path: Path, input_size: tuple[int, int]) -> None:
    import onnx

    example = torch.rand(2, 3, *input_size)
    with atomic_path(path) as tmp, _quiet_tracing():
        torch.onnx.export(
            model,
            (example,),
            str(tmp),
            input_names=["images"],
            output_names=["embedding"],
            dynamic_axes={"images": {0: "batch"}, "embedding": {0: "batch"}},
            opset_version=ONNX_OPSET,
            dynamo=False,
        )
        onnx.checker.check_model(str(tmp))


def run_onnx(path: Path) -> Runner:
    import onnxruntime

    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return lambda images: torch.from_numpy(session.run(None, {"images": images.numpy()})[0])


def onnx_params(path: Path) -> int:
    """How many weights an ONNX file holds: the elements of its initializers (the exporter folds BatchNorms
    and constants, so this can differ from the PyTorch model's count by a little)."""
    import math

    import onnx

    return sum(math.prod(t.dims) for t in onnx.load(str(path), load_external_data=False).graph.initializer)


def write_torchscript(model: nn.Module, path: Path, input_size: tuple[int, int]) -> None:
    example = torch.rand(2, 3, *input_size)
    with atomic_path(path) as tmp, _quiet_tracing(), torch.no_grad():
        traced = torch.jit.trace(model, example, check_trace=False)  # checked against the model afterwards
        torch.jit.save(traced, str(tmp))


def run_torchscript(path: Path) -> Runner:
    with _quiet_tracing():
        module = torch.jit.load(str(path), map_location="cpu").eval()
    return module


@contextmanager
def _quiet_tracing() -> Iterator[None]:
    """Tracing a timm model warns about values fixed at trace time and about TorchScript being deprecated;
    the written file is compared with the model on two batch sizes instead."""
    with warnings.catch_warnings():
        for category in (torch.jit.TracerWarning, DeprecationWarning, FutureWarning):
            warnings.simplefilter("ignore", category)
        yield


CHECK_BATCHES = (2, 3)
TOLERANCE = 1e-4  # max abs diff allowed, relative to the largest output magnitude (at least 1)


def max_abs_diff(model: nn.Module, run: Runner, input_size: tuple[int, int], what: str) -> float:
    """The largest |file - model| over random batches of 2 and 3 images; a RunError when it is not tiny."""
    generator = torch.Generator().manual_seed(0)
    worst = 0.0
    for batch in CHECK_BATCHES:
        images = torch.rand(batch, 3, *input_size, generator=generator)
        with torch.no_grad():
            expected, got = model(images), run(images)
        if got.shape != expected.shape:
            raise RunError(
                f"{what} gives shape {tuple(got.shape)} for a batch of {batch} images, the PyTorch model "
                f"{tuple(expected.shape)}; the export is wrong, please report it"
            )
        diff = (got - expected).abs().max().item()
        if not diff <= TOLERANCE * max(1.0, expected.abs().max().item()):
            raise RunError(
                f"{what} differs from the PyTorch model by up to {diff:.3g} on a batch of {batch} images "
                f"(allowed {TOLERANCE:g} x the output scale); the export is wrong, please report it"
            )
        worst = max(worst, diff)
    return worst
