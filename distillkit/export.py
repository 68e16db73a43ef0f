"""Exporting the student alone, as plain timm loads it, or as an ONNX or TorchScript file.

`export_student` writes the folder a compress run ends with:

    <dir>/model.safetensors   the student's state dict (no heads, no teacher)
    <dir>/config.json         timm's local-dir format: architecture, model_args, pretrained_cfg
                              (input size, mean/std), plus a `distillkit` section of provenance
    <dir>/README.md           the model card (`distillkit.card`): Hub metadata, evaluation, how to load it

Load it with `timm.create_model("local-dir:<dir>", pretrained=True)` or `distillkit.load_student(<dir>)`.

`export` (`distillkit export`) re-exports such a folder as safetensors, ONNX (model.onnx, and
model.onnx.data for weights over 1 GiB) or TorchScript (model.pt), whole or cut at an early-exit block
(`distillkit.exits`), and checks the written file against the PyTorch model. A CNN cut inside its
stages is not a model timm can rebuild from config.json, so CNN exits are exported as ONNX or
TorchScript only. `features_only` writes the student as timm's features_only backbone instead, the maps of
several stages or blocks (`distillkit.export_features`). `distillkit.export_heads` adds a run's adaptor heads
(strategy agglomerate) to an export, in its heads/ folder (`distillkit.heads`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import timm
from torch import nn

from .card import model_card
from .errors import UsageError
from .exits import exit_meaning, resolve_exit, truncate
from .export_features import (
    concatenated,
    feature_args,
    feature_info,
    features_model,
    features_weights,
    run_features_onnx,
    write_features_onnx,
)
from .features import is_token_model, num_layers
from .heads import HEADS_FOLDER
from .io import save_safetensors, write_json, write_text
from .runtimes import (
    ONNX_DATA_FILE,
    ONNX_FILE,
    TORCHSCRIPT_FILE,
    max_abs_diff,
    require_onnx,
    run_onnx,
    run_torchscript,
    write_onnx,
    write_torchscript,
)

WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
CARD_FILE = "README.md"
FORMATS = ("safetensors", "onnx", "torchscript")
RUNTIME_FORMATS = {  # format -> (file name, writer, runner)
    "onnx": (ONNX_FILE, write_onnx, run_onnx),
    "torchscript": (TORCHSCRIPT_FILE, write_torchscript, run_torchscript),
}
FEATURE_RUNTIMES = {  # the same for a features_only backbone: its runners give the list of maps
    "onnx": (ONNX_FILE, write_features_onnx, run_features_onnx),
    "torchscript": (TORCHSCRIPT_FILE, write_torchscript, run_torchscript),
}


def export_student(
    model: nn.Module,
    out_dir: str | Path,
    *,
    architecture: str,
    model_args: dict[str, Any],
    input_size: int,
    mean: tuple,
    std: tuple,
    provenance: dict[str, Any],
) -> dict[str, Path]:
    """Write the student's weights, timm config and model card to `out_dir`."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    save_safetensors(out_dir / WEIGHTS_FILE, model.state_dict(), metadata={"format": "pt"})
    return {
        "weights": out_dir / WEIGHTS_FILE,
        **write_config_and_card(
            out_dir,
            architecture=architecture,
            model_args=model_args,
            num_features=getattr(model, "num_features", None),
            input_size=input_size,
            mean=mean,
            std=std,
            provenance=provenance,
        ),
    }


def write_config_and_card(
    out_dir: Path,
    *,
    architecture: str,
    model_args: dict[str, Any],
    num_features: int | None,
    input_size: int,
    mean: tuple,
    std: tuple,
    provenance: dict[str, Any],
) -> dict[str, Path]:
    config = {
        "architecture": architecture,
        "num_classes": 0,
        "num_features": num_features,
        "model_args": model_args,
        "pretrained_cfg": {
            "input_size": [3, input_size, input_size],
            "interpolation": "bilinear",
            "crop_pct": 1.0,
            "crop_mode": "center",
            "mean": list(mean),
            "std": list(std),
            "num_classes": 0,
        },
        "distillkit": provenance,
    }
    write_json(out_dir / CONFIG_FILE, config)
    write_text(out_dir / CARD_FILE, model_card(architecture, input_size, mean, std, provenance))
    return {"config": out_dir / CONFIG_FILE, "card": out_dir / CARD_FILE}


def student_folder(path: str | Path) -> Path:
    """The export folder behind `path`: the folder itself, its model.safetensors, or a run folder."""
    path = Path(path).expanduser()
    if path.is_file():
        path = path.parent
    if (path / "student" / CONFIG_FILE).is_file():  # a run directory
        path = path / "student"
    if not (path / CONFIG_FILE).is_file() or not (path / WEIGHTS_FILE).is_file():
        raise UsageError(f"{path} is not an exported student: expected {CONFIG_FILE} and {WEIGHTS_FILE} in it")
    return path


def read_config(folder: Path) -> dict[str, Any]:
    """An export folder's config.json, checked for what loading and evaluating need."""
    try:
        config = json.loads((folder / CONFIG_FILE).read_text(encoding="utf-8"))
        config["architecture"], config["pretrained_cfg"]["input_size"]
        config["pretrained_cfg"]["mean"], config["pretrained_cfg"]["std"]
    except (ValueError, KeyError, TypeError):
        raise UsageError(f"{folder / CONFIG_FILE} is damaged or not a timm config; export the student again") from None
    export_info = (config.get("distillkit") or {}).get("export") or {}
    if export_info.get("features_only"):
        raise UsageError(
            f"{folder} holds a features-only backbone (feature maps, no embedding), which distillkit neither "
            "evaluates nor exports again: use the run's whole student (the run folder or its student/). Load the "
            f"backbone with timm.create_model('local-dir:{folder}', pretrained=True)"
        )
    return config


def load_student(path: str | Path) -> nn.Module:
    """A distilled student (eval mode) from an export folder, its model.safetensors, or a run folder."""
    folder = student_folder(path)
    read_config(folder)
    try:
        model = timm.create_model(f"local-dir:{folder}", pretrained=True)
    except (RuntimeError, OSError, ValueError) as e:
        raise UsageError(f"cannot load the student in {folder}: {e}") from None
    return model.eval()


EXPORT_FILES = (WEIGHTS_FILE, ONNX_FILE, ONNX_DATA_FILE, TORCHSCRIPT_FILE, CONFIG_FILE, CARD_FILE)


def is_export_folder(path: Path) -> bool:
    """A folder an earlier distillkit export (or compress run) wrote: its config.json names distillkit."""
    try:
        return "distillkit" in json.loads((path / CONFIG_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError, TypeError):
        return False


def prepare_export_folder(out_dir: Path) -> None:
    """An export writes only into a new or empty folder or an earlier export, whose model files of every
    format are removed first (a stale model.onnx must not outlive a new model.safetensors: `eval` would
    score it); a user's other files stay. Any other folder is refused, unchanged."""
    if not out_dir.exists():
        return
    if not out_dir.is_dir():
        raise UsageError(f"export --out {out_dir} is a file; choose a folder")
    entries = sorted(p.name for p in out_dir.iterdir())
    if not entries:
        return
    if not is_export_folder(out_dir):
        raise UsageError(
            f"export --out {out_dir} is not empty ({', '.join(entries[:3])}"
            f"{', ...' if len(entries) > 3 else ''}) and holds no distillkit export; its files would "
            "be replaced. Choose a new or empty folder"
        )
    for name in EXPORT_FILES:
        (out_dir / name).unlink(missing_ok=True)
    heads = out_dir / HEADS_FOLDER  # an earlier export's adaptor heads (export_heads)
    if heads.is_dir():
        for path in heads.iterdir():
            if path.suffix in (".json", ".safetensors"):
                path.unlink()
        if not any(heads.iterdir()):
            heads.rmdir()


@dataclass
class ExportResult:
    out_dir: Path
    format: str
    files: dict[str, Path]  # the model file(s), config.json, README.md
    exit_at: int | None  # the block the student was cut after; None: the whole student
    max_abs_diff: float  # the written model vs the PyTorch model, on random batches of 2 and 3 images
    features_only: bool = False  # timm's features_only backbone: feature maps (every output's largest diff)


def _export_folder(
    source: Path,
    format: str,  # noqa: A002
    block: int | None,
    out: str | Path | None,
    features_only: bool = False,
) -> Path:
    """`out`, or `<student folder>-<format>[-exit<block>|-features]` beside the student; never the student itself."""
    suffix = f"-{format}" + ("" if block is None else f"-exit{block}") + ("-features" if features_only else "")
    out_dir = Path(out).expanduser() if out else source.parent / f"{source.name}{suffix}"
    if out_dir.resolve() == source.resolve():
        raise UsageError(f"the output folder {out_dir} is the student being exported; choose another --out")
    return out_dir


def _write_format(exported: nn.Module, out_dir: Path, format: str, size: tuple[int, int], meta: dict):  # noqa: A002
    """Write `exported` in `format` with its config.json and model card; (files written, a runner of the file)."""
    if format == "safetensors":
        return export_student(exported, out_dir, **meta), load_student(out_dir)
    file_name, write, runner = RUNTIME_FORMATS[format]
    out_dir.mkdir(parents=True, exist_ok=True)
    write(exported, out_dir / file_name, size)
    files = {"model": out_dir / file_name}
    if format == "onnx" and (out_dir / ONNX_DATA_FILE).is_file():  # a large model's weights, beside its graph
        files["model_data"] = out_dir / ONNX_DATA_FILE
    card = write_config_and_card(out_dir, num_features=getattr(exported, "num_features", None), **meta)
    return {**files, **card}, runner(out_dir / file_name)


def _write_features(student: nn.Module, backbone: nn.Module, out_dir: Path, format: str, size, meta: dict):  # noqa: A002
    """Write the features_only `backbone` in `format` with its config.json and model card; (files written, a
    runner of the file giving its maps). The safetensors folder is loaded back by its config.json alone."""
    out_dir.mkdir(parents=True, exist_ok=True)
    if format == "safetensors":
        save_safetensors(out_dir / WEIGHTS_FILE, features_weights(student, backbone), metadata={"format": "pt"})
        files = {"weights": out_dir / WEIGHTS_FILE}
    else:
        file_name, write, _ = FEATURE_RUNTIMES[format]
        write(backbone, out_dir / file_name, size)
        files = {"model": out_dir / file_name}
    card = write_config_and_card(out_dir, num_features=None, **meta)
    if format == "safetensors":
        return {**files, **card}, timm.create_model(f"local-dir:{out_dir}", pretrained=True).eval()
    return {**files, **card}, FEATURE_RUNTIMES[format][2](files["model"])


def check_format(format: str) -> None:  # noqa: A002
    if format not in FORMATS:
        raise UsageError(f"unknown export format {format!r}: choose one of {', '.join(FORMATS)}")


def export(
    run_dir: str | Path,
    format: str = "safetensors",
    out: str | Path | None = None,  # noqa: A002
    exit_at: int | None = None,
    features_only: bool = False,
) -> ExportResult:
    """Export the student of a compress run (or an export folder) as safetensors, onnx or torchscript.

    `exit_at` cuts the student after that block (as `distillkit.features.resolve_layer` indexes blocks;
    negative counts from the end). `features_only` writes timm's features_only backbone of the student
    (`distillkit.export_features`): the maps of several stages (CNN) or blocks (ViT), not the embedding.
    `out` defaults to `<student folder>-<format>[-exit<block>|-features]` beside it. The written file is run on
    random batches of 2 and 3 images and compared with the PyTorch model (or backbone).
    """
    check_format(format)
    if features_only and exit_at is not None:
        raise UsageError(
            "--features-only gives the maps of several stages and --exit-at cuts the student after one block; "
            "pass one of them"
        )
    if format == "onnx":
        require_onnx(writing=True)
    source = student_folder(run_dir)
    config = read_config(source)
    model = load_student(source)
    block = None if exit_at is None else resolve_exit(model, exit_at)
    if block is not None and format == "safetensors" and not is_token_model(model):
        raise UsageError(
            f"--exit-at with a CNN student ({config['architecture']}) cannot be exported as safetensors: "
            "timm cannot rebuild a CNN cut inside its stages from config.json. Use --format onnx or "
            "--format torchscript"
        )
    out_dir = _export_folder(source, format, block, out, features_only)
    backbone = features_model(source, config["architecture"]) if features_only else None
    prepare_export_folder(out_dir)
    exported = model if block is None else truncate(model, block)
    model_args = dict(config.get("model_args") or {})
    if block is not None and is_token_model(model):
        model_args["depth"] = block + 1  # the cut ViT is a plain timm ViT this deep
    info = {"format": format, "exit_at": block, "blocks": num_layers(model), "source": str(source)}
    if block is not None:
        info["meaning"] = exit_meaning(model)
    if backbone is not None:
        model_args |= feature_args(backbone)
        info |= {**feature_args(backbone), "feature_info": feature_info(backbone)}
    cfg = config["pretrained_cfg"]
    size = tuple(cfg["input_size"][1:])
    meta = dict(
        architecture=config["architecture"],
        model_args=model_args,
        input_size=size[0],
        mean=tuple(cfg["mean"]),
        std=tuple(cfg["std"]),
        provenance={**(config.get("distillkit") or {}), "export": info},
    )
    what = f"the exported {format} {'backbone' if backbone is not None else 'model'} in {out_dir}"
    if backbone is None:
        files, run = _write_format(exported, out_dir, format, size, meta)
        diff = max_abs_diff(exported, run, size, what)
    else:
        files, run = _write_features(model, backbone, out_dir, format, size, meta)
        diff = max_abs_diff(concatenated(backbone), concatenated(run), size, what)
    return ExportResult(
        out_dir=out_dir, format=format, files=files, exit_at=block, max_abs_diff=diff, features_only=features_only
    )
