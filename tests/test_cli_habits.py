"""The command line's manners: quick to answer (no torch for help, version and listings), --version, shell
completion, brackets that survive in messages, defaults in --help, --json, listings that fit 80 columns and
pipes, warnings on stderr through the "distillkit" logger, full recipe paths for --set, and the packaging."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

import distillkit
from distillkit import messages
from distillkit.cli import app

ROOT = Path(__file__).resolve().parents[1]
HEAVY = ("torch", "timm", "torchvision", "accelerate")
WIDE = {"COLUMNS": "250"}  # no wrapping of long lines by rich
ANSI = re.compile(r"\x1b\[[0-9;]*m")


def python(code: str) -> subprocess.CompletedProcess:
    """Run `code` in a fresh interpreter (so sys.modules shows what importing costs)."""
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=ROOT)


def invoke(args: list[str], **env: str):
    return CliRunner().invoke(app, args, env={**WIDE, **env})


def flat(text: str) -> str:
    return " ".join(text.split())


def test_importing_distillkit_loads_no_torch():
    done = python(f"import sys, distillkit, distillkit.cli; print([m for m in {HEAVY!r} if m in sys.modules])")
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"


def test_every_public_name_resolves_and_export_and_report_stay_functions(monkeypatch):
    import distillkit.api
    import distillkit.errors
    import distillkit.export
    import distillkit.report

    for name in distillkit.__all__:
        assert getattr(distillkit, name) is not None, name
    assert distillkit.compress is distillkit.api.compress and distillkit.UsageError is distillkit.errors.UsageError
    for name in ("export", "report"):
        monkeypatch.delitem(vars(distillkit), name)  # as before the first use
        setattr(distillkit, name, sys.modules[f"distillkit.{name}"])  # what `import distillkit.<name>` does
        assert getattr(distillkit, name) is getattr(sys.modules[f"distillkit.{name}"], name)  # still the function
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        distillkit.nope  # noqa: B018


def test_help_version_and_every_listing_run_without_torch():
    commands = [["--help"], ["--version"], ["compress", "--help"], ["eval", "--help"]]
    commands += [["list", what, *json_flag] for what in ("teachers", "students", "strategies", "recipes")
                 for json_flag in ([], ["--json"])]  # fmt: skip
    done = python(
        "import contextlib, io, sys\n"
        "from distillkit.cli import main\n"
        f"for args in {commands!r}:\n"
        "    sys.argv = ['distillkit', *args]\n"
        "    with contextlib.redirect_stdout(io.StringIO()):\n"
        "        try:\n"
        "            main()\n"
        "        except SystemExit as e:\n"
        "            assert e.code in (0, None), (args, e.code)\n"
        f"print([m for m in {HEAVY!r} if m in sys.modules])\n"
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"


def test_version_has_one_source():
    result = invoke(["--version"])
    assert result.exit_code == 0 and result.stdout == f"distillkit {distillkit.__version__}\n"
    tomllib = pytest.importorskip("tomllib")
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
    assert "version" not in pyproject["project"] and "version" in pyproject["project"]["dynamic"]
    source = ROOT / pyproject["tool"]["hatch"]["version"]["path"]
    assert re.search(rf'^__version__ = "{re.escape(distillkit.__version__)}"', source.read_text(), re.M)


def test_packaging_files():
    assert (
        "Apache License" in (ROOT / "LICENSE").read_text()
        and "Version 2.0, January 2004" in (ROOT / "LICENSE").read_text()
    )
    assert (ROOT / "distillkit" / "py.typed").is_file()
    tomllib = pytest.importorskip("tomllib")
    project = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    assert project["license"] == "Apache-2.0" and project["license-files"] == ["LICENSE"]
    assert "Typing :: Typed" in project["classifiers"] and {"Source", "Issues"} <= set(project["urls"])


def test_shell_completion_completes_commands_and_choices(monkeypatch):
    # typer's --show-completion is a flag whose shell shellingham detects from the process tree (not found ten
    # levels up under some CI and xdist trees: "Shell  not supported", exit 1); without detection it takes the
    # shell as its value, which is what this test asks for.
    monkeypatch.setenv("_TYPER_COMPLETE_TEST_DISABLE_SHELL_DETECTION", "1")
    script = CliRunner().invoke(app, ["--show-completion", "bash"], prog_name="distillkit")
    assert script.exit_code == 0 and "_DISTILLKIT_COMPLETE=complete_bash" in script.stdout
    asks = {"_DISTILLKIT_COMPLETE": "complete_bash", "COMP_WORDS": "distillkit list st", "COMP_CWORD": "2"}
    done = subprocess.run(
        [sys.executable, "-c", "import sys; sys.argv[0] = 'distillkit'; from distillkit.cli import main; main()"],
        env={**os.environ, **asks}, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert done.stdout.split() == ["students", "strategies"], done.stderr


def test_brackets_in_an_error_survive(tmp_path):
    folder = tmp_path / "[onnx]" / "x"
    result = invoke(["compress", "--data", str(folder)])
    assert result.exit_code == 2
    assert f"error: data folder {folder} does not exist" in result.stderr, result.stderr


def test_the_onnx_install_hint_keeps_its_brackets(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "onnx", None)  # `import onnx` fails as if it were not installed
    result = invoke(["export", str(tmp_path), "--format", "onnx"])
    assert result.exit_code == 2
    assert "pip install 'distillkit[onnx]'" in result.stderr, result.stderr


def test_compress_help_shows_the_default_recipes_values():
    recipe = yaml.safe_load((ROOT / "recipes" / "default.yaml").read_text(encoding="utf-8"))
    text = flat(invoke(["compress", "--help"]).stdout)
    for option, value in (
        ("--lr", recipe["train"]["lr"]),
        ("--batch-size", recipe["train"]["batch_size"]),
        ("--teacher", recipe["teacher"]["name"]),
        ("--student", recipe["student"]["name"]),
        ("--seed", 0),  # not in default.yaml: the schema's default
    ):
        assert re.search(rf"{option} .*?\[default: \(recipe: {re.escape(str(value))}\)\]", text), option
    assert f"[default: (recipe: set by train.images={recipe['train']['images']})]" in text  # --epochs


def _expected_names(what: str) -> list[str]:
    """What each listing must hold, from the registries, the files and the strategies' classes themselves."""
    from distillkit.teachers import TEACHERS

    return {
        "teachers": TEACHERS.names() + ["timm:<model name>", "file:<path>"],
        "students": [p.stem for p in sorted((ROOT / "students").glob("*.yaml"))] + ["timm:<model name>"],
        "strategies": distillkit.list_strategies(),
        "recipes": sorted(p.stem for p in (ROOT / "recipes").glob("*.yaml")),
    }[what]


@pytest.mark.parametrize("what", ["teachers", "students", "strategies", "recipes"])
def test_list_json_is_the_only_thing_on_stdout(what):
    result = invoke(["list", what, "--json"])
    assert result.exit_code == 0, result.output
    rows = json.loads(result.stdout)
    assert [row["name"] for row in rows] == _expected_names(what)
    if what == "strategies":
        from distillkit.strategies import STRATEGIES

        assert all(row["summary"] == STRATEGIES.get(row["name"]).summary for row in rows)
    if what == "teachers":
        from distillkit.teachers import TEACHERS

        zoo = [row for row in rows if row["name"] in TEACHERS]
        assert all(row["architecture"] == TEACHERS.get(row["name"]).architecture for row in zoo)


def test_list_fits_80_columns_without_cutting_anything():
    result = invoke(["list", "teachers"], COLUMNS="80", TTY_COMPATIBLE="1")
    assert result.exit_code == 0, result.output
    lines = ANSI.sub("", result.stdout).splitlines()
    assert "┃" in result.stdout and max(len(line) for line in lines) <= 80
    assert "…" not in result.stdout
    names = {line.split("│")[1].strip() for line in lines if line.startswith("│")}
    assert set(_expected_names("teachers")) <= names  # each name whole, on one line


def test_list_piped_is_one_plain_line_per_row():
    from distillkit.teachers import TEACHERS

    result = invoke(["list", "teachers"], COLUMNS="80")
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert lines[0].split() == ["name", "architecture", "embedding", "weights", "license"]
    for name in TEACHERS:
        spec = TEACHERS.get(name)
        (line,) = [line for line in lines if line.split()[0] == name]
        assert spec.architecture in line and spec.weights_source in line and line.endswith(spec.license or "-")
    assert len(lines) == 1 + len(_expected_names("teachers"))


def test_eval_json_is_the_only_thing_on_stdout(tmp_path):
    import numpy as np
    import timm
    import torch
    from PIL import Image

    for split, count in (("train", 4), ("val", 2)):
        for label, colour in enumerate(((200, 30, 30), (30, 200, 30))):
            (tmp_path / "images" / split / str(label)).mkdir(parents=True)
            for i in range(count):
                pixels = np.tile(np.array(colour, dtype=np.uint8) + i, (8, 8, 1))
                Image.fromarray(pixels).save(tmp_path / "images" / split / str(label) / f"{i}.png")
    model = timm.create_model("mobilenetv3_small_050")
    torch.save(model.state_dict(), tmp_path / "weights.pth")
    args = ["eval", "timm:mobilenetv3_small_050", "--data", str(tmp_path / "images"), "--weights"]
    result = invoke([*args, str(tmp_path / "weights.pth"), "--json"])
    assert result.exit_code == 0, result.output
    metrics = json.loads(result.stdout)
    assert metrics["params"] == sum(p.numel() for p in model.parameters())
    assert (
        0.0 <= metrics["knn_top1"] <= 1.0
        and metrics["top1_skipped"] == "the classifier head has 1000 classes and the data 2"
    )


@pytest.fixture
def clean_logger():
    """Leave the "distillkit" logger as it was: the CLI installs its console handler on it."""
    handlers = list(messages.logger.handlers)
    yield
    messages.logger.handlers[:] = handlers


def test_warnings_print_on_stderr_as_one_line_and_quiet_silences_them(monkeypatch, clean_logger):
    import distillkit.api
    import distillkit.listing

    def warns_first(what):
        def rows():
            messages.warn(f"listing {what} [onnx] went differently")
            return [{"name": "x", "description": "y"}]

        return rows

    monkeypatch.setitem(distillkit.listing.ROWS, "recipes", warns_first("recipes"))
    result = invoke(["list", "recipes"])
    assert result.exit_code == 0
    assert result.stderr == "warning: listing recipes [onnx] went differently\n"  # no file:line, brackets kept
    assert "went differently" not in result.stdout

    def compress(recipe, **options):
        messages.warn("compress said something")

    monkeypatch.setattr(distillkit.api, "compress", compress)
    assert invoke(["compress"]).stderr == "warning: compress said something\n"
    quiet = invoke(["compress", "--quiet"])
    assert quiet.exit_code == 0 and quiet.stderr == ""


def test_python_users_see_warnings_without_configuring_logging():
    done = python("from distillkit.messages import warn; warn('the teacher [x] runs every epoch')")
    assert done.returncode == 0 and done.stderr == "the teacher [x] runs every epoch\n"


def test_set_with_a_leaf_key_names_the_full_path():
    result = invoke(["compress", "--set", "lr=0.1"])
    assert result.exit_code == 2
    assert "did you mean --set train.lr=0.1?" in flat(result.stderr), result.stderr
    with pytest.raises(distillkit.UsageError, match=r"--set teacher.input_size=64 or --set student.input_size=64"):
        distillkit.resolve_recipe(overrides=["input_size=64"])
    with pytest.raises(distillkit.UsageError, match=r"--set data.augment.hue=0.1\?"):
        distillkit.resolve_recipe(overrides={"augment.hue": 0.1})
    assert distillkit.resolve_recipe(overrides=["train.lr=0.1", "out=runs/x"]).train.lr == 0.1
