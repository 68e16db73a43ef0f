"""How fast the data path feeds training: prints one JSON line.

    python benchmarks/data_loading.py [--images 512] [--size 224] [--batch 64] [--workers 0 1 2]

Makes `--images` 224 px JPEGs (smooth random colour fields, quality 90) in a temporary folder, the same images as
webdataset tar shards (256 per shard) and as a Hugging Face dataset (save_to_disk), then reads each source
through the training DataLoader's dataset (`open_data`, `ReplacingBad`, `collate_skipping_bad`) at `--size`
with 0, 1, 2 workers (`--workers`), one pass after a warm-up batch; `pil_folder` is the folder decoded with
PIL (the decoder of before), in the main process. Next to them: the training step's own images/s at the same
size (EfficientNet-Lite0 teacher forward + MobileNetV3-Small forward, backward and SGD step, random weights,
batches already in memory), on the device torch picks. Also: the seconds indexing the shards took (once; later
runs read the index from the cache). A data path keeps up when its images/s is above the step's.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader

from distillkit.data import collate_skipping_bad, open_data
from distillkit.data.decode import as_rgb
from distillkit.data.loading import available_cores
from distillkit.data.sources import FolderImages, ReplacingBad


def make_jpegs(folder: Path, count: int, size: int) -> list[bytes]:
    from PIL import Image

    rng = np.random.default_rng(0)
    folder.mkdir(parents=True)
    blobs = []
    for i in range(count):
        field = rng.integers(0, 256, (size // 16, size // 16, 3), dtype=np.uint8)
        buffer = io.BytesIO()
        Image.fromarray(field).resize((size, size), Image.BILINEAR).save(buffer, "JPEG", quality=90)
        blobs.append(buffer.getvalue())
        (folder / f"{i:06d}.jpg").write_bytes(blobs[-1])
    return blobs


def make_shards(folder: Path, blobs: list[bytes], per_shard: int = 256) -> str:
    import webdataset as wds

    folder.mkdir(parents=True)
    shards = range(0, len(blobs), per_shard)
    for number, start in enumerate(shards):
        with wds.TarWriter(str(folder / f"train-{number:06d}.tar")) as writer:
            for i in range(start, min(start + per_shard, len(blobs))):
                writer.write({"__key__": f"{i:06d}", "jpg": blobs[i]})
    return str(folder / f"train-{{000000..{len(shards) - 1:06d}}}.tar")


def make_hf(folder: Path, blobs: list[bytes]) -> str:
    import datasets

    features = datasets.Features({"image": datasets.Image()})
    table = datasets.Dataset.from_dict({"image": [{"bytes": b, "path": None} for b in blobs]}, features)
    table.save_to_disk(str(folder))
    return f"hf:{folder}"


class PilFolder(FolderImages):
    """The decoder of before: PIL decodes and resizes every file."""

    def __getitem__(self, index: int):
        from PIL import Image
        from torchvision.transforms.v2 import functional as TF

        with Image.open(self.paths[index]) as img:
            img = TF.center_crop(TF.resize(as_rgb(img), self.size, antialias=True), [self.size, self.size])
            return TF.pil_to_tensor(img), -1, index


def images_per_second(dataset, batch: int, workers: int) -> float:
    loader = DataLoader(
        ReplacingBad(dataset), batch_size=batch, shuffle=False, num_workers=workers, collate_fn=collate_skipping_bad
    )
    batches = iter(loader)
    next(batches)  # warm-up: workers started, first files read
    start, count = time.perf_counter(), 0
    for item in batches:
        count += item.images.shape[0]
    return round(count / (time.perf_counter() - start), 1)


def step_images_per_second(size: int, batch: int, steps: int = 3) -> float:
    import timm

    device = "cuda" if torch.cuda.is_available() else "cpu"
    teacher = timm.create_model("efficientnet_lite0", num_classes=0).to(device).eval()
    student = timm.create_model("mobilenetv3_small_100", num_classes=0).to(device).train()
    optimizer = torch.optim.SGD(student.parameters(), lr=0.01)
    x = torch.rand(batch, 3, size, size, device=device)
    for step in range(steps + 1):
        if step == 1:
            torch.cuda.synchronize() if device == "cuda" else None
            start = time.perf_counter()
        with torch.no_grad():
            target = teacher(x)
        out = student(x)
        width = min(out.shape[1], target.shape[1])
        loss = (out[:, :width] - target[:, :width]).pow(2).mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    torch.cuda.synchronize() if device == "cuda" else None
    return round(steps * batch / (time.perf_counter() - start), 1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=512)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        os.environ["DISTILLKIT_CACHE"] = str(root / "cache")  # a fresh shard index: its cost is measured
        blobs = make_jpegs(root / "jpegs", args.images, args.size)
        sources = {"folder": str(root / "jpegs"), "shards": make_shards(root / "shards", blobs)}
        sources["hf"] = make_hf(root / "hf", blobs)
        record = {"benchmark": "data_loading", "images": args.images, "size": args.size, "batch": args.batch}
        record |= {"cpu_cores": available_cores(), "machine": platform.processor() or platform.machine()}
        record["torch_threads"] = torch.get_num_threads()
        paths = sorted((root / "jpegs").iterdir())
        results = {f"pil_folder_w{w}": images_per_second(PilFolder(paths, None, args.size), args.batch, w) for w in [0]}
        for name, source in sources.items():
            start = time.perf_counter()
            data = open_data(source, limit=None, seed=0, val_fraction=0.1, load_size=args.size)
            record[f"{name}_open_seconds"] = round(time.perf_counter() - start, 3)  # shards: the index, once
            for w in args.workers:
                results[f"{name}_w{w}"] = images_per_second(data.train, args.batch, w)
        record["images_per_second"] = results
        record["train_step_images_per_second"] = step_images_per_second(args.size, args.batch)
    print(json.dumps(record), flush=True)


if __name__ == "__main__":
    main()
