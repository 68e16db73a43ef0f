"""Run `distillkit compress` (the CLI) in this process, with an optional fault at a given step.

    python fault_run.py --kill-after-checkpoint N -- <compress options>   SIGKILL right after step N's checkpoint
    python fault_run.py --term-at-step N -- <compress options>            SIGTERM while step N runs
    python fault_run.py -- <compress options>                             no fault

One CPU thread, so runs in different processes compute bit-identical results.
"""

import os
import signal
import sys

import torch

torch.set_num_threads(1)

from distillkit import cli  # noqa: E402
from distillkit.train import loop  # noqa: E402

args = sys.argv[1:]
fault = args[:2] if args[:1] in (["--kill-after-checkpoint"], ["--term-at-step"]) else []
compress_args = args[len(fault) :]
if compress_args[:1] == ["--"]:  # optional separator (torchrun swallows it)
    compress_args = compress_args[1:]
options = fault

if options[:1] == ["--kill-after-checkpoint"]:
    kill_step = int(options[1])
    real_save = loop.save_checkpoint

    def save_then_die(run_dir, module, optimizer, state, recipe):
        path = real_save(run_dir, module, optimizer, state, recipe)
        if state["step"] == kill_step:
            os.kill(os.getpid(), signal.SIGKILL)
        return path

    loop.save_checkpoint = save_then_die
elif options[:1] == ["--term-at-step"]:
    term_step = int(options[1])
    real_factor = loop.lr_factor

    sent = []

    def factor_then_term(step, total_steps, warmup_steps):  # called once per parameter group
        if step == term_step and not sent:
            sent.append(True)
            os.kill(os.getpid(), signal.SIGTERM)
        return real_factor(step, total_steps, warmup_steps)

    loop.lr_factor = factor_then_term

sys.argv = ["distillkit", "compress", *compress_args]
cli.main()
