"""Runs that survive: SIGKILL + --resume, SIGTERM, bad images, non-finite losses, full disks, OOM."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

import distillkit
from distillkit.errors import RunError, UsageError
from distillkit.strategies.seed import Seed
from distillkit.teachers.base import Teacher
from distillkit.train import loop

FAULT_RUN = Path(__file__).parent / "helpers" / "fault_run.py"
TINY = ["teacher.input_size=32", "strategy.seed.queue_size=64", "eval.enabled=false", "train.deterministic=true"]


def cli_args(out: Path, *extra: str) -> list[str]:
    args = [
        "--student",
        "mobilenetv3-small",
        "--limit",
        "128",
        "--batch-size",
        "16",
        "--epochs",
        "2",
        "--out",
        str(out),
        "--quiet",
        "--set",
        "train.checkpoint_every=3",
    ]
    for item in TINY:
        args += ["--set", item]
    return args + list(extra)


def fault_run(fault: list[str], args: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(FAULT_RUN), *fault, "--", *args], capture_output=True, text=True, timeout=300
    )


def final_weights(run: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run / "checkpoints" / "last" / "model.safetensors"))


def saved_position(run: Path) -> dict:
    state = torch.load(run / "checkpoints" / "last" / "train_state.pt", weights_only=True)
    return {k: state[k] for k in ("step", "epoch", "batch")}


def test_sigkill_mid_epoch_then_resume_ends_with_the_uninterrupted_weights(tmp_path):
    """With the default recipe's teacher cache (one view slot, float16), each run with a cache of its own:
    the killed run's cache holds the rows written before the kill, the resumed run computes the rest."""
    in_process(tmp_path / "whole", teacher_cache=tmp_path / "cache-whole")
    assert saved_position(tmp_path / "whole")["step"] == 16  # 2 epochs x 128 / 16

    killed_cache = tmp_path / "cache-killed"
    killed = fault_run(
        ["--kill-after-checkpoint", "6"], cli_args(tmp_path / "killed", "--teacher-cache", str(killed_cache))
    )
    assert killed.returncode == -9  # SIGKILL
    assert saved_position(tmp_path / "killed") == {"step": 6, "epoch": 0, "batch": 6}  # mid-epoch

    # what a later kill leaves in the log: a step logged after the checkpoint, then a line torn mid-write
    log = tmp_path / "killed" / "metrics.jsonl"
    with open(log, "a", encoding="utf-8") as f:
        f.write(json.dumps({"step": 7, "epoch": 0, "loss": 1.0}) + "\n" + '{"step": 8, "epo')
    in_process(tmp_path / "killed", resume=True, teacher_cache=killed_cache)
    a, b = final_weights(tmp_path / "whole"), final_weights(tmp_path / "killed")
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key

    def logged(run):  # every line is whole JSON; which steps and epoch ends were logged, in order
        return [
            (r.get("step"), r.get("epoch_end"))
            for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())
        ]

    assert logged(tmp_path / "killed") == logged(tmp_path / "whole")  # each step once, as if never killed
    assert logged(tmp_path / "killed")[-1][0] == 16


def in_process(out: Path, **kwargs):
    """`cli_args`' run (no teacher cache unless `teacher_cache` is given), in this process: one thread, so it
    computes what fault_run.py does (the subprocess is only needed where a real signal must hit a process)."""
    options = dict(
        student="mobilenetv3-small", limit=128, batch_size=16, epochs=2, out=out, quiet=True,
        teacher_cache=False, set=["train.checkpoint_every=3", *TINY],
    )  # fmt: skip
    return distillkit.compress(**(options | kwargs))


@pytest.fixture(scope="module")
def never_killed(tmp_path_factory) -> dict[str, torch.Tensor]:
    return final_weights(in_process(tmp_path_factory.mktemp("whole") / "run").run_dir)


@pytest.mark.parametrize("phase", ["written", "between-renames", "swapped"])
def test_a_sigkill_at_each_phase_of_a_save_leaves_a_checkpoint_to_resume_from(tmp_path, phase, never_killed):
    """A real SIGKILL inside step 6's save (checkpoints every 3 steps): after the new files are complete,
    between the two renames, or after the swap. A complete checkpoint is always there (step 3's or step 6's),
    and --resume ends with the weights of a run that was never killed."""
    from distillkit.train.checkpoint import find_checkpoint

    killed = fault_run(["--kill-in-save", phase, "6"], cli_args(tmp_path / "killed", "--no-teacher-cache"))
    assert killed.returncode == -9, killed.stderr[-2000:]  # SIGKILL
    left = find_checkpoint(tmp_path / "killed")
    assert left is not None
    assert torch.load(left / "train_state.pt", weights_only=True)["step"] == (6 if phase == "swapped" else 3)
    in_process(tmp_path / "killed", resume=True)
    resumed = final_weights(tmp_path / "killed")
    assert all(torch.equal(never_killed[key], resumed[key]) for key in never_killed)
    assert sorted(p.name for p in (tmp_path / "killed" / "checkpoints").iterdir()) == ["last"]  # nothing stale


def test_sigterm_finishes_the_step_saves_and_says_how_to_resume(tmp_path):
    stopped = fault_run(["--term-at-step", "4"], cli_args(tmp_path / "run"))
    assert stopped.returncode == 1
    message = " ".join(stopped.stderr.split())
    assert "--resume" in message and "step 5" in message
    assert saved_position(tmp_path / "run")["step"] == 5  # step index 4 completed, then saved
    in_process(tmp_path / "run", resume=True, teacher_cache=None)  # cli_args' default: the automatic cache
    assert saved_position(tmp_path / "run")["step"] == 16


def tiny(out, **kwargs):
    options = dict(
        student="mobilenetv3-small",
        data="builtin:fashion-mnist",
        limit=64,
        batch_size=16,
        out=out,
        set=list(TINY),
        quiet=True,
    )
    options.update(kwargs)
    return distillkit.compress(**options)


def test_resume_with_a_changed_recipe_needs_force(tmp_path, tells):
    tiny(tmp_path / "run", max_steps=2)
    with pytest.raises(UsageError, match="--force-resume"):
        tiny(tmp_path / "run", max_steps=4, lr=0.01, resume=True)
    with tells("changed recipe"):
        result = tiny(tmp_path / "run", max_steps=4, lr=0.01, resume=True, force_resume=True)
    assert result.steps == 4


def image_folder(root: Path, good: int, bad: int) -> Path:
    rng = np.random.default_rng(0)
    for cls in ("a", "b"):
        (root / cls).mkdir(parents=True)
    for i in range(good):
        Image.fromarray(rng.integers(0, 255, (12, 12, 3), dtype=np.uint8)).save(root / "ab"[i % 2] / f"{i}.png")
    for i in range(bad):
        (root / "a" / f"broken{i}.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really" if i % 2 else b"")
    return root


def test_a_few_bad_images_are_skipped_and_counted(tmp_path, tells):
    data = image_folder(tmp_path / "images", good=60, bad=2)
    with tells("unreadable images were skipped: .*broken"):
        result = tiny(
            tmp_path / "run",
            data=str(data),
            limit=None,
            epochs=1,
            set=TINY + ["data.max_bad_fraction=0.1", "data.val_fraction=0.05"],
        )
    assert result.steps >= 1


def test_too_many_bad_images_stop_the_run_with_examples(tmp_path):
    data = image_folder(tmp_path / "images", good=40, bad=8)
    with pytest.raises(RunError, match=r"unreadable, more than data.max_bad_fraction = 0.01; e.g. .*broken"):
        tiny(tmp_path / "run", data=str(data), limit=None, epochs=1, set=TINY + ["data.val_fraction=0.05"])


def test_a_bad_image_is_counted_once_however_many_epochs_meet_it(tmp_path, tells):
    """One unreadable file among 81 (1.2 %, over the 1 % default) trains with a warning: a run tolerates at
    least one bad file, and a file met again every epoch is still one file."""
    data = image_folder(tmp_path / "images", good=80, bad=1)
    with tells(r"^1 unreadable image was skipped: .*broken0.png"):
        result = tiny(tmp_path / "run", data=str(data), limit=None, epochs=3, set=TINY + ["data.val_fraction=0.05"])
    assert result.steps >= 3


def test_two_bad_files_in_208_do_not_stop_a_two_epoch_run(tmp_path, tells):
    """2 distinct files are within 1 % of 208 images; counted per epoch they were 4 and stopped the run."""
    data = image_folder(tmp_path / "images", good=206, bad=2)
    with tells(r"^2 unreadable images were skipped"):
        result = tiny(tmp_path / "run", data=str(data), limit=None, epochs=2, set=TINY + ["data.val_fraction=0.05"])
    assert result.steps >= 2


def nan_on_calls(monkeypatch, bad_calls: set[int]) -> None:
    """SEED's loss is NaN on the forward calls numbered in `bad_calls` (1, 2, ...: one per step)."""
    real_forward, calls = Seed.forward, {"n": 0}

    def forward(self, step):
        calls["n"] += 1
        out = real_forward(self, step)
        return {k: v * float("nan") for k, v in out.items()} if calls["n"] in bad_calls else out

    monkeypatch.setattr(Seed, "forward", forward)


def student_after_each_step(monkeypatch) -> list[dict[str, torch.Tensor]]:
    """The student's parameters (not BatchNorm's running statistics, which every forward updates) and the
    optimiser's state tensors (SGD's momentum buffers) after every optimiser step of the runs that follow."""
    snapshots, real_step = [], loop.train_step

    def step(ctx, *args, **kwargs):
        outcome = real_step(ctx, *args, **kwargs)
        student = ctx.accelerator.unwrap_model(ctx.module).student
        optimiser = ctx.optimizer.optimizer.state.values()
        state = {f"optimiser.{i}.{k}": v.clone() for i, s in enumerate(optimiser) for k, v in s.items()}
        snapshots.append({**{k: v.detach().clone() for k, v in student.named_parameters()}, **state})
        return outcome

    monkeypatch.setattr(loop, "train_step", step)
    return snapshots


def assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("optimizer, state", [("sgd", "momentum_buffer"), ("adamw", "exp_avg_sq")])
def test_non_finite_losses_are_skipped_on_the_device_leaving_the_student_and_optimiser_unchanged(
    tmp_path, monkeypatch, tells, optimizer, state
):
    snapshots = student_after_each_step(monkeypatch)
    nan_on_calls(monkeypatch, {2, 3})
    with tells("not finite; they were skipped"):
        result = tiny(tmp_path / "skips", max_steps=4, set=TINY + ["train.log_every=1", f"train.optimizer={optimizer}"])
    assert result.steps == 4 and result.skipped_steps == 2
    after_1, after_2, after_3, after_4 = snapshots
    assert any(k.endswith(state) for k in after_1)  # the optimiser's state is compared too
    assert_same(after_1, after_2)  # the skipped steps changed no parameter and no momentum buffer
    assert_same(after_1, after_3)
    assert not torch.equal(after_3["conv_stem.weight"], after_4["conv_stem.weight"])  # step 4 trained again
    logged = [json.loads(line) for line in (tmp_path / "skips" / "metrics.jsonl").read_text().splitlines()]
    steps = {line["step"]: line for line in logged if "epoch_end" not in line}
    assert "loss" not in steps[2] and steps[3]["skipped_steps"] == 2 and np.isfinite(steps[4]["loss"])


def test_a_non_finite_micro_batch_skips_its_whole_accumulation_group(tmp_path, monkeypatch):
    snapshots = student_after_each_step(monkeypatch)  # one per micro-batch: two per optimiser step
    nan_on_calls(monkeypatch, {3})  # the first micro-batch of step 2
    result = tiny(tmp_path / "accum", max_steps=3, set=TINY + ["train.grad_accum=2", "train.log_every=1"])
    assert result.steps == 3 and result.skipped_steps == 1
    step_1, step_2, step_3 = snapshots[1], snapshots[3], snapshots[5]
    assert_same(step_1, step_2)  # the good second micro-batch's gradients were not applied either
    assert not torch.equal(step_2["conv_stem.weight"], step_3["conv_stem.weight"])


def test_non_finite_losses_in_a_row_stop_the_run_with_the_student_from_before_them(tmp_path, monkeypatch, tells):
    snapshots = student_after_each_step(monkeypatch)
    nan_on_calls(monkeypatch, set(range(3, 100)))
    stops = TINY + ["train.max_nonfinite_steps=3", "train.checkpoint_every=1", "train.log_every=1"]
    with tells("not finite"), pytest.raises(RunError, match="3 steps in a row had a non-finite loss"):
        tiny(tmp_path / "stops", epochs=3, set=stops)
    state = torch.load(tmp_path / "stops" / "checkpoints" / "last" / "train_state.pt", weights_only=True)
    assert state["step"] == 4  # stopped at step 5, its third non-finite one, before checkpointing it
    saved = load_file(tmp_path / "stops" / "checkpoints" / "last" / "model.safetensors")
    student = {k.removeprefix("student."): v for k, v in saved.items() if k.startswith("student.")}
    after_2 = {k: v for k, v in snapshots[1].items() if not k.startswith("optimiser.")}
    assert_same({k: student[k] for k in after_2}, after_2)  # the checkpoint holds the student of the last good step


def test_a_real_write_limit_while_saving_is_a_clear_error_and_keeps_the_last_checkpoint(tmp_path):
    """A real fault, not a patched exception: the resumed run may write files of at most 1 MB
    (RLIMIT_FSIZE, SIGXFSZ ignored, so writes fail with EFBIG as on a full disk). safetensors raises its own
    SafetensorError and torch.save a RuntimeError around the OS error; both must become one clear message,
    exit code 1, and the previous checkpoint must survive untouched."""
    in_process(tmp_path / "run", max_steps=3)
    before = final_weights(tmp_path / "run")
    limited = (
        "import resource, signal, runpy, sys; signal.signal(signal.SIGXFSZ, signal.SIG_IGN); "
        "resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, 1 << 20)); "
        f"sys.argv = [{str(FAULT_RUN)!r}] + sys.argv[1:]; runpy.run_path({str(FAULT_RUN)!r}, run_name='__main__')"
    )
    args = cli_args(tmp_path / "run", "--resume", "--no-teacher-cache", "--max-steps", "6")
    full = subprocess.run([sys.executable, "-c", limited, "--", *args], capture_output=True, text=True, timeout=300)
    assert full.returncode == 1, full.stderr[-3000:]
    message = " ".join(full.stderr.split())
    assert "the disk is full" in message and "Traceback" not in full.stderr, full.stderr[-3000:]
    after = final_weights(tmp_path / "run")
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir()) == ["last"]


def test_out_of_memory_is_a_clear_error(tmp_path, monkeypatch):
    def no_memory(self, views, request):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")

    monkeypatch.setattr(Teacher, "forward", no_memory)
    with pytest.raises(RunError, match="does not fit in memory; lower --batch-size"):
        tiny(tmp_path / "run", max_steps=1)


def test_sync_bn_on_cpu_processes_is_refused_or_harmless(tmp_path):
    # one process: nothing to synchronise, the run works
    assert tiny(tmp_path / "run", max_steps=1, set=TINY + ["train.sync_bn=true"]).steps == 1


@pytest.mark.parametrize("umask,file_mode,dir_mode", [(0o022, 0o644, 0o755), (0o077, 0o600, 0o700)])
def test_files_are_written_with_the_users_umask(tmp_path, umask, file_mode, dir_mode):
    """Colleagues, containers and web servers read an exported model as the umask allows, as with cp."""
    previous = os.umask(umask)
    try:
        result = tiny(tmp_path / "run", max_steps=1)
    finally:
        os.umask(previous)
    run = result.run_dir
    for path in (
        run / "recipe.yaml",
        run / "checkpoints" / "last" / "model.safetensors",
        run / "checkpoints" / "last" / "train_state.pt",
        result.student_dir / "model.safetensors",
        result.student_dir / "config.json",
    ):
        assert stat.S_IMODE(path.stat().st_mode) == file_mode, path
    assert stat.S_IMODE((run / "checkpoints" / "last").stat().st_mode) == dir_mode
