"""Run `distillkit compress` (the CLI) in this process, with an optional fault at a given step.

    python fault_run.py --kill-after-checkpoint N -- <compress options>   SIGKILL right after step N's checkpoint
    python fault_run.py --term-at-step N -- <compress options>            SIGTERM while step N runs
    python fault_run.py --kill-in-save PHASE N -- <compress options>      SIGKILL inside step N's checkpoint save:
        PHASE written (files complete in the temporary folder), between-renames (last -> last.old done,
        the new one not yet in place) or swapped (the new one in place, last.old not yet removed)
    python fault_run.py -- <compress options>                             no fault
    python fault_run.py --command pretrain bootleg [fault] -- <options>   another command than compress

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
command = ["compress"]
if args[:1] == ["--command"]:  # --command pretrain bootleg: another distillkit command than compress
    command = args[1:3] if args[1] == "pretrain" else args[1:2]
    args = args[1 + len(command) :]
fault = (
    args[:3]
    if args[:1] == ["--kill-in-save"]
    else args[:2]
    if args[:1] in (["--kill-after-checkpoint"], ["--term-at-step"])
    else []
)
compress_args = args[len(fault) :]
if compress_args[:1] == ["--"]:  # optional separator (torchrun swallows it)
    compress_args = compress_args[1:]
options = fault

if options[:1] == ["--kill-after-checkpoint"]:
    kill_step = int(options[1])
    real_save = loop.save_checkpoint

    def save_then_die(run_dir, accelerator, state, recipe):
        path = real_save(run_dir, accelerator, state, recipe)
        if state["step"] == kill_step:
            os.kill(os.getpid(), signal.SIGKILL)
        return path

    loop.save_checkpoint = save_then_die
elif options[:1] == ["--kill-in-save"]:
    from pathlib import Path

    from distillkit.train import checkpoint

    phase, kill_step = options[1], int(options[2])
    real_save_checkpoint, real_rename, real_write_text = checkpoint.save_checkpoint, Path.rename, checkpoint.write_text
    saving = {"step": None}

    def save_marking_the_step(run_dir, accelerator, state, recipe):
        saving["step"] = state["step"]
        return real_save_checkpoint(run_dir, accelerator, state, recipe)

    def die_if(now: str) -> None:
        if now == phase and saving["step"] == kill_step:
            os.kill(os.getpid(), signal.SIGKILL)

    def write_text_then_maybe_die(path, text):
        real_write_text(path, text)
        if Path(path).name == checkpoint.RECIPE_FILE:  # the last file of the temporary folder
            die_if("written")

    def rename_then_maybe_die(self, target):
        result = real_rename(self, target)
        die_if({"last.old": "between-renames", "last": "swapped"}.get(Path(target).name, ""))
        return result

    loop.save_checkpoint = save_marking_the_step
    checkpoint.write_text = write_text_then_maybe_die
    Path.rename = rename_then_maybe_die
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

sys.argv = ["distillkit", *command, *compress_args]
cli.main()
