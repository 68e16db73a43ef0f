"""Two CPU processes (torchrun, gloo) give the same answer as one process with the same global batch.

The student is a ViT (LayerNorm only), so per-process batch statistics cannot differ; the SEED queue
is filled with teacher embeddings gathered from both processes, in rank order, which is the
one-process batch order.
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from distillkit.cli import app

FAULT_RUN = Path(__file__).parent / "helpers" / "fault_run.py"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_args(out: Path, strategy: str, cache: bool = False) -> list[str]:
    args = (
        [
            "--teacher-cache",
            str(out.parent / f"cache-{out.name}"),
            "--set",
            "data.view_slots=1",
            "--set",
            "data.cache_dtype=float32",
        ]
        if cache
        else ["--no-teacher-cache"]
    )
    args += [
        "--student",
        "timm:vit_tiny_patch16_224",
        "--strategy",
        strategy,
        "--limit",
        "128",
        "--batch-size",
        "32",
        "--epochs",
        "2",
        "--out",
        str(out),
        "--quiet",
        "--seed",
        "3",
    ]
    for item in (
        "teacher.input_size=32",
        "student.input_size=32",
        "strategy.seed.queue_size=64",
        "eval.enabled=false",
        "train.deterministic=true",
        "train.log_every=1",
        "train.lr=0.05",
    ):
        args += ["--set", item]
    return args


def two_processes(args: list[str]) -> subprocess.CompletedProcess:
    """`compress` (through fault_run.py) under torchrun: 2 CPU processes on this machine."""
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nnodes",
        "1",
        "--nproc_per_node",
        "2",
        "--master_addr",
        "127.0.0.1",
        "--master_port",
        str(free_port()),
        str(FAULT_RUN),
        "--",
        *args,
    ]
    return subprocess.run(command, capture_output=True, text=True, timeout=300)


def one_process(args: list[str]) -> None:
    """`compress` in this process (one CPU thread, as fault_run.py's processes): the 1-process reference."""
    result = CliRunner().invoke(app, ["compress", *args])
    assert result.exit_code == 0, (result.output[-3000:], result.exception)


def losses(run: Path) -> list[float]:
    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [line["loss"] for line in lines if "loss" in line and "epoch_end" not in line]


# seed alone is inside seed+feature (each case is two ~20 s runs, so the suite keeps the composite one)
@pytest.mark.parametrize("strategy, cache", [("seed+feature", False), ("seed", True)])
def test_two_processes_match_one_process(tmp_path, strategy, cache):
    """With a teacher cache each process writes its share of the rows in epoch 1 and reads them in epoch 2."""
    one_process(run_args(tmp_path / "one", strategy, cache))
    two = two_processes(run_args(tmp_path / "two", strategy, cache))
    assert two.returncode == 0, two.stderr[-3000:]

    a, b = losses(tmp_path / "one"), losses(tmp_path / "two")
    assert len(a) == len(b) == 8
    assert a == pytest.approx(b, rel=1e-4, abs=1e-5)
    wa = load_file(str(tmp_path / "one" / "checkpoints" / "last" / "model.safetensors"))
    wb = load_file(str(tmp_path / "two" / "checkpoints" / "last" / "model.safetensors"))
    assert wa.keys() == wb.keys()
    for key in wa:
        assert torch.allclose(wa[key], wb[key], rtol=1e-4, atol=1e-5), key
    # the queue (filled from both processes) is the same too
    assert any("queue" in key for key in wa)
    if cache:  # both processes wrote their rows: every training image has its one view slot filled
        for run in ("one", "two"):
            (entry,) = (tmp_path / f"cache-{run}").iterdir()
            assert np.fromfile(entry / "filled.bin", dtype=np.uint8).sum() == 128


def test_bad_images_are_added_up_over_processes(tmp_path):
    """Two processes each meet only their own shard's files: at the epoch's end they add up the distinct bad
    files of both (2 here, over the 1 allowed) and stop together, with the total, instead of each letting its
    share through (or one stopping while the other waits)."""
    from PIL import Image

    rng = np.random.default_rng(0)
    for split, count in (("train", 94), ("val", 4)):  # 96 training files: 6 full global batches, none dropped
        for i in range(count):
            folder = tmp_path / "images" / split / "ab"[i % 2]
            folder.mkdir(parents=True, exist_ok=True)
            Image.fromarray(rng.integers(0, 255, (12, 12, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    for i in range(2):
        (tmp_path / "images" / "train" / "a" / f"broken{i}.png").write_bytes(b"not an image")
    args = [
        "--data",
        str(tmp_path / "images"),
        "--student",
        "mobilenetv3-small",
        "--batch-size",
        "16",
        "--epochs",
        "1",
        "--out",
        str(tmp_path / "run"),
        "--quiet",
        "--no-teacher-cache",
    ]
    for item in (
        "teacher.input_size=32",
        "student.input_size=32",
        "strategy.seed.queue_size=32",
        "eval.enabled=false",
        "data.max_bad_fraction=0.005",
    ):
        args += ["--set", item]
    two = two_processes(args)
    assert two.returncode != 0
    assert two.stderr.count("2 of 96 training images are unreadable") == 2, two.stderr[-3000:]  # both processes


def test_overwrite_under_torchrun_replaces_the_run_once(tmp_path):
    """--overwrite with 2 processes: one process clears the previous run, the other waits for it, and the new
    run's files are all that is left (its metrics start again at step 1); a folder holding a file no run
    wrote is refused by both processes before anything is deleted."""
    out = tmp_path / "run"
    base = run_args(out, "seed")
    base[base.index("--epochs") + 1] = "1"
    one_process([*base, "--max-steps", "3"])
    (out / "checkpoints" / "stale-note").write_text("written by the first run's folder")  # inside a run entry

    again = two_processes([*base, "--max-steps", "2", "--overwrite"])
    assert again.returncode == 0, again.stderr[-3000:]
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines() if '"loss"' in line]
    assert steps == [1, 2]
    assert not (out / "checkpoints" / "stale-note").exists()

    (out / "my-notes.txt").write_text("the user's")
    refused = two_processes([*base, "--max-steps", "2", "--overwrite"])
    # each process exits 2; torchrun itself reports a failed worker group as 1
    assert refused.returncode != 0 and "files a run did not write: my-notes.txt" in " ".join(refused.stderr.split())
    assert (out / "my-notes.txt").read_text() == "the user's" and (out / "metrics.jsonl").exists()


def test_the_command_destroys_the_process_group_before_it_exits():
    """`distillkit` (cli.main) leaves no torch.distributed group open when it returns, on success and on bad
    usage alike: a process that exits with gloo's threads still running can abort at interpreter exit."""
    script = f"""
import sys
import torch.distributed as dist
from distillkit.cli import main
for argv in (["distillkit", "--version"], ["distillkit", "compress", "--no-such-flag"]):
    dist.init_process_group("gloo", init_method="tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
    sys.argv = argv
    try:
        main()
    except SystemExit as e:
        print(argv[1], "exit", e.code, "group open:", dist.is_initialized())
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    reports = [line for line in done.stdout.splitlines() if "group open" in line]
    assert reports == ["--version exit 0 group open: False", "compress exit 2 group open: False"]
