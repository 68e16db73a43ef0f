"""Students that start from pretrained weights: `student.weights` (a local file, `--student-weights`) and
`student.pretrained` (timm's Hub weights, here from a Hugging Face cache filled offline)."""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import pytest
import timm
import torch
from huggingface_hub import constants
from safetensors.torch import save_file
from test_compress import tiny_run
from typer.testing import CliRunner

from distillkit import UsageError
from distillkit.cli import app
from distillkit.recipe import StudentConfig
from distillkit.student import Student

COMMIT = "fedcba9876543210fedcba9876543210fedcba98"


def _randomised(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for tensor in model.parameters():
            tensor.add_(torch.randn(tensor.shape, generator=generator) * 0.05)
    return model.eval()


def _user_file(tmp_path: Path, arch: str = "mobilenetv3_small_100", **kwargs) -> tuple[Path, dict]:
    """A state dict as a user has it: timm's model with its 1000-class classifier, as safetensors."""
    state = _randomised(timm.create_model(arch, num_classes=1000, **kwargs), seed=11).state_dict()
    path = tmp_path / f"{arch}.safetensors"
    save_file({k: v.contiguous() for k, v in state.items()}, path)
    return path, state


def test_student_weights_file_is_the_starting_point_without_its_classifier(tmp_path):
    path, state = _user_file(tmp_path)
    student = Student.create(StudentConfig(name="mobilenetv3-small", weights=str(path)), seed=0)
    loaded = student.model.state_dict()
    assert loaded.keys() == {k for k in state if not k.startswith("classifier.")}
    assert all(torch.equal(loaded[k], state[k]) for k in loaded)
    start = student.at_start()
    assert all(torch.equal(start.model.state_dict()[k], state[k]) for k in loaded)
    assert Student.create(StudentConfig(name="mobilenetv3-small"), seed=0).at_start() is None


def test_vit_student_weights_are_resampled_to_the_students_input_size(tmp_path):
    path, state = _user_file(tmp_path, "vit_tiny_patch16_224", depth=2)
    spec = tmp_path / "vit.yaml"
    spec.write_text("timm: vit_tiny_patch16_224\ninput_size: 32\nmodel_args: {depth: 2}\n")
    student = Student.create(StudentConfig(name=str(spec), weights=str(path)), seed=0)
    loaded = student.model.state_dict()
    assert loaded["pos_embed"].shape == (1, 1 + 2 * 2, 192) and state["pos_embed"].shape == (1, 1 + 14 * 14, 192)
    assert torch.equal(loaded["pos_embed"][:, :1], state["pos_embed"][:, :1])  # the class token's position
    assert torch.equal(loaded["blocks.1.mlp.fc2.weight"], state["blocks.1.mlp.fc2.weight"])


def test_bad_student_starts_are_refused_with_what_to_do(tmp_path):
    resnet, _ = _user_file(tmp_path, "resnet18")
    with pytest.raises(UsageError, match="do not fit student 'mobilenetv3-small'.*state dict of that architecture"):
        Student.create(StudentConfig(name="mobilenetv3-small", weights=str(resnet)))
    with pytest.raises(UsageError, match="do not exist"):
        Student.create(StudentConfig(name="mobilenetv3-small", weights=str(tmp_path / "missing.pth")))
    with pytest.raises(UsageError, match="both set: choose one"):
        Student.create(StudentConfig(name="mobilenetv3-small", weights=str(resnet), pretrained=True))
    junk = tmp_path / "junk.pth"
    junk.write_text("<html>not found</html>")
    with pytest.raises(UsageError, match="junk.pth"):
        Student.create(StudentConfig(name="mobilenetv3-small", weights=str(junk)))


def test_pretrained_student_reads_timms_hub_weights(no_network, monkeypatch, tmp_path):
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    path, state = _user_file(tmp_path)
    snapshot = Path(constants.HF_HUB_CACHE) / "models--timm--mobilenetv3_small_100.lamb_in1k"
    (snapshot / "snapshots" / COMMIT).mkdir(parents=True)
    (snapshot / "refs").mkdir()
    (snapshot / "refs" / "main").write_text(COMMIT)
    shutil.copyfile(path, snapshot / "snapshots" / COMMIT / "model.safetensors")

    student = Student.create(StudentConfig(name="mobilenetv3-small", pretrained=True), seed=0)

    assert torch.equal(student.model.state_dict()["conv_stem.weight"], state["conv_stem.weight"])


def test_pretrained_student_offline_fails_fast_naming_the_flag(no_network):
    start = time.perf_counter()
    with pytest.raises(UsageError, match="cannot be reached.*--student-weights FILE"):
        Student.create(StudentConfig(name="mobilenetv3-small", pretrained=True))
    assert time.perf_counter() - start < 5


def test_a_run_from_a_weights_file_scores_its_starting_point(tmp_path):
    path, _ = _user_file(tmp_path)
    result = tiny_run(tmp_path / "run", epochs=1, limit=64, student_weights=path)
    metrics = result.metrics
    assert {"teacher", "student", "student_random_init", "student_start"} <= set(metrics)
    assert metrics["student_start"]["knn_top1"] != metrics["student_random_init"]["knn_top1"]
    saved = json.loads((result.run_dir / "result.json").read_text())
    assert "student_start" in saved["metrics"]
    assert "pretrained start" in (result.run_dir / "report.html").read_text()


def test_cli_refuses_a_missing_student_weights_file_before_loading(tmp_path):
    result = CliRunner().invoke(
        app, ["compress", "--student-weights", str(tmp_path / "nope.safetensors"), "--out", str(tmp_path / "r")]
    )
    assert result.exit_code == 2
    assert "do not exist" in result.output
    assert not (tmp_path / "r").exists()
