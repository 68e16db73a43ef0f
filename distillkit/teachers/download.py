"""Official checkpoint files: cached downloads when the network allows, one clear message when not.

Files land in `<distillkit cache>/weights/<file name>` (the cache is `~/.cache/distillkit`, or
`$DISTILLKIT_CACHE`); a file already there is used without touching the network.
"""

from __future__ import annotations

from pathlib import Path
from urllib.parse import urlparse

from ..errors import UsageError
from . import hub


def weights_cache_dir() -> Path:
    from ..io import cache_dir

    return cache_dir() / "weights"


def cached_path(url: str) -> Path:
    return weights_cache_dir() / Path(urlparse(url).path).name


def fetch_weights(url: str, what: str) -> Path:
    """The local path of `url`'s file, downloading it into the cache first if needed.

    Offline, raises `UsageError` naming the file to download and the flag to pass, after one quick
    connection check (no retries, no timeouts to wait out).
    """
    path = cached_path(url)
    if path.is_file() and path.stat().st_size > 0:
        return path
    host = urlparse(url).hostname or url
    manual = f"Download it on a machine with internet and pass it with --teacher-weights FILE (or copy it to {path})"
    if not hub.network_available(host):
        raise UsageError(
            f"{what}: its weights are the file {url}, and {host} cannot be reached from this machine. {manual}"
        )
    import torch

    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        torch.hub.download_url_to_file(url, str(path), progress=True)
    except Exception as e:  # urllib's HTTP/URL errors, timeouts, a full disk
        raise UsageError(f"{what}: downloading its weights from {url} failed ({e}). {manual}") from None
    return path
