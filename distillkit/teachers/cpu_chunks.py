"""Why a frozen network runs a large CPU batch in chunks, and how large they are.

glibc's malloc gives every block above its mmap threshold (which grows to at most 32 MiB) a fresh mmap, and the
first touch of each of its pages faults. A network whose activations for one batch are larger than that
spends much of its forward faulting in pages instead of computing: EfficientNet-Lite0 at 64 px keeps a
96 x 32 x 32 map per image, 50 MB for a 128-image batch. Run in chunks whose largest activation stays under
`CHUNK_BYTES`, the same forward reuses pages already mapped: Lite0 at 64 px on one AVX2 core went from
333 to 504 images/s (`benchmarks/teacher_chunks.py`). Each image's outputs do not depend on the others in
an eval-mode network, so the chunks' outputs are the whole batch's. GPUs keep whole batches (their caching
allocator has no such cost).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

CHUNK_BYTES = 24 * 2**20  # below glibc's largest mmap threshold (32 MiB), with room for a padded copy


def largest_output_bytes(model: nn.Module, probe: Tensor) -> int:
    """The largest tensor any module of `model` returns for `probe`, in bytes per image (0: nothing seen)."""
    largest = 0

    def record(module, args, output):
        nonlocal largest
        for tensor in output if isinstance(output, (tuple, list)) else (output,):
            if isinstance(tensor, Tensor) and tensor.dim() > 0:
                largest = max(largest, tensor.nbytes // probe.shape[0])

    hooks = [module.register_forward_hook(record) for module in model.modules()]
    try:
        with torch.no_grad():
            model(probe)
    finally:
        for hook in hooks:
            hook.remove()
    return largest


def chunk_images(bytes_per_image: int) -> int | None:
    """Images per CPU chunk for a network whose largest activation is `bytes_per_image` (None: whole batches)."""
    return max(1, CHUNK_BYTES // bytes_per_image) if bytes_per_image else None
