"""The recipe: a typed description of one distillation run.

Sources, later ones winning: the schema defaults below <- a YAML recipe file (the embedded
`recipes/default.yaml` when none is given) <- CLI flags / API keyword arguments <- `--set a.b=value`.
Everything is validated before any model or data is loaded: an unknown key, a wrong type or a bad
value raises `UsageError` naming the key path and what is allowed.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Literal, Union

import yaml

from .errors import UsageError
from .registry import did_you_mean
from .roles import PRIMARY_TEACHER


@dataclass
class TeacherConfig:
    name: str = "efficientnet-lite0"
    weights: str | None = None  # a local checkpoint file; None = the teacher's default source
    input_size: int | None = None  # pixels; None = the teacher's own input size
    channels_last: bool = True
    variant: str | None = None  # network in a training checkpoint: momentum (MoCo), student (DINO), encoder (I-JEPA)
    arch: str | None = None  # timm architecture of a file:<path> teacher
    # the teacher's own autocast: auto = bf16 on GPUs that support it, fp32 on CPUs; features reach strategies in fp32
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    compile: bool = False  # run the teacher's feature extraction through torch.compile while training


@dataclass
class StudentConfig:
    name: str = "mobilenetv3"
    input_size: int | None = None  # pixels; None = the student spec's input size
    channels_last: bool | None = None  # None = the student spec's choice (True for conv nets)
    compile: bool = False  # run the student's forward through torch.compile while training
    pretrained: bool = False  # start from timm's pretrained weights (its Hub copy) instead of random init
    weights: str | None = None  # start from this weights file (a timm state dict of the student's architecture)
    # extra timm.create_model arguments over the spec's (e.g. {drop_path_rate: 0.1}; a ViT's {patch_size: 4, depth: 6})
    model_args: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class AugmentConfig:
    """Photometric augmentation of every view, after its crop and flip (see `data/augment.py`); the defaults
    turn everything off. SimCLR (Chen et al. 2020, appendix A) uses colour jitter of strength s
    (brightness / contrast / saturation 0.8 s, hue 0.2 s) with p 0.8, grayscale p 0.2 and, on ImageNet,
    Gaussian blur p 0.5 with sigma 0.1-2.0; BYOL (Grill et al. 2020) adds solarisation p 0.2 on one view."""

    jitter: float = 0.0  # probability that colour jitter applies to a view
    brightness: float = 0.0  # strength s: factor uniform in [max(0, 1 - s), 1 + s]; 0 = off
    contrast: float = 0.0  # strength s: factor uniform in [max(0, 1 - s), 1 + s]; 0 = off
    saturation: float = 0.0  # strength s: factor uniform in [max(0, 1 - s), 1 + s]; 0 = off
    hue: float = 0.0  # strength h <= 0.5: hue shift uniform in [-h, h] (of a full turn); 0 = off
    grayscale: float = 0.0  # probability of converting a view to grayscale
    blur: float = 0.0  # probability of a Gaussian blur
    blur_sigma: tuple[float, float] = (0.1, 2.0)  # blur sigma range in pixels of a 224 px view (scaled to the view)
    solarize: float = 0.0  # probability of solarisation (pixels >= 0.5 become 1 - x)

    def __post_init__(self) -> None:
        for name in ("jitter", "grayscale", "blur", "solarize"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise UsageError(f"data.augment.{name} must be a probability in [0, 1], got {value}")
        for name in ("brightness", "contrast", "saturation"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value >= 0.0):
                raise UsageError(f"data.augment.{name} must be a strength >= 0, got {value}")
        if not 0.0 <= self.hue <= 0.5:
            raise UsageError(f"data.augment.hue must be in [0, 0.5], got {self.hue}")
        low, high = self.blur_sigma
        if not (0.0 < low <= high and math.isfinite(high)):
            raise UsageError(f"data.augment.blur_sigma must satisfy 0 < low <= high, got {[low, high]}")


@dataclass
class DataConfig:
    source: str = "builtin:fashion-mnist"  # builtin:<name> or an image folder
    limit: int | None = None  # use only this many training images
    val_fraction: float = 0.1  # held-out share of an image folder that has no val/ or test/ folder
    load_size: int | None = None  # folder images are resized to this; None = 1.15 x the view size
    # DataLoader worker processes decoding images; auto = min(8, this process's share of the cores - 1), 0 when
    # that is below 1 and for in-memory builtin datasets (see data/loading.py); 0 = decode in the main process
    num_workers: int | Literal["auto"] = "auto"
    crop_scale: tuple[float, float] = (0.2, 1.0)  # RandomResizedCrop area range
    crop_ratio: tuple[float, float] = (0.75, 1.3333333)
    flip: float = 0.5  # horizontal flip probability
    view_size: int | None = None  # render every network's views at this size, each resizes them; None: see render
    # shared: one rendering at the largest network input, each network resizes it (the schema default; it
    # measured better on the uncached 2-epoch default of before, k-NN 76.0 vs 73.6 %); per_network: each
    # network's own size straight from the crop (one resampling; a student reading cached teacher outputs
    # renders only its own size: what recipes/default.yaml uses)
    render: Literal["shared", "per_network"] = "shared"
    max_bad_fraction: float = 0.01  # the run fails when more training images (rounded up to files) are unreadable
    # photometric augmentation of every view (colour jitter, grayscale, blur, solarize), off by default;
    # replayable like the crops, so cached teacher outputs, resumes and several processes agree
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    # K: epoch e renders the views of slot e mod K; None = new views every epoch; auto = enough slots for the
    # teacher to render an eighth of the images seen: max(1, min(epochs, round(images seen / (8 x images))))
    view_slots: int | Literal["auto"] | None = None
    # where the teachers' outputs on those views are cached: "auto" (the default) = in the user cache
    # ($DISTILLKIT_CACHE/teacher-outputs) whenever the run has more epochs than view slots, so the teacher
    # runs once per slot; a folder = always there (K = 4 unless set); null / --no-teacher-cache = never
    teacher_cache: str | None = "auto"
    cache_dtype: Literal["float16", "float32"] = "float16"  # how cached teacher outputs are stored
    # seed of the views' crops and flips; None = train.seed. Runs that differ only in train.seed but share a
    # view_seed see the same views, so they share one teacher-cache entry (e.g. a benchmark's seeds)
    view_seed: int | None = None


@dataclass
class TrainConfig:
    epochs: int = 1
    # the budget in images seen (optimiser steps x global batch x grad_accum); when set it decides the epochs, so a
    # smaller data source trains as long as a large one (more epochs of fewer images) and `epochs` is unused
    images: int | None = None
    max_steps: int | None = None  # stop after this many optimiser steps
    batch_size: int = 128  # global: summed over all processes
    lr: float = 0.05
    optimizer: Literal["sgd", "adamw"] = "sgd"
    momentum: float = 0.9
    weight_decay: float = 1e-4
    # null = constant; a value = cosine from weight_decay at the first step to this at the last (I-JEPA: 0.04 -> 0.4)
    weight_decay_end: float | None = None
    warmup_fraction: float = 0.05  # share of the steps spent in linear warm-up
    # micro-batches per optimiser step; null = what `accelerate launch` / `accelerate config` set
    # (ACCELERATE_GRADIENT_ACCUMULATION_STEPS), else 1. An explicit value contradicting that is refused
    grad_accum: int | None = None
    clip_grad: float | None = None  # max gradient norm; None = no clipping
    # auto = the mixed precision of `accelerate launch --mixed_precision` / `accelerate config`, else fp32;
    # an explicit value (here or --precision) wins. The run records the resolved value
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    seed: int = 0
    log_every: int = 10  # steps between JSONL metric lines
    checkpoint_every: int | None = 200  # optimiser steps between checkpoints (and one every epoch); None = epochs only
    deterministic: bool = False  # torch deterministic algorithms (exact resume / equivalence on CPU)
    sync_bn: bool = False  # synchronise BatchNorm statistics across processes (GPUs only)
    max_nonfinite_steps: int = 20  # consecutive non-finite losses before the run stops
    # experiment trackers, through Accelerate: tensorboard, wandb, mlflow (one name, a list, or comma-separated),
    # or all = every one of them that is installed; none by default. metrics.jsonl is written either way
    log_with: list[str] | str | None = None


@dataclass
class EvalConfig:
    enabled: bool = True
    knn_k: int = 20
    knn_temperature: float = 0.07
    probe_steps: int = 300  # full-batch optimisation steps of the linear probe
    max_train: int = 10000  # labelled training images used as k-NN bank / probe training set
    max_test: int = 10000  # held-out images scored
    latency_runs: int = 30
    # online k-NN at every epoch's end: a bank of N training images scored on N // 2 held-out ones; 0 = off
    online_images: int = 1000

    def __post_init__(self):  # checked with the recipe, before anything trains: not after an hour of training
        for key in ("knn_k", "probe_steps", "max_train", "max_test", "latency_runs"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise UsageError(
                    f"eval.{key} must be a whole number >= 1, got {value!r}"
                    + (" (eval.enabled=false turns evaluation off)" if value in (0, False) else "")
                )
        if not (isinstance(self.knn_temperature, (int, float)) and self.knn_temperature > 0):
            raise UsageError(f"eval.knn_temperature must be > 0, got {self.knn_temperature!r}")


@dataclass
class Recipe:
    # null only in pretraining recipes (`distillkit pretrain`), whose strategy is its own teacher
    teacher: TeacherConfig | None = field(default_factory=TeacherConfig)
    # more frozen teachers, by role (e.g. `mim: {name: mae-vitb}`), for strategies that read two at once
    teachers: dict[str, TeacherConfig] = field(default_factory=dict)
    student: StudentConfig = field(default_factory=StudentConfig)
    # strategy name -> its typed settings (the strategy's own Config dataclass, with `weight`)
    strategy: dict[str, Any] = field(default_factory=lambda: {"seed": {}})
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    out: str | None = None  # run directory; None = runs/<time>-<teacher>-<student>

    def to_dict(self) -> dict[str, Any]:
        return _plain(dataclasses.asdict(self))

    def all_teachers(self) -> dict[str, TeacherConfig]:
        """Every teacher by role, the primary `teacher` first (none for a pretraining recipe's null teacher)."""
        return ({PRIMARY_TEACHER: self.teacher} if self.teacher is not None else {}) | self.teachers


def _plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


# ----------------------------------------------------------------------------- recipe files


def recipes_dir() -> Path:
    """Where the shipped recipes are: inside the wheel, or at the top of a source checkout."""
    return _data_dir("recipes")


def _data_dir(name: str) -> Path:
    package = Path(__file__).resolve().parent
    for candidate in (package / name, package.parent / name):
        if candidate.is_dir():
            return candidate
    raise FileNotFoundError(f"distillkit's {name}/ folder is missing from the installation at {package}")


def list_recipes() -> list[str]:
    return sorted(p.stem for p in recipes_dir().glob("*.yaml"))


def find_recipe(name_or_path: str | Path) -> Path:
    path = Path(name_or_path)
    if path.is_file():
        return path
    shipped = recipes_dir() / f"{name_or_path}.yaml"
    if shipped.is_file():
        return shipped
    raise UsageError(
        f"recipe {str(name_or_path)!r} is neither a file nor a shipped recipe: "
        f"{did_you_mean(str(name_or_path), list_recipes())}"
    )


def read_yaml(path: Path) -> dict[str, Any]:
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        raise UsageError(f"cannot read recipe {path}: {e.strerror or e}") from None
    except UnicodeDecodeError:
        raise UsageError(f"recipe {path} is not a text (UTF-8 YAML) file") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise UsageError(f"recipe {path} is not valid YAML: {e}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise UsageError(f"recipe {path} must be a mapping of sections (teacher:, student:, ...)")
    return data


# ----------------------------------------------------------------------------- overrides


def parse_set(items: list[str] | dict[str, Any] | None) -> dict[str, Any]:
    """`["train.lr=0.1", "strategy.seed.queue_size=1024"]` -> {"train.lr": 0.1, ...}.

    Values are parsed as YAML scalars/flow collections (`0.1`, `true`, `null`, `[0.2, 1.0]`).
    """
    if items is None:
        return {}
    if isinstance(items, dict):
        for key, value in items.items():
            _check_full_path(str(key), str(value))
        return dict(items)
    parsed = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise UsageError(f"--set {item!r} must look like key.path=value, e.g. train.lr=0.1")
        _check_full_path(key.strip(), raw)
        try:
            parsed[key.strip()] = yaml.safe_load(raw) if raw.strip() else None
        except yaml.YAMLError:
            parsed[key.strip()] = raw
    return parsed


def _check_full_path(key: str, raw: str) -> None:
    """`lr=0.1` names no section: when the schema has keys ending in it (train.lr), say which."""
    if key.split(".")[0] in {f.name for f in fields(Recipe)}:
        return
    paths = _paths_ending_in(key, Recipe, "")
    if paths:
        hint = " or ".join(f"--set {path}={raw}" for path in paths)
        raise UsageError(f"--set {key}={raw}: recipe keys are full paths from their section; did you mean {hint}?")


def _paths_ending_in(key: str, cls: type, prefix: str) -> list[str]:
    """The schema's dotted keys (of its sections, not of strategies or extra teachers) that end in `key`."""
    hints, paths = typing.get_type_hints(cls), []
    for f in fields(cls):
        path = prefix + f.name
        optional = typing.get_origin(hints[f.name]) in (Union, types.UnionType)
        kinds = (hints[f.name], *(typing.get_args(hints[f.name]) if optional else ()))
        section = next((kind for kind in kinds if dataclasses.is_dataclass(kind)), None)
        if path.endswith("." + key):
            paths.append(path)
        elif section is not None:  # a section, or an optional one (teacher: null in pretraining recipes)
            paths += _paths_ending_in(key, section, path + ".")
    return paths


def apply_overrides(data: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """Set dotted keys in a nested dict (creating sections as needed)."""
    for dotted, value in overrides.items():
        parts = dotted.split(".")
        node = data
        for i, part in enumerate(parts[:-1]):
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            if not isinstance(child, dict):
                raise UsageError(f"cannot set {dotted!r}: {'.'.join(parts[: i + 1])} is not a section")
            node = child
        node[parts[-1]] = value
    return data


# ----------------------------------------------------------------------------- validation


def build_recipe(data: dict[str, Any]) -> Recipe:
    """Validate a nested dict against the schema and return a typed `Recipe`."""
    recipe = _build_dataclass(Recipe, data, "")
    recipe.strategy = _validate_strategies(recipe.strategy)
    recipe.train.log_with = check_log_with(recipe.train.log_with)
    _check_teacher_roles(recipe.teachers)
    return recipe


# the experiment trackers `train.log_with` may name; "all" means every one of them that is installed
TRACKERS = ("tensorboard", "wandb", "mlflow")


def check_log_with(value: list[str] | str | None) -> list[str]:
    """`train.log_with` as a list of tracker names, each once: from one name, comma-separated names or a list."""
    items = [] if value is None else [value] if isinstance(value, str) else value
    names = []
    for name in (part.strip() for item in items for part in item.split(",")):
        if name and name not in TRACKERS + ("all",):
            raise UsageError(
                f"train.log_with: unknown tracker {name!r}: {did_you_mean(name, [*TRACKERS, 'all'])} "
                "(all = every one of tensorboard, wandb and mlflow that is installed)"
            )
        if name and name not in names:
            names.append(name)
    return names


def _check_teacher_roles(teachers: dict[str, TeacherConfig]) -> None:
    if teachers:
        from torch import nn  # only for recipes with extra roles: the schema itself loads no torch

    for role in teachers:
        if role == PRIMARY_TEACHER:
            raise UsageError(
                f"teachers.{role}: the role {PRIMARY_TEACHER!r} is the `teacher:` section itself; "
                "give the extra teacher another role name, e.g. teachers.mim"
            )
        if not str(role).isidentifier():
            raise UsageError(
                f"teachers.{role}: a teacher role must be a plain name (letters, digits, _), e.g. mim or cl"
            )
        if hasattr(nn.Module, role) or role.startswith("_"):
            raise UsageError(
                f"teachers.{role}: {role!r} is reserved (the strategies keep one module per role, and torch "
                "modules already have an attribute of that name); name the role otherwise, e.g. mim or cl"
            )


def _build_dataclass(cls: type, data: Any, path: str) -> Any:
    if not isinstance(data, dict):
        raise UsageError(f"{path or 'recipe'} must be a mapping, got {_describe(data)}")
    hints = typing.get_type_hints(cls)
    known = {f.name: f for f in fields(cls)}
    prefix = f"{path}." if path else ""
    for key in data:
        if key not in known:
            suggestion = did_you_mean(prefix + str(key), [prefix + k for k in known])
            raise UsageError(f"unknown key {prefix + str(key)!r}: {suggestion}")
    for name, spec in known.items():
        required = spec.default is dataclasses.MISSING and spec.default_factory is dataclasses.MISSING
        if required and name not in data:
            raise UsageError(f"{path or 'recipe'} is missing the required key {name!r}")
    values = {}
    for name, value in data.items():
        values[name] = check_value(hints[name], value, f"{path}.{name}" if path else name)
    return cls(**values)


def check_value(hint: Any, value: Any, path: str) -> Any:
    """Check `value` against a type hint and return it converted (list->tuple, int->float)."""
    if dataclasses.is_dataclass(hint):
        return _build_dataclass(hint, value, path)
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in (a for a in args if a is not type(None)):
            try:
                return check_value(arg, value, path)
            except UsageError as e:
                errors.append(e)
        raise errors[0]
    if origin is Literal:
        if value not in args:
            raise UsageError(f"{path} = {value!r} is not allowed; choose one of {', '.join(map(str, args))}")
        return value
    if origin is tuple:
        if not isinstance(value, (list, tuple)) or len(value) != len(args):
            raise UsageError(f"{path} must be a list of {len(args)} values, got {_describe(value)}")
        return tuple(check_value(a, v, f"{path}[{i}]") for i, (a, v) in enumerate(zip(args, value)))
    if origin is dict:
        if not isinstance(value, dict):
            raise UsageError(f"{path} must be a mapping, got {_describe(value)}")
        if args and dataclasses.is_dataclass(args[1]):
            return {
                key: check_value(args[1], {} if item is None else item, f"{path}.{key}") for key, item in value.items()
            }
        return dict(value)
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise UsageError(f"{path} must be a list, got {_describe(value)}")
        return [check_value(args[0], v, f"{path}[{i}]") for i, v in enumerate(value)]
    if hint in (bool, int, float, str, Any):
        return _check_scalar(hint, value, path)
    raise TypeError(f"recipe schema uses an unsupported type {hint!r} at {path}")


def _check_scalar(hint: Any, value: Any, path: str) -> Any:
    """bool / int / float / str / Any: the value, a float converted from a number or its string."""
    if hint is bool:
        if not isinstance(value, bool):
            raise UsageError(f"{path} must be true or false, got {_describe(value)}")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise UsageError(f"{path} must be a whole number, got {_describe(value)}")
        return value
    if hint is float:
        if isinstance(value, str):
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise UsageError(f"{path} must be a number, got {_describe(value)}")
        if not math.isfinite(value):
            raise UsageError(f"{path} must be a finite number, got {value}")
        return float(value)
    if hint is str:
        if not isinstance(value, str):
            raise UsageError(f"{path} must be a string, got {_describe(value)}")
        return value
    return value


def _describe(value: Any) -> str:
    return f"{value!r} ({type(value).__name__})"


def _validate_strategies(section: dict[str, Any]) -> dict[str, Any]:
    """name -> settings dict (or Config) -> name -> the strategy's typed Config."""
    from .strategies import STRATEGIES

    if not section:
        raise UsageError(f"strategy must name at least one strategy; choose from {', '.join(STRATEGIES.names())}")
    validated = {}
    for name, settings in section.items():
        strategy_cls = STRATEGIES.get(name)
        settings = {} if settings is None else settings
        if dataclasses.is_dataclass(settings):
            settings = dataclasses.asdict(settings)
        validated[name] = _build_dataclass(strategy_cls.Config, settings, f"strategy.{name}")
    return validated


def check_ranges(recipe: Recipe) -> None:
    """Value checks the types alone cannot express."""
    positive = {
        "train.epochs": recipe.train.epochs,
        "train.batch_size": recipe.train.batch_size,
        "train.log_every": recipe.train.log_every,
        "train.max_nonfinite_steps": recipe.train.max_nonfinite_steps,
        "eval.knn_k": recipe.eval.knn_k,
        "eval.max_train": recipe.eval.max_train,
        "eval.max_test": recipe.eval.max_test,
    }
    for key, value in positive.items():
        if value < 1:
            raise UsageError(f"{key} must be at least 1, got {value}")
    if recipe.eval.online_images == 1 or recipe.eval.online_images < 0:
        raise UsageError(f"eval.online_images must be 0 (off) or at least 2, got {recipe.eval.online_images}")
    optional_positive = {
        "train.max_steps": recipe.train.max_steps,
        "train.images": recipe.train.images,
        "train.checkpoint_every": recipe.train.checkpoint_every,
        "train.grad_accum": recipe.train.grad_accum,
        "data.limit": recipe.data.limit,
        **{
            (f"teachers.{role}.input_size" if role != PRIMARY_TEACHER else "teacher.input_size"): t.input_size
            for role, t in recipe.all_teachers().items()
        },
        "student.input_size": recipe.student.input_size,
        "data.view_size": recipe.data.view_size,
        "data.view_slots": None if recipe.data.view_slots == "auto" else recipe.data.view_slots,
        "data.load_size": recipe.data.load_size,
    }
    if recipe.data.num_workers != "auto" and recipe.data.num_workers < 0:
        raise UsageError(f"data.num_workers must be auto or a whole number >= 0, got {recipe.data.num_workers}")
    for key, value in optional_positive.items():
        if value is not None and value < 1:
            raise UsageError(f"{key} must be a positive number or null, got {value}")
    for key in ("weight_decay", "weight_decay_end"):
        value = getattr(recipe.train, key)
        if value is not None and value < 0:
            raise UsageError(f"train.{key} must be 0 or more, got {value}")
    if recipe.train.lr <= 0:
        raise UsageError(f"train.lr must be positive, got {recipe.train.lr}")
    if not 0.0 <= recipe.train.warmup_fraction < 1.0:
        raise UsageError(f"train.warmup_fraction must be in [0, 1), got {recipe.train.warmup_fraction}")
    if not 0.0 < recipe.data.val_fraction < 1.0:
        raise UsageError(f"data.val_fraction must be in (0, 1), got {recipe.data.val_fraction}")
    if not 0.0 <= recipe.data.max_bad_fraction <= 1.0:
        raise UsageError(f"data.max_bad_fraction must be in [0, 1], got {recipe.data.max_bad_fraction}")
    if not 0.0 <= recipe.data.flip <= 1.0:
        raise UsageError(f"data.flip must be a probability in [0, 1], got {recipe.data.flip}")
    low, high = recipe.data.crop_scale
    if not 0.0 < low <= high <= 1.0:
        raise UsageError(f"data.crop_scale must satisfy 0 < low <= high <= 1, got {[low, high]}")
    low, high = recipe.data.crop_ratio
    if not 0.0 < low <= high:
        raise UsageError(f"data.crop_ratio must satisfy 0 < low <= high, got {[low, high]}")
    if recipe.train.clip_grad is not None and recipe.train.clip_grad <= 0:
        raise UsageError(f"train.clip_grad must be positive or null, got {recipe.train.clip_grad}")


# ----------------------------------------------------------------------------- one entry point

# CLI flag / API keyword -> dotted recipe key. The CLI and `compress()` share this table.
OPTION_KEYS = {
    "teacher": "teacher.name",
    "teacher_weights": "teacher.weights",
    "arch": "teacher.arch",
    "student": "student.name",
    "student_weights": "student.weights",
    "data": "data.source",
    "epochs": "train.epochs",
    "max_steps": "train.max_steps",
    "limit": "data.limit",
    "batch_size": "train.batch_size",
    "lr": "train.lr",
    "out": "out",
    "seed": "train.seed",
    "precision": "train.precision",
    "teacher_cache": "data.teacher_cache",
    "log_with": "train.log_with",
}


def default_values(keys: list[str]) -> dict[str, Any]:
    """Dotted key -> its value in the embedded default recipe (recipes/default.yaml, else the schema's default),
    read without validating the recipe, which would import the strategies: for `distillkit compress --help`."""
    recipe, schema, values = read_yaml(find_recipe("default")), Recipe(), {}
    for key in keys:
        node, default = recipe, schema
        for part in key.split("."):
            node = node.get(part, dataclasses.MISSING) if isinstance(node, dict) else dataclasses.MISSING
            default = getattr(default, part, None)
        values[key] = default if node is dataclasses.MISSING else node
    return values


def resolve_recipe(
    recipe: str | Path | dict[str, Any] | Recipe | None = None,
    options: dict[str, Any] | None = None,
    strategy: str | None = None,
    overrides: list[str] | dict[str, Any] | None = None,
) -> Recipe:
    """Merge a recipe source, explicit options and `--set` overrides into a validated `Recipe`.

    `strategy` ("seed", or "seed+hidden" for several) replaces the recipe's strategy section,
    keeping the recipe's settings for strategies it already configures.
    """
    if isinstance(recipe, Recipe):
        data = recipe.to_dict()
    elif isinstance(recipe, dict):
        data = _plain(dict(recipe))
    else:
        data = read_yaml(find_recipe(recipe if recipe is not None else "default"))
    for option, value in (options or {}).items():
        if value is not None:
            data = apply_overrides(data, {OPTION_KEYS[option]: str(value) if isinstance(value, Path) else value})
    if (options or {}).get("epochs") is not None:  # --epochs is the budget the user asked for
        data = apply_overrides(data, {"train.images": None})
    if strategy is not None:
        names = [n.strip() for n in strategy.split("+") if n.strip()]
        if not names:
            raise UsageError(f"--strategy {strategy!r} names no strategy; e.g. --strategy seed")
        old = data.get("strategy") or {}
        data["strategy"] = {n: (old.get(n) or {}) if isinstance(old, dict) else {} for n in names}
    data = apply_overrides(data, parse_set(overrides))
    built = build_recipe(data)
    check_ranges(built)
    return built


def recipe_to_yaml(recipe: Recipe) -> str:
    return yaml.safe_dump(recipe.to_dict(), sort_keys=False)
