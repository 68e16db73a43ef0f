"""Writing a student as an ONNX or TorchScript file, and running such a file to check it.

Both files take `images` (B, 3, H, W) float32, already resized and normalised, with a free batch
dimension, and return the embedding (B, D).

ONNX goes through PyTorch's current exporter, built on torch.export (`dynamo=True`; it needs
`onnxscript`), though it is far slower than the TorchScript-based one: with one thread on a shared
2-core machine, MobileNetV3-Small at 32 px took 18-20 s (legacy 0.5-0.6 s) and ViT-Tiny 14-15 s (legacy
0.6-0.9 s), about 2 s of each being onnxscript rebuilding its operator table. Both files give the same
outputs (max abs diff vs PyTorch ~3e-6 for ViT-Tiny, ~2e-10 for the MobileNet). An export runs once per
model and is checked against it anyway, while the legacy exporter is deprecated (the new one is PyTorch's
default since 2.9) and due to be removed. Where torch.export cannot capture a model (Python control flow
on tensor values, say), the legacy exporter writes the file instead, and the user is told why, PyTorch's
deprecation warning included.

Weights over `EXTERNAL_DATA_BYTES` are written to `model.onnx.data` beside `model.onnx` (protobuf caps a
file at 2 GiB); smaller models stay one self-contained file, as onnxruntime and most tools expect.
"""

from __future__ import annotations

import contextlib
import importlib
import io
import math
import os
import sys
import tempfile
import warnings
from contextlib import contextmanager
from itertools import chain
from pathlib import Path
from typing import Callable, Iterator

import torch
from torch import Tensor, nn

from . import messages
from .errors import RunError, UsageError
from .io import atomic_path

ONNX_FILE = "model.onnx"
ONNX_DATA_FILE = ONNX_FILE + ".data"  # the weights of a large model, beside the graph
TORCHSCRIPT_FILE = "model.pt"
ONNX_OPSET = 18  # the lowest the torch.export-based exporter writes without converting down
ONNX_NAMES = dict(input_names=["images"], output_names=["embedding"], opset_version=ONNX_OPSET)
ONNX_INSTALL = "pip install 'distillkit[onnx]'"
EXTERNAL_DATA_BYTES = 1 << 30  # weights above this are written to ONNX_DATA_FILE, well under protobuf's 2 GiB
FLOAT_TYPES = {1, 10, 11, 16}  # onnx.TensorProto FLOAT, FLOAT16, DOUBLE, BFLOAT16

Runner = Callable[[Tensor], Tensor]  # a batch of images -> embeddings, on the CPU


def require_onnx(writing: bool = False) -> None:
    """Fail early and clearly when the optional ONNX packages are missing (`writing`: onnxscript too,
    which the exporter needs; running a file needs only onnx and onnxruntime)."""
    for module in ("onnx", "onnxruntime") + (("onnxscript",) if writing else ()):
        try:
            importlib.import_module(module)
        except ImportError:
            raise UsageError(
                f"the onnx format needs the {module!r} package, which is not installed: {ONNX_INSTALL}"
            ) from None


def write_onnx(model: nn.Module, path: Path, input_size: tuple[int, int]) -> None:
    """Write `model` as ONNX at `path` (and its weights at `<path>.data` when they are large), checked by
    onnx's checker; an earlier file at `path` stays as it was when exporting fails."""
    import onnx

    example = torch.rand(2, 3, *input_size)
    large = sum(t.numel() * t.element_size() for t in chain(model.parameters(), model.buffers())) > EXTERNAL_DATA_BYTES
    data = path.with_name(path.name + ".data")
    # the exporter names the weights file after the graph's, so both are written as `path.name` in a folder
    # of their own, then moved beside the target
    with atomic_path(path) as tmp, tempfile.TemporaryDirectory(prefix=f".{path.name}.", dir=path.parent) as folder:
        staged = Path(folder) / path.name
        _export_onnx(model, example, staged, large)
        onnx.checker.check_model(str(staged))
        if (Path(folder) / data.name).is_file():
            os.replace(Path(folder) / data.name, data)
        else:
            data.unlink(missing_ok=True)  # a stale one belongs to an earlier graph
        os.replace(staged, tmp)


def _export_onnx(model: nn.Module, example: Tensor, path: Path, large: bool) -> None:
    """The torch.export-based exporter, or the legacy TorchScript-based one where it cannot export `model`."""
    printed = io.StringIO()  # torch.export prints the graph it gave up on to stderr; the warning says why
    try:
        with contextlib.redirect_stderr(printed):
            torch.onnx.export(
                model,
                (example,),
                str(path),
                dynamo=True,
                dynamic_shapes=({0: torch.export.Dim("batch")},),
                external_data=large,
                verbose=False,
                **ONNX_NAMES,
            )
    except torch.onnx.errors.OnnxExporterError as e:
        messages.logger.debug("the torch.export-based ONNX exporter failed; it printed:\n%s", printed.getvalue())
        messages.warn(
            f"PyTorch's torch.export-based ONNX exporter cannot export this model ({_reason(e)}); it was "
            "exported with PyTorch's deprecated TorchScript-based exporter instead"
        )
        _export_legacy(model, example, path, large)
    except BaseException:
        sys.stderr.write(printed.getvalue())
        raise
    else:
        sys.stderr.write(printed.getvalue())


def _export_legacy(model: nn.Module, example: Tensor, path: Path, large: bool) -> None:
    """PyTorch's TorchScript-based exporter, with its warnings (its deprecation notice too) left to show."""
    with warnings.catch_warnings():
        warnings.simplefilter("default", DeprecationWarning)  # Python hides those of libraries by default
        torch.onnx.export(
            model,
            (example,),
            str(path),
            dynamo=False,
            dynamic_axes={"images": {0: "batch"}, "embedding": {0: "batch"}},
            **ONNX_NAMES,
        )
    if large:  # it writes weights beside the graph only above 2 GiB, and as one file per tensor
        _weights_to_one_file(path)


def _reason(error: BaseException) -> str:
    """The type and first line of the innermost cause of an exporter error: why it failed, briefly."""
    while error.__cause__ is not None:
        error = error.__cause__
    first = " ".join(next(iter(str(error).strip().splitlines()), "").split())
    reason = f"{type(error).__name__}: {first}" if first else type(error).__name__
    return reason if len(reason) <= 200 else reason[:197] + "..."


def _weights_to_one_file(path: Path) -> None:
    """Rewrite the ONNX file at `path` with all its weights in `<path>.data`."""
    import onnx

    onnx.save_model(
        onnx.load(str(path)),
        str(path),
        save_as_external_data=True,
        all_tensors_to_one_file=True,
        location=path.name + ".data",
        size_threshold=0,
    )


def run_onnx(path: Path) -> Runner:
    import onnxruntime

    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return lambda images: torch.from_numpy(session.run(None, {"images": images.numpy()})[0])


def onnx_params(path: Path) -> int:
    """How many weights an ONNX file holds: the elements of its floating-point initializers of rank 1 or
    more (not the scalars and int64 shapes the torch.export-based exporter also stores as initializers).
    Exporters fold BatchNorms into convolutions and store identical tensors once (the all-ones / all-zeros
    norms of an untrained model), so this can be a little below the PyTorch model's count."""
    import onnx

    graph = onnx.load(str(path), load_external_data=False).graph  # shapes only: the weights stay on disk
    return sum(math.prod(t.dims) for t in graph.initializer if t.data_type in FLOAT_TYPES and len(t.dims) > 0)


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
