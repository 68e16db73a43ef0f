"""ONNX export through torch.export, its fallback to the legacy exporter, and large models' external data.

Every file written here is read back with onnx's own loader and checker and run by onnxruntime; the
expectations come from the PyTorch models (their forward, their parameters) and from torch.export itself.
"""

from __future__ import annotations

import logging
import shutil
import sys

import numpy as np
import pytest
import timm
import torch
from PIL import Image
from torch import nn

import distillkit
import distillkit.runtimes as runtimes
from distillkit.errors import UsageError
from distillkit.evaluate import evaluate_student
from distillkit.export import export_student

onnx = pytest.importorskip("onnx")
onnxruntime = pytest.importorskip("onnxruntime")

pytestmark = [
    pytest.mark.usefixtures("one_cpu_thread"),
    pytest.mark.filterwarnings("ignore:`torch.jit.load` is deprecated:FutureWarning"),
]

GRAPH_SIGNATURE = "pkg.torch.export.ExportedProgram.graph_signature"  # only the torch.export-based exporter writes it


class Branchy(nn.Module):
    """Python control flow on a tensor's value: TorchScript tracing records the branch taken, torch.export
    refuses to guess. Images in [0, 1) always take the first branch, so the traced file is right for them."""

    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(3, 4)

    def forward(self, images):
        pooled = images.mean(dim=(2, 3))
        if images.mean() > 0:
            return self.proj(pooled)
        return -self.proj(pooled)


def metadata_keys(path) -> set[str]:
    return {p.key for p in onnx.load(str(path), load_external_data=False).graph.metadata_props}


def run_file(path):
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return lambda x: torch.from_numpy(session.run(None, {"images": x.numpy()})[0])


def test_a_model_torch_export_cannot_capture_is_written_by_the_legacy_exporter_with_a_warning(tmp_path, caplog):
    torch.manual_seed(0)
    model = Branchy().eval()
    with pytest.raises(RuntimeError, match="data-dependent"):  # torch.export really cannot capture it
        torch.export.export(model, (torch.rand(2, 3, 8, 8),))
    path = tmp_path / "model.onnx"
    with (
        caplog.at_level(logging.WARNING, logger="distillkit"),
        pytest.warns(DeprecationWarning, match="legacy TorchScript-based ONNX export"),  # PyTorch's, not hidden
    ):
        runtimes.write_onnx(model, path, (8, 8))
    [record] = [r for r in caplog.records if r.name == "distillkit"]
    message = record.getMessage()
    assert "\n" not in message
    assert "torch.export-based ONNX exporter cannot export this model" in message
    assert "data-dependent" in message and "TorchScript-based exporter instead" in message
    onnx.checker.check_model(str(path))
    assert GRAPH_SIGNATURE not in metadata_keys(path)  # the legacy exporter wrote it
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.onnx"]  # no staging folder left behind
    assert runtimes.max_abs_diff(model, run_file(path), (8, 8), "the fallback") < 1e-5  # batches of 2 and 3


def test_onnx_params_counts_the_weights_not_the_exporters_shape_constants(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 5)).eval()
    path = tmp_path / "model.onnx"
    (tmp_path / "model.onnx.data").write_bytes(b"the weights of an earlier, larger export")
    runtimes.write_onnx(model, path, (8, 8))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.onnx"]  # one self-contained file, nothing stale
    assert GRAPH_SIGNATURE in metadata_keys(path)
    initializers = onnx.load(str(path)).graph.initializer
    assert any(t.data_type == onnx.TensorProto.INT64 for t in initializers)  # Flatten's shape, not a weight
    assert runtimes.onnx_params(path) == sum(p.numel() for p in model.parameters())  # nothing to fold here
    x = torch.rand(3, 3, 8, 8)
    with torch.no_grad():
        assert (run_file(path)(x) - model(x)).abs().max().item() < 1e-5


@pytest.fixture
def run_dir(tmp_path):
    """A fake compress run holding a MobileNetV3 student with non-trivial BatchNorm statistics."""
    torch.manual_seed(0)
    model = timm.create_model("mobilenetv3_small_050", num_classes=0)
    with torch.no_grad():
        model.train()(torch.rand(4, 3, 32, 32))
    model.eval()
    export_student(
        model,
        tmp_path / "run" / "student",
        architecture="mobilenetv3_small_050",
        model_args={},
        input_size=32,
        mean=(0.5, 0.5, 0.5),
        std=(0.25, 0.25, 0.25),
        provenance={"teacher": {"name": "t", "source": "test"}, "strategy": {}, "data": "d", "steps": 1},
    )
    return tmp_path / "run", model


def labelled_images(root):
    """Two classes of solid-colour images, train/ and val/."""
    rng = np.random.default_rng(0)
    for split, count in (("train", 4), ("val", 2)):
        for name, base in (("red", (220, 30, 30)), ("blue", (30, 30, 220))):
            (root / split / name).mkdir(parents=True)
            for i in range(count):
                colour = np.clip(np.array(base) + rng.integers(-30, 30, 3), 0, 255).astype(np.uint8)
                Image.fromarray(np.tile(colour, (8, 8, 1))).save(root / split / name / f"{i}.png")
    return root


def test_large_weights_go_to_model_onnx_data_and_the_folder_works_anywhere(run_dir, tmp_path, monkeypatch):
    run, model = run_dir
    monkeypatch.setattr(runtimes, "EXTERNAL_DATA_BYTES", 0)  # as for a model over 1 GiB
    result = distillkit.export(run, format="onnx", exit_at=0, out=tmp_path / "onnx")
    names = sorted(p.name for p in result.out_dir.iterdir())
    assert names == ["README.md", "config.json", "model.onnx", "model.onnx.data"]
    assert result.files["model_data"] == result.out_dir / "model.onnx.data" and result.max_abs_diff < 1e-4
    graph = onnx.load(str(result.out_dir / "model.onnx"), load_external_data=False).graph
    assert GRAPH_SIGNATURE in {p.key for p in graph.metadata_props}
    weights = [t for t in graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL]
    assert weights and {e.value for t in weights for e in t.external_data if e.key == "location"} == {"model.onnx.data"}

    moved = shutil.copytree(result.out_dir, tmp_path / "elsewhere" / "export")  # everything needed is inside
    onnx.checker.check_model(str(moved / "model.onnx"))
    seen = []  # the first block's output, mean-pooled: what an exit after block 0 returns
    handle = model.get_submodule(model.feature_info[0]["module"]).register_forward_hook(lambda *a: seen.append(a[2]))
    x = torch.rand(4, 3, 32, 32)
    with torch.no_grad():
        model(x)
    handle.remove()
    assert (run_file(moved / "model.onnx")(x) - seen[0].mean(dim=(2, 3))).abs().max().item() < 1e-4

    metrics = evaluate_student(moved / "model.onnx", data=str(labelled_images(tmp_path / "images")), probe_steps=5)
    loaded = onnx.load(str(moved / "model.onnx")).graph.initializer  # the weights themselves, from the .data file
    floats = [onnx.numpy_helper.to_array(t) for t in loaded if t.data_type == onnx.TensorProto.FLOAT and t.dims]
    assert metrics["params"] == sum(a.size for a in floats) > 0
    exit_params = sum(p.numel() for name, p in model.named_parameters() if name.startswith(("conv_stem.", "bn1.")))
    assert metrics["params"] == pytest.approx(exit_params, rel=0.05)  # its BatchNorm folded into the convolution

    distillkit.export(run, format="torchscript", exit_at=0, out=result.out_dir)  # over it: no stale weights file
    assert sorted(p.name for p in result.out_dir.iterdir()) == ["README.md", "config.json", "model.pt"]


def test_exporting_needs_onnxscript_and_running_a_file_does_not(run_dir, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "onnxscript", None)  # as if not installed
    with pytest.raises(UsageError, match=r"needs the 'onnxscript' package.*pip install 'distillkit\[onnx\]'"):
        distillkit.export(run_dir[0], format="onnx", out=tmp_path / "onnx")
    assert not (tmp_path / "onnx").exists()
    runtimes.require_onnx()  # `eval` of an ONNX file needs only onnx and onnxruntime
