"""Official checkpoint files: cached downloads when the network allows, one clear message when not.

Files land in `<distillkit cache>/weights/<file name>` (the cache is `~/.cache/distillkit`, or
`$DISTILLKIT_CACHE`). A download goes to `<name>.part` first, resumes from where a dropped one stopped
(HTTP Range), times out instead of hanging, and is checked against its sha256 when the zoo knows it; the
hash of what arrived is recorded beside the file (`<name>.sha256`), so a cached file that changed later
is refused. Several processes on one machine download once: the others wait on a lock, then read it.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import shutil
import socket
import urllib.error
import urllib.request
from contextlib import contextmanager
from pathlib import Path
from urllib.parse import urlparse

from ..errors import UsageError
from ..net import no_connection

TIMEOUT_S = 60.0  # seconds without a byte from the server before a download gives up
CHUNK = 1 << 20


def weights_cache_dir() -> Path:
    from ..io import cache_dir

    return cache_dir() / "weights"


def cached_path(url: str) -> Path:
    return weights_cache_dir() / Path(urlparse(url).path).name


def fetch_weights(url: str, what: str, sha256: str | None = None) -> Path:
    """The local path of `url`'s file, downloading it into the cache first if needed (`sha256`: its known
    hash, checked). Offline, raises `UsageError` naming the file to download and the flag to pass, from
    urllib's own connection error (no retries; proxies from `HTTPS_PROXY` / `HTTP_PROXY` apply)."""
    path = cached_path(url)
    manual = f"Download it on a machine with internet and pass it with --teacher-weights FILE (or copy it to {path})"
    path.parent.mkdir(parents=True, exist_ok=True)
    with _download_lock(path):  # the first process downloads; the others find the file when they get the lock
        if path.is_file() and path.stat().st_size > 0:
            _check_cached(path, sha256)
            return path
        try:
            _download(url, path, sha256)
        except Unreachable as e:
            raise UsageError(
                f"{what}: its weights are the file {url}, and {e.host} cannot be reached from this machine "
                f"({e.reason}). {manual}"
            ) from None
        except UsageError as e:
            raise UsageError(f"{what}: {e}. {manual}") from None
    return path


class Unreachable(Exception):
    """No connection to the server at all (DNS, refused, no route, the proxy): nothing was downloaded."""

    def __init__(self, host: str, reason: object):
        super().__init__(f"{host}: {reason}")
        self.host, self.reason = host, reason


def _download(url: str, path: Path, sha256: str | None) -> None:
    """`url` into `path` through `<path>.part`, resuming a partial file; verified, then renamed."""
    part = path.with_name(path.name + ".part")
    done = part.stat().st_size if part.exists() else 0
    request = urllib.request.Request(url, headers={"Range": f"bytes={done}-"} if done else {})
    try:
        with urllib.request.build_opener().open(request, timeout=TIMEOUT_S) as response:  # proxies: as set now
            resumed = done and getattr(response, "status", 200) == 206
            expected = response.headers.get("Content-Length")
            expected = int(expected) + (done if resumed else 0) if expected is not None else None
            with open(part, "ab" if resumed else "wb") as out:
                shutil.copyfileobj(response, out, CHUNK)
    except (TimeoutError, socket.timeout):
        raise UsageError(f"downloading {url} timed out ({TIMEOUT_S:.0f} s without data); run again to resume") from None
    except urllib.error.URLError as e:
        if no_connection(e):
            raise Unreachable(urlparse(url).hostname or url, e.reason) from None
        if "timed out" in str(e):
            raise UsageError(
                f"downloading {url} timed out ({TIMEOUT_S:.0f} s without data); run again to resume"
            ) from None
        raise UsageError(f"downloading {url} failed ({e}); run again to resume") from None
    except (OSError, ValueError) as e:
        if "timed out" in str(e):
            raise UsageError(
                f"downloading {url} timed out ({TIMEOUT_S:.0f} s without data); run again to resume"
            ) from None
        raise UsageError(f"downloading {url} failed ({e}); run again to resume") from None
    size = part.stat().st_size
    if expected is not None and size < expected:
        raise UsageError(f"the download of {url} is incomplete ({size:,} of {expected:,} bytes); run again to resume")
    digest = _sha256(part)
    if sha256 is not None and digest != sha256.lower():
        part.unlink()
        raise UsageError(
            f"the sha256 of {url} ({digest}) does not match the known one ({sha256}): it was damaged "
            "or replaced on the way; the file was not kept"
        )
    (path.with_name(path.name + ".sha256")).write_text(digest + "\n", encoding="utf-8")
    os.replace(part, path)


def _check_cached(path: Path, sha256: str | None) -> None:
    """A cached file must still be what was downloaded (its recorded hash) and, when known, the official file.
    A file copied there by hand has no record and is used as it is."""
    record = path.with_name(path.name + ".sha256")
    recorded = record.read_text(encoding="utf-8").strip() if record.is_file() else None
    if recorded is None and sha256 is None:
        return
    digest = _sha256(path)
    if recorded is not None and digest != recorded:
        raise UsageError(
            f"{path} changed since it was downloaded (sha256 {digest}, recorded {recorded}); "
            "delete it and run again to download it afresh"
        )
    if sha256 is not None and digest != sha256.lower():
        raise UsageError(
            f"{path} is not the official file (sha256 {digest}, expected {sha256}); delete it and run "
            "again, or pass your own file with --teacher-weights"
        )


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(CHUNK), b""):
            digest.update(block)
    return digest.hexdigest()


@contextmanager
def _download_lock(path: Path):
    with open(path.with_name(path.name + ".lock"), "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)
