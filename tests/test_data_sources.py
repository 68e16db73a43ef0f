"""Data sources beyond folders (issue 17, item 3): webdataset tar shards, Hugging Face datasets, torchvision
decoding, and DataLoader workers (`data.num_workers: auto`) that change no result."""

from __future__ import annotations

import io
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file
from test_compress import TINY, tiny_run

import distillkit.data.shards as shards
from distillkit.data import BadImage, check_data_source, collate_skipping_bad, open_data
from distillkit.data.decode import as_rgb, decode_resized
from distillkit.data.loading import auto_workers, loader_options, resolve_workers
from distillkit.data.sources import FolderImages, TensorImages
from distillkit.errors import UsageError
from distillkit.recipe import resolve_recipe
from distillkit.train import loop

ROOT = Path(__file__).resolve().parents[1]
NO_EVAL = TINY + ["eval.enabled=false"]
LOG = ["train.log_every=1"]


def encoded(array: np.ndarray, fmt: str, mode: str | None = None, **options) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array, mode=mode).save(buffer, fmt, **options)
    return buffer.getvalue()


def colour(n: int) -> np.ndarray:
    """Image n: a 40 x 48 block whose red value is n (so the pixels say which sample they are)."""
    return np.full((40, 48, 3), (n, 255 - n, n % 7 * 30), dtype=np.uint8)


def write_shards(folder: Path, sizes: list[int], labelled: bool = True, bad: set[int] = frozenset()) -> str:
    """Shards written with webdataset's own TarWriter: sample n (counted over the shards) is colour(n) with
    class n % 2; the samples in `bad` hold bytes that are not an image."""
    import webdataset as wds

    folder.mkdir(parents=True, exist_ok=True)
    n = 0
    for number, size in enumerate(sizes):
        with wds.TarWriter(str(folder / f"train-{number:06d}.tar")) as writer:
            for _ in range(size):
                sample = {
                    "__key__": f"s{n:05d}",
                    "jpg": b"\xff\xd8 not a jpeg" if n in bad else encoded(colour(n), "PNG"),
                }
                writer.write(sample | ({"cls": n % 2} if labelled else {}))
                n += 1
    return str(folder / f"train-{{000000..{len(sizes) - 1:06d}}}.tar")


@pytest.fixture(autouse=True)
def own_cache(tmp_path, monkeypatch):
    """The shard index is cached in the user cache: one per test."""
    monkeypatch.setenv("DISTILLKIT_CACHE", str(tmp_path / "cache"))


# ----------------------------------------------------------------------------- decoding


RNG = np.random.default_rng(0)
PIXELS = RNG.integers(0, 256, (30, 20, 3), dtype=np.uint8)
FAST = {
    "jpeg RGB": encoded(PIXELS, "JPEG"),
    "jpeg L": encoded(PIXELS[..., 0], "JPEG"),
    "png RGB": encoded(PIXELS, "PNG"),
    "png RGBA": encoded(np.dstack([PIXELS, PIXELS[..., :1]]), "PNG"),
    "png L": encoded(PIXELS[..., 0], "PNG"),
    "png LA": encoded(PIXELS[..., :2], "PNG", mode="LA"),
    "png 1": encoded(PIXELS[..., 0] > 128, "PNG"),
    "png I;16": encoded(PIXELS[..., 0].astype(np.uint16) * 257 + 3, "PNG"),
    "webp RGB": encoded(PIXELS, "WEBP", lossless=True),
    "webp RGBA": encoded(np.dstack([PIXELS, PIXELS[..., :1]]), "WEBP", lossless=True),
}
_PALETTE = io.BytesIO()
Image.fromarray(PIXELS).convert("P").save(_PALETTE, "PNG")
FAST["png P"] = _PALETTE.getvalue()


@pytest.mark.parametrize("name", sorted(FAST))
def test_torchvision_decoding_gives_pils_pixels(name, monkeypatch):
    """The modes decoded by torchvision.io.decode_image give exactly what PIL + as_rgb give, and torchvision
    is what decoded them."""
    import torchvision.io
    from torchvision.transforms.v2 import functional as TF

    calls = []
    real = torchvision.io.decode_image
    monkeypatch.setattr(torchvision.io, "decode_image", lambda *a, **k: calls.append(1) or real(*a, **k))
    data = FAST[name]
    got = decode_resized(torch.frombuffer(bytearray(data), dtype=torch.uint8), 16)
    expected = TF.center_crop(TF.resize(TF.pil_to_tensor(as_rgb(Image.open(io.BytesIO(data)))), 16), [16, 16])
    assert calls == [1]
    assert got.dtype == torch.uint8 and got.shape == (3, 16, 16)
    assert torch.equal(got, expected)


def test_other_formats_take_pil(tmp_path, monkeypatch):
    import torchvision.io

    monkeypatch.setattr(torchvision.io, "decode_image", lambda *a, **k: pytest.fail("torchvision used for a BMP"))
    (tmp_path / "a.bmp").write_bytes(encoded(PIXELS, "BMP"))
    image, _, _ = FolderImages([tmp_path / "a.bmp"], None, 8)[0]
    assert image.shape == (3, 8, 8)


def test_a_truncated_jpeg_is_a_bad_image_with_a_readable_reason(tmp_path):
    """PIL reads its header, torchvision fails on the data (a RuntimeError): skipped, with a reason."""
    data = encoded(RNG.integers(0, 256, (64, 64, 3), dtype=np.uint8), "JPEG")
    (tmp_path / "cut.jpg").write_bytes(data[: len(data) // 3])
    item = FolderImages([tmp_path / "cut.jpg"], None, 8)[0]
    assert isinstance(item, BadImage) and item.path.endswith("cut.jpg")
    assert item.reason and ".cpp" not in item.reason


# ----------------------------------------------------------------------------- workers


@pytest.mark.parametrize(
    "cores, processes, expected", [(1, 1, 0), (2, 1, 1), (4, 4, 0), (16, 1, 8), (16, 2, 7), (64, 8, 7)]
)
def test_auto_workers_formula(cores, processes, expected):
    assert auto_workers(cores, processes) == expected


def test_num_workers_auto_resolution_and_gpu_options(monkeypatch):
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "1")
    folder = FolderImages([], None, 8)
    assert resolve_recipe(None).data.num_workers == "auto"
    assert resolve_workers("auto", TensorImages(torch.zeros(2, 1, 4, 4, dtype=torch.uint8), None)) == 0
    assert resolve_workers("auto", folder) == auto_workers() and resolve_workers(3, folder) == 3
    cpu = loader_options(2, folder, "cpu", persistent=True)
    assert cpu == {"num_workers": 2, "pin_memory": False, "persistent_workers": False}
    gpu = loader_options(2, folder, "cuda", persistent=True)
    assert gpu == {"num_workers": 2, "pin_memory": True, "persistent_workers": True}
    assert loader_options(0, folder, "cuda", persistent=True)["persistent_workers"] is False
    for bad in (-1, "many"):
        with pytest.raises(UsageError, match="num_workers"):
            resolve_recipe(None, overrides={"data.num_workers": bad})


# ----------------------------------------------------------------------------- webdataset shards


def test_shards_index_in_shard_order_and_the_same_image_every_time(tmp_path, monkeypatch):
    pattern = write_shards(tmp_path / "s", [4, 3, 5])
    data = open_data(pattern, limit=None, seed=0, val_fraction=0.25, load_size=8)
    assert (len(data.train), len(data.test), data.num_classes) == (9, 3, 2)
    samples = [data.train[i] for i in range(9)]
    numbers = [int(image[0, 4, 4]) for image, _, _ in samples]
    assert numbers == sorted(numbers) and len(set(numbers)) == 9  # shard order kept after the held-out split
    assert [label for _, label, _ in samples] == [n % 2 for n in numbers]
    assert [index for _, _, index in samples] == list(range(9))
    # another open (the next epoch, another process, a resumed run) reads the index from the cache, not the tars
    monkeypatch.setattr(shards, "_scan", lambda paths: pytest.fail("the shards were indexed again"))
    again = open_data(pattern, limit=None, seed=0, val_fraction=0.25, load_size=8)
    assert all(torch.equal(again.train[i][0], samples[i][0]) for i in range(9))


def test_unlabelled_shards_and_a_bad_entry(tmp_path):
    pattern = write_shards(tmp_path / "s", [3, 3], labelled=False, bad={4})
    data = open_data(pattern, limit=None, seed=0, val_fraction=0.25, load_size=8)
    assert data.num_classes is None and data.test is None and len(data.train) == 6
    bad = data.train[4]
    assert isinstance(bad, BadImage) and bad.path.endswith("train-000001.tar:s00004.jpg") and bad.reason
    batch = collate_skipping_bad([data.train[i] for i in range(6)])
    assert batch.indices.tolist() == [0, 1, 2, 3, 5] and [b.path for b in batch.bad] == [bad.path]


def test_shard_sources_are_checked_before_loading(tmp_path):
    write_shards(tmp_path / "s", [2])
    with pytest.raises(UsageError, match="1 of the 2 shards"):
        check_data_source(str(tmp_path / "s" / "train-{000000..000001}.tar"))
    with pytest.raises(UsageError, match="local"):
        check_data_source("pipe:curl -s https://example.com/train-{000000..000001}.tar")
    (tmp_path / "broken.tar").write_bytes(b"not a tar at all" * 100)
    with pytest.raises(UsageError, match="not an uncompressed tar"):
        open_data(str(tmp_path / "broken.tar"), limit=None, seed=0, val_fraction=0.1, load_size=8)


def test_a_missing_library_is_a_clear_error():
    """With webdataset and datasets made unimportable (None in sys.modules: import raises ImportError), the
    sources say which package to install, before anything loads."""
    code = (
        "import sys; sys.modules['webdataset'] = None; sys.modules['datasets'] = None\n"
        "from distillkit.data import check_data_source\n"
        "from distillkit.errors import UsageError\n"
        "for source in ('shards/train-{000000..000009}.tar', 'hf:/tmp/somewhere'):\n"
        "    try:\n"
        "        check_data_source(source)\n"
        "    except UsageError as e:\n"
        "        print('ERROR', e)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=ROOT)
    lines = [line for line in done.stdout.splitlines() if line.startswith("ERROR")]
    assert len(lines) == 2, done.stdout + done.stderr
    assert "pip install 'distillkit[webdataset]'" in lines[0] and "pip install 'distillkit[hf]'" in lines[1]


def test_shards_train_and_evaluate_with_workers_and_resume_mid_epoch_exactly(tmp_path, monkeypatch, tells):
    """A labelled shard run trains and evaluates. The same run with 2 DataLoader workers, killed after a
    mid-epoch checkpoint and resumed (workers again), ends with bit-identical losses and weights."""
    pattern = write_shards(tmp_path / "s", [40, 40, 40, 40], bad={8})  # 8: a training image (7 is held out)
    common = dict(data=pattern, limit=None, batch_size=32, epochs=2)
    with tells(r"1 unreadable image was skipped: .*train-000000\.tar:s00008\.jpg \(not a readable image"):
        whole = tiny_run(
            tmp_path / "whole", **common, set=TINY + LOG + ["data.num_workers=0"], teacher_cache=tmp_path / "c1"
        )
    assert whole.steps == 8
    assert 0.0 <= whole.metrics["student"]["knn_top1"] <= 1.0 and 0.0 <= whole.metrics["student"]["probe_top1"] <= 1.0

    real_save = loop.save_checkpoint
    monkeypatch.setattr(loop, "save_checkpoint", lambda *a, **k: (real_save(*a, **k), _crash())[0])
    workers = NO_EVAL + LOG + ["data.num_workers=2", "train.checkpoint_every=2"]
    with pytest.raises(KeyboardInterrupt):
        tiny_run(tmp_path / "two", **common, set=workers, teacher_cache=tmp_path / "c2")
    assert max(_losses(tmp_path / "two")) == 2  # stopped inside the first epoch (4 steps)
    monkeypatch.setattr(loop, "save_checkpoint", real_save)
    resumed = tiny_run(tmp_path / "two", **common, set=workers, resume=True, teacher_cache=tmp_path / "c2")
    assert resumed.steps == 8 and sorted(_losses(whole.run_dir)) == list(range(1, 9))
    assert _losses(resumed.run_dir) == _losses(whole.run_dir)
    a, b = (load_file(str(r.run_dir / "checkpoints" / "last" / "model.safetensors")) for r in (whole, resumed))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _crash():
    raise KeyboardInterrupt("simulated crash after the first checkpoint (step 2 of 4 in epoch 0)")


def _losses(run_dir: Path) -> dict[int, float]:
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {line["step"]: line["loss"] for line in lines if "loss" in line and "epoch_end" not in line}  # not the means


# ----------------------------------------------------------------------------- Hugging Face datasets


def hf_dataset(path: Path, n: int, splits: bool = False, bad: set[int] = frozenset()) -> Path:
    """A labelled dataset saved with save_to_disk; row n is colour(n) with class n % 3 (raw bytes where bad)."""
    datasets = pytest.importorskip("datasets")

    def table(start: int, count: int):
        images = [
            {"bytes": b"not an image" if i in bad else encoded(colour(i), "PNG"), "path": None}
            for i in range(start, start + count)
        ]
        features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(num_classes=3)})
        return datasets.Dataset.from_dict(
            {"image": images, "label": [i % 3 for i in range(start, start + count)]}, features
        )

    if splits:
        datasets.DatasetDict({"train": table(0, n), "test": table(n, 10)}).save_to_disk(str(path))
    else:
        table(0, n).save_to_disk(str(path))
    return path


def test_hf_dataset_rows_are_the_index_and_a_bad_row_is_skipped(tmp_path):
    path = hf_dataset(tmp_path / "ds", 12, bad={5})
    data = open_data(f"hf:{path}", limit=None, seed=0, val_fraction=0.25, load_size=8)
    assert (len(data.train), len(data.test), data.num_classes) == (9, 3, 3)
    items = [data.train[i] for i in range(9)] + [data.test[i] for i in range(3)]
    bad = [item for item in items if isinstance(item, BadImage)]
    assert len(bad) == 1 and bad[0].path.endswith("row 5") and bad[0].reason
    good = [item for item in items[:9] if not isinstance(item, BadImage)]
    numbers = [int(image[0, 4, 4]) for image, _, _ in good]
    assert numbers == sorted(numbers) and [label for _, label, _ in good] == [n % 3 for n in numbers]
    assert [index for _, _, index in good] == [i for i in range(9) if not isinstance(items[i], BadImage)]
    assert all(torch.equal(data.train[index][0], image) for image, _, index in good)  # the same image again


def test_hf_splits_and_sources_are_checked(tmp_path):
    path = hf_dataset(tmp_path / "dd", 20, splits=True)
    data = open_data(f"hf:{path}", limit=None, seed=0, val_fraction=0.25, load_size=8)
    assert len(data.train) == 20 and len(data.test) == 10  # the test split, not a share of train
    assert int(data.test[0][0][0, 4, 4]) == 20
    on_test = open_data(f"hf:{path}:test", limit=None, seed=0, val_fraction=0.5, load_size=8)  # no other held-out
    assert len(on_test.train) == len(on_test.test) == 5  # split: half of it is held out
    with pytest.raises(UsageError, match="splits train, test"):
        open_data(f"hf:{path}:validation", limit=None, seed=0, val_fraction=0.25, load_size=8)
    with pytest.raises(UsageError, match="does not exist"):
        check_data_source(f"hf:{tmp_path / 'missing'}")


def test_a_hub_name_fails_fast_without_the_hub(monkeypatch):
    pytest.importorskip("datasets")
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # nothing listens on port 9: refused at once
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", "http://127.0.0.1:9")
    start = time.perf_counter()
    with pytest.raises(UsageError, match="cannot be reached|no dataset"):
        open_data("hf:distillkit-tests/no-such-dataset", limit=None, seed=0, val_fraction=0.1, load_size=8)
    assert time.perf_counter() - start < 15


def test_hf_run_trains_and_evaluates(tmp_path):
    path = hf_dataset(tmp_path / "ds", 80, splits=True)
    result = tiny_run(tmp_path / "run", data=f"hf:{path}", limit=None, batch_size=16, max_steps=3)
    assert result.steps == 3
    assert 0.0 <= result.metrics["student"]["knn_top1"] <= 1.0
    assert result.metrics["eval_split"]["test_images"] == 10
