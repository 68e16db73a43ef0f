"""Data sources: IDX files, Fashion-MNIST lookup order and the bundled fallback, image folders."""

from __future__ import annotations

import gzip
import struct
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

import distillkit.data.sources as sources
from distillkit.data import BadImage, check_data_source, collate_skipping_bad, open_data
from distillkit.data.sources import is_full_fashion_mnist, load_fashion_mnist, load_folder, read_idx
from distillkit.errors import UsageError

# ----------------------------------------------------------------------------- helpers


def idx_bytes(array: np.ndarray) -> bytes:
    """An IDX file of unsigned bytes, written by hand: 0, 0, 0x08, ndim, big-endian uint32 dims, data."""
    header = struct.pack(">BBBB", 0, 0, 0x08, array.ndim) + b"".join(struct.pack(">I", d) for d in array.shape)
    return header + np.ascontiguousarray(array, dtype=np.uint8).tobytes()


def write_idx(path: Path, array: np.ndarray) -> Path:
    data = idx_bytes(array)
    if path.suffix == ".gz":
        with gzip.open(path, "wb") as f:
            f.write(data)
    else:
        path.write_bytes(data)
    return path


def write_fashion_dir(folder: Path, n_train: int, n_test: int, gz: bool = True) -> dict[str, np.ndarray]:
    """A tiny Fashion-MNIST-layout folder. Image i of a split is filled with value (i * 7 + offset) % 256."""
    folder.mkdir(parents=True, exist_ok=True)
    suffix = ".gz" if gz else ""
    arrays = {}
    for prefix, n, offset in (("train", n_train, 0), ("t10k", n_test, 100)):
        images = np.stack([np.full((28, 28), (i * 7 + offset) % 256, np.uint8) for i in range(n)])
        images[:, 0, 0] = 255  # one marked pixel per image
        labels = np.array([i % 10 for i in range(n)], np.uint8)
        write_idx(folder / f"{prefix}-images-idx3-ubyte{suffix}", images)
        write_idx(folder / f"{prefix}-labels-idx1-ubyte{suffix}", labels)
        arrays[prefix] = images
        arrays[prefix + "_labels"] = labels
    return arrays


def write_png(path: Path, color, size=(8, 8), mode="RGB") -> Path:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, size, color).save(path)
    return path


@pytest.fixture
def offline_fashion(monkeypatch, tmp_path):
    """No Fashion-MNIST on disk, no download: the bundled subset is what remains."""
    monkeypatch.setattr(sources, "fashion_mnist_search_dirs", lambda: [tmp_path])
    monkeypatch.setattr(sources, "_download_fashion_mnist", lambda: None)


@pytest.fixture
def small_fashion(monkeypatch, tmp_path):
    """DISTILLKIT_FASHION_MNIST pointing at a hand-written 20 train / 10 test set."""
    folder = tmp_path / "fm"
    arrays = write_fashion_dir(folder, 20, 10)
    monkeypatch.setenv("DISTILLKIT_FASHION_MNIST", str(folder))

    def no_download():
        raise AssertionError("the env folder should have been used")

    monkeypatch.setattr(sources, "_download_fashion_mnist", no_download)
    return folder, arrays


# ----------------------------------------------------------------------------- read_idx


@pytest.mark.parametrize("name", ["a-idx3-ubyte", "a-idx3-ubyte.gz"])
def test_read_idx_3d(tmp_path, name):
    expected = np.arange(24, dtype=np.uint8).reshape(2, 3, 4)
    path = write_idx(tmp_path / name, expected)
    got = read_idx(path)
    assert got.dtype == np.uint8
    assert got.shape == (2, 3, 4)
    assert got[1, 2, 3] == 23 and got[0, 1, 0] == 4
    np.testing.assert_array_equal(got, expected)


@pytest.mark.parametrize("name", ["l-idx1-ubyte", "l-idx1-ubyte.gz"])
def test_read_idx_1d(tmp_path, name):
    path = tmp_path / name
    raw = b"\x00\x00\x08\x01" + b"\x00\x00\x00\x05" + bytes([9, 0, 255, 3, 1])
    if name.endswith(".gz"):
        path.write_bytes(gzip.compress(raw))
    else:
        path.write_bytes(raw)
    np.testing.assert_array_equal(read_idx(path), np.array([9, 0, 255, 3, 1], np.uint8))


def test_read_idx_truncated_data(tmp_path):
    path = tmp_path / "t-idx3-ubyte"
    path.write_bytes(idx_bytes(np.zeros((2, 3, 4), np.uint8))[:-4])
    with pytest.raises(UsageError, match="truncated"):
        read_idx(path)


def test_read_idx_truncated_gzip_stream(tmp_path):
    path = tmp_path / "t-idx3-ubyte.gz"
    blob = gzip.compress(idx_bytes(np.arange(200, dtype=np.uint8).reshape(2, 10, 10)))
    path.write_bytes(blob[: len(blob) // 2])
    with pytest.raises(UsageError, match=str(path.name)):
        read_idx(path)


def test_read_idx_not_gzip(tmp_path):
    path = tmp_path / "t-idx3-ubyte.gz"
    path.write_bytes(idx_bytes(np.zeros((1, 2, 2), np.uint8)))  # named .gz, but raw
    with pytest.raises(UsageError):
        read_idx(path)


@pytest.mark.parametrize(
    "raw", [b"", b"\x00\x00", b"\x00\x00\x0d\x01\x00\x00\x00\x01\x00\x00\x00\x00", b"PK\x03\x04hello"]
)
def test_read_idx_bad_magic(tmp_path, raw):
    path = tmp_path / "x-idx1-ubyte"
    path.write_bytes(raw)
    with pytest.raises(UsageError, match="not an IDX file"):
        read_idx(path)


def test_read_idx_truncated_header(tmp_path):
    path = tmp_path / "h-idx3-ubyte"
    path.write_bytes(b"\x00\x00\x08\x03\x00\x00\x00\x02\x00\x00")  # 3 dims announced, 1.5 present
    with pytest.raises(UsageError):
        read_idx(path)


# ----------------------------------------------------------------------------- Fashion-MNIST


def test_bundled_fallback(offline_fashion):
    train, test, where = load_fashion_mnist()
    assert len(train) == 20000
    assert len(test) == 2000
    assert "bundled" in where and "20,000 train" in where
    assert not is_full_fashion_mnist(where)  # its hint mentions "the full set"; a benchmark must not take it
    image, label, index = train[0]
    assert image.dtype == torch.uint8
    assert tuple(image.shape) == (1, 28, 28)
    assert isinstance(label, int) and 0 <= label <= 9
    assert index == 0
    assert train[19999][2] == 19999
    train_counts = torch.bincount(train.labels, minlength=10)
    test_counts = torch.bincount(test.labels, minlength=10)
    assert train_counts.tolist() == [2000] * 10
    assert test_counts.tolist() == [200] * 10
    assert int(train.images.max()) > 0  # real pictures, not a blank array


@pytest.mark.skipif(
    not Path("/usr/share/datasets/fashion-mnist").is_dir(), reason="needs Debian's dataset-fashion-mnist"
)
def test_bundled_subset_is_the_first_images_of_each_class():
    """The bundle holds the first 2,000 training / 200 test images of each class, pixel for pixel."""
    from distillkit.data.sources import read_bundled_fashion_mnist, read_idx

    bundle = read_bundled_fashion_mnist()
    root = Path("/usr/share/datasets/fashion-mnist")
    for prefix, split, per_class in (("train", "train", 2000), ("t10k", "test", 200)):
        images = read_idx(root / f"{prefix}-images-idx3-ubyte.gz").reshape(-1, 28, 28)
        labels = read_idx(root / f"{prefix}-labels-idx1-ubyte.gz")
        chosen = sorted(i for c in range(10) for i in np.flatnonzero(labels == c)[:per_class])
        assert (bundle[f"{split}_images"] == images[chosen]).all()
        assert (bundle[f"{split}_labels"] == labels[chosen]).all()


def test_open_data_builtin_uses_bundled(offline_fashion):
    data = open_data("builtin:fashion-mnist", limit=None, seed=0, val_fraction=0.1, load_size=32)
    assert data.num_classes == 10
    assert len(data.train) == 20000 and data.train is data.train_all
    assert len(data.test) == 2000
    assert "bundled" in data.source


def test_env_folder_is_used_first(small_fashion):
    folder, arrays = small_fashion
    train, test, where = load_fashion_mnist()
    assert len(train) == 20 and len(test) == 10
    assert str(folder) in where
    assert is_full_fashion_mnist(where)
    # image i of train is filled with i * 7, with a marked pixel at (0, 0)
    image, label, index = train[3]
    assert tuple(image.shape) == (1, 28, 28) and image.dtype == torch.uint8
    assert int(image[0, 5, 5]) == 21 and int(image[0, 0, 0]) == 255
    assert label == 3 and index == 3
    image, label, _ = test[9]
    assert int(image[0, 27, 27]) == 163  # 9 * 7 + 100
    assert label == 9


def test_search_dirs_start_with_env(monkeypatch, tmp_path):
    monkeypatch.setenv("DISTILLKIT_FASHION_MNIST", str(tmp_path / "mine"))
    monkeypatch.setenv("DISTILLKIT_CACHE", str(tmp_path / "cache"))
    dirs = sources.fashion_mnist_search_dirs()
    assert dirs[0] == tmp_path / "mine"
    assert tmp_path / "cache" / "fashion-mnist" in dirs


def test_uncompressed_env_folder(monkeypatch, tmp_path):
    folder = tmp_path / "raw"
    write_fashion_dir(folder, 4, 2, gz=False)
    monkeypatch.setattr(sources, "fashion_mnist_search_dirs", lambda: [folder])
    monkeypatch.setattr(sources, "_download_fashion_mnist", lambda: None)
    train, test, _ = load_fashion_mnist()
    assert (len(train), len(test)) == (4, 2)


def test_incomplete_folder_is_skipped(monkeypatch, tmp_path):
    partial = tmp_path / "partial"
    write_fashion_dir(partial, 4, 2)
    (partial / "t10k-labels-idx1-ubyte.gz").unlink()
    full = tmp_path / "full"
    write_fashion_dir(full, 6, 3)
    monkeypatch.setattr(sources, "fashion_mnist_search_dirs", lambda: [partial, full])
    monkeypatch.setattr(sources, "_download_fashion_mnist", lambda: None)
    train, test, where = load_fashion_mnist()
    assert (len(train), len(test)) == (6, 3)
    assert str(full) in where


def test_damaged_folder_is_usage_error(monkeypatch, tmp_path):
    folder = tmp_path / "fm"
    write_fashion_dir(folder, 5, 2)
    write_idx(folder / "train-labels-idx1-ubyte.gz", np.zeros(4, np.uint8))  # 5 images, 4 labels
    monkeypatch.setattr(sources, "fashion_mnist_search_dirs", lambda: [folder])
    with pytest.raises(UsageError, match="damaged"):
        load_fashion_mnist()


# ----------------------------------------------------------------------------- open_data and limit


def test_limit_selects_a_deterministic_subset(small_fashion):
    data = open_data("builtin:fashion-mnist", limit=5, seed=0, val_fraction=0.1, load_size=32)
    assert len(data.train) == 5
    assert len(data.train_all) == 20
    assert len(data.test) == 10
    items = [data.train[i] for i in range(5)]
    indices = [index for _, _, index in items]
    assert len(set(indices)) == 5
    assert all(0 <= i < 20 for i in indices)
    assert indices == sorted(indices)
    for image, label, index in items:  # each item is the original image with its original index
        assert int(image[0, 5, 5]) == index * 7
        assert label == index % 10

    again = open_data("builtin:fashion-mnist", limit=5, seed=0, val_fraction=0.1, load_size=32)
    assert [again.train[i][2] for i in range(5)] == indices
    other = open_data("builtin:fashion-mnist", limit=5, seed=1, val_fraction=0.1, load_size=32)
    assert [other.train[i][2] for i in range(5)] != indices


def test_limit_at_or_above_size_keeps_everything(small_fashion):
    for limit in (20, 1000):
        data = open_data("builtin:fashion-mnist", limit=limit, seed=0, val_fraction=0.1, load_size=32)
        assert len(data.train) == 20


def test_open_data_unknown_builtin():
    with pytest.raises(UsageError, match="did you mean 'fashion-mnist'"):
        open_data("builtin:fashion-mnis", limit=None, seed=0, val_fraction=0.1, load_size=32)


# ----------------------------------------------------------------------------- image folders


def labelled_folder(root: Path) -> dict[str, list[Path]]:
    files = {
        "cat": [write_png(root / "cat" / f"c{i}.png", (200, 10, 10)) for i in range(6)],
        "dog": [write_png(root / "dog" / f"d{i}.png", (10, 200, 10)) for i in range(4)],
    }
    return files


def test_class_subfolders_are_labelled_with_held_out_split(tmp_path):
    files = labelled_folder(tmp_path)
    data = open_data(str(tmp_path), limit=None, seed=0, val_fraction=0.2, load_size=8)
    assert data.num_classes == 2
    assert data.test is not None
    assert len(data.test) == 2  # round(10 * 0.2)
    assert len(data.train) == 8
    train_paths, test_paths = set(data.train.paths), set(data.test.paths)
    assert not train_paths & test_paths
    assert train_paths | test_paths == set(files["cat"] + files["dog"])
    for dataset in (data.train, data.test):
        for path, label in zip(dataset.paths, dataset.labels):
            assert label == (0 if path.parent.name == "cat" else 1)  # classes sorted by name
    image, label, index = data.train[0]
    assert image.dtype == torch.uint8 and tuple(image.shape) == (3, 8, 8)
    expected = (200, 10, 10) if label == 0 else (10, 200, 10)
    assert image[:, 4, 4].tolist() == list(expected)
    assert "held out" in data.source


def test_folder_split_is_deterministic_for_a_seed(tmp_path):
    labelled_folder(tmp_path)
    a = open_data(str(tmp_path), limit=None, seed=5, val_fraction=0.3, load_size=8)
    b = open_data(str(tmp_path), limit=None, seed=5, val_fraction=0.3, load_size=8)
    assert a.test.paths == b.test.paths
    assert a.train.paths == b.train.paths
    assert len(a.test) == 3


def test_folder_limit(tmp_path):
    labelled_folder(tmp_path)
    data = open_data(str(tmp_path), limit=3, seed=0, val_fraction=0.2, load_size=8)
    assert len(data.train) == 3
    assert len(data.train_all) == 8


def test_flat_folder_is_unlabelled(tmp_path):
    paths = [write_png(tmp_path / f"img{i}.png", (i * 40, 0, 0)) for i in range(3)]
    (tmp_path / "notes.txt").write_text("not an image", encoding="utf-8")
    data = open_data(str(tmp_path), limit=None, seed=0, val_fraction=0.2, load_size=8)
    assert data.num_classes is None
    assert data.test is None
    assert len(data.train) == 3
    assert set(data.train.paths) == set(paths)
    image, label, index = data.train[0]
    assert label == -1
    assert tuple(image.shape) == (3, 8, 8)


def test_train_val_layout_uses_val_split(tmp_path):
    train_files = [write_png(tmp_path / "train" / c / f"{c}{i}.png", (5, 5, 5)) for c in ("a", "b") for i in range(3)]
    val_files = [write_png(tmp_path / "val" / c / f"{c}{i}.png", (9, 9, 9)) for c in ("a", "b") for i in range(2)]
    data = open_data(str(tmp_path), limit=None, seed=0, val_fraction=0.5, load_size=8)
    assert data.num_classes == 2
    assert set(data.train.paths) == set(train_files)
    assert set(data.test.paths) == set(val_files)  # not a val_fraction split
    assert data.test.labels == [0, 0, 1, 1]
    assert "val/" in data.source


def test_train_folder_without_val_is_labelled(tmp_path):
    for c in ("a", "b"):
        for i in range(5):
            write_png(tmp_path / "train" / c / f"{i}.png", (5, 5, 5))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        data = open_data(str(tmp_path), limit=None, seed=0, val_fraction=0.2, load_size=8)
    assert data.num_classes == 2
    assert data.test is not None and len(data.test) == 2


def test_upper_case_extensions_and_hidden_folders(tmp_path):
    write_png(tmp_path / "a" / "ONE.PNG", (1, 1, 1))
    write_png(tmp_path / "b" / "two.Png", (2, 2, 2))
    write_png(tmp_path / ".hidden" / "three.png", (3, 3, 3))
    train, test, num_classes, _ = load_folder(tmp_path, 0.5, 0, 8)
    assert num_classes == 2
    assert sorted(p.name for p in train.paths + test.paths) == ["ONE.PNG", "two.Png"]


def test_val_folder_with_unknown_class(tmp_path):
    for c in ("a", "b"):
        write_png(tmp_path / "train" / c / "x.png", (1, 2, 3))
    write_png(tmp_path / "val" / "zebra" / "x.png", (1, 2, 3))
    with pytest.raises(UsageError, match="zebra"):
        load_folder(tmp_path, 0.1, 0, 8)


def test_empty_folder(tmp_path):
    with pytest.raises(UsageError, match="no images"):
        open_data(str(tmp_path), limit=None, seed=0, val_fraction=0.1, load_size=8)


def test_folder_without_image_files(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "readme.txt").write_text("x", encoding="utf-8")
    with pytest.raises(UsageError, match="no images"):
        open_data(str(tmp_path), limit=None, seed=0, val_fraction=0.1, load_size=8)


@pytest.mark.parametrize("content", [b"", b"\x89PNG\r\n\x1a\nthis is not a png", b"GIF89a garbage"])
def test_unreadable_image_is_skipped(tmp_path, content):
    good = [write_png(tmp_path / f"good{i}.png", (50, 60, 70)) for i in range(2)]
    bad = tmp_path / "bad.png"
    bad.write_bytes(content)
    data = open_data(str(tmp_path), limit=None, seed=0, val_fraction=0.1, load_size=8)
    assert len(data.train) == 3
    bad_index = data.train.paths.index(bad)
    marker = data.train[bad_index]
    assert isinstance(marker, BadImage) and marker.path.endswith("bad.png") and marker.reason
    batch = collate_skipping_bad([data.train[i] for i in range(3)])
    assert batch.images.shape == (2, 3, 8, 8)
    assert batch.labels.tolist() == [-1, -1]
    assert sorted(batch.indices.tolist()) == sorted(data.train.paths.index(p) for p in good)
    assert [b.path for b in batch.bad] == [str(bad)]


def test_truncated_png_is_skipped(tmp_path):
    from PIL import Image

    path = tmp_path / "big.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(path)
    path.write_bytes(path.read_bytes()[:200])
    write_png(tmp_path / "ok.png", (1, 1, 1))
    data = open_data(str(tmp_path), limit=None, seed=0, val_fraction=0.1, load_size=8)
    assert isinstance(data.train[data.train.paths.index(path)], BadImage)


def test_collate_skipping_bad():
    item = lambda i: (torch.full((3, 2, 2), i, dtype=torch.uint8), i % 2, i)  # noqa: E731
    bad = BadImage("x.png", "broken")
    batch = collate_skipping_bad([item(1), bad, item(2), bad, item(3)])
    assert batch.images.shape == (3, 3, 2, 2)
    assert batch.images[:, 0, 0, 0].tolist() == [1, 2, 3]
    assert batch.labels.tolist() == [1, 0, 1]
    assert batch.labels.dtype == torch.long and batch.indices.dtype == torch.long
    assert batch.indices.tolist() == [1, 2, 3]
    assert batch.bad == [bad, bad]
    empty = collate_skipping_bad([bad, bad])
    assert empty.images is None and len(empty.bad) == 2


@pytest.mark.parametrize(
    "mode, color, expected",
    [
        ("L", 77, [77, 77, 77]),
        ("RGBA", (10, 20, 30, 128), [10, 20, 30]),
        ("RGB", (1, 2, 3), [1, 2, 3]),
        ("P", 0, None),
    ],
)
def test_image_modes_become_rgb(tmp_path, mode, color, expected):
    write_png(tmp_path / "one.png", color, size=(12, 8), mode=mode)  # non-square: resize + centre crop
    data = open_data(str(tmp_path), limit=None, seed=0, val_fraction=0.1, load_size=6)
    image, _, _ = data.train[0]
    assert image.dtype == torch.uint8
    assert tuple(image.shape) == (3, 6, 6)
    if expected is not None:
        assert image[:, 3, 3].tolist() == expected
        assert torch.equal(image, torch.tensor(expected, dtype=torch.uint8).view(3, 1, 1).expand(3, 6, 6))


def test_single_class_folder_is_unlabelled(tmp_path, tells):
    for i in range(3):
        write_png(tmp_path / "only" / f"{i}.png", (3, 3, 3))
    with tells("single class"):
        data = open_data(str(tmp_path), limit=None, seed=0, val_fraction=0.1, load_size=8)
    assert data.num_classes is None
    assert data.test is None
    assert len(data.train) == 3


# ----------------------------------------------------------------------------- check_data_source


def test_check_data_source_ok(tmp_path):
    check_data_source("builtin:fashion-mnist")
    check_data_source(str(tmp_path))


def test_check_data_source_unknown_builtin():
    with pytest.raises(UsageError, match="builtin:nope"):
        check_data_source("builtin:nope")


def test_check_data_source_missing_path(tmp_path):
    with pytest.raises(UsageError, match="does not exist"):
        check_data_source(str(tmp_path / "missing"))


def test_check_data_source_file(tmp_path):
    path = tmp_path / "a.png"
    path.write_bytes(b"")
    with pytest.raises(UsageError, match="is a file"):
        check_data_source(str(path))


# ----------------------------------------------------------------------------- awkward images (issue 15, item 7)


def test_a_decompression_bomb_is_skipped_and_named(tmp_path):
    """A 196 M pixel image (more than twice PIL's MAX_IMAGE_PIXELS) makes PIL raise DecompressionBombError,
    not OSError: it must become a BadImage that says why, not a crash."""
    from PIL import Image

    Image.new("1", (14000, 14000)).save(tmp_path / "bomb.png")  # one bit per pixel: a small file, 196 M pixels
    write_png(tmp_path / "fine.png", (9, 9, 9))
    data = open_data(str(tmp_path), limit=None, seed=0, val_fraction=0.5, load_size=8)
    items = {Path(data.train.paths[i]).name: data.train[i] for i in range(len(data.train))}
    assert isinstance(items["bomb.png"], BadImage) and "decompression bomb" in items["bomb.png"].reason
    assert not isinstance(items["fine.png"], BadImage)


@pytest.mark.parametrize("mode", ["I;16", "I"])
def test_sixteen_bit_images_are_scaled_not_clipped(tmp_path, mode):
    """A 16-bit grayscale PNG holds 0..65535: it is scaled to 0..255 (value >> 8), not clipped to white."""
    from PIL import Image

    values = np.array([[0, 1000], [30000, 65535]], dtype=np.uint16).repeat(4, 0).repeat(4, 1)  # 8 x 8
    if mode == "I;16":  # a 16-bit PNG
        Image.fromarray(values).save(tmp_path / "deep.png")
    else:  # a 32-bit integer TIFF holding 16-bit values
        Image.fromarray(values.astype(np.int32), mode="I").save(tmp_path / "deep.tif")
    data = open_data(str(tmp_path), limit=None, seed=0, val_fraction=0.5, load_size=8)
    pixels, _, _ = data.train[0]
    assert pixels[0].tolist() == (values >> 8).astype(np.uint8).tolist()
    assert torch.equal(pixels[0], pixels[1]) and torch.equal(pixels[1], pixels[2])


@pytest.mark.parametrize(
    "mode, color, expected", [("CMYK", (0, 255, 255, 0), [255, 0, 0]), ("LA", (77, 200), [77] * 3)]
)
def test_cmyk_and_gray_alpha_images_become_rgb(tmp_path, mode, color, expected):
    from PIL import Image

    Image.new(mode, (8, 8), color).save(tmp_path / ("one.jpg" if mode == "CMYK" else "one.png"))
    data = open_data(str(tmp_path), limit=None, seed=0, val_fraction=0.5, load_size=8)
    pixels, _, _ = data.train[0]
    assert [abs(int(v) - e) <= 2 for v, e in zip(pixels[:, 4, 4], expected)] == [True] * 3


def test_dotfiles_and_notebook_checkpoints_are_not_images(tmp_path):
    """macOS' AppleDouble files (._x.jpg), .ipynb_checkpoints/ and other hidden entries are skipped."""
    for cls in ("a", "b"):
        write_png(tmp_path / cls / "real.png", (5, 5, 5))
        (tmp_path / cls / "._real.png").write_bytes(b"\x00\x05\x16\x07 AppleDouble junk")
        write_png(tmp_path / cls / ".ipynb_checkpoints" / "copy.png", (6, 6, 6))
        write_png(tmp_path / cls / "sub" / ".hidden.png", (7, 7, 7))
    data = open_data(str(tmp_path), limit=None, seed=0, val_fraction=0.5, load_size=8)
    found = [Path(p).relative_to(tmp_path).as_posix() for p in data.train.paths + data.test.paths]
    assert sorted(found) == ["a/real.png", "b/real.png"]


def test_a_val_folder_beside_class_folders_is_the_held_out_split(tmp_path):
    """root/{a,b}/ plus root/val/{a,b}/ without train/: val/ is the held-out split, not a third class."""
    for cls in ("a", "b"):
        for i in range(3):
            write_png(tmp_path / cls / f"{i}.png", (i, i, i))
        write_png(tmp_path / "val" / cls / "v.png", (9, 9, 9))
    data = open_data(str(tmp_path), limit=None, seed=0, val_fraction=0.5, load_size=8)
    assert data.num_classes == 2 and len(data.train) == 6 and len(data.test) == 2
    assert all("/val/" in str(p) for p in data.test.paths) and not any("/val/" in str(p) for p in data.train.paths)


def test_training_batches_stay_full_when_an_image_is_unreadable(tmp_path):
    """The training loader's dataset gives an unreadable image's place to the next readable one (with its own
    index) and reports the bad file, so every process's batch keeps its size."""
    from distillkit.data.sources import ReplacingBad

    for i in range(4):
        write_png(tmp_path / f"{i}.png", (i, i, i))
    (tmp_path / "1.png").write_bytes(b"broken")
    data = open_data(str(tmp_path), limit=None, seed=0, val_fraction=0.5, load_size=8)
    batch = collate_skipping_bad([ReplacingBad(data.train)[i] for i in range(4)])
    assert batch.images.shape[0] == 4 and batch.indices.tolist() == [0, 2, 2, 3]
    assert [Path(b.path).name for b in batch.bad] == ["1.png"]
    plain = collate_skipping_bad([data.train[i] for i in range(4)])  # evaluation skips it instead
    assert plain.images.shape[0] == 3 and len(plain.bad) == 1
