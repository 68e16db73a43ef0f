"""Hugging Face `datasets`: `--data hf:<path or name>[:split]`.

The path is a folder written by `save_to_disk` (read with `load_from_disk`), another local folder or file that
`load_dataset` reads (an imagefolder, parquet files), or a Hub dataset name (`load_dataset(name)`, into the
Hugging Face cache; `HF_HUB_OFFLINE=1` reads a cached one without the network). Before a Hub download the Hub is
asked once, without retries, so an offline machine gets huggingface_hub's own error in about a second instead of
`datasets`' half a minute of retries. The split is the one named after the last `:`, else `train` (or the only
one); evaluation reads a `test` / `validation` split beside it when there is one, else `data.val_fraction` of a
labelled training split is held out (its images keep their order).

The image column is the feature of type `Image`; the label column a `ClassLabel` feature, when there is one
(else unlabelled). An image's index is its row number in the training split (after any held-out split). Images
are read from the Arrow files `datasets` memory-maps, as encoded bytes decoded on demand like a folder's files
(`decode.read_image`): nothing is held in memory, which is what lets a dataset larger than RAM train; a dataset
held in memory (built with `Dataset.from_dict` and not saved) works too.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from ..errors import UsageError
from .decode import BadImage, read_image

INSTALL = "pip install 'distillkit[hf]' (or pip install datasets)"
HELD_OUT_SPLITS = ("test", "validation", "valid", "val")
_SPLIT = re.compile(r"^[A-Za-z0-9_.-]+$")
PROBE_TIMEOUT_S = 10.0


def parse_hf(source: str) -> tuple[str, str | None]:
    """`hf:<path or name>[:split]` -> (path or name, split or None)."""
    rest = source[len("hf:") :]
    head, sep, tail = rest.rpartition(":")
    if sep and head and _SPLIT.match(tail) and not Path(rest).expanduser().exists():
        return head, tail
    return rest, None


def _datasets():
    try:
        import datasets
    except ImportError:
        raise UsageError(f"--data hf:... reads Hugging Face datasets; install them: {INSTALL}") from None
    return datasets


def _is_local(name: str) -> bool:
    return Path(name).expanduser().exists() or name.startswith(("/", ".", "~")) or name.endswith(".parquet")


def check_hf_source(source: str) -> None:
    """Cheap checks before anything loads: `datasets` installed, a name, and a local path that exists."""
    _datasets()
    name, _ = parse_hf(source)
    if not name:
        raise UsageError("--data hf: needs a dataset: hf:<folder saved with save_to_disk | Hub name>[:split]")
    if _is_local(name) and not Path(name).expanduser().exists():
        raise UsageError(f"--data {source!r}: {name} does not exist; pass a dataset folder or a Hub name")


def open_hf(name: str):
    """The Dataset or DatasetDict behind `name` (see the module docstring)."""
    datasets = _datasets()
    path = Path(name).expanduser()
    if path.is_dir() and ((path / "dataset_dict.json").is_file() or (path / "state.json").is_file()):
        return datasets.load_from_disk(str(path))
    if path.is_file():
        if path.suffix != ".parquet":
            raise UsageError(f"--data hf:{name}: a single file must be .parquet (or pass its folder)")
        return datasets.load_dataset("parquet", data_files=str(path))
    if not path.exists():
        _check_hub(name)
    try:
        return datasets.load_dataset(str(path) if path.exists() else name)
    except (ConnectionError, FileNotFoundError, ValueError) as e:  # datasets' own errors, e.g. offline mode
        raise UsageError(f"--data hf:{name}: {str(e).splitlines()[0][:300]}") from None


def _check_hub(name: str) -> None:
    """Ask the Hub once (no retries) about the dataset; a UsageError with huggingface_hub's reason if it cannot."""
    from huggingface_hub import HfApi, constants
    from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError

    if constants.HF_HUB_OFFLINE:
        return  # datasets reads its cache, or says at once that it is offline
    try:
        HfApi().dataset_info(name, timeout=PROBE_TIMEOUT_S)
    except GatedRepoError:
        raise UsageError(f"the Hub dataset {name} is gated: accept its terms, then `hf auth login`") from None
    except RepositoryNotFoundError:
        raise UsageError(f"the Hub has no dataset {name!r} (or it is private: `hf auth login`)") from None
    except Exception as e:  # huggingface_hub's network errors: no connection, DNS, proxy, timeout
        raise UsageError(
            f"--data hf:{name}: the Hugging Face Hub cannot be reached ({type(e).__name__}: {e}); a dataset "
            "already in the local Hugging Face cache loads with HF_HUB_OFFLINE=1, or pass a local folder"
        ) from None


def _splits(loaded, split: str | None, name: str):
    """(training split, held-out split or None) of a Dataset or DatasetDict."""
    if not hasattr(loaded, "keys"):  # a single Dataset
        if split is not None:
            raise UsageError(f"--data hf:{name} is a single dataset without splits; drop ':{split}'")
        return loaded, None
    names = list(loaded.keys())
    train = split or ("train" if "train" in names else names[0] if len(names) == 1 else None)
    if train not in names:
        raise UsageError(f"--data hf:{name} has splits {', '.join(names)}; name one: hf:{name}:<split>")
    held_out = next((s for s in HELD_OUT_SPLITS if s in names and s != train), None)
    return loaded[train], (loaded[held_out] if held_out else None)


def columns(dataset, name: str) -> tuple[str, str | None]:
    """(image column: the `Image` feature, label column: a `ClassLabel` feature or None)."""
    datasets = _datasets()
    features = dataset.features
    images = [c for c, f in features.items() if isinstance(f, datasets.Image)]
    if not images:
        listed = ", ".join(f"{c} ({type(f).__name__})" for c, f in features.items())
        raise UsageError(f"--data hf:{name} has no Image column (columns: {listed}); cast one with Image()")
    labels = [c for c, f in features.items() if isinstance(f, datasets.ClassLabel)]
    label = next((c for c in ("label", "labels") if c in labels), labels[0] if labels else None)
    return images[0], label


class HFImages(Dataset):
    """Rows `rows` of a `datasets.Dataset`, their images decoded on demand; item i carries index i."""

    def __init__(self, dataset, image: str, label: str | None, rows: np.ndarray, size: int, name: str):
        datasets = _datasets()
        keep = [image] + ([label] if label else [])
        self.table = dataset.select_columns(keep).cast_column(image, datasets.Image(decode=False))  # the bytes
        self.image, self.label, self.rows, self.size, self.name = image, label, rows, size, name

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int):
        row = int(self.rows[i])
        record = self.table[row]
        where = f"hf:{self.name} row {row}"
        encoded = record[self.image] or {}
        data = encoded.get("bytes")
        try:
            if data is None and encoded.get("path"):
                data = Path(encoded["path"]).read_bytes()
        except OSError as e:
            return BadImage(where, str(e)[:200])
        image = read_image(data or b"", where, self.size)
        if isinstance(image, BadImage):
            return image
        return image, (int(record[self.label]) if self.label else -1), i


def load_hf(source: str, val_fraction: float, seed: int, size: int):
    """(train, test or None, number of classes or None, description) of an `hf:` source."""
    check_hf_source(source)
    name, split = parse_hf(source)
    train, held_out = _splits(open_hf(name), split, name)
    image, label = columns(train, name)
    num_classes = train.features[label].num_classes if label else None
    n = len(train)
    if n == 0:
        raise UsageError(f"--data {source!r}: the split has no rows")
    rows, test_rows = np.arange(n), None
    if label and held_out is None and n > 1:
        order = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).numpy()
        n_test = max(1, int(round(n * val_fraction)))
        test_rows, rows = np.sort(order[:n_test]), np.sort(order[n_test:])
    train_set = HFImages(train, image, label, rows, size, name)
    test = None
    if label and held_out is not None and label in held_out.features:
        test = HFImages(held_out, image, label, np.arange(len(held_out)), size, name)
        where = f"Hugging Face dataset {name} ({n:,} training rows, {len(held_out):,} held out)"
    elif test_rows is not None:
        test = HFImages(train, image, label, test_rows, size, name)
        where = f"Hugging Face dataset {name} ({len(rows):,} training rows, {len(test_rows):,} held out)"
    else:
        where = f"Hugging Face dataset {name} ({n:,} rows{', unlabelled' if not label else ''})"
    return train_set, test, num_classes, where
