"""What every training process must agree on: one decision, one mean, one verdict on a loss."""

from __future__ import annotations

import torch
from torch import Tensor


def agreed(accelerator, flag: bool) -> bool:
    """True on every process when it is true on any (a signal may reach only some of them)."""
    if accelerator.num_processes == 1:
        return flag
    return bool(accelerator.gather(torch.tensor([float(flag)], device=accelerator.device)).max().item())


def main_decides(accelerator, value):
    """The main process's `value` (any picklable object) on every process."""
    if accelerator.num_processes == 1:
        return value
    from accelerate.utils import broadcast_object_list

    return broadcast_object_list([value], from_process=0)[0]


def mean_over_processes(accelerator, values: dict[str, Tensor]) -> dict[str, float]:
    stacked = torch.stack([v.detach().float().reshape(()) for v in values.values()]).to(accelerator.device)
    means = accelerator.reduce(stacked, reduction="mean")
    return dict(zip(values, means.tolist()))


def finite_on_every_process(accelerator, loss: Tensor) -> Tensor:
    """1.0 when `loss` is finite on every process, else 0.0: a 0-dim float32 tensor on the device, computed
    without reading anything back (under several processes one all-gather, a collective, not a host read)."""
    finite = torch.isfinite(loss.detach()).float().reshape(1)
    if accelerator.num_processes > 1:
        finite = accelerator.gather(finite).min()
    return finite.reshape(())
