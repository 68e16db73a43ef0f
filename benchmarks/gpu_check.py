"""The GPU check in one command: prints one JSON line (`benchmarks/gpu_check.sh` runs it).

    python benchmarks/gpu_check.py [--smoke]

On a CUDA GPU (about 3-5 minutes on one H200-class GPU; the budget is 8), in bf16:

  throughput   distillkit's loop vs a bare hand-written loop vs the student alone, images/s and
               `overhead_ratio` (benchmarks/throughput.py) for EfficientNet-Lite0 -> MobileNetV3-Small and a
               ViT-B/16 (random weights) -> MobileNetV3-Small, teacher and student at 224 px, batch 256, the
               fastest of 3 interleaved rounds of 30 steps after 3 warm-up steps
  cache        a student reusing the teacher cache vs the student alone (benchmarks/cache_speed.py, `feature`,
               Lite0 -> MobileNetV3-Small at 224 px, 20,000 Fashion-MNIST images, batch 256, one epoch each)
  evaluation   seconds of `distillkit.evaluate.evaluate_run` on the device: teacher, student and random init
               embedded (5,000-image bank, 5,000 scored, random labelled images), k-NN, linear probe (300 steps),
               CPU latency (5 runs)
  data         the data path's images/s: benchmarks/data_loading.py when it exists, else the product's
               DataLoader (`data.num_workers: auto`, pinned) over a folder of 2,048 synthetic 500 x 375 JPEGs,
               decoded and resized, batches moved to the device
  syncs        host syncs per training step: 30 steps of the distillkit loop under
               `torch.cuda.set_sync_debug_mode("warn")`, its warnings counted per step (inside the step, and
               between steps: the loader and checkpoint checks); and, in both modes, the host reads of device
               values made from distillkit's train/ and strategies/ code (the Tensor methods item, bool, int,
               float, tolist, counted as tests/test_step_syncs.py counts them)
  fsdp         `distillkit compress` under `accelerate launch --use_fsdp` (1 process, bf16, 16 steps of 64): stopped
               at step 8, resumed from its sharded checkpoint, exported from the weights gathered from the shards;
               the export compared with the checkpoint's shards merged by Accelerate (skipped without a GPU:
               Accelerate does not shard CPU processes)
  peak memory  `torch.cuda.max_memory_allocated()` over the whole check (and per pair in `throughput`)

Targets on a GPU: overhead_ratio <= 1.05 for each pair, cache reuse >= 0.9x the student alone.

Without a GPU (or with `--smoke`) the same code paths run with tiny sizes (32 px, batch 8, a few steps) in fp32
(a CPU without bf16 units emulates bf16 several times slower), and the line says `"gpu": false` with a note;
the exit status is 0 either way.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import subprocess
import sys
import tempfile
import time
import warnings
from contextlib import contextmanager
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent)]  # the sibling benchmarks, and the distillkit of this checkout
import cache_speed  # noqa: E402
import throughput  # noqa: E402

# what each mode runs; the GPU sizes fit the 8-minute budget on one H200-class GPU with room to spare
SETTINGS = {
    "gpu": {
        "size": 224, "batch": 256, "steps": 30, "warmup": 3, "rounds": 3, "precision": "bf16",
        "pairs": ["lite0", "vit-b"],
        "cache_images": 20000, "cache_batch": 256, "alone_steps": 30,
        "eval_bank": 5000, "eval_test": 5000, "probe_steps": 300, "latency_runs": 5,
        "data_images": 2048, "data_batch": 256, "data_epochs": 2, "data_workers": [0, 8], "sync_steps": 30,
        "fsdp_steps": 16,
    },
    "smoke": {
        "size": 32, "batch": 8, "steps": 2, "warmup": 1, "rounds": 1, "precision": "fp32",
        "pairs": ["lite0", "vit-b"],
        "cache_images": 128, "cache_batch": 16, "alone_steps": 2,
        "eval_bank": 128, "eval_test": 64, "probe_steps": 10, "latency_runs": 1,
        "data_images": 48, "data_batch": 16, "data_epochs": 1, "data_workers": [0], "sync_steps": 5,
        "fsdp_steps": 4,
    },
}  # fmt: skip
TARGETS = {"overhead_ratio_max": 1.05, "reuse_vs_alone_min": 0.9}
READS = ("item", "__bool__", "__int__", "__float__", "tolist")
COUNTED = ("/distillkit/train/", "/distillkit/strategies/")
NOT_DEVICE = ("/distillkit/train/cache.py",)  # the cache's own host arrays


def measure_throughput(settings: dict) -> dict:
    """pair -> benchmarks/throughput.py's record (distillkit / bare / student alone, overhead_ratio, memory)."""
    options = argparse.Namespace(
        steps=settings["steps"], batch=settings["batch"], rounds=settings["rounds"], warmup=settings["warmup"],
        precision=settings["precision"], vit_size=settings["size"], size=settings["size"], render="shared",
    )  # fmt: skip
    return {pair: throughput.measure(pair, options) for pair in settings["pairs"]}


def measure_cache(settings: dict) -> dict:
    """benchmarks/cache_speed.py's record for `feature`: uncached / fill / reuse epochs vs the student alone."""
    options = argparse.Namespace(
        limit=settings["cache_images"], batch=settings["cache_batch"], size=settings["size"],
        precision=settings["precision"], alone_steps=settings["alone_steps"],
    )  # fmt: skip
    return cache_speed.measure(options, "feature", "shared")


def measure_evaluation(settings: dict) -> dict:
    """Seconds of `evaluate_run` (what `compress` evaluates with) on the training device, random labelled
    images at the pair's load size: 3 networks embedded on a bank and a scored split, k-NN, probe, latency."""
    import dataclasses

    from distillkit.data import ImageData
    from distillkit.data.sources import TensorImages
    from distillkit.evaluate import evaluate_run

    options = argparse.Namespace(
        steps=1, batch=8, precision=settings["precision"], vit_size=settings["size"], size=settings["size"],
        render="shared",
    )  # fmt: skip
    setup = throughput.Setup("lite0", options)
    generator = torch.Generator().manual_seed(1)
    load = setup.data.images.shape[-1]

    def labelled(n: int) -> TensorImages:
        images = torch.randint(0, 256, (n, 3, load, load), dtype=torch.uint8, generator=generator)
        return TensorImages(images, torch.randint(0, 10, (n,), generator=generator))

    bank, test = labelled(settings["eval_bank"]), labelled(settings["eval_test"])
    images = ImageData(train=bank, train_all=bank, test=test, num_classes=10, source="random labelled images")
    evaluation = dataclasses.replace(
        setup.recipe.eval, enabled=True, max_train=len(bank), max_test=len(test),
        probe_steps=settings["probe_steps"], latency_runs=settings["latency_runs"],
    )  # fmt: skip
    recipe = dataclasses.replace(setup.recipe, eval=evaluation)
    throughput.synchronize(setup.device)
    start = time.perf_counter()
    metrics = evaluate_run(recipe, setup.teacher, setup.run.student, images, setup.device)
    throughput.synchronize(setup.device)
    seconds = time.perf_counter() - start
    return {
        "seconds": round(seconds, 2),
        "bank_images": len(bank),
        "scored_images": len(test),
        "networks": [name for name in metrics if isinstance(metrics[name], dict) and "params" in metrics[name]],
        "px": load,
        "probe_steps": settings["probe_steps"],
        "latency_runs": settings["latency_runs"],
    }


def measure_data(settings: dict, device: torch.device) -> dict:
    """The data path's images/s: benchmarks/data_loading.py's record when that script exists and runs (folder,
    webdataset shards and a Hugging Face dataset, by worker count), else the product's DataLoader options over a
    folder of synthetic JPEGs."""
    script = HERE / "data_loading.py"
    failed = None
    if script.exists():
        record = run_data_loading(script, settings)
        if "error" not in record:
            return record
        failed = record["error"]
    with tempfile.TemporaryDirectory() as folder:
        write_jpegs(Path(folder), settings["data_images"], small=settings["size"] < 128)
        record = folder_loader_speed(Path(folder), settings, device)
    return record | ({"data_loading_error": failed} if failed else {})


def run_data_loading(script: Path, settings: dict) -> dict:
    """benchmarks/data_loading.py's JSON line at the check's sizes, run on this checkout's distillkit, with
    `best_img_per_s`: the fastest source and worker count."""
    command = [
        sys.executable, str(script), "--images", str(settings["data_images"]), "--size", str(settings["size"]),
        "--batch", str(settings["data_batch"]), "--workers", *map(str, settings["data_workers"]),
    ]  # fmt: skip
    environment = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, [str(HERE.parent), os.environ.get("PYTHONPATH")])),
    }
    done = subprocess.run(command, capture_output=True, text=True, timeout=300, env=environment)
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if done.returncode or not lines:
        return {"error": (done.stderr or done.stdout).strip()[-400:]}
    record = json.loads(lines[-1])
    speeds = record.get("images_per_second") or {}
    best = max(speeds, key=speeds.get) if speeds else None
    return {"source": script.name, "best": best, "best_img_per_s": speeds.get(best), **record}


def write_jpegs(folder: Path, count: int, small: bool) -> None:
    """`count` JPEGs (500 x 375, ImageNet-like; 64 x 48 when `small`) of smooth noise in two class folders."""
    from PIL import Image

    width, height = (64, 48) if small else (500, 375)
    generator = torch.Generator().manual_seed(2)
    for i in range(count):
        coarse = torch.randint(0, 256, (3, height // 8 + 1, width // 8 + 1), dtype=torch.uint8, generator=generator)
        pixels = torch.nn.functional.interpolate(coarse[None].float(), size=(height, width), mode="bilinear")[0]
        (folder / f"class{i % 2}").mkdir(exist_ok=True)
        Image.fromarray(pixels.clamp(0, 255).byte().permute(1, 2, 0).numpy()).save(
            folder / f"class{i % 2}" / f"{i:05d}.jpg", quality=90
        )


def folder_loader_speed(folder: Path, settings: dict, device: torch.device) -> dict:
    """Images/s of the training DataLoader's options (`data/loading.py`) over `folder`, decoded and resized at
    the load size, each batch moved to `device`; the first epoch warms the workers up and is not timed."""
    from torch.utils.data import DataLoader

    from distillkit.data import collate_skipping_bad
    from distillkit.data.loading import loader_options
    from distillkit.data.sources import load_folder

    load = int(round(settings["size"] * 1.15))
    train, _, _, _ = load_folder(folder, 0.0, 0, load)
    options = loader_options("auto", train, device, persistent=True)
    loader = DataLoader(train, batch_size=settings["data_batch"], collate_fn=collate_skipping_bad, **options)
    speeds = []
    for epoch in range(settings["data_epochs"] + 1):
        throughput.synchronize(device)
        start, images = time.perf_counter(), 0
        for batch in loader:
            images += batch.to(device, non_blocking=True).images.shape[0]
        throughput.synchronize(device)
        if epoch:
            speeds.append(images / (time.perf_counter() - start))
    return {
        "source": "DataLoader over synthetic JPEGs (data_loading.py absent or failed)",
        "images": len(train),
        "px": load,
        "num_workers": options["num_workers"],
        "best_img_per_s": round(max(speeds), 1),
    }


@contextmanager
def counting_steps():
    """Per training step (`loop._Training.step`): the host reads made from distillkit's train/ and strategies/
    code, and on CUDA the `set_sync_debug_mode("warn")` warnings inside the step and since the previous one."""
    from distillkit.train import loop

    record = {"reads": [], "in_step": [], "between": [], "where": collections.Counter()}
    originals = {name: getattr(torch.Tensor, name) for name in READS}
    original_step = loop._Training.step
    cuda = torch.cuda.is_available()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        state = {"reads": 0, "last_end": None, "in_step": False}
        for name, original in originals.items():
            setattr(torch.Tensor, name, _counted(original, state, record["where"]))

        def step(self, batch):
            reads, warned = state["reads"], len(caught)
            if state["last_end"] is not None:
                record["between"].append(warned - state["last_end"])
            state["in_step"] = True
            try:
                done = original_step(self, batch)
            finally:
                state["in_step"] = False
            record["reads"].append(state["reads"] - reads)
            record["in_step"].append(len(caught) - warned)
            state["last_end"] = len(caught)
            return done

        loop._Training.step = step
        if cuda:
            torch.cuda.set_sync_debug_mode("warn")
        try:
            yield record
        finally:
            if cuda:
                torch.cuda.set_sync_debug_mode(0)
            loop._Training.step = original_step
            for name, original in originals.items():
                setattr(torch.Tensor, name, original)
    record["sync_where"] = collections.Counter(
        f"{w.filename.split('/site-packages/')[-1].split('/distillkit/')[-1]}:{w.lineno}"
        for w in caught
        if "synchroniz" in str(w.message)
    )


def _counted(original, state: dict, where: collections.Counter):
    """`original` (a Tensor method that reads a value back to the host), counting the calls distillkit's train/
    and strategies/ code makes inside a training step."""

    def read(self, *args, **kwargs):
        frame = sys._getframe(1)
        caller = frame.f_code.co_filename
        if state["in_step"] and any(p in caller for p in COUNTED) and not any(p in caller for p in NOT_DEVICE):
            state["reads"] += 1
            where[f"{caller.split('/distillkit/')[-1]}:{frame.f_lineno}"] += 1
        return original(self, *args, **kwargs)

    return read


def measure_syncs(settings: dict) -> dict:
    """Host syncs per step of distillkit's loop (Lite0 -> MobileNetV3-Small at the check's size, SEED, logging
    every 10 steps): median and max over the steps after the first, and the places they come from."""
    options = argparse.Namespace(
        steps=settings["sync_steps"], batch=settings["batch"], precision=settings["precision"],
        vit_size=settings["size"], size=settings["size"], render="shared",
    )  # fmt: skip
    setup = throughput.Setup("lite0", options)
    setup.recipe.train.log_every = 10
    with counting_steps() as record:
        throughput.run_distillkit(setup, settings["sync_steps"])
    later = slice(1, None)  # step 1 sets the strategies' state up
    out = {
        "steps": settings["sync_steps"],
        "log_every": 10,
        "host_reads_per_step": summary(record["reads"][later]),
        "host_reads_where": dict(record["where"].most_common(6)),
    }
    if torch.cuda.is_available():
        out["cuda_syncs_in_step"] = summary(record["in_step"][later])
        out["cuda_syncs_between_steps"] = summary(record["between"][later])
        out["cuda_syncs_where"] = dict(record["sync_where"].most_common(8))
    return out


def measure_fsdp(settings: dict, gpu: bool) -> dict:
    """`distillkit compress` under `accelerate launch --use_fsdp` on one GPU process: a run stopped at half its
    steps, resumed from its sharded checkpoint (Accelerate's save_state / load_state) to the end, evaluated and
    exported from the weights gathered from the shards; the exported safetensors compared with the student
    part of the checkpoint's own shards, merged by Accelerate's merge_fsdp_weights. Accelerate gives FSDP to
    CUDA (and other accelerator) processes only, so on a CPU this section says so and runs nothing."""
    if not gpu:
        return {"skipped": "FSDP needs accelerator processes: Accelerate does not shard CPU processes"}
    import shutil

    from accelerate.utils import merge_fsdp_weights
    from safetensors.torch import load_file

    work = Path(tempfile.mkdtemp(prefix="distillkit-fsdp-"))
    run_dir, steps = work / "run", settings["fsdp_steps"]
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--use_fsdp", "--num_processes", "1",
              "--mixed_precision", "bf16", shutil.which("distillkit") or "distillkit", "compress"]  # fmt: skip
    options = ["--data", "builtin:fashion-mnist", "--limit", "2048", "--batch-size", "64", "--out", str(run_dir),
               "--set", "eval.max_train=1024", "--set", "eval.max_test=512",
               "--set", "eval.online_images=0"]  # fmt: skip
    tick = time.perf_counter()
    first = subprocess.run([*launch, *options, "--max-steps", str(steps // 2)], capture_output=True, text=True)
    resumed = subprocess.run([*launch, *options, "--max-steps", str(steps), "--resume"], capture_output=True, text=True)
    seconds = round(time.perf_counter() - tick, 1)
    record = {"steps": steps, "seconds": seconds, "first_rc": first.returncode, "resumed_rc": resumed.returncode}
    if first.returncode or resumed.returncode:
        return record | {"error": (first.stderr if first.returncode else resumed.stderr)[-2000:]}
    result = json.loads((run_dir / "result.json").read_text())
    shards = next((run_dir / "checkpoints" / "last").glob("pytorch_model_fsdp*"))
    merge_fsdp_weights(str(shards), str(work / "merged"), safe_serialization=True)
    merged = load_file(str(next((work / "merged").glob("*.safetensors"))))
    exported = load_file(str(run_dir / "student" / "model.safetensors"))
    student = {name.removeprefix("student."): t for name, t in merged.items() if name.startswith("student.")}
    differences = [(exported[name].float() - t.float()).abs().max().item() for name, t in student.items()]
    shutil.rmtree(work, ignore_errors=True)
    return record | {
        "resumed_from_half": f"resumed from step {steps // 2}" in " ".join(resumed.stdout.split()),
        "trained_steps": result["steps"],
        "student_knn_top1": result["metrics"].get("student", {}).get("knn_top1"),
        "export_keys_match_shards": set(exported) == set(student),
        "export_max_abs_diff_vs_shards": max(differences) if differences else None,
    }


def summary(counts: list[int]) -> dict:
    """Median and max of per-step counts (None for no steps)."""
    if not counts:
        return {"median": None, "max": None}
    return {"median": sorted(counts)[len(counts) // 2], "max": max(counts)}


def build_report(
    sections: dict, device: str | None, seconds: float, peak_gb: float | None = None, note: str | None = None
) -> dict:
    """The one JSON record: versions, each section, the targets checked (on a GPU only: `device` is its name;
    None for the CPU smoke run), the peak GPU memory, the total time."""
    pairs = sections.get("throughput", {})
    cache = sections.get("cache", {})
    report = {
        "benchmark": "gpu_check",
        "gpu": device is not None,
        "device": device or "cpu",
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "cpus": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "throughput": {pair: pick(r, THROUGHPUT_KEYS) for pair, r in pairs.items()},
        "cache": pick(cache, CACHE_KEYS),
        "evaluation": sections.get("evaluation"),
        "data": sections.get("data"),
        "syncs": sections.get("syncs"),
        "fsdp": sections.get("fsdp"),
        "peak_gpu_memory_gb": peak_gb,
        "seconds": round(seconds, 1),
    }
    if device is not None:
        report["targets_met"] = {
            **{f"{p}_overhead_ratio": r["overhead_ratio"] <= TARGETS["overhead_ratio_max"] for p, r in pairs.items()},
            "cache_reuse_vs_alone": cache.get("reuse_vs_alone", 0) >= TARGETS["reuse_vs_alone_min"],
            "fsdp_export_matches": (sections.get("fsdp") or {}).get("export_max_abs_diff_vs_shards") == 0.0,
        }
    if note:
        report["note"] = note
    return report


THROUGHPUT_KEYS = (
    "teacher", "teacher_px", "student", "student_px", "batch", "steps", "precision", "distillkit_img_per_s",
    "bare_img_per_s", "student_alone_img_per_s", "overhead_ratio", "teacher_share_of_bare_step", "peak_gpu_memory_gb",
)  # fmt: skip
CACHE_KEYS = (
    "pair", "strategy", "images", "batch", "precision", "uncached_img_per_s", "fill_img_per_s", "reuse_img_per_s",
    "alone_img_per_s", "reuse_vs_alone", "reuse_vs_uncached",
)  # fmt: skip


def pick(record: dict, keys: tuple[str, ...]) -> dict:
    return {key: record[key] for key in keys if key in record}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="the tiny CPU-sized run, even on a GPU")
    args = parser.parse_args()
    warnings.simplefilter("ignore")  # random-weight teachers announce themselves; the counting re-enables its own
    gpu = torch.cuda.is_available() and not args.smoke
    settings = SETTINGS["gpu" if gpu else "smoke"]
    if not torch.cuda.is_available():
        print("gpu_check: no CUDA GPU here; a CPU smoke run of the same code paths (tiny sizes)", file=sys.stderr)
    start = time.perf_counter()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    sections = {}
    for name, measure in (
        ("throughput", lambda: measure_throughput(settings)),
        ("cache", lambda: measure_cache(settings)),
        ("evaluation", lambda: measure_evaluation(settings)),
        ("data", lambda: measure_data(settings, device)),
        ("syncs", lambda: measure_syncs(settings)),
        ("fsdp", lambda: measure_fsdp(settings, gpu)),
    ):
        tick = time.perf_counter()
        sections[name] = measure()
        print(f"gpu_check: {name} done in {time.perf_counter() - tick:.1f} s", file=sys.stderr, flush=True)
    note = None
    if not gpu:
        note = (
            "no GPU: a smoke run at tiny sizes checked that every section runs; its speeds say nothing about a GPU"
            if not torch.cuda.is_available()
            else "--smoke: tiny sizes on the GPU; not the GPU check's numbers"
        )
    name = torch.cuda.get_device_name(device) if gpu else None
    peak = None
    if torch.cuda.is_available():  # the pairs reset the peak: the largest of theirs and the one since
        pairs = [record["peak_gpu_memory_gb"] for record in sections["throughput"].values()]
        peak = max([*pairs, round(torch.cuda.max_memory_allocated(device) / 1e9, 2)])
    print(json.dumps(build_report(sections, name, time.perf_counter() - start, peak, note)), flush=True)


if __name__ == "__main__":
    main()
