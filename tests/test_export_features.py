"""`distillkit export --features-only`: the student as a timm features_only backbone, as safetensors (loaded
by timm from its config.json alone), ONNX (one output per map, a free batch) and TorchScript, each run by its
own runtime on batch sizes export does not check with and compared with the in-memory student's maps taken
by forward hooks (a CNN's feature_info modules; a ViT's blocks, patch tokens as maps); the feature_info it
records; and the refusals (with --exit-at, a features-only folder where a whole student is needed, a timm
that cannot build the backbone), through the API and the command line."""

from __future__ import annotations

import json
import logging

import pytest
import timm
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

import distillkit
from distillkit.cli import app
from distillkit.errors import UsageError
from distillkit.export import export_student

pytestmark = [
    pytest.mark.usefixtures("one_cpu_thread"),
    pytest.mark.filterwarnings("ignore:`torch.jit.load` is deprecated:FutureWarning"),
]

STUDENTS = {  # architecture -> (model_args, the feature_info indices timm's features_only gives by default)
    "mobilenetv3_small_050": ({}, [0, 1, 2, 3, 4]),  # every stage
    "vit_tiny_patch16_224": ({"img_size": 32, "depth": 3}, [0, 1, 2]),  # the last 3 blocks
}


@pytest.fixture(scope="module", params=list(STUDENTS))
def run(request, tmp_path_factory):
    """A compress run folder holding an exported student, and the in-memory student."""
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
        mean=(0.5,) * 3,
        std=(0.25,) * 3,
        provenance={"strategy": {"seed": {}}},
    )
    return architecture, model, run_dir


def hooked_maps(model: torch.nn.Module, indices: list[int], x: torch.Tensor) -> list[torch.Tensor]:
    """The outputs of the modules behind feature_info[i], by forward hooks; a ViT block's tokens without its
    prefix tokens, as a (B, C, H, W) map."""
    seen = {}
    handles = [
        model.get_submodule(model.feature_info[i]["module"]).register_forward_hook(
            lambda _m, _i, out, i=i: seen.setdefault(i, out)
        )
        for i in indices
    ]
    try:
        model(x)
    finally:
        for handle in handles:
            handle.remove()
    maps = []
    for i in indices:
        out = seen[i]
        if out.dim() == 3:
            tokens = out[:, model.num_prefix_tokens :]
            side = int(tokens.shape[1] ** 0.5)
            out = tokens.transpose(1, 2).reshape(out.shape[0], -1, side, side)
        maps.append(out)
    return maps


def assert_maps_match(run_file, model, indices, batches=(1, 4)):
    for batch in batches:
        x = torch.rand(batch, 3, 32, 32)
        with torch.no_grad():
            got, expected = run_file(x), hooked_maps(model, indices, x)
        assert len(got) == len(expected)
        for g, e in zip(got, expected):
            assert g.shape == e.shape
            assert (g - e).abs().max().item() < 1e-4


def test_safetensors_loads_as_the_backbone_from_its_config_alone(run, caplog):
    architecture, model, run_dir = run
    model_args, indices = STUDENTS[architecture]
    result = distillkit.export(run_dir, features_only=True)
    assert result.out_dir == run_dir / "student-safetensors-features" and result.features_only
    assert 0 <= result.max_abs_diff < 1e-4
    config = json.loads((result.out_dir / "config.json").read_text())
    assert config["model_args"] == {**model_args, "features_only": True, "out_indices": indices}
    with caplog.at_level(logging.INFO, logger="timm"):
        backbone = timm.create_model(f"local-dir:{result.out_dir}", pretrained=True).eval()
    assert not [r for r in caplog.records if "keys" in r.getMessage()]  # no unexpected or missing weights
    assert_maps_match(backbone, model, indices)
    explicit = timm.create_model(f"local-dir:{result.out_dir}", pretrained=True, features_only=True).eval()
    assert_maps_match(explicit, model, indices, batches=(2,))
    with torch.no_grad():
        maps = hooked_maps(model, indices, torch.rand(1, 3, 32, 32))
    info = config["distillkit"]["export"]["feature_info"]
    assert [entry["output"] for entry in info] == [f"stage{i}" for i in range(len(indices))]
    assert [entry["index"] for entry in info] == indices
    assert [entry["channels"] for entry in info] == [m.shape[1] for m in maps]
    assert [entry["reduction"] for entry in info] == [32 // m.shape[-1] for m in maps]
    assert config["distillkit"]["export"]["out_indices"] == indices
    card = (result.out_dir / "README.md").read_text()  # the model card says what model(x) now returns
    assert "features_only` backbone" in card and "pooled embedding" not in card
    assert f"stage0 ({maps[0].shape[1]} ch, 1/{32 // maps[0].shape[-1]})" in card
    if "mobilenet" in architecture:  # MobileNetV3's features class has no head: its weights are left out
        assert not [k for k in load_file(str(result.out_dir / "model.safetensors")) if k.startswith("conv_head")]


@pytest.fixture(scope="module")
def onnx_features(run, tmp_path_factory):
    """One ONNX export per student: the torch.export-based exporter takes 5-20 s each here."""
    return distillkit.export(run[2], format="onnx", features_only=True, out=tmp_path_factory.mktemp("o") / "x")


def test_onnx_has_one_named_output_per_map_and_a_free_batch(run, onnx_features):
    import onnxruntime

    architecture, model, _ = run
    indices = STUDENTS[architecture][1]
    assert 0 <= onnx_features.max_abs_diff < 1e-4
    session = onnxruntime.InferenceSession(
        str(onnx_features.out_dir / "model.onnx"), providers=["CPUExecutionProvider"]
    )
    assert [o.name for o in session.get_outputs()] == [f"stage{i}" for i in range(len(indices))]
    assert [i.name for i in session.get_inputs()] == ["images"]
    assert all(isinstance(o.shape[0], str) for o in session.get_outputs())  # a named, free batch dimension
    run_file = lambda x: [torch.from_numpy(m) for m in session.run(None, {"images": x.numpy()})]  # noqa: E731
    assert_maps_match(run_file, model, indices)
    assert sorted(p.name for p in onnx_features.out_dir.iterdir()) == ["README.md", "config.json", "model.onnx"]


def test_torchscript_returns_the_maps(run, tmp_path):
    architecture, model, run_dir = run
    result = distillkit.export(run_dir, format="torchscript", features_only=True, out=tmp_path / "ts")
    assert_maps_match(torch.jit.load(str(tmp_path / "ts" / "model.pt")).eval(), model, STUDENTS[architecture][1])
    assert result.max_abs_diff < 1e-4


def test_a_features_only_folder_is_not_taken_for_a_whole_student(run, tmp_path):
    _, _, run_dir = run
    result = distillkit.export(run_dir, features_only=True, out=tmp_path / "features")
    for call in (
        lambda: distillkit.load_student(result.out_dir),
        lambda: distillkit.export(result.out_dir, out=tmp_path / "again"),
    ):
        with pytest.raises(UsageError, match="holds a features-only backbone"):
            call()


def test_features_only_and_exit_at_are_refused_together(run, tmp_path):
    with pytest.raises(UsageError, match="pass one of them"):
        distillkit.export(run[2], features_only=True, exit_at=1, out=tmp_path / "x")
    assert not (tmp_path / "x").exists()


def test_a_timm_that_cannot_build_the_backbone_is_named(run, tmp_path, monkeypatch):
    """As timm before 1.0 answered features_only for ViTs."""
    create = timm.create_model

    def old_timm(name, *args, **kwargs):
        if kwargs.get("features_only"):
            raise RuntimeError("features_only not implemented for Vision Transformer models.")
        return create(name, *args, **kwargs)

    monkeypatch.setattr(timm, "create_model", old_timm)
    with pytest.raises(UsageError, match=r"cannot build .* as a features_only backbone \(features_only not impl"):
        distillkit.export(run[2], features_only=True, out=tmp_path / "x")
    assert not (tmp_path / "x").exists()


def test_cli(run, tmp_path):
    runner = CliRunner()
    result = runner.invoke(app, ["export", str(run[2]), "--features-only", "--out", str(tmp_path / "f")])
    assert result.exit_code == 0, result.output
    assert "exported the student's features_only backbone as safetensors" in " ".join(result.output.split())
    refused = runner.invoke(app, ["export", str(run[2]), "--features-only", "--exit-at", "1"])
    assert refused.exit_code == 2 and "pass one of them" in " ".join(refused.output.split())
