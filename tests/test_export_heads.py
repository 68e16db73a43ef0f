"""`distillkit export RUN --heads`: agglomerate's adaptor heads written beside the student and loaded by
`distillkit.heads`, against a float64 computation from the run's checkpoint tensors and the formulas of
distillkit/heads.py's docstring (Linear -> ReLU -> Linear, the standardiser's inverse, the resampling rule),
on the student's features taken by forward hooks; the inverse of every standardiser; the refusals (a seed
run, an export folder, a student the checkpoint does not hold, flags that do not go with --heads), and the
command line."""

from __future__ import annotations

import json
import shutil
import warnings

import numpy as np
import pytest
import timm
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import load_file
from typer.testing import CliRunner

import distillkit
from distillkit.cli import app
from distillkit.errors import UsageError
from distillkit.export import export_student
from distillkit.export_heads import export_heads, restore_as_linear
from distillkit.heads import RESAMPLE_RULE, load_heads, student_features, student_maps
from distillkit.strategies.standardize import PhiS, Unchanged, ZScore
from distillkit.teachers.zoo import RANDOM_WEIGHTS

pytestmark = pytest.mark.usefixtures("one_cpu_thread")

PREFIX = "objective.strategies.agglomerate"
CNN_TEACHER = [
    "teachers.cnn.name=timm:test_efficientnet",
    f"teachers.cnn.weights={RANDOM_WEIGHTS}",
    "teachers.cnn.input_size=64",  # a 2 x 2 last map of 64 channels, 256-d embedding
]
RUNS = {  # name -> (student, strategy, settings); the primary teacher is ViT-Tiny/16 (192-d)
    # MobileNetV3 at 64 px, a 2 x 2 last map: interpolated up to the ViT's 4 x 4 tokens (at 64 px), the same
    # grid as the CNN teacher's; PHI-S; dense heads on two levels: 0.5 -> level 2 (stride 8: 24 channels, 8 x 8,
    # pooled to both teachers' grids) and 1.0 -> level 4 (the last)
    "cnn": (
        "mobilenetv3-small",
        "agglomerate",
        [
            *CNN_TEACHER,
            "teacher.input_size=64",
            "student.input_size=64",
            "strategy.agglomerate.dense_layers=[0.5,1.0]",
        ],
    ),
    # a 2-block ViT of 8 px patches at 32 px, a 4 x 4 grid: pooled down to both teachers' 2 x 2; z-scores
    "vit": (
        "vit-tiny",
        "agglomerate",
        [
            *CNN_TEACHER,
            "teacher.input_size=32",
            "student.input_size=32",
            "student.model_args={patch_size: 8, depth: 2}",
            "strategy.agglomerate.standardize=zscore",
        ],
    ),
    # pooled embeddings only, raw targets
    "summary-only": (
        "mobilenetv3-small",
        "agglomerate",
        [
            "teacher.input_size=32",
            "student.input_size=32",
            "strategy.agglomerate.dense_weight=0",
            "strategy.agglomerate.standardize=none",
        ],
    ),
    "seed": ("mobilenetv3-small", "seed", ["teacher.input_size=32", "student.input_size=32"]),
}
SIZES = {"cnn": 64, "vit": 32, "summary-only": 32}  # the student's input size
GRIDS = {"cnn": {"teacher": [4, 4], "cnn": [2, 2]}, "vit": {"teacher": [2, 2], "cnn": [2, 2]}}
WIDTHS = {"teacher": (192, 192), "cnn": (256, 64)}  # role -> (embedding, last layer channels)


@pytest.fixture(scope="module")
def images_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    for i in range(16):
        Image.fromarray(rng.integers(0, 255, (40, 40, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    return folder


@pytest.fixture(scope="module")
def runs(images_folder, tmp_path_factory):
    """name -> a 2-step compress run folder."""
    made = {}
    root = tmp_path_factory.mktemp("runs")
    for name, (student, strategy, settings) in RUNS.items():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            made[name] = distillkit.compress(
                teacher="timm:vit_tiny_patch16_224",
                teacher_weights=RANDOM_WEIGHTS,
                student=student,
                strategy=strategy,
                data=str(images_folder),
                batch_size=8,
                max_steps=2,
                out=root / name,
                quiet=True,
                set=[*settings, "data.teacher_cache=null", "eval.enabled=false"],
            ).run_dir
    return made


@pytest.fixture(scope="module")
def exported(runs):
    """name -> the export with heads of that agglomerate run."""
    return {name: export_heads(runs[name]) for name in ("cnn", "vit", "summary-only")}


# ----------------------------------------------------------------------------- references (float64)


def ref_mlp(weights: dict, prefix: str, x: torch.Tensor) -> torch.Tensor:
    """Linear -> ReLU -> Linear from the checkpoint's tensors `<prefix>.0.*` and `<prefix>.2.*`."""
    w1, b1 = weights[f"{prefix}.0.weight"].double(), weights[f"{prefix}.0.bias"].double()
    w2, b2 = weights[f"{prefix}.2.weight"].double(), weights[f"{prefix}.2.bias"].double()
    return (x.double() @ w1.T + b1).clamp_min(0) @ w2.T + b2


def ref_restore(weights: dict, prefix: str, kind: str, y: torch.Tensor) -> torch.Tensor:
    """The standardiser undone, from its buffers: phi_s x = mu + alpha^2 y W (W the cached (n, d) matrix);
    zscore x = mu + y sqrt(var + 1e-6), mu and var bias-corrected moving averages (momentum 0.99); none x = y."""
    if kind == "none":
        return y
    if kind == "phi_s":
        matrix, scale = weights[f"{prefix}.matrix"].double(), weights[f"{prefix}.scale"].double()
        return weights[f"{prefix}.mean"].double() + scale**2 * (y @ matrix)
    updates = int(weights[f"{prefix}.moments.updates"])
    correction = 1 - 0.99**updates
    mean = weights[f"{prefix}.moments.first"] / correction
    var = (weights[f"{prefix}.moments.second"] / correction - mean**2).clamp_min(0)
    return mean + y * torch.sqrt(var + 1e-6)


def ref_resample(maps: torch.Tensor, size: list[int]) -> torch.Tensor:
    """Average pooling to shrink, bilinear interpolation (align_corners False) to grow."""
    if maps.shape[-2] >= size[0] and maps.shape[-1] >= size[1]:
        return F.adaptive_avg_pool2d(maps, size)
    return F.interpolate(maps, size=size, mode="bilinear", align_corners=False)


def hooked_layer(model: torch.nn.Module, x: torch.Tensor, index: int = -1) -> torch.Tensor:
    """The output of the module behind the model's feature_info entry `index` (default the last), by a forward
    hook: a CNN's map (B, C, h, w), or a ViT's block tokens without its prefix tokens as a map."""
    seen = []
    module = model.get_submodule(model.feature_info[index]["module"])
    handle = module.register_forward_hook(lambda _m, _i, out: seen.append(out))
    try:
        model(x)
    finally:
        handle.remove()
    out = seen[0]
    if out.dim() == 3:
        tokens = out[:, model.num_prefix_tokens :]
        side = int(tokens.shape[1] ** 0.5)
        return tokens.transpose(1, 2).reshape(out.shape[0], -1, side, side)
    return out


def recipe_of(run_dir) -> dict:
    import yaml

    return yaml.safe_load((run_dir / "checkpoints" / "last" / "recipe.yaml").read_text())


# ----------------------------------------------------------------------------- the heads


@pytest.mark.parametrize("name", ["cnn", "vit", "summary-only"])
def test_exported_heads_give_the_trained_heads_in_the_teachers_space(runs, exported, name):
    run_dir, result = runs[name], exported[name]
    kind = recipe_of(run_dir)["strategy"]["agglomerate"]["standardize"]
    weights = load_file(str(run_dir / "checkpoints" / "last" / "model.safetensors"))
    student = timm.create_model(f"local-dir:{result.export.out_dir}", pretrained=True).eval()
    heads = load_heads(result.export.out_dir)
    roles = ["teacher"] if name == "summary-only" else ["teacher", "cnn"]
    assert sorted(heads) == sorted(roles) == sorted(result.heads)
    size = SIZES[name]
    x = torch.rand(3, 3, size, size, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        embedding, student_map = student(x), hooked_layer(student, x)
        helper_embedding, helper_map = student_features(student, x)
        helper_grid = helper_map if helper_map.dim() == 4 else helper_map.transpose(1, 2).reshape(student_map.shape)
        assert torch.allclose(helper_embedding, embedding) and torch.allclose(helper_grid, student_map)
        for role in roles:
            summary = f"{PREFIX}.heads.{role}.summary"
            expected = ref_restore(
                weights, f"{PREFIX}.standardizers.{role}.summary", kind, ref_mlp(weights, summary, embedding)
            )
            got = heads[role](embedding)
            assert got.shape == (3, WIDTHS[role][0])
            assert torch.allclose(got.double(), expected, atol=1e-4, rtol=1e-4)
            config = json.loads(result.heads[role]["config"].read_text())
            assert config["role"] == role and config["standardize"] == kind
            assert config["summary"]["teacher_dim"] == WIDTHS[role][0]
            if name == "summary-only":
                assert config["dense"] is None
                with pytest.raises(UsageError, match="dense_weight=0"):
                    heads[role].dense(helper_map)
                continue
            side, grid = student_map.shape[-1], GRIDS[name][role]
            assert config["dense"]["student_grid"] == [side, side] and config["dense"]["teacher_grid"] == grid
            assert config["dense"]["layer"] == len(student.feature_info) - 1  # the deepest dense layer: the last
            assert [stage["layer"] for stage in config["dense_stages"]] == ([2] if name == "cnn" else [])
            tokens = ref_mlp(weights, f"{PREFIX}.heads.{role}.dense", student_map.flatten(2).transpose(1, 2))
            maps = ref_resample(tokens.transpose(1, 2).reshape(3, -1, side, side), grid)
            expected = ref_restore(
                weights, f"{PREFIX}.standardizers.{role}.dense", kind, maps.flatten(2).transpose(1, 2)
            )
            got = heads[role].dense(helper_map)
            assert got.shape == (3, grid[0] * grid[1], WIDTHS[role][1])
            assert torch.allclose(got.double(), expected, atol=1e-4, rtol=1e-4)
    assert all(0 <= d < 1e-4 for d in result.max_abs_diff.values())


def test_the_heads_of_every_dense_layer_are_exported(runs, exported):
    """The cnn run's dense_layers [0.5, 1.0]: MobileNetV3's level 2 (stride 8: 24 channels, 8 x 8 at 64 px) has
    a head of its own, dense_layer2, beside the last level's (dense, layer 4); its output is its MLP on that
    level's map, average-pooled to each teacher's grid and restored by the teacher's one dense standardiser."""
    run_dir, result = runs["cnn"], exported["cnn"]
    weights = load_file(str(run_dir / "checkpoints" / "last" / "model.safetensors"))
    assert f"{PREFIX}.heads.cnn.dense_layer2.0.weight" in weights
    assert not any(".standardizers.cnn.dense_layer2" in key for key in weights)
    student = timm.create_model(f"local-dir:{result.export.out_dir}", pretrained=True).eval()
    heads = load_heads(result.export.out_dir)
    x = torch.rand(3, 3, 64, 64, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        level2 = hooked_layer(student, x, 2)
        assert level2.shape == (3, 24, 8, 8)
        maps = student_maps(student, x, heads["teacher"].dense_layers)
        assert list(maps) == [2, 4] and torch.equal(maps[2], level2) and torch.equal(maps[4], hooked_layer(student, x))
        for role in ("teacher", "cnn"):
            assert heads[role].dense_layers == [2, 4]
            config = json.loads(result.heads[role]["config"].read_text())
            (stage,) = config["dense_stages"]
            channels, grid = WIDTHS[role][1], GRIDS["cnn"][role]
            assert stage["layer"] == 2 and stage["path"] == "dense_layer2" and stage["in_dim"] == 24
            assert stage["student_grid"] == [8, 8] and stage["teacher_grid"] == grid
            assert stage["teacher_dim"] == channels and stage["resample"] == RESAMPLE_RULE
            assert (stage["hidden_dim"], stage["out_dim"]) == (
                config["dense"]["hidden_dim"],
                config["dense"]["out_dim"],
            )
            written = load_file(str(result.heads[role]["weights"]))
            assert set(written) == {
                f"{path}.{layer}.{kind}"
                for path in ("summary", "dense", "dense_layer2")
                for layer in ("fc1", "fc2", "restore")
                for kind in ("weight", "bias")
            }
            tokens = ref_mlp(weights, f"{PREFIX}.heads.{role}.dense_layer2", level2.flatten(2).transpose(1, 2))
            pooled = ref_resample(tokens.transpose(1, 2).reshape(3, -1, 8, 8), grid).flatten(2).transpose(1, 2)
            expected = ref_restore(weights, f"{PREFIX}.standardizers.{role}.dense", "phi_s", pooled)
            got = heads[role].dense(maps[2], 2)
            assert got.shape == (3, grid[0] * grid[1], channels)
            assert torch.allclose(got.double(), expected, atol=1e-4, rtol=1e-4)
            assert not torch.allclose(
                got, heads[role].dense(hooked_layer(student, x)), rtol=1e-2, atol=1e-6
            )  # another head
        with pytest.raises(UsageError, match=r"dense paths for the student's layers \[2, 4\], not layer 3"):
            heads["teacher"].dense(maps[2], 3)


def test_the_standardisers_were_trained(runs):
    """Else the restore would be the identity and the comparison above would prove less."""
    weights = load_file(str(runs["cnn"] / "checkpoints" / "last" / "model.safetensors"))
    assert int(weights[f"{PREFIX}.standardizers.cnn.summary.moments.updates"]) == 2
    assert not torch.allclose(weights[f"{PREFIX}.standardizers.cnn.summary.matrix"], torch.eye(256))


def test_the_student_beside_the_heads_is_the_runs(runs, exported):
    result = exported["cnn"]
    assert result.export.out_dir == runs["cnn"] / "student-safetensors-heads"
    assert sorted(p.name for p in (result.export.out_dir / "heads").iterdir()) == [
        "cnn.json",
        "cnn.safetensors",
        "teacher.json",
        "teacher.safetensors",
    ]
    assert (
        load_file(str(result.export.out_dir / "model.safetensors")).keys()
        == load_file(str(runs["cnn"] / "student" / "model.safetensors")).keys()
    )
    config = json.loads(result.heads["teacher"]["config"].read_text())
    assert config["teacher"]["name"] == "timm:vit_tiny_patch16_224" and config["teacher"]["input_size"] == [64, 64]
    assert config["student"]["architecture"] == "mobilenetv3_small_100" and config["student"]["input_size"] == 64


def test_an_export_without_heads_over_one_with_them_removes_them(runs, tmp_path):
    out = tmp_path / "export"
    export_heads(runs["summary-only"], out=out)
    (out / "heads" / "notes.txt").write_text("mine", encoding="utf-8")
    distillkit.export(runs["summary-only"], out=out)
    assert sorted(p.name for p in (out / "heads").iterdir()) == ["notes.txt"]


@pytest.mark.parametrize("kind", ["phi_s", "zscore", "none"])
def test_restore_as_a_linear_layer_inverts_the_standardiser(kind):
    """A width of 6 has no Hadamard matrix: PHI-S pads to 8 outputs, and restore maps them back to 6."""
    rows = torch.randn(200, 6, generator=torch.Generator().manual_seed(0)) * torch.tensor([3.0, 1, 0.5, 2, 1, 4]) + 2
    standardizer = {"phi_s": PhiS(6, 0.9), "zscore": ZScore(6, 0.9), "none": Unchanged(6)}[kind]
    standardizer.update(rows)
    standardizer.update(rows[:100])
    weight, bias = restore_as_linear(standardizer)
    assert weight.shape == (6, 8 if kind == "phi_s" else 6)
    standardised = standardizer(rows)
    assert torch.allclose(standardised @ weight.T + bias, rows, atol=1e-4)


# ----------------------------------------------------------------------------- refusals


def test_a_run_without_agglomerate_is_refused(runs, tmp_path):
    with pytest.raises(UsageError, match="--heads needs a run trained with strategy agglomerate; this run used seed"):
        export_heads(runs["seed"], out=tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_an_export_folder_is_refused_with_the_run_to_pass(runs, tmp_path):
    with pytest.raises(UsageError, match="is an exported student, which holds no adaptor heads"):
        export_heads(runs["cnn"] / "student", out=tmp_path / "out")
    with pytest.raises(UsageError, match="holds no checkpoint"):
        export_heads(tmp_path, out=tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_a_student_the_checkpoint_does_not_hold_is_refused(runs, tmp_path):
    run_dir = tmp_path / "run"
    shutil.copytree(runs["summary-only"], run_dir)
    student = distillkit.load_student(run_dir)
    with torch.no_grad():
        student.conv_stem.weight.add_(0.1)  # as if trained on after the checkpoint
    config = json.loads((run_dir / "student" / "config.json").read_text())
    export_student(
        student,
        run_dir / "student",
        architecture=config["architecture"],
        model_args=config["model_args"],
        input_size=32,
        mean=tuple(config["pretrained_cfg"]["mean"]),
        std=tuple(config["pretrained_cfg"]["std"]),
        provenance=config["distillkit"],
    )
    with pytest.raises(UsageError, match="holds another state of the student"):
        export_heads(run_dir, out=tmp_path / "out")
    assert not (tmp_path / "out").exists()


# ----------------------------------------------------------------------------- command line


def invoke(args: list[str]):
    return CliRunner().invoke(app, args, env={"COLUMNS": "250"})


def flat(text: str) -> str:
    return " ".join(text.split())


def test_cli_exports_the_heads(runs, tmp_path):
    result = invoke(
        ["export", str(runs["summary-only"]), "--heads", "--format", "torchscript", "--out", str(tmp_path / "o")]
    )
    assert result.exit_code == 0, result.output
    assert "adaptor heads of teacher in" in flat(result.output)
    assert sorted(p.name for p in (tmp_path / "o").iterdir()) == ["README.md", "config.json", "heads", "model.pt"]
    assert list(load_heads(tmp_path / "o")) == ["teacher"]


@pytest.mark.parametrize(
    "args, message",
    [
        (["--heads"], "--heads needs a run trained with strategy agglomerate; this run used seed"),
        (["--heads", "--exit-at", "1"], "leave out --exit-at and --features-only"),
        (["--heads", "--features-only"], "leave out --exit-at and --features-only"),
    ],
)
def test_cli_refusals(runs, tmp_path, args, message):
    result = invoke(["export", str(runs["seed"]), *args, "--out", str(tmp_path / "o")])
    assert result.exit_code == 2, result.output
    assert message in flat(result.output) and "Traceback" not in result.output
    assert not (tmp_path / "o").exists()


def test_export_help_names_the_flags():
    result = invoke(["export", "--help"])
    assert result.exit_code == 0
    assert "--heads" in result.output and "--features-only" in result.output
    assert "agglomerate" in flat(result.output)
