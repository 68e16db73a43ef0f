"""Where training images come from: `builtin:<name>` datasets, image folders, webdataset tar shards
(shards.py) and Hugging Face datasets (`hf:`, hf.py).

Every dataset yields `(image, label, index)`: a uint8 (C, H, W) tensor of fixed size, an int label
(-1 when unlabelled) and the image's index, which keys its augmentation (see views.py).

`builtin:fashion-mnist` is looked for, in order: $DISTILLKIT_FASHION_MNIST, Debian's
dataset-fashion-mnist (/usr/share/datasets/fashion-mnist), the user cache
($DISTILLKIT_CACHE or ~/.cache/distillkit), torchvision's download into that cache when online,
and finally the 20,000 + 2,000 image subset bundled inside the package (8.3 MB, xz-compressed).
"""

from __future__ import annotations

import functools
import gzip
import math
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset

from ..errors import UsageError
from ..io import cache_dir
from ..messages import warn
from ..net import reachable
from ..registry import did_you_mean
from .decode import BadImage, as_rgb, error_reason, read_image  # noqa: F401 (as_rgb: re-exported, it lived here)
from .shards import is_shard_source

IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"}
HELD_OUT_FOLDERS = ("val", "test", "valid", "validation")
BUNDLED_DIR = Path(__file__).resolve().parent / "bundled"
FASHION_MNIST_CLASSES = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)


@dataclass
class ImageData:
    train: Dataset  # what distillation trains on (after --limit)
    train_all: Dataset  # the whole training split: the k-NN bank / probe training set
    test: Dataset | None  # held-out labelled split for evaluation
    num_classes: int | None  # None when unlabelled
    source: str  # where the images came from, for the run summary


class TensorImages(Dataset):
    """Images held in memory as one uint8 tensor (N, C, H, W)."""

    in_memory = True  # nothing to decode: `data.num_workers: auto` reads it in the main process

    def __init__(self, images: Tensor, labels: Tensor | None):
        self.images = images
        self.labels = labels

    def __len__(self) -> int:
        return self.images.shape[0]

    def __getitem__(self, index: int):
        label = int(self.labels[index]) if self.labels is not None else -1
        return self.images[index], label, index


@dataclass
class Batch:
    images: Tensor | None  # uint8 (B, C, H, W); None when every item was bad
    labels: Tensor | None
    indices: Tensor | None
    bad: list[BadImage]
    host_images: Tensor | None = None  # after `to(device)`: the same images still on the host (hashed there)

    def pin_memory(self) -> "Batch":
        """The batch in page-locked memory (what a DataLoader with pin_memory=True calls): faster copies to a GPU."""
        pin = lambda t: t.pin_memory() if t is not None else None  # noqa: E731
        return Batch(pin(self.images), pin(self.labels), pin(self.indices), self.bad)

    def to(self, device, non_blocking: bool = False) -> "Batch":
        """The images and labels on `device` (what Accelerate's prepared loader calls: without it a dataclass
        stays on the CPU). The indices stay on the host, and the images too as `host_images`: views are drawn
        and the teacher cache is read and checked (pixel hashes) there, and a copy back from a GPU would wait
        for it every step."""
        move = lambda t: t.to(device, non_blocking=non_blocking) if t is not None else None  # noqa: E731
        host = self.images if self.images is None or self.images.device.type == "cpu" else self.host_images
        return Batch(move(self.images), move(self.labels), self.indices, self.bad, host)


class FolderImages(Dataset):
    """Image files decoded on demand (`decode.read_image`: torchvision for JPEG / PNG / WebP, PIL for the rest),
    resized (shorter side) and centre-cropped to `size` x `size`.

    An unreadable file yields a `BadImage`; `collate_skipping_bad` drops it and reports it.
    """

    def __init__(self, paths: list[Path], labels: list[int] | None, size: int):
        self.paths = paths
        self.labels = labels
        self.size = size

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int):
        path = self.paths[index]
        try:
            data = path.read_bytes()
        except OSError as e:
            return BadImage(str(path), error_reason(e))
        image = read_image(data, str(path), self.size)
        if isinstance(image, BadImage):
            return image
        return image, (self.labels[index] if self.labels is not None else -1), index


class ReplacingBad(Dataset):
    """Training items where an unreadable image's place is taken by the next readable one (index + 1, + 2,
    ...), which carries its own index (so its views and cached teacher outputs are its own) and the bad
    files met on the way. Every batch then stays full: under several processes the strategies' gathers see
    equal batch sizes on every process. Evaluation reads the plain dataset, where bad items are skipped."""

    def __init__(self, base: Dataset):
        self.base = base

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, index: int):
        bad = []
        for step in range(len(self.base)):
            item = self.base[(index + step) % len(self.base)]
            if not isinstance(item, BadImage):
                return (*item, bad)
            bad.append(item)
        return bad[0]  # not a single readable image


def collate_skipping_bad(items) -> Batch:
    """Stack the readable items; unreadable ones (`BadImage`, or those a `ReplacingBad` item met) are
    reported in `Batch.bad`."""
    bad = [item for item in items if isinstance(item, BadImage)]
    bad += [b for item in items if not isinstance(item, BadImage) and len(item) == 4 for b in item[3]]
    good = [item for item in items if not isinstance(item, BadImage)]
    if not good:
        return Batch(None, None, None, bad)
    images = torch.stack([item[0] for item in good])
    labels = torch.tensor([item[1] for item in good], dtype=torch.long)
    indices = torch.tensor([item[2] for item in good], dtype=torch.long)
    return Batch(images, labels, indices, bad)


class Subset(Dataset):
    """A fixed selection of another dataset's items, keeping their original indices."""

    def __init__(self, base: Dataset, indices: list[int]):
        self.base = base
        self.indices = indices

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int):
        return self.base[self.indices[i]]


# ----------------------------------------------------------------------------- entry point

BUILTINS = ("fashion-mnist",)


def open_data(source: str, *, limit: int | None, seed: int, val_fraction: float, load_size: int) -> ImageData:
    if source.startswith("builtin:"):
        name = source[len("builtin:") :]
        if name not in BUILTINS:
            raise UsageError(
                f"unknown builtin dataset {source!r}: {did_you_mean(name, list(BUILTINS))} (e.g. builtin:fashion-mnist)"
            )
        train, test, where = load_fashion_mnist()
        num_classes = 10
    elif source.startswith("hf:"):
        from .hf import load_hf

        train, test, num_classes, where = load_hf(source, val_fraction, seed, load_size)
    elif is_shard_source(source):
        from .shards import load_shards

        train, test, num_classes, where = load_shards(source, val_fraction, seed, load_size)
    else:
        train, test, num_classes, where = load_folder(Path(source).expanduser(), val_fraction, seed, load_size)
    train_limited = train
    if limit is not None and limit < len(train):
        chosen = torch.randperm(len(train), generator=torch.Generator().manual_seed(seed))[:limit]
        train_limited = Subset(train, sorted(chosen.tolist()))
    return ImageData(train=train_limited, train_all=train, test=test, num_classes=num_classes, source=where)


def check_data_source(source: str) -> None:
    """Cheap checks before anything loads: a known builtin, a Hugging Face dataset (`hf:`), existing tar shards,
    or an existing folder; an optional source's library installed."""
    if source.startswith("builtin:"):
        name = source[len("builtin:") :]
        if name not in BUILTINS:
            raise UsageError(f"unknown builtin dataset {source!r}: {did_you_mean(name, list(BUILTINS))}")
        return
    if source.startswith("hf:"):
        from .hf import check_hf_source

        return check_hf_source(source)
    if is_shard_source(source):
        from .shards import check_shards

        return check_shards(source)
    path = Path(source).expanduser()
    if not path.exists():
        raise UsageError(
            f"data folder {path} does not exist; pass --data with an image folder, webdataset shards "
            "('dir/train-{000000..000009}.tar'), hf:<dataset> or builtin:fashion-mnist"
        )
    if not path.is_dir():
        raise UsageError(f"--data {path} is a file; pass a folder of images (optionally one subfolder per class)")


# ----------------------------------------------------------------------------- Fashion-MNIST


def fashion_mnist_search_dirs() -> list[Path]:
    dirs = []
    if os.environ.get("DISTILLKIT_FASHION_MNIST"):
        dirs.append(Path(os.environ["DISTILLKIT_FASHION_MNIST"]))
    dirs += [
        Path("/usr/share/datasets/fashion-mnist"),
        cache_dir() / "fashion-mnist",
        cache_dir() / "fashion-mnist" / "FashionMNIST" / "raw",
    ]
    return dirs


def is_full_fashion_mnist(where: str) -> bool:
    """Whether `where` (load_fashion_mnist's third value) names the full 60,000 / 10,000 set, not the subset."""
    return where.startswith("Fashion-MNIST (full")


def load_fashion_mnist() -> tuple[TensorImages, TensorImages, str]:
    for folder in fashion_mnist_search_dirs():
        found = _read_fashion_mnist_dir(folder)
        if found is not None:
            return (*found, f"Fashion-MNIST (full, {folder})")
    downloaded = _download_fashion_mnist()
    if downloaded is not None:
        return (*downloaded, f"Fashion-MNIST (full, downloaded to {cache_dir() / 'fashion-mnist'})")
    bundle = read_bundled_fashion_mnist()
    train = _tensor_images(bundle["train_images"], bundle["train_labels"])
    test = _tensor_images(bundle["test_images"], bundle["test_labels"])
    return (
        train,
        test,
        (
            f"Fashion-MNIST (bundled subset: {len(train):,} train / {len(test):,} test; for the full set run "
            "`apt-get install dataset-fashion-mnist` or connect to the internet)"
        ),
    )


@functools.lru_cache(maxsize=1)
def read_bundled_fashion_mnist() -> dict[str, np.ndarray]:
    """The subset shipped in the package: an .npz compressed with xz (see bundled/LICENSE-fashion-mnist.txt),
    decoded once per process; the arrays are read-only (callers copy them)."""
    import io
    import lzma

    with lzma.open(BUNDLED_DIR / "fashion_mnist_subset.npz.xz") as f:
        bundle = np.load(io.BytesIO(f.read()))
        arrays = {name: bundle[name] for name in bundle.files}
    for array in arrays.values():
        array.flags.writeable = False
    return arrays


def _read_fashion_mnist_dir(folder: Path) -> tuple[TensorImages, TensorImages] | None:
    splits = []
    for prefix in ("train", "t10k"):
        images = _find(folder, f"{prefix}-images-idx3-ubyte")
        labels = _find(folder, f"{prefix}-labels-idx1-ubyte")
        if images is None or labels is None:
            return None
        x = read_idx(images).reshape(-1, 28, 28)
        y = read_idx(labels)
        if x.shape[0] != y.shape[0]:
            raise UsageError(f"Fashion-MNIST in {folder} is damaged: {x.shape[0]} images but {y.shape[0]} labels")
        splits.append(_tensor_images(x, y))
    return splits[0], splits[1]


def _find(folder: Path, stem: str) -> Path | None:
    for name in (stem + ".gz", stem):
        if (folder / name).is_file():
            return folder / name
    return None


def read_idx(path: Path) -> np.ndarray:
    """Read an IDX file (optionally gzipped): magic (2 zero bytes, dtype 0x08, ndim), dims, data. A read-only
    array, decoded once per process for a given file, size and modification time (Fashion-MNIST's 26 MB gzip
    takes ~0.6 s to inflate: a pipeline or benchmark that runs compress many times pays it once)."""
    try:
        stat = path.stat()
    except OSError as e:
        raise UsageError(f"cannot read {path}: {e}; the file is damaged, delete it or reinstall it") from None
    return _decode_idx(path.resolve(), stat.st_size, stat.st_mtime_ns)


@functools.lru_cache(maxsize=8)  # the four Fashion-MNIST files, and a few others
def _decode_idx(path: Path, size: int, mtime_ns: int) -> np.ndarray:
    """read_idx's work; `size` and `mtime_ns` key the cache so a replaced file is read again."""
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            raw = f.read()
    except (OSError, EOFError) as e:
        raise UsageError(f"cannot read {path}: {e}; the file is damaged, delete it or reinstall it") from None
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != 0x08:
        raise UsageError(f"{path} is not an IDX file of unsigned bytes")
    ndim = raw[3]
    if len(raw) < 4 + 4 * ndim:
        raise UsageError(f"{path} is truncated: its header is incomplete")
    dims = [int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    data = np.frombuffer(raw, np.uint8, offset=4 + 4 * ndim)
    if data.size != math.prod(dims):
        raise UsageError(f"{path} is truncated: expected {math.prod(dims)} values, found {data.size}")
    return data.reshape(dims)


def _tensor_images(images: np.ndarray, labels: np.ndarray) -> TensorImages:
    x = torch.from_numpy(np.array(images, dtype=np.uint8)).unsqueeze(1)  # (N, 1, 28, 28) grayscale
    return TensorImages(x, torch.from_numpy(labels.astype(np.int64)))


def _download_fashion_mnist() -> tuple[TensorImages, TensorImages] | None:
    from torchvision.datasets import FashionMNIST

    if not reachable(FashionMNIST.mirrors[0]):  # offline: the bundled subset, no download noise
        return None

    root = cache_dir() / "fashion-mnist"
    try:
        FashionMNIST(str(root), train=True, download=True)
        FashionMNIST(str(root), train=False, download=True)
    except Exception as e:  # any download failure falls through to the bundled subset
        warn(f"Fashion-MNIST download failed ({e}); using the bundled subset")
        return None
    return _read_fashion_mnist_dir(root / "FashionMNIST" / "raw")


# ----------------------------------------------------------------------------- image folders


def load_folder(root: Path, val_fraction: float, seed: int, size: int):
    check_data_source(str(root))
    held_out = next((root / n for n in HELD_OUT_FOLDERS if (root / n).is_dir()), None)
    if held_out is not None and ((root / "train").is_dir() or _class_folders(root, exclude=held_out.name)):
        train_root = root / "train" if (root / "train").is_dir() else root
        train_paths, train_labels, classes = scan_folder(train_root, exclude=(held_out.name,))
        test_paths, test_labels, test_classes = scan_folder(held_out, classes)
        where = f"image folder {root} ({'train/ and ' if train_root != root else 'class folders and '}{held_out.name}/)"
    else:
        if (root / "train").is_dir():  # train/ alone: split it
            root = root / "train"
        paths, labels, classes = scan_folder(root)
        order = torch.randperm(len(paths), generator=torch.Generator().manual_seed(seed)).tolist()
        n_test = max(1, int(round(len(paths) * val_fraction))) if labels is not None and len(paths) > 1 else 0
        test_ids, train_ids = sorted(order[:n_test]), sorted(order[n_test:])
        train_paths = [paths[i] for i in train_ids]
        test_paths = [paths[i] for i in test_ids]
        train_labels = [labels[i] for i in train_ids] if labels is not None else None
        test_labels = [labels[i] for i in test_ids] if labels is not None else None
        where = f"image folder {root}" + (f" ({n_test} images held out for evaluation)" if n_test else "")
    train = FolderImages(train_paths, train_labels, size)
    test = FolderImages(test_paths, test_labels, size) if test_paths and test_labels is not None else None
    return train, test, (len(classes) if train_labels is not None else None), where


def _class_folders(root: Path, exclude: str) -> list[Path]:
    return [
        d
        for d in root.iterdir()
        if d.is_dir()
        and not d.name.startswith(".")
        and d.name != exclude
        and d.name not in HELD_OUT_FOLDERS
        and _images_in(d)
    ]


def scan_folder(root: Path, classes: list[str] | None = None, exclude: tuple[str, ...] = ()):
    """Class subfolders -> labelled images; loose image files -> unlabelled. Fails on an empty folder.
    `exclude`: subfolder names that are not classes (the held-out split beside them)."""
    subdirs = sorted(d for d in root.iterdir() if d.is_dir() and not d.name.startswith(".") and d.name not in exclude)
    loose = sorted(p for p in root.iterdir() if _is_image_file(p))
    class_images = {d.name: _images_in(d) for d in subdirs}
    class_images = {k: v for k, v in class_images.items() if v}
    if classes is None and len(class_images) >= 2:
        classes = sorted(class_images)
    if classes is not None and class_images:
        unknown = sorted(set(class_images) - set(classes))
        if unknown:
            raise UsageError(f"{root} has class folders not in the training split: {', '.join(unknown[:5])}")
        paths, labels = [], []
        for label, name in enumerate(classes):
            for path in class_images.get(name, []):
                paths.append(path)
                labels.append(label)
        return paths, labels, classes
    paths = loose + [p for images in class_images.values() for p in images]
    if not paths:
        raise UsageError(
            f"no images found in {root} (looked for {', '.join(sorted(IMAGE_EXTENSIONS))} files, directly "
            "or one subfolder per class)"
        )
    if len(class_images) == 1:
        warn(f"{root} has a single class folder: training without labels, so no k-NN / probe accuracy")
    return paths, None, []


def _images_in(folder: Path) -> list[Path]:
    """Image files anywhere under `folder`, except hidden ones and those inside hidden folders (macOS'
    `._name` AppleDouble files, `.ipynb_checkpoints/`, `.git/`)."""
    return sorted(
        p
        for p in folder.rglob("*")
        if _is_image_file(p) and not any(part.startswith(".") for part in p.relative_to(folder).parts)
    )


def _is_image_file(path: Path) -> bool:
    return path.is_file() and not path.name.startswith(".") and path.suffix.lower() in IMAGE_EXTENSIONS
