"""`distillkit export RUN --heads`: a run's student with strategy agglomerate's adaptor heads, which map the
student's embedding and feature maps to each teacher's (the files and how to use them: `distillkit.heads`).

The heads are in the run's last checkpoint (checkpoints/last/model.safetensors, keys
`objective.strategies.agglomerate.heads.<role>.<summary|dense|dense_layer<s>>...` and
`...standardizers.<role>...`), not in its exported student. They are read back by building the run's objective
as training built it, from the checkpoint's recipe, the run's teachers (loaded as training loaded them: their
dry forwards give the widths and the token grids the dense heads resample to) and the exported student, and
loading the checkpoint's objective weights into it, which must fit exactly. The student is exported as
`distillkit.export` does (any format), the heads go to its heads/ folder, and the written heads, loaded by
`distillkit.heads.load_heads`, are compared with the trained strategy's heads and standardisers on random
images.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from . import __version__
from .errors import RunError, UsageError
from .export import CONFIG_FILE, ExportResult, check_format, export, load_student, read_config, student_folder
from .features import extract_features
from .heads import (
    HEAD_FORMAT,
    HEAD_FORMAT_VERSION,
    HEADS_FOLDER,
    RESAMPLE_RULE,
    load_heads,
    student_features,
    student_maps,
)
from .io import save_safetensors, write_json
from .recipe import Recipe, resolve_recipe
from .runtimes import TOLERANCE
from .strategies import Objective
from .strategies.agglomerate import Agglomerate, dense_prediction
from .teachers import Teacher, load_teacher
from .train.checkpoint import MODEL_FILE, find_checkpoint, saved_recipe

STRATEGY = Agglomerate.name


@dataclass
class HeadsExportResult:
    export: ExportResult  # the student, as `distillkit.export` wrote it
    heads: dict[str, dict[str, Path]]  # role -> {"weights": <role>.safetensors, "config": <role>.json}
    max_abs_diff: dict[str, float]  # role -> the written heads vs the trained strategy's (every path)


def export_heads(
    run_dir: str | Path,
    format: str = "safetensors",  # noqa: A002
    out: str | Path | None = None,
) -> HeadsExportResult:
    """Export the student of the agglomerate run `run_dir` as `distillkit.export` does, plus per teacher role
    `heads/<role>.safetensors` and `heads/<role>.json` (`distillkit.heads`). `out` defaults to
    `<student folder>-<format>-heads` beside the student. The run is checked and its objective built again before
    anything is written; the written heads are checked against the trained ones."""
    check_format(format)
    run_dir = Path(run_dir).expanduser()
    checkpoint = _checkpoint(run_dir)
    recipe = resolve_recipe(saved_recipe(checkpoint))
    if STRATEGY not in recipe.strategy:
        raise UsageError(
            f"--heads needs a run trained with strategy {STRATEGY}; this run used {'+'.join(recipe.strategy)}, "
            "which has no per-teacher adaptor heads"
        )
    source = student_folder(run_dir)
    config = read_config(source)
    student = load_student(source)
    weights = _checkpoint_weights(checkpoint)
    _check_same_student(student, weights, checkpoint, source)
    size = config["pretrained_cfg"]["input_size"][1]
    teachers = _run_teachers(recipe)
    strategy = _trained_strategy(recipe, teachers, student, size, weights, checkpoint)
    result = export(run_dir, format=format, out=out or source.parent / f"{source.name}-{format}-heads")
    folder = result.out_dir / HEADS_FOLDER
    student_info = {"architecture": config["architecture"], "input_size": size, "source": str(source)}
    files = {
        role: _write_head(strategy, role, teachers[role], student, student_info, folder) for role in strategy.roles
    }
    diffs = check_heads(strategy, student, folder, size)
    return HeadsExportResult(export=result, heads=files, max_abs_diff=diffs)


def _checkpoint(run_dir: Path) -> Path:
    checkpoint = find_checkpoint(run_dir)
    if checkpoint is not None:
        return checkpoint
    if (run_dir / CONFIG_FILE).is_file():
        raise UsageError(
            f"{run_dir} is an exported student, which holds no adaptor heads; --heads reads them from the "
            "checkpoint of the compress run it came from: pass that run folder"
        )
    raise UsageError(
        f"--heads needs a compress run folder: the adaptor heads are in its checkpoints/last, and {run_dir} "
        "holds no checkpoint"
    )


def _checkpoint_weights(checkpoint: Path) -> dict[str, Tensor]:
    from safetensors.torch import load_file

    if not (checkpoint / MODEL_FILE).is_file():
        raise UsageError(
            f"--heads reads the heads from {checkpoint / MODEL_FILE}, which this checkpoint does not have "
            "(FSDP and DeepSpeed write sharded states of their own)"
        )
    return load_file(str(checkpoint / MODEL_FILE), device="cpu")


def _check_same_student(student: nn.Module, weights: dict[str, Tensor], checkpoint: Path, source: Path) -> None:
    """The heads fit the student they were trained with: the checkpoint's student must be the exported one."""
    trained = {name[len("student.") :]: t for name, t in weights.items() if name.startswith("student.")}
    state = student.state_dict()
    if set(trained) != set(state) or not all(torch.equal(state[name], trained[name]) for name in state):
        raise UsageError(
            f"the checkpoint in {checkpoint} holds another state of the student than {source} (was the run "
            "resumed after its export and stopped before exporting again?); finish the run with "
            "`distillkit compress --resume --out RUN` so that its student and its heads belong together"
        )


def _run_teachers(recipe: Recipe) -> dict[str, Teacher]:
    """The run's teachers, loaded as training loaded them (`distillkit.run.Run.from_recipe`)."""
    return {
        role: load_teacher(
            t.name, t.weights, t.input_size, t.channels_last, variant=t.variant, arch=t.arch, precision=t.precision
        )
        for role, t in recipe.all_teachers().items()
    }


def _trained_strategy(
    recipe: Recipe,
    teachers: dict[str, Teacher],
    student: nn.Module,
    size: int,
    weights: dict[str, Tensor],
    checkpoint: Path,
) -> Agglomerate:
    """The run's objective built again (as `Run.from_recipe` builds it) with the checkpoint's weights; its
    agglomerate strategy."""
    objective = Objective.build(recipe.strategy, teachers, student, size)
    state = {name[len("objective.") :]: t for name, t in weights.items() if name.startswith("objective.")}
    missing, unexpected = objective.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise UsageError(
            f"the checkpoint in {checkpoint} does not match the objective its recipe builds "
            f"(missing {missing[:3]}, unexpected {unexpected[:3]}); it was written by another distillkit"
        )
    return objective.strategies[STRATEGY].eval()


def restore_as_linear(standardizer: nn.Module) -> tuple[Tensor, Tensor]:
    """(weight, bias) with standardizer.restore(y) = y @ weight^T + bias, read off the (affine) restore at 0
    and at the unit vectors, in float64; float32 results."""
    exact = copy.deepcopy(standardizer).double()
    with torch.no_grad():
        bias = exact.restore(torch.zeros(1, standardizer.out_dim, dtype=torch.float64))[0]
        weight = (exact.restore(torch.eye(standardizer.out_dim, dtype=torch.float64)) - bias).T
    return weight.float(), bias.float()


def _write_head(
    strategy: Agglomerate, role: str, teacher: Teacher, student: nn.Module, student_info: dict, folder: Path
) -> dict[str, Path]:
    """heads/<role>.safetensors and heads/<role>.json (the layout: `distillkit.heads`)."""
    restores = {name: restore_as_linear(s) for name, s in strategy.standardizers[role].items()}
    tensors, paths = {}, {}
    for path, (first, _, second) in strategy.heads[role].items():
        weight, bias = restores["summary" if path == "summary" else "dense"]
        for layer, (w, b) in {"fc1": (first.weight, first.bias), "fc2": (second.weight, second.bias)}.items():
            tensors[f"{path}.{layer}.weight"], tensors[f"{path}.{layer}.bias"] = w, b
        # the dense paths share their standardiser: copies, since safetensors refuses tensors that share memory
        tensors[f"{path}.restore.weight"], tensors[f"{path}.restore.bias"] = weight.clone(), bias.clone()
        paths[path] = {
            "in_dim": first.in_features,
            "hidden_dim": first.out_features,
            "out_dim": second.out_features,
            "teacher_dim": weight.shape[0],
        }
    dense = _dense_entries(strategy, role, student, student_info["input_size"], paths)
    config = {
        "format": HEAD_FORMAT,
        "version": HEAD_FORMAT_VERSION,
        "role": role,
        "teacher": teacher.describe(),
        "student": student_info,
        "standardize": strategy.config.standardize,
        "summary": paths["summary"],
        "dense": dense.pop("dense", None),
        "dense_stages": list(dense.values()),
        "distillkit_version": __version__,
    }
    files = {"weights": folder / f"{role}.safetensors", "config": folder / f"{role}.json"}
    save_safetensors(files["weights"], {k: v.float() for k, v in tensors.items()}, metadata={"format": "pt"})
    write_json(files["config"], config)
    return files


def _dense_entries(
    strategy: Agglomerate, role: str, student: nn.Module, size: int, paths: dict[str, dict]
) -> dict[str, dict]:
    """Head name -> its json entry, for every dense layer in ascending order ({} without dense heads): the
    layer, the path (but for the deepest, "dense"), the widths, the grids and the resampling rule."""
    request = type(strategy).student_request(strategy.config)
    with torch.no_grad():
        maps = strategy.student_maps(extract_features(student, torch.zeros(1, 3, size, size), request))
    entries = {}
    for layer, name in strategy.dense_head_names.items():
        where = {"layer": layer} if name == "dense" else {"layer": layer, "path": name}
        entries[name] = where | paths[name]
        entries[name] |= {
            "student_grid": list(maps[layer].shape[-2:]),
            "teacher_grid": list(strategy.grids[role]),
            "resample": RESAMPLE_RULE,
        }
    return entries


def check_heads(strategy: Agglomerate, student: nn.Module, folder: Path, size: int) -> dict[str, float]:
    """The largest |written - trained| of each role's heads, every path (the summary and each dense layer's),
    on random images (the student's features as training extracts them, and as `distillkit.heads.student_features`
    and `student_maps` give them); a RunError when not tiny."""
    loaded = load_heads(folder)
    images = torch.rand(3, 3, size, size, generator=torch.Generator().manual_seed(0))
    request = type(strategy).student_request(strategy.config)
    diffs = {}
    with torch.no_grad():
        features = extract_features(student, images, request)
        embedding, _ = student_features(student, images)
        maps = student_maps(student, images, strategy.dense_layers) if strategy.dense else {}
        for role in strategy.roles:
            expected, got = _trained_outputs(strategy, role, features), {"summary": loaded[role](embedding)}
            for layer, name in strategy.dense_head_names.items():
                got[name] = loaded[role].dense(maps[layer], layer)
            diffs[role] = max(_diff(got[path], expected[path], f"the {path} head of {role!r}") for path in expected)
    return diffs


def _trained_outputs(strategy: Agglomerate, role: str, features) -> dict[str, Tensor]:
    """The strategy's heads on the student's features, restored to the teacher's space (as `Agglomerate`
    predicts: each dense head on its layer's grid, resampled to the teacher's)."""
    heads, standardizers = strategy.heads[role], strategy.standardizers[role]
    outputs = {"summary": standardizers["summary"].restore(heads["summary"](features.embedding))}
    for layer, student_map in strategy.student_maps(features).items():
        name = strategy.dense_head_names[layer]
        prediction = dense_prediction(heads[name], student_map, strategy.grids[role])
        outputs[name] = standardizers["dense"].restore(prediction)
    return outputs


def _diff(got: Tensor, expected: Tensor, what: str) -> float:
    if got.shape != expected.shape:
        raise RunError(
            f"the written {what} gives shape {tuple(got.shape)}, the trained one {tuple(expected.shape)}; the "
            "export is wrong, please report it"
        )
    diff = (got - expected.float()).abs().max().item()
    if not diff <= TOLERANCE * max(1.0, expected.abs().max().item()):
        raise RunError(
            f"the written {what} differs from the trained one by up to {diff:.3g}; the export is wrong, please "
            "report it"
        )
    return diff
