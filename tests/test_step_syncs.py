"""Host reads of tensors inside the training step (on a GPU each one waits for the device): counted on a real
run by wrapping the Tensor methods that read a value back (`item`, `bool`, `int`, `float`, `tolist`), for the
calls made by distillkit's loop and strategies. Between logging steps the step makes none: a non-finite loss is
skipped on the device by the fused optimiser and counted there (train/step.py `DeviceSkip`, train/loop.py
`NonfiniteSteps`); a logging step makes one, the logged terms and those counts together. The teacher cache's own
host arrays (train/cache.py) and data loading are not device reads.
"""

from __future__ import annotations

import collections
import sys

import pytest
import torch
from test_compress import tiny_run

from distillkit.train import loop

READS = ("item", "__bool__", "__int__", "__float__", "tolist")
COUNTED = ("/distillkit/train/", "/distillkit/strategies/")
NOT_DEVICE = ("/distillkit/train/cache.py",)


@pytest.fixture
def reads(monkeypatch):
    """(optimiser step, where) -> number of host reads made from distillkit's step code at that step."""
    counts: collections.Counter = collections.Counter()
    step = {"now": 0}
    for name in READS:
        original = getattr(torch.Tensor, name)

        def counted(self, *args, __original=original, **kwargs):
            caller = sys._getframe(1).f_code.co_filename
            if any(part in caller for part in COUNTED) and not any(part in caller for part in NOT_DEVICE):
                counts[(step["now"], f"{caller.split('/distillkit/')[-1]}:{sys._getframe(1).f_lineno}")] += 1
            return __original(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, counted)
    original_step = loop._Training.step

    def numbered(self, batch):
        step["now"] = self.position.step + 1
        return original_step(self, batch)

    monkeypatch.setattr(loop._Training, "step", numbered)
    return counts


def test_no_host_read_between_logging_steps_and_one_at_each(tmp_path, reads):
    tiny_run(
        tmp_path / "run",
        max_steps=12,
        limit=512,
        set=["teacher.input_size=32", "strategy.seed.queue_size=64", "eval.enabled=false", "train.log_every=5"],
    )
    logging_steps = {5, 10, 12}
    for step in range(2, 13):  # step 1 sets the strategies' state up (a first read of counters is allowed)
        where = sorted(w for (s, w), n in reads.items() if s == step for _ in range(n))  # one entry per read
        if step == 12:  # after the last step, outside it: the skipped-step total for the result, read once
            where.remove(next(w for w in where if w.startswith("train/loop.py")))
        assert len(where) == (1 if step in logging_steps else 0), (step, where)
        assert all(w.startswith("train/step_log.py") for w in where), (step, where)
