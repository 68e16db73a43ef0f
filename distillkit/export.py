"""Exporting the student alone, as plain timm loads it.

    <dir>/model.safetensors   the student's state dict (no heads, no teacher)
    <dir>/config.json         timm's local-dir format: architecture, model_args, pretrained_cfg
                              (input size, mean/std), plus a `distillkit` section of provenance
    <dir>/README.md           a short model card

Load it with `timm.create_model("local-dir:<dir>", pretrained=True)` or `distillkit.load_student(<dir>)`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import timm
from torch import nn

from .errors import UsageError
from .io import save_safetensors, write_json, write_text

WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
CARD_FILE = "README.md"


def export_student(model: nn.Module, out_dir: str | Path, *, architecture: str, model_args: dict[str, Any],
                   input_size: int, mean: tuple, std: tuple, provenance: dict[str, Any]) -> dict[str, Path]:
    """Write the student's weights, timm config and model card to `out_dir`."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    save_safetensors(out_dir / WEIGHTS_FILE, model.state_dict(), metadata={"format": "pt"})
    config = {
        "architecture": architecture,
        "num_classes": 0,
        "num_features": getattr(model, "num_features", None),
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
    return {"weights": out_dir / WEIGHTS_FILE, "config": out_dir / CONFIG_FILE, "card": out_dir / CARD_FILE}


def model_card(architecture: str, input_size: int, mean: tuple, std: tuple, provenance: dict[str, Any]) -> str:
    metrics = provenance.get("metrics") or {}
    rows = [f"| {name} | " + " | ".join(_fmt(v) for v in values.values()) + " |"
            for name, values in metrics.items() if isinstance(values, dict)]
    header = ""
    if rows:
        columns = next(v for v in metrics.values() if isinstance(v, dict)).keys()
        header = "| model | " + " | ".join(columns) + " |\n|---|" + "---|" * len(columns) + "\n"
    return f"""# {architecture}, distilled with distillkit

A `timm` {architecture} backbone (no classifier: `model(x)` returns the pooled embedding),
distilled from a frozen teacher.

- Teacher: {provenance.get('teacher', {}).get('name')} ({provenance.get('teacher', {}).get('source')})
- Strategy: {', '.join(provenance.get('strategy', {}))}
- Data: {provenance.get('data')}
- Input: {input_size}x{input_size} RGB in [0, 1], normalised with mean {list(mean)} and std {list(std)}
- Trained: {provenance.get('steps')} steps, distillkit {provenance.get('distillkit_version')}

## Evaluation

{header}{chr(10).join(rows) if rows else 'No labelled held-out data was available.'}

## Use

```python
import timm
model = timm.create_model("local-dir:PATH/TO/THIS/FOLDER", pretrained=True).eval()
# or: import distillkit; model = distillkit.load_student("PATH/TO/THIS/FOLDER")
```
"""


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4f}"
    return str(value)


def load_student(path: str | Path) -> nn.Module:
    """A distilled student (eval mode) from an export folder, its model.safetensors, or a run folder."""
    path = Path(path).expanduser()
    if path.is_file():
        path = path.parent
    if (path / "student" / CONFIG_FILE).is_file():  # a run directory
        path = path / "student"
    if not (path / CONFIG_FILE).is_file() or not (path / WEIGHTS_FILE).is_file():
        raise UsageError(f"{path} is not an exported student: expected {CONFIG_FILE} and {WEIGHTS_FILE} in it")
    try:
        config = json.loads((path / CONFIG_FILE).read_text(encoding="utf-8"))
        config["architecture"]
    except (ValueError, KeyError, TypeError):
        raise UsageError(f"{path / CONFIG_FILE} is damaged or not a timm config; export the student again") from None
    try:
        model = timm.create_model(f"local-dir:{path}", pretrained=True)
    except (RuntimeError, OSError, ValueError) as e:
        raise UsageError(f"cannot load the student in {path}: {e}") from None
    return model.eval()
