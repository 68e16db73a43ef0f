"""Unreadable training images: each file counted once, however many epochs and processes meet it.

A run tolerates `data.max_bad_fraction` of its training images, rounded up to whole files (so at least one
unless it is 0: a single broken file in a small folder trains, with a warning). One process stops at once
when its own distinct files pass the limit; several processes add up their files (the union) at every
epoch's end and at the run's end.
"""

from __future__ import annotations

import math

from accelerate.utils import gather_object

from ..data import BadImage
from ..errors import RunError


class BadImageTally:
    def __init__(self, accelerator, dataset_size: int, max_fraction: float):
        self.accelerator = accelerator
        self.dataset_size = dataset_size
        self.max_fraction = max_fraction
        self.found: dict[str, str] = {}  # path -> reason: this process's, or every process's after `merge`

    @property
    def allowed(self) -> int:
        return math.ceil(self.max_fraction * self.dataset_size - 1e-9) if self.max_fraction > 0 else 0

    def add(self, bad: list[BadImage]) -> None:
        """The bad items of one batch; a single process checks the limit at once."""
        for item in bad:
            self.found.setdefault(item.path, item.reason)
        if self.accelerator.num_processes == 1:
            self._check()

    def merge(self) -> None:
        """Every process's files, on every process (a collective: all processes call it), then the check."""
        if self.accelerator.num_processes > 1:
            for found in gather_object([self.found]):
                for path, reason in found.items():
                    self.found.setdefault(path, reason)
        self._check()

    def _check(self) -> None:
        if len(self.found) > self.allowed:
            raise RunError(
                f"{len(self.found)} of {self.dataset_size} training images are unreadable, more than "
                f"data.max_bad_fraction = {self.max_fraction}; e.g. {self.examples()}. Remove or fix "
                "them, or raise data.max_bad_fraction"
            )

    def examples(self, n: int = 3) -> str:
        return "; ".join(f"{path} ({reason})" for path, reason in sorted(self.found.items())[:n])

    def summary(self) -> str | None:
        """The warning a run ends with, or None when every image was readable."""
        count = len(self.found)
        if not count:
            return None
        return f"{count} unreadable image{' was' if count == 1 else 's were'} skipped: {self.examples()}"
