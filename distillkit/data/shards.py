"""webdataset tar shards: `--data 'shards/train-{000000..000099}.tar'`.

The pattern is expanded as webdataset expands it (`webdataset.shardlists.expand_urls`: brace ranges and lists,
`::` between patterns). Files are grouped into samples by webdataset's convention (`base_plus_ext`: the name
up to the first dot of its last part is the sample key, consecutive files with one key are one sample;
`__name__` entries are skipped). A sample's image is its first .jpg / .jpeg / .png / .webp / ... entry, its label
its .cls entry (an integer) when every sample has one, else the shards are unlabelled.

An image's index is its position in the shards' order (a running count over the shards, in the order the
pattern lists them), which keys its views, its cached teacher outputs and resume; after a labelled run's held-out
split (`data.val_fraction`, as for a folder without val/) the training images keep their order. To know the
length up front and to read any sample directly (a shuffle over all the shards, exact resume, any number of
processes and workers), the shards are indexed once: tar headers and the small .cls entries are read, the images
are not (the header of every member, about 0.3 s per 10,000 samples on a local disk). The index is kept in the
user cache ($DISTILLKIT_CACHE or ~/.cache/distillkit/shard-index), keyed by the shards' paths, sizes and
modification times, so later runs skip it. Images are read from disk when a batch needs them, never held in
memory: the index holds four integers per sample. Shards must be local (or mounted) uncompressed .tar files;
a URL or `pipe:` source is refused.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import tarfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from ..errors import UsageError
from ..io import cache_dir
from ..messages import warn
from .decode import BadImage, read_image

INSTALL = "pip install 'distillkit[webdataset]' (or pip install webdataset)"
IMAGE_SUFFIXES = ("jpg", "jpeg", "png", "webp", "bmp", "gif", "tif", "tiff", "ppm", "pgm")
META = re.compile(r"__[^/]*__($|/)")  # webdataset's skip_meta: __key__-style entries are not samples
INDEX_VERSION = 1


def is_shard_source(source: str) -> bool:
    """Whether `--data` names tar shards: a pattern whose expansion ends in .tar (checked without webdataset)."""
    return not source.startswith(("builtin:", "hf:")) and all(
        re.sub(r"\{[^}]*\}", "", part).endswith(".tar") for part in source.split("::")
    )


def expand_shards(source: str) -> list[Path]:
    """The shard files of a pattern, in its order; a clear error when webdataset is missing or a shard is not local."""
    try:
        from webdataset.shardlists import expand_urls
    except ImportError:
        raise UsageError(f"--data {source!r} names webdataset tar shards; install webdataset: {INSTALL}") from None
    urls = expand_urls(source)
    remote = [u for u in urls if "://" in u or u.startswith("pipe:")]
    if remote:
        raise UsageError(f"--data {remote[0]!r}: only local (or mounted) tar shards can be read; copy them locally")
    return [Path(u).expanduser() for u in urls]


def check_shards(source: str) -> None:
    """Cheap checks before anything loads: webdataset installed, every shard an existing file."""
    shards = expand_shards(source)
    missing = [str(p) for p in shards if not p.is_file()]
    if missing:
        raise UsageError(
            f"{len(missing)} of the {len(shards)} shards of --data {source!r} do not exist, e.g. "
            f"{', '.join(missing[:3])}; check the pattern (brace ranges like train-{{000000..000009}}.tar)"
        )


@dataclass
class ShardIndex:
    """Where every sample's image lies: shard number, header offset (its name, for messages), data offset, size."""

    shards: list[str]
    entries: np.ndarray  # int64 (N, 4): shard, header offset, data offset, size
    labels: np.ndarray | None  # int64 (N,), or None when unlabelled


def index_shards(shards: list[Path]) -> ShardIndex:
    """The shards' index, from the user cache when these exact files were indexed before, else by reading them."""
    stats = [(str(p.resolve()), p.stat().st_size, p.stat().st_mtime_ns) for p in shards]
    key = hashlib.sha256(json.dumps([INDEX_VERSION, stats]).encode()).hexdigest()[:24]
    cached = cache_dir() / "shard-index" / f"{key}.npz"
    if cached.is_file():
        with np.load(cached) as saved:
            labels = saved["labels"] if bool(saved["labelled"]) else None
            return ShardIndex([s for s, _, _ in stats], saved["entries"], labels)
    index = _scan(shards)
    cached.parent.mkdir(parents=True, exist_ok=True)
    partial = cached.with_suffix(f".{os.getpid()}.tmp.npz")
    labels = index.labels if index.labels is not None else np.zeros(0, np.int64)
    np.savez(partial, entries=index.entries, labels=labels, labelled=index.labels is not None)
    os.replace(partial, cached)  # atomic: processes indexing at once each write a whole file
    return index


def _scan(shards: list[Path]) -> ShardIndex:
    entries, labels, unlabelled, imageless = [], [], 0, 0
    for number, path in enumerate(shards):
        for image, label in _scan_shard(path):
            if image is None:
                imageless += 1
                continue
            entries.append((number, *image))
            labels.append(label)
            unlabelled += label is None
    if not entries:
        raise UsageError(f"no images in the {len(shards)} shards ({', '.join(map(str, shards[:2]))}, ...)")
    if imageless:
        warn(f"{imageless} samples of the shards have no image entry ({', '.join(IMAGE_SUFFIXES)}); left out")
    if 0 < unlabelled < len(labels):
        warn(f"{unlabelled} of {len(labels)} shard samples have no .cls label: training without labels")
    labelled = unlabelled == 0
    return ShardIndex(
        [str(p.resolve()) for p in shards],
        np.asarray(entries, dtype=np.int64).reshape(-1, 4),
        np.asarray(labels, dtype=np.int64) if labelled else None,
    )


def _scan_shard(path: Path):
    """(header offset, data offset, size) of each sample's image (None: no image) and its .cls label (or None)."""
    from webdataset.tariterators import base_plus_ext

    try:
        tar = tarfile.open(path, "r:")  # seekable: headers are read, data is skipped
    except tarfile.ReadError as e:
        raise UsageError(f"{path} is not an uncompressed tar file ({e}); webdataset shards are plain .tar") from None
    samples, key, image, label = [], None, None, None
    with tar:
        for info in tar:
            name = info.name
            if not info.isreg() or META.match(name):
                continue
            prefix, suffix = base_plus_ext(name)
            if prefix is None:
                continue
            if prefix != key:
                if key is not None:
                    samples.append((image, label))
                key, image, label = prefix, None, None
            suffix = suffix.lower()
            if image is None and suffix in IMAGE_SUFFIXES:
                image = (info.offset, info.offset_data, info.size)
            elif suffix == "cls":
                label = _read_label(tar, info, path)
            tar.members = []  # the index keeps offsets only, not every TarInfo
    if key is not None:
        samples.append((image, label))
    return samples


def _read_label(tar: tarfile.TarFile, info: tarfile.TarInfo, path: Path) -> int:
    text = tar.extractfile(info).read().decode("utf-8", "replace").strip()
    if not text.isdigit():
        raise UsageError(f"{path}: {info.name} holds {text[:40]!r}, not a class number (.cls is an integer >= 0)")
    return int(text)


class ShardImages(Dataset):
    """The samples `rows` of indexed shards, decoded on demand like a folder's files (`decode.read_image`); item
    i carries index i. Reads use no open file between items, so the dataset pickles into DataLoader workers."""

    def __init__(self, index: ShardIndex, rows: np.ndarray, size: int):
        self.index = index
        self.rows = rows
        self.size = size

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int):
        row = int(self.rows[i])
        shard, header, offset, size = (int(v) for v in self.index.entries[row])
        path = self.index.shards[shard]
        try:
            with open(path, "rb") as f:
                f.seek(offset)
                data = f.read(size)
        except OSError as e:
            return BadImage(f"{path} (sample {row})", str(e)[:200])
        image = read_image(data, "", self.size)
        if isinstance(image, BadImage):
            return BadImage(f"{path}:{_member_name(path, header)}", image.reason)
        label = int(self.index.labels[row]) if self.index.labels is not None else -1
        return image, label, i


def _member_name(path: str, header: int) -> str:
    """The name of the tar member whose header starts at `header` (only for messages: bad files are few)."""
    try:
        with tarfile.open(path, "r:") as tar:
            tar.fileobj.seek(header)
            return tarfile.TarInfo.fromtarfile(tar).name
    except (OSError, tarfile.TarError):
        return f"member at byte {header}"


def load_shards(source: str, val_fraction: float, seed: int, size: int):
    """(train, test or None, number of classes or None, description) of a shard pattern."""
    check_shards(source)
    shards = expand_shards(source)
    index = index_shards(shards)
    n = len(index.entries)
    rows = np.arange(n)
    if index.labels is None or n < 2:
        where = f"webdataset shards {source} ({len(shards)} shards, {n:,} images, unlabelled)"
        return ShardImages(index, rows, size), None, None, where
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).numpy()
    n_test = max(1, int(round(n * val_fraction)))
    test_rows, train_rows = np.sort(order[:n_test]), np.sort(order[n_test:])
    num_classes = int(index.labels.max()) + 1
    where = f"webdataset shards {source} ({len(shards)} shards, {n:,} images, {n_test:,} held out for evaluation)"
    return ShardImages(index, train_rows, size), ShardImages(index, test_rows, size), num_classes, where
