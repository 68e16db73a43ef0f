"""The `distillkit` command line: help, listings and fast rejection of bad input (exit code 2).

Every bad-input case must fail before any model or data loads; `no_loading` makes loading a
model or starting a training run fail loudly (a different exit code and an exception) so a
check that slipped through cannot pass by accident or run for minutes.
"""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

import distillkit.api
from distillkit.cli import app

WIDE = {"COLUMNS": "250"}  # rich tables and help panels truncate long names at 80 columns


@pytest.fixture
def runner() -> CliRunner:
    return CliRunner()


@pytest.fixture
def no_loading(monkeypatch):
    def forbidden(*args, **kwargs):
        raise AssertionError("bad input must be rejected before models or data load")

    for name in ("make_accelerator", "train"):
        monkeypatch.setattr(distillkit.api, name, forbidden)
    monkeypatch.setattr(distillkit.api.Run, "from_recipe", forbidden)
    for name in ("load_teacher", "open_data"):
        monkeypatch.setattr(distillkit.run, name, forbidden)
    monkeypatch.setattr(distillkit.student, "create_student", forbidden)


def flat(text: str) -> str:
    """Output with rich's line wrapping undone."""
    return " ".join(text.split())


def squashed(text: str) -> str:
    """Output without any whitespace (rich folds long paths anywhere)."""
    return "".join(text.split())


def invoke(runner: CliRunner, args: list[str]):
    return runner.invoke(app, args, env=WIDE)


def assert_usage_error(result, *fragments: str) -> str:
    assert result.exit_code == 2, (result.exit_code, result.output, result.exception)
    assert "Traceback" not in result.output
    text = flat(result.output)
    for fragment in fragments:
        assert fragment in text, (fragment, result.output)
    return text


# ----------------------------------------------------------------------------- help


def test_app_help(runner):
    result = invoke(runner, ["--help"])
    assert result.exit_code == 0
    for command in ("compress", "list", "eval", "export"):
        assert command in result.output


def test_no_arguments_shows_help(runner):
    result = invoke(runner, [])
    assert "compress" in result.output
    assert "Usage" in result.output


COMPRESS_OPTIONS = (
    "--teacher",
    "--teacher-weights",
    "--student",
    "--strategy",
    "--data",
    "--epochs",
    "--max-steps",
    "--limit",
    "--batch-size",
    "--lr",
    "--out",
    "--recipe",
    "--set",
    "--resume",
    "--overwrite",
    "--seed",
    "--precision",
    "--quiet",
)


def test_compress_help_lists_options(runner):
    result = invoke(runner, ["compress", "--help"])
    assert result.exit_code == 0, result.output
    for option in COMPRESS_OPTIONS:
        assert option in result.output, option
    for precision in ("fp32", "bf16", "fp16"):
        assert precision in result.output


def test_list_help(runner):
    result = invoke(runner, ["list", "--help"])
    assert result.exit_code == 0
    for what in ("teachers", "students", "strategies", "recipes"):
        assert what in result.output


def test_eval_help(runner):
    result = invoke(runner, ["eval", "--help"])
    assert result.exit_code == 0
    for option in ("--data", "--max-train", "--max-test", "--seed", "--weights", "--per-block"):
        assert option in result.output, option


# ----------------------------------------------------------------------------- list


@pytest.mark.parametrize(
    "what, names",
    [
        ("teachers", ["efficientnet-lite0", "timm:<model name>"]),
        (
            "students",
            ["mobilenetv3", "mobilenetv3-small", "efficientnet-b0", "resnet18", "vit-tiny", "mobilenetv3_large_100"],
        ),
        ("strategies", ["seed", "SEED"]),
        ("recipes", ["default", "seed-vit", "The embedded default"]),
    ],
)
def test_list(runner, what, names):
    result = invoke(runner, ["list", what])
    assert result.exit_code == 0, result.output
    for name in names:
        assert name in result.output, name


def test_list_unknown_kind_is_usage_error(runner):
    result = invoke(runner, ["list", "models"])
    assert result.exit_code == 2


# ----------------------------------------------------------------------------- bad input: exit 2, fast


def test_unknown_student(runner, no_loading):
    assert_usage_error(
        invoke(runner, ["compress", "--student", "mobilenet"]),
        "unknown student 'mobilenet'",
        "did you mean",
        "'mobilenetv3'",
    )


def test_unknown_timm_student(runner, no_loading):
    assert_usage_error(invoke(runner, ["compress", "--student", "timm:resnet_nonexistent_xyz"]), "unknown timm model")


def test_unknown_teacher(runner, no_loading):
    assert_usage_error(
        invoke(runner, ["compress", "--teacher", "efficientnet-lite"]),
        "unknown teacher 'efficientnet-lite'",
        "did you mean 'efficientnet-lite2' or 'efficientnet-lite0'",
    )


def test_unknown_timm_teacher(runner, no_loading):
    assert_usage_error(invoke(runner, ["compress", "--teacher", "timm:not_a_model_xyz"]), "unknown timm model")


def test_unknown_strategy(runner, no_loading):
    assert_usage_error(
        invoke(runner, ["compress", "--strategy", "sed"]), "unknown strategy 'sed'", "did you mean 'seed'"
    )


def test_unknown_recipe_key(runner, no_loading):
    assert_usage_error(invoke(runner, ["compress", "--set", "train.lrr=1"]), "'train.lrr'", "did you mean")


def test_set_without_equals(runner, no_loading):
    assert_usage_error(invoke(runner, ["compress", "--set", "novalue"]), "'novalue'", "key.path=value")


def test_set_bad_value(runner, no_loading):
    assert_usage_error(invoke(runner, ["compress", "--set", "train.precision=fp8"]), "train.precision", "fp32")


def test_bad_precision_flag(runner, no_loading):
    text = assert_usage_error(invoke(runner, ["compress", "--precision", "fp8"]), "fp8")
    assert "precision" in text


def test_epochs_not_a_number(runner, no_loading):
    assert_usage_error(invoke(runner, ["compress", "--epochs", "two"]), "epochs")


def test_negative_epochs(runner, no_loading):
    assert_usage_error(invoke(runner, ["compress", "--epochs", "0"]), "train.epochs")


def test_missing_data_folder(runner, no_loading, tmp_path):
    missing = tmp_path / "nonexistent"
    result = invoke(runner, ["compress", "--data", str(missing)])
    assert_usage_error(result, "does not exist")
    assert squashed(str(missing)) in squashed(result.output)


def test_nonexistent_absolute_data(runner, no_loading):
    assert_usage_error(invoke(runner, ["compress", "--data", "/nonexistent"]), "/nonexistent", "does not exist")


def test_data_is_a_file(runner, no_loading, tmp_path):
    path = tmp_path / "images.zip"
    path.write_bytes(b"PK")
    assert_usage_error(invoke(runner, ["compress", "--data", str(path)]), "is a file")


def test_unknown_builtin_dataset(runner, no_loading):
    assert_usage_error(invoke(runner, ["compress", "--data", "builtin:mnist"]), "unknown builtin dataset")


def test_unknown_recipe(runner, no_loading):
    assert_usage_error(invoke(runner, ["compress", "--recipe", "defualt"]), "did you mean 'default'")


def test_recipe_file_with_bad_key(runner, no_loading, tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("train:\n  epochz: 3\n", encoding="utf-8")
    assert_usage_error(invoke(runner, ["compress", "--recipe", str(path)]), "'train.epochz'")


def test_resume_without_checkpoint(runner, no_loading, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    result = invoke(runner, ["compress", "--resume", "--out", str(out)])
    assert_usage_error(result, "--resume", "no checkpoint")
    assert squashed(str(out)) in squashed(result.output)


def test_resume_with_missing_out_dir(runner, no_loading, tmp_path):
    assert_usage_error(invoke(runner, ["compress", "--resume", "--out", str(tmp_path / "never")]), "no checkpoint")


def test_resume_and_overwrite_contradict(runner, no_loading, tmp_path):
    assert_usage_error(
        invoke(runner, ["compress", "--resume", "--overwrite", "--out", str(tmp_path)]), "--resume", "--overwrite"
    )


def test_out_dir_holding_a_run_is_protected(runner, no_loading, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / ".distillkit-run").write_text("{}", encoding="utf-8")
    (out / "recipe.yaml").write_text("train: {}\n", encoding="utf-8")
    (out / "result.json").write_text("{}", encoding="utf-8")
    result = invoke(runner, ["compress", "--out", str(out)])
    assert_usage_error(result, "already holds a run", "--resume", "--overwrite")
    # nothing was deleted
    assert (out / "recipe.yaml").is_file()
    assert (out / "result.json").is_file()


@pytest.mark.parametrize(
    "files",
    [["notes.txt", "src/main.py"], ["recipe.yaml", "thesis.tex"]],
    ids=["a project folder", "an unmarked folder with a recipe.yaml"],
)
@pytest.mark.parametrize("flags", [[], ["--overwrite"]], ids=["plain", "--overwrite"])
def test_overwrite_never_deletes_a_folder_distillkit_did_not_make(runner, no_loading, tmp_path, files, flags):
    out = tmp_path / "project"
    for name in files:
        (out / name).parent.mkdir(parents=True, exist_ok=True)
        (out / name).write_text("mine", encoding="utf-8")
    result = invoke(runner, ["compress", "--out", str(out), *flags])
    assert_usage_error(result, "distillkit writes only into a new or empty folder", "another --out")
    assert sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file()) == sorted(files)
    assert all((out / name).read_text(encoding="utf-8") == "mine" for name in files)


@pytest.mark.parametrize("where", ["inside", "around"])
def test_a_run_folder_and_its_data_stay_apart(runner, no_loading, tmp_path, where):
    data = tmp_path / "images"
    (data / "cat").mkdir(parents=True)
    out = data / "runs" / "small" if where == "inside" else tmp_path
    fragment = "is inside the training data" if where == "inside" else "contains the training data"
    assert_usage_error(invoke(runner, ["compress", "--data", str(data), "--out", str(out)]), fragment)


def test_a_run_folder_stays_out_of_the_user_cache(runner, no_loading, tmp_path, monkeypatch):
    monkeypatch.setenv("DISTILLKIT_CACHE", str(tmp_path / "cache"))
    assert_usage_error(
        invoke(runner, ["compress", "--out", str(tmp_path / "cache" / "run")]), "is inside distillkit's user cache"
    )


def test_bad_input_is_reported_on_stderr(runner, no_loading):
    result = invoke(runner, ["compress", "--student", "mobilenet"])
    assert result.exit_code == 2
    try:
        stderr = result.stderr
    except ValueError:  # older click without separate stderr capture
        pytest.skip("this click version mixes stderr into stdout")
    assert "unknown student" in flat(stderr)
    assert "unknown student" not in flat(result.stdout)


def test_eval_missing_student_dir(runner, tmp_path):
    assert_usage_error(invoke(runner, ["eval", str(tmp_path / "nope")]), "not an exported student")


def test_export_help(runner):
    result = invoke(runner, ["export", "--help"])
    assert result.exit_code == 0
    for option in ("--format", "--out", "--exit-at", "safetensors", "onnx", "torchscript"):
        assert option in result.output, option


def test_export_an_early_exit_and_an_out_of_range_block(runner, tmp_path):
    import timm

    from distillkit.export import export_student

    model = timm.create_model("vit_tiny_patch16_224", img_size=32, depth=3, num_classes=0).eval()
    export_student(
        model,
        tmp_path / "run" / "student",
        architecture="vit_tiny_patch16_224",
        model_args={"img_size": 32, "depth": 3},
        input_size=32,
        mean=(0.5,) * 3,
        std=(0.5,) * 3,
        provenance={},
    )
    result = invoke(runner, ["export", str(tmp_path / "run"), "--format", "torchscript", "--exit-at", "1"])
    assert result.exit_code == 0, result.output
    assert "max abs diff" in result.output
    assert (tmp_path / "run" / "student-torchscript-exit1" / "model.pt").is_file()
    assert_usage_error(invoke(runner, ["export", str(tmp_path / "run"), "--exit-at", "3"]), "out of range", "0..2")
