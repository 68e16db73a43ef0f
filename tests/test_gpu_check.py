"""The GPU check (benchmarks/gpu_check.py): its JSON record and its host-sync counter, on the CPU; and the
batches' move to the training device that a GPU run depends on."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from accelerate.utils import send_to_device

from distillkit.data.sources import Batch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import gpu_check  # noqa: E402


def test_a_prepared_loader_moves_images_and_labels_and_keeps_indices_on_the_host():
    images = torch.randint(0, 256, (2, 3, 4, 4), dtype=torch.uint8)
    batch = Batch(images, torch.tensor([3, 1]), torch.tensor([7, 9]), [])
    moved = send_to_device(batch, torch.device("meta"))  # what Accelerate's prepared DataLoader does with it
    assert moved.images.device.type == "meta" and moved.labels.device.type == "meta"
    assert moved.indices.device.type == "cpu" and moved.indices.tolist() == [7, 9]
    assert moved.host_images is images  # hashed by the teacher cache without a copy back
    assert send_to_device(moved, torch.device("meta")).host_images is images


def throughput_record(overhead: float) -> dict:
    return {"distillkit_img_per_s": 100.0, "bare_img_per_s": 100.0 * overhead, "overhead_ratio": overhead, "x": 1}


def test_the_report_checks_the_targets_on_a_gpu_and_says_when_there_was_none():
    sections = {
        "throughput": {"lite0": throughput_record(1.04), "vit-b": throughput_record(1.06)},
        "cache": {"reuse_img_per_s": 89.0, "alone_img_per_s": 100.0, "reuse_vs_alone": 0.89},
        "evaluation": {"seconds": 1.5},
        "data": {"best_img_per_s": 10.0},
        "syncs": {"host_reads_per_step": {"median": 1, "max": 2}},
        "fsdp": {"export_max_abs_diff_vs_shards": 0.0},
    }
    on_gpu = gpu_check.build_report(sections, "NVIDIA H200", 12.0, peak_gb=3.5)
    assert on_gpu["gpu"] is True and on_gpu["device"] == "NVIDIA H200" and on_gpu["peak_gpu_memory_gb"] == 3.5
    assert on_gpu["targets_met"] == {
        "lite0_overhead_ratio": True,
        "vit-b_overhead_ratio": False,
        "cache_reuse_vs_alone": False,
        "fsdp_export_matches": True,
    }
    assert "x" not in on_gpu["throughput"]["lite0"]  # only the documented keys
    smoke = gpu_check.build_report(sections, None, 12.0, note="no GPU")
    assert smoke["gpu"] is False and smoke["note"] == "no GPU" and "targets_met" not in smoke
    assert json.loads(json.dumps(smoke)) == smoke  # one JSON line


def test_the_sync_counter_finds_no_host_read_between_logging_steps():
    settings = {**gpu_check.SETTINGS["smoke"], "sync_steps": 4}
    syncs = gpu_check.measure_syncs(settings)
    # between logging steps the step reads nothing back; the last step logs, one read (tests/test_step_syncs.py)
    assert syncs["host_reads_per_step"] == {"median": 0, "max": 1}, syncs
    assert all(where.startswith("train/step_log.py:") for where in syncs["host_reads_where"]), syncs
    assert "cuda_syncs_in_step" not in syncs  # set_sync_debug_mode needs CUDA
