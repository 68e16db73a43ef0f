"""How the DataLoaders read: worker processes (`data.num_workers`), pinned memory and persistent workers.

`data.num_workers: auto` (the default) gives each process min(8, cores - 1) workers, where cores is this
process's share of the CPUs it may run on (`os.sched_getaffinity`, else `os.cpu_count()`, divided by the
local process count `LOCAL_WORLD_SIZE` that torchrun and `accelerate launch` set); 0 (decoding in the main
process) when that is below 1, and 0 for images already decoded in memory (the builtin datasets), where a
worker would only add copies. Workers change no result: an item depends only on its index (views are drawn
from hashes of the index, not from a random state), and the sampler stays in the main process.
On a CUDA device batches are pinned (page-locked, for asynchronous copies) and the training loader's workers
persist across epochs; on a CPU neither pays.
"""

from __future__ import annotations

import os
from typing import Any

import torch
from torch.utils.data import Dataset

MAX_AUTO_WORKERS = 8


def available_cores() -> int:
    """The CPUs this process may run on (its affinity mask where the OS has one)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def local_processes() -> int:
    """Training processes on this machine (torchrun's and Accelerate's LOCAL_WORLD_SIZE; 1 without them)."""
    try:
        return max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    except ValueError:
        return 1


def auto_workers(cores: int | None = None, processes: int | None = None) -> int:
    """min(MAX_AUTO_WORKERS, cores per process - 1), never below 0."""
    cores = available_cores() if cores is None else cores
    processes = local_processes() if processes is None else processes
    return max(0, min(MAX_AUTO_WORKERS, cores // max(1, processes) - 1))


def in_memory(dataset: Dataset) -> bool:
    """Whether the items are already-decoded tensors (through wrappers that keep a `base`)."""
    while hasattr(dataset, "base"):
        dataset = dataset.base
    return bool(getattr(dataset, "in_memory", False))


def resolve_workers(setting: int | str, dataset: Dataset) -> int:
    """`data.num_workers` as a number: itself, or `auto` worked out for this machine and dataset."""
    if setting != "auto":
        return int(setting)
    return 0 if in_memory(dataset) else auto_workers()


def loader_options(
    setting: int | str, dataset: Dataset, device: torch.device | str, persistent: bool
) -> dict[str, Any]:
    """DataLoader keyword arguments: the workers, and on CUDA pinned memory and (when `persistent`, for a loader
    read epoch after epoch) persistent workers."""
    workers = resolve_workers(setting, dataset)
    cuda = torch.device(device).type == "cuda"
    return {"num_workers": workers, "pin_memory": cuda, "persistent_workers": cuda and persistent and workers > 0}
