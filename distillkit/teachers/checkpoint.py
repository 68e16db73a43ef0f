"""Reading checkpoint files safely, with errors that name the file and say what to do.

Only `torch.load(weights_only=True)` and safetensors: nothing in a checkpoint can run code.
Training checkpoints often carry harmless extras next to the tensors (DINO and MAE save their
`argparse.Namespace` of arguments, some loops save numpy scalars); those load through an explicit
allow-list, `SAFE_EXTRAS`. Anything else is refused.
"""

from __future__ import annotations

import argparse
import pickle
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ..errors import UsageError

StateDict = dict[str, Tensor]


def _safe_extras() -> list:
    """Plain-data types seen in real training checkpoints: argparse.Namespace, numpy scalars and dtypes.

    numpy scalars pickle as `numpy._core.multiarray.scalar` (numpy 2) or `numpy.core.multiarray.scalar`
    (numpy 1); both names are allowed, bound to the function of the installed numpy. A dtype object
    is rebuilt by `numpy.dtype` and then given its state, so its class (e.g. `Float64DType`) is listed too.
    """
    import numpy as np

    core = getattr(np, "_core", None) or np.core
    scalar = core.multiarray.scalar
    extras: list = [
        argparse.Namespace,
        np.dtype,
        (scalar, "numpy.core.multiarray.scalar"),
        (scalar, "numpy._core.multiarray.scalar"),
    ]
    codes = np.typecodes["AllInteger"] + np.typecodes["AllFloat"] + "?"
    extras += list(dict.fromkeys(type(np.dtype(code)) for code in codes))
    return extras


SAFE_EXTRAS = _safe_extras()


def read_checkpoint(path: str | Path) -> Any:
    """Load a .safetensors / .pth / .pt / .pth.tar file onto the CPU, refusing executable pickles."""
    path = Path(path).expanduser()
    if not path.exists():
        raise UsageError(f"checkpoint {path} does not exist; check the path given to --teacher-weights")
    if not path.is_file():
        raise UsageError(f"checkpoint {path} is not a file")
    if path.stat().st_size == 0:
        raise UsageError(f"checkpoint {path} is empty (0 bytes); download it again")
    _refuse_non_checkpoints(path)
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(str(path), device="cpu")
        except (SafetensorError, OSError, ValueError) as e:
            raise UsageError(
                f"checkpoint {path} is not a readable safetensors file ({e}); it may be truncated: download it again"
            ) from None
    try:
        with torch.serialization.safe_globals(SAFE_EXTRAS):
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        refused = [line for line in str(e).splitlines() if "GLOBAL" in line or "Unsupported" in line]
        raise UsageError(
            f"refused to load {path}: it holds Python objects that safe loading does not allow "
            f"({(refused or [str(e).splitlines()[0]])[0].strip()[:200]}). distillkit never runs code from a "
            "checkpoint. If you trust the file, re-save only its tensors, e.g. as safetensors, and pass that file"
        ) from None
    except Exception as e:  # noqa: BLE001 - a damaged file fails deep in the unpickler, in any way
        first = (str(e).splitlines() or [""])[0][:200] or type(e).__name__
        raise UsageError(
            f"checkpoint {path} could not be read ({first}); it is truncated or not a PyTorch checkpoint: "
            "download it again or pass a .safetensors file"
        ) from None


def _refuse_non_checkpoints(path: Path) -> None:
    """Files that are plainly something else, named for what they are: an HTML page saved in place of the
    download (an error or login page), a Git LFS pointer (the repository was cloned without `git lfs`),
    or any other text."""
    with open(path, "rb") as f:
        head = f.read(512)
    start = head.lstrip().lower()
    if start.startswith((b"<!doctype html", b"<html", b"<?xml", b"<head")):
        raise UsageError(
            f"checkpoint {path} is an HTML page, not a checkpoint: probably an error or login page saved in place "
            "of the file; download it again (check the URL)"
        )
    if head.startswith(b"version https://git-lfs.github.com/spec/"):
        raise UsageError(
            f"checkpoint {path} is a Git LFS pointer ({path.stat().st_size} bytes standing in for the file), not "
            "the checkpoint: run `git lfs pull` in its repository, or download the file itself"
        )
    try:
        text = head.decode("utf-8")
    except UnicodeDecodeError:
        return
    if text and all(c.isprintable() or c in "\n\r\t" for c in text):
        raise UsageError(f"checkpoint {path} is a text file, not a checkpoint (it begins {text[:60]!r})")


def unwrap_state_dict(checkpoint: Any, path: str | Path = "checkpoint") -> StateDict:
    """Find the tensor dict inside common wrappers ({'state_dict': ...}, {'model': ...}) and strip
    the DDP/compile prefixes `module.` and `_orig_mod.`."""
    node = checkpoint
    for key in ("state_dict", "model"):
        if isinstance(node, dict) and isinstance(node.get(key), dict):
            node = node[key]
    if not isinstance(node, dict) or not node or not all(isinstance(v, Tensor) for v in node.values()):
        raise UsageError(f"{path} holds no state dict of tensors (top-level keys: {_keys(checkpoint)})")
    out = {}
    for key, value in node.items():
        for prefix in ("module.", "_orig_mod."):
            if key.startswith(prefix):
                key = key[len(prefix) :]
        out[key] = value
    return out


def _keys(obj: Any) -> str:
    if isinstance(obj, dict):
        keys = list(obj)
        return ", ".join(map(str, keys[:8])) + (f" ... ({len(keys)} in all)" if len(keys) > 8 else "")
    return type(obj).__name__


def load_exact(model: nn.Module, state_dict: StateDict, source: str, hint: str = "", file_format: str = "") -> None:
    """A strict load; on any mismatch one readable report (missing, unexpected, shapes), never a partial load.

    `file_format` (what the file was recognised as) and `hint` (what to do) end the report.
    """
    expected = model.state_dict()
    missing = [k for k in expected if k not in state_dict]
    unexpected = [k for k in state_dict if k not in expected]
    shapes = [
        f"{k}: file {tuple(state_dict[k].shape)} vs model {tuple(v.shape)}"
        for k, v in expected.items()
        if k in state_dict and state_dict[k].shape != v.shape
    ]
    if missing or unexpected or shapes:
        lines = [f"{source} does not fit {type(model).__name__} exactly:"]
        for label, items in (("missing keys", missing), ("unexpected keys", unexpected), ("shape mismatches", shapes)):
            if items:
                lines.append(f"  {label} ({len(items)}): " + ", ".join(items[:5]) + (" ..." if len(items) > 5 else ""))
        if file_format:
            lines.append(f"  file format: {file_format}")
        if hint:
            lines.append(f"  hint: {hint}")
        raise UsageError("\n".join(lines))
    model.load_state_dict(state_dict, strict=True)
