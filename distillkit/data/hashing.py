"""Counter-based random numbers: uniform draws that are a pure function of (seed, epoch or view slot,
image index, view index, draw), so views and augmentations replay exactly on any process, after a resume,
or when a teacher-output cache replays them."""

from __future__ import annotations

import torch
from torch import Tensor

MASK32 = 0xFFFFFFFF


def _mix32(x: Tensor) -> Tensor:
    """A 32-bit integer hash (lowbias32) on int64 tensors holding values < 2**32."""
    x = x & MASK32
    x = ((x ^ (x >> 16)) * 0x7FEB352D) & MASK32
    x = ((x ^ (x >> 15)) * 0x846CA68B) & MASK32
    return x ^ (x >> 16)


def hash_uniform(seed: int, epoch: int, indices: Tensor, view: int, draws: int) -> Tensor:
    """Uniform [0, 1) numbers, shape (len(indices), draws), a pure function of all the arguments."""
    x = _mix32(torch.full_like(indices, seed & MASK32))
    x = _mix32(x ^ (epoch & MASK32))
    x = _mix32(x ^ (indices & MASK32))
    x = _mix32(x ^ (view & MASK32)).unsqueeze(1)
    x = _mix32(x ^ torch.arange(draws, dtype=torch.int64, device=indices.device))
    return (x >> 8).double() / float(1 << 24)
