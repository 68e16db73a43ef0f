"""Writing files so that a crash never leaves a half-written one: temp file in the same folder,
fsync, then an atomic rename over the target."""

from __future__ import annotations

import errno
import json
import os
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

from .errors import RunError


def cache_dir() -> Path:
    """distillkit's user cache (downloads, data, teacher outputs): $DISTILLKIT_CACHE or ~/.cache/distillkit."""
    return Path(os.environ.get("DISTILLKIT_CACHE", Path.home() / ".cache" / "distillkit")).expanduser()


def permissions(directory: bool) -> int:
    """The mode a plain open() / mkdir() would give under the current umask (0644 / 0755 by default)."""
    umask = os.umask(0)
    os.umask(umask)
    return (0o777 if directory else 0o666) & ~umask


@contextmanager
def atomic_path(target: str | Path) -> Iterator[Path]:
    """Yield a temp path beside `target`; on success it replaces `target` atomically."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        tmp_path.chmod(permissions(directory=False))  # mkstemp's 0600 would hide the file from everyone else
        with open(tmp_path, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp_path, target)
    except BaseException as e:
        tmp_path.unlink(missing_ok=True)
        if disk_full(e):
            raise RunError(
                f"the disk is full (or a file-size or quota limit was reached): could not write {target}; "
                "free some space and retry"
            ) from None
        raise


FULL_DISK_ERRNOS = {errno.ENOSPC, errno.EFBIG, errno.EDQUOT}
FULL_DISK_WORDS = ("No space left on device", "File too large", "FileTooLarge", "StorageFull", "Disk quota exceeded")


def disk_full(error: BaseException) -> bool:
    """An OSError for a full disk (or a file-size / quota limit), or a library's own exception around one:
    safetensors raises SafetensorError and torch.save RuntimeError, with the OS error only in the message."""
    if isinstance(error, OSError):
        return error.errno in FULL_DISK_ERRNOS
    return isinstance(error, Exception) and any(word in str(error) for word in FULL_DISK_WORDS)


def write_text(target: str | Path, text: str) -> None:
    with atomic_path(target) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_json(target: str | Path, data: Any) -> None:
    write_text(target, json.dumps(data, indent=2, sort_keys=False) + "\n")


def save_safetensors(target: str | Path, tensors: dict, metadata: dict[str, str] | None = None) -> None:
    from safetensors.torch import save_file

    tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    with atomic_path(target) as tmp:
        save_file(tensors, str(tmp), metadata=metadata)
