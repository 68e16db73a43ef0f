"""Step time of many teachers, cached and uncached: prints a table and one JSON line.

    python benchmarks/agglomerate_speed.py [--teachers 1 2 3] [--limit 10000] [--batch 128]
                                           [--bootleg RUN/bootleg.pth]

Recipe agglomerate-cnn as benchmarks/agglomerate.py sets it up (`base_recipe`: MobileNetV3-Small at 32 px,
strategy agglomerate with PHI-S targets and one summary + dense adaptor-head pair per teacher, evaluation off,
`data.view_slots` 1, views seeded apart from the run's seed), with

  1 teacher    EfficientNet-Lite0 at 64 px
  2 teachers   + EfficientNet-Lite2 at 64 px (the recipe as shipped)
  3 teachers   + the tiny self-supervised Bootleg ViT of `distillkit pretrain bootleg` at 32 px (`--bootleg FILE`,
               needed for 3; pretrained first, ~15 minutes on 2 cores, when FILE does not exist)

on `--limit` Fashion-MNIST images (builtin:fashion-mnist), batch `--batch`, one epoch per run, the float16
teacher cache, on the device Accelerate picks (a GPU when there is one). For each teacher count, three runs:

  uncached   no teacher cache: every teacher runs every step
  fill       the first epoch with a fresh cache: the teachers run and their outputs are written
  reuse      a second run (the same seed, so the same `--limit` images and views) on the same cache:
             every teacher output is read, no teacher runs

Each row: images/s and ms per optimiser step of the training phase, read from the run's metrics.jsonl (its
step records carry the images/s since training began, so the time at step k is k x batch / images/s), timed
from the first logged step (`train.log_every` = WARMUP_STEPS: the loader's start and the first kernels' tuning
left out) to the last, so start-up, the end-of-epoch checkpoint and evaluation are not in it (a run of one
logged step, e.g. `--limit 256`, is timed over its whole epoch); the epoch's seconds as recorded; for each
teacher count the cache's bytes per image and view slot of each teacher (from the cache entry's
meta.json: its stored tensors' shapes x views per step x the dtype's size, the figure a run prints when it
opens the cache) and the ratio reuse / uncached of images/s.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import tempfile
import warnings
from pathlib import Path

import numpy as np
import torch

import distillkit
from distillkit.train.cache import DTYPES

sys.path.insert(0, str(Path(__file__).resolve().parent))
from agglomerate import base_recipe, roles_of  # noqa: E402  (the recipe as the quality benchmark runs it)
from quality import ensure_bootleg  # noqa: E402  (pretrains the tiny Bootleg teacher when its file is missing)

WARMUP_STEPS = 10  # steps before the timed window (train.log_every: the first logged step opens it)
MODES = ("uncached", "fill", "reuse")
SEEDS = {"uncached": 0, "fill": 0, "reuse": 0}  # one seed: `--limit` draws its images from the seed, so another
# seed would train on other images and fill the cache again instead of reading it


def recipe_with(count: int, bootleg: Path | None) -> dict:
    """agglomerate-cnn with its first `count` teacher roles: Lite0, + Lite2, + the Bootleg teacher."""
    recipe = base_recipe(bootleg if count == 3 else None)
    recipe["teachers"] = dict(list(recipe["teachers"].items())[: count - 1])
    return recipe


def training_speed(run_dir: Path, batch: int) -> dict[str, float]:
    """images/s and ms per step from the run's metrics.jsonl, timed from the first logged step to the last
    (the whole epoch when only one step was logged)."""
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line]
    clock = {r["step"]: r["step"] * batch / r["images_per_s"] for r in records if "images_per_s" in r}
    (epoch,) = (r for r in records if "epoch_end" in r)
    first, last = min(clock), max(clock)
    if first == last:
        first, seconds = 0, epoch["seconds"]
    else:
        seconds = clock[last] - clock[first]
    steps = last - first
    return {
        "img_per_s": round(steps * batch / seconds, 1),
        "ms_per_step": round(1000 * seconds / steps, 2),
        "timed_steps": steps,
        "epoch_s": epoch["seconds"],
    }


def epoch_run(recipe: dict, args, out: Path, cache: Path | None, seed: int) -> dict:
    """One epoch of `recipe`, with the teacher cache in `cache` (None: no cache); its training speed."""
    result = distillkit.compress(
        recipe,
        limit=args.limit,
        batch_size=args.batch,
        epochs=1,
        seed=seed,
        out=out,
        quiet=True,
        teacher_cache=cache if cache is not None else False,
        set=["train.checkpoint_every=null", f"train.log_every={WARMUP_STEPS}"],
    )
    if (cache is not None) != (result.teacher_cache is not None):
        raise RuntimeError(f"{out.name}: the teacher cache was {'not ' if cache else ''}used, against the plan")
    return {**training_speed(result.run_dir, args.batch), "data": result.data_source}


def cache_per_image(cache: Path) -> dict[str, dict]:
    """teacher -> the bytes one image's cached outputs take in one view slot (every stored tensor, every view)
    and the shapes stored, from each entry's meta.json."""
    entries = {}
    for meta_file in sorted(cache.glob("*/meta.json")):
        meta = json.loads(meta_file.read_text())
        key, shapes = meta["key"], meta["shapes"]
        itemsize = np.dtype(DTYPES[key["dtype"]][0]).itemsize
        entries[key["teacher"]] = {  # entries are keyed by the teacher's computation, not by its role
            "bytes": key["views_per_step"] * itemsize * sum(math.prod(shape) for shape in shapes.values()),
            "dtype": key["dtype"],
            "stored": shapes,
        }
    return entries


def measure(count: int, args, bootleg: Path | None, work: Path) -> dict:
    """One teacher count: its uncached, filling and reusing epochs, the cache's size per teacher, reuse / uncached."""
    recipe = recipe_with(count, bootleg)
    folder, cache = work / f"{count}-teachers", work / f"{count}-teachers" / "cache"
    runs = {}
    for mode in MODES:
        runs[mode] = epoch_run(recipe, args, folder / mode, None if mode == "uncached" else cache, SEEDS[mode])
        print(f"  {count} teacher(s), {mode}: {runs[mode]['img_per_s']} img/s", flush=True)
    (data,) = {runs[mode].pop("data") for mode in MODES}
    stored = cache_per_image(cache)
    roles = roles_of(recipe)
    return {
        "teachers": count,
        "data": data,
        "roles": {role: f"{s['name']} {s['input_size']}px" for role, s in roles.items()},
        **runs,
        "reuse_vs_uncached": round(runs["reuse"]["img_per_s"] / runs["uncached"]["img_per_s"], 2),
        "cache_per_image": stored,
        "cache_bytes_per_image_all_roles": sum(entry["bytes"] for entry in stored.values()),
    }


def print_table(rows: list[dict]) -> None:
    print(f"\n{'teachers':<9} {'run':<9} {'img/s':>9} {'ms/step':>9} {'steps':>6}   cache bytes per image and slot")
    for row in rows:
        sizes = ", ".join(f"{teacher} {entry['bytes']:,}" for teacher, entry in row["cache_per_image"].items())
        sizes += f" (all {row['cache_bytes_per_image_all_roles']:,})" if len(row["cache_per_image"]) > 1 else ""
        for mode in MODES:
            run = row[mode]
            tail = sizes if mode == "fill" else ""
            print(
                f"{row['teachers']:<9} {mode:<9} {run['img_per_s']:>9.1f} {run['ms_per_step']:>9.2f} "
                f"{run['timed_steps']:>6}   {tail}"
            )
        print(f"{row['teachers']:<9} {'reuse / uncached':<19} {row['reuse_vs_uncached']:>9.2f}x")


def device_name() -> str:
    """What Accelerate trains on here: the first CUDA GPU when there is one, else the CPU."""
    return torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--teachers", type=int, nargs="+", default=[1, 2, 3], choices=[1, 2, 3])
    parser.add_argument("--limit", type=int, default=10000, help="training images (one epoch per run)")
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--bootleg", type=Path, default=None, help="the third teacher's file (RUN/bootleg.pth)")
    args = parser.parse_args()
    if 3 in args.teachers and args.bootleg is None:
        parser.error(
            "--teachers 3 needs --bootleg FILE: the tiny Bootleg teacher's RUN/bootleg.pth (pretrained into "
            "FILE first when it does not exist), or leave 3 out (--teachers 1 2)"
        )
    warnings.simplefilter("ignore")
    with tempfile.TemporaryDirectory(prefix="distillkit-agglomerate-speed-") as tmp:
        work = Path(tmp)
        bootleg = ensure_bootleg(args.bootleg, work) if 3 in args.teachers else None
        rows = [measure(count, args, bootleg, work) for count in sorted(set(args.teachers))]
    print_table(rows)
    print(
        json.dumps(
            {
                "benchmark": "agglomerate_speed",
                "recipe": "agglomerate-cnn",
                "student": "mobilenetv3-small 32px",
                "images": args.limit,
                "batch": args.batch,
                "view_slots": 1,
                "warmup_steps": WARMUP_STEPS,
                "device": device_name(),
                "machine": f"{platform.machine()}, {os.cpu_count()} cpus",
                "torch": torch.__version__,
                "threads": torch.get_num_threads(),
                "rows": rows,
            }
        ),
        flush=True,
    )


if __name__ == "__main__":
    main()
