"""What a run says while it trains: the smoothed loss terms on the progress bar, one metrics.jsonl record
every `train.log_every` steps and at every epoch's end, and the speed (online evaluation time left out). The
experiment trackers (`train.log_with`) get the same numbers at the same steps."""

from __future__ import annotations

import math
import time
from pathlib import Path

import torch
from torch import Tensor

from .metrics_log import append_record
from .sync import mean_over_processes
from .trackers import numbers


class StepLog:
    """Only the main process writes and draws; every process takes part in the means over processes."""

    def __init__(self, accelerator, progress, metrics_path: Path, total_steps: int, log_every: int, start_step: int):
        self.accelerator = accelerator
        self.main = accelerator.is_main_process
        self.progress = progress
        self.metrics_path = metrics_path
        self.total_steps = total_steps
        self.log_every = log_every
        self._smoothed: dict[str, Tensor] = {}  # exponential moving averages (factor 0.9), on the device
        self.terms_mean: dict[str, float] = {}  # their values when last read back (logging steps, epoch ends)
        self.logged: dict[str, float] | None = None  # the last logging step's values, until `take_logged`
        self.counters: dict[str, float] = {}  # the loop's device counters as read at the last logging step
        self.images_seen = 0  # by all processes, since this start (a resume counts from its own start)
        self.paused_seconds = 0.0  # online evaluation inside the loop: not training time
        self.started = time.perf_counter()
        self.task = (
            progress.add_task("distilling", total=total_steps, completed=start_step, terms="", speed="")
            if self.main
            else None
        )

    @property
    def seconds(self) -> float:
        return time.perf_counter() - self.started - self.paused_seconds

    @property
    def speed(self) -> float:
        return self.images_seen / self.seconds if self.seconds > 0 else 0.0

    def step(
        self,
        step: int,
        epoch: int,
        loss: Tensor,
        terms: dict[str, Tensor],
        lr: float,
        skipped: Tensor,
        counters: dict[str, Tensor],
    ) -> None:
        """After optimiser step `step` (counted from 1): smooth the terms on the device (no host read; a step
        skipped for a non-finite loss, `skipped` 1.0, leaves them as they were), and every `log_every` steps read
        them back once, with `counters` (device numbers the loop reads at the same time), draw and log. Between
        logging steps nothing here waits for the device."""
        current = {k: v.detach().float() for k, v in terms.items()} | {"loss": loss.detach().float()}
        self._smoothed = {k: _smooth(self._smoothed.get(k), v, skipped) for k, v in current.items()}
        log_now = step % self.log_every == 0 or step == self.total_steps
        if not log_now:
            if self.main:
                self.progress.update(self.task, completed=step)
            return
        if self.accelerator.num_processes > 1:  # the global batch's losses, not this process's share
            values = mean_over_processes(self.accelerator, current)
            self._read_smoothed(counters)
        else:  # one read for all
            both = torch.stack([*current.values(), *self._smoothed.values(), *counters.values()]).tolist()
            values = dict(zip(current, both[: len(current)]))
            smoothed = both[len(current) : len(current) + len(self._smoothed)]
            self.terms_mean = dict(zip(self._smoothed, smoothed))
            self.counters = dict(zip(counters, both[len(current) + len(self._smoothed) :]))
        self.logged = values
        if not self.main:
            return
        self._draw(step, epoch)
        finite = {k: v for k, v in values.items() if math.isfinite(v)}  # a skipped step's terms are left out
        skips = {"skipped_steps": int(self.counters["skipped_total"])} if self.counters.get("skipped_total") else {}
        record = {"step": step, "epoch": epoch, **finite, **skips, "lr": lr, "images_per_s": round(self.speed, 1)}
        append_record(self.metrics_path, record)
        self.track(record, step)

    def take_logged(self) -> dict[str, float] | None:
        """The values the last logging step read back (None when no logging step came since the last call)."""
        logged, self.logged = self.logged, None
        return logged

    def _read_smoothed(self, counters: dict[str, Tensor] | None = None) -> None:
        """The smoothed terms (and `counters`) as numbers (one read of the device), for the bar and the records."""
        counters = counters or {}
        if self._smoothed or counters:
            read = torch.stack([*self._smoothed.values(), *counters.values()]).tolist()
            self.terms_mean = dict(zip(self._smoothed, read[: len(self._smoothed)]))
            self.counters = dict(zip(counters, read[len(self._smoothed) :]))

    def epoch_end(self, epoch: int, step: int, seconds: float, extra: dict | None = None) -> None:
        """The record of a finished epoch (`epoch` counted from 1), with e.g. its online k-NN."""
        self._read_smoothed()
        if self.main:
            append_record(
                self.metrics_path,
                {
                    "epoch_end": epoch,
                    "step": step,
                    "seconds": round(seconds, 2),
                    **{k: round(v, 6) for k, v in self.terms_mean.items()},
                    **(extra or {}),
                },
            )
            self.track({"epoch_seconds": round(seconds, 2), **(extra or {})}, step)

    def track(self, record: dict, step: int) -> None:
        """Log a record's numbers (its `step` left out) to the experiment trackers, at optimiser step `step`."""
        self.accelerator.log(numbers(record), step=step)

    def _draw(self, step: int, epoch: int) -> None:
        text = " ".join(f"{k} {v:.4f}" for k, v in self.terms_mean.items())
        self.progress.update(self.task, completed=step, speed=f"{self.speed:.0f} img/s", terms=text)
        if not self.progress.console.is_terminal and (
            step % max(1, self.total_steps // 10) == 0 or step == self.total_steps
        ):
            self.progress.console.print(
                f"step {step}/{self.total_steps} epoch {epoch + 1} {text} {self.speed:.0f} img/s", highlight=False
            )


def _smooth(previous: Tensor | None, value: Tensor, skipped: Tensor) -> Tensor:
    """0.9 previous + 0.1 value, on the device; the value itself when there is no finite previous one; the
    previous one kept when the step was skipped (its value may be NaN or infinite)."""
    if previous is None:
        return value
    smoothed = torch.where(torch.isfinite(previous), 0.9 * previous + 0.1 * value, value)
    return torch.where(skipped > 0, previous, smoothed)
