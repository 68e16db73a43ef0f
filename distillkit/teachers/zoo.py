"""Teacher names and `load_teacher`.

    <zoo name>           a named teacher (`distillkit list teachers`): efficientnet-lite0, mae-*, moco-*,
                         dino-*, bootleg (any ViT, read from the file), bootleg-*; see catalog.py
    timm:<name>          any timm model; hub weights, or --teacher-weights FILE
    file:<path>          any checkpoint file, with --arch <timm model name> for its architecture

Files of a known self-supervised layout (MoCo, DINO, I-JEPA, MAE; formats.py) are unpacked the same
way for every kind of name, `teacher.variant` choosing the network inside.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

import timm
import torch
from torch import nn

from ..errors import UsageError
from ..hub import create_pretrained
from ..inputs import InputConfig
from ..registry import did_you_mean
from .base import Teacher
from .build import create_backbone, fit_input_size, load_backbone, random_model
from .catalog import GAP_VIT  # importing the catalog registers the zoo
from .checkpoint import read_checkpoint
from .families import describe_source, projection_head
from .formats import VARIANTS, describe_variants, extract
from .lite0 import convert_lite_package_layout  # noqa: F401 - a public helper
from .spec import IMAGENET_MEAN, IMAGENET_STD, RANDOM_WEIGHTS, TEACHERS, BuildOptions, Built, TeacherSpec

__all__ = ["RANDOM_WEIGHTS", "TEACHERS", "TeacherSpec", "check_teacher_name", "list_teachers", "load_teacher"]


def list_teachers() -> list[str]:
    return TEACHERS.names() + ["timm:<model name>", "file:<path>"]


def load_teacher(
    name: str,
    weights: str | Path | None = None,
    input_size: int | None = None,
    channels_last: bool = True,
    variant: str | None = None,
    arch: str | None = None,
    model_kwargs: Mapping[str, Any] | None = None,
    precision: str = "auto",
    compile: bool = False,
    fold_norms: bool = True,
) -> Teacher:
    """A frozen teacher by zoo name, `timm:<model>` or `file:<path>` (with `arch`, a timm model name).

    `weights` is a local file (always works offline); `variant` picks the network inside a training
    checkpoint that holds several ("momentum", "student", "encoder"); `model_kwargs` are extra
    `timm.create_model` arguments (tests use them to shrink a family: dict(depth=2, embed_dim=64)).
    `precision` (auto | fp32 | bf16) is the teacher's own autocast; `compile` runs training's feature
    extraction through torch.compile; `fold_norms` folds its batch norms into the convolutions before them
    (`norm_folding`: the same outputs up to float rounding, faster); False keeps the network as loaded.
    """
    weights = str(weights) if weights is not None else None
    check_teacher_name(name, variant=variant, arch=arch, weights=weights)
    options = BuildOptions(
        weights=weights, input_size=input_size, variant=variant, model_kwargs=dict(model_kwargs or {})
    )
    if name.startswith("timm:"):
        built = _build_timm(name[len("timm:") :], options)
    elif name.startswith("file:"):
        built = build_from_file(name, arch, Path(name[len("file:") :]).expanduser(), options)
    else:
        spec = TEACHERS.get(name)
        built = spec.build(spec, options)
    model = built.model.eval()
    _check_finite(model, built.head, built.source)
    input_config = built.input_config or _input_config(model, input_size)
    return Teacher(
        name,
        model,
        input_config,
        built.source,
        built.head,
        channels_last,
        precision=precision,
        compile=compile,
        fold_norms=fold_norms,
    )


def _check_finite(model, head, source: str) -> None:
    """NaN or inf in a teacher's weights would train every step on non-finite targets: refuse them here."""

    for module_name, module in (("", model), ("head.", head)):
        if module is None:
            continue
        for name, tensor in list(module.named_parameters()) + list(module.named_buffers()):
            if tensor.is_floating_point() and not torch.isfinite(tensor).all():
                bad = int((~torch.isfinite(tensor)).sum())
                raise UsageError(
                    f"the teacher's weights ({source}) hold {bad} non-finite values (NaN or inf) in "
                    f"{module_name}{name}: the file is damaged or was saved from a diverged run; "
                    "use another checkpoint"
                )


def _unknown_teacher_hint(name: str) -> str:
    """The zoo names close to `name`, after the prefix that would make it work when it is a timm model's name
    or a file."""
    hint = did_you_mean(name, TEACHERS.names() + ["timm:<model name>", "file:<path>"])
    if timm.is_model(name):
        return f"{name!r} is a timm model: use 'timm:{name}'; or {hint}"
    if Path(name).expanduser().is_file():
        return f"{name!r} is a file: use 'file:{name}' with --arch and the timm architecture its weights fit; or {hint}"
    return hint


def check_teacher_name(
    name: str, variant: str | None = None, arch: str | None = None, weights: str | Path | None = None
) -> None:
    """Reject an unknown name, a misplaced --arch or variant, before anything loads."""
    if name.startswith("timm:"):
        _check_timm_name(name[len("timm:") :], f"teacher {name!r}")
        if arch is not None:
            raise UsageError(f"--arch is for file:<path> teachers; teacher {name} names its architecture already")
        return
    if name.startswith("file:"):
        _check_file_teacher(name[len("file:") :], arch, weights)
        return
    if name not in TEACHERS:
        raise UsageError(f"unknown teacher {name!r}: {_unknown_teacher_hint(name)}")
    spec = TEACHERS.get(name)
    if arch is not None:
        raise UsageError(
            f"--arch is for file:<path> teachers; teacher {name} is timm's {spec.architecture}. "
            f"For another architecture use --teacher file:PATH --arch {arch}"
        )
    if variant is not None:
        kinds = [kind for kind in spec.formats if kind in VARIANTS]
        if not kinds:
            raise UsageError(f"teacher {name} has no variants (teacher.variant {variant!r}); drop teacher.variant")
        if variant not in VARIANTS[kinds[0]]:
            raise UsageError(
                f"teacher.variant {variant!r} does not exist for teacher {name}; choose one of "
                f"{describe_variants(kinds[0])}"
            )


def _check_timm_name(timm_name: str, what: str) -> None:
    """A timm model name, with an optional pretrained tag that must exist, or `hf-hub:<owner>/<repo>`."""
    if timm_name.startswith("hf-hub:"):
        repo = timm_name[len("hf-hub:") :]
        if repo.count("/") != 1 or not all(repo.split("/")):
            raise UsageError(
                f"{what}: hf-hub:<owner>/<repository> names a Hub repository, e.g. "
                f"hf-hub:timm/vit_small_patch14_dinov2.lvd142m; got {timm_name!r}"
            )
        return
    arch, _, tag = timm_name.partition(".")
    if not arch or not timm.is_model(arch):
        raise UsageError(f"unknown timm model {timm_name!r} in {what}: {did_you_mean(timm_name, timm.list_models())}")
    if tag and timm_name not in timm.list_pretrained(timm_name):
        tags = [name.partition(".")[2] for name in timm.list_pretrained(f"{arch}.*")]
        known = f"its tags: {', '.join(tags)}" if tags else "it has no pretrained weights in timm"
        raise UsageError(f"timm has no weights tagged {tag!r} for {arch} ({what}); {known}")


def _check_file_teacher(path: str, arch: str | None, weights: str | Path | None) -> None:
    if not path:
        raise UsageError("teacher file: needs a path: --teacher file:PATH --arch TIMM_MODEL_NAME")
    if arch is None:
        raise UsageError(
            f"teacher file:{path} needs the timm architecture its weights fit: pass --arch NAME "
            '(e.g. --arch vit_small_patch16_224; `python -c "import timm; print(timm.list_models())"` '
            "lists them). Files of a zoo teacher load by its name instead: see `distillkit list teachers`"
        )
    _check_timm_name(arch, f"--arch of teacher file:{path}")
    if weights is not None and Path(weights).expanduser() != Path(path).expanduser():
        raise UsageError(f"teacher file:{path} names its weights already; drop --teacher-weights {weights}")
    if not Path(path).expanduser().exists():
        raise UsageError(f"checkpoint {path} (teacher file:{path}) does not exist; check the path")


def _input_config(model: nn.Module, input_size: int | None) -> InputConfig:
    cfg = timm.data.resolve_data_config({}, model=model)
    size = (input_size, input_size) if input_size else tuple(cfg["input_size"][1:])
    return InputConfig(size=size, mean=tuple(cfg["mean"]), std=tuple(cfg["std"]))


# ----------------------------------------------------------------------------- timm:<name>, file:<path>


def _build_timm(timm_name: str, options: BuildOptions) -> Built:
    if options.weights == RANDOM_WEIGHTS:
        return Built(
            random_model(timm_name, options.input_size, kwargs=options.model_kwargs),
            None,
            "random init (smoke tests only)",
        )
    if options.weights is not None:
        return build_from_file(f"timm:{timm_name}", timm_name, Path(options.weights).expanduser(), options)
    if options.variant is not None:
        raise UsageError(
            f"teacher.variant {options.variant!r} picks a network inside a training checkpoint; "
            f"pass that file with --teacher-weights FILE"
        )
    hint = (
        f"Download the weights on a machine with internet (e.g. timm.create_model('{timm_name}', "
        "pretrained=True) and save its state_dict as .safetensors), then pass --teacher-weights FILE."
    )
    model = create_pretrained(timm_name, f"teacher timm:{timm_name}", hint, **options.model_kwargs)
    fit_input_size(model, options.input_size)
    return Built(model, None, f"timm hub ({timm_name})")


def build_from_file(teacher: str, arch: str, path: Path, options: BuildOptions) -> Built:
    """Any timm architecture from a checkpoint file, in any layout formats.py knows.

    Self-supervised layouts get ImageNet mean/std and keep a MoCo projector as projection head; a
    file without a class token (I-JEPA / Bootleg) gets a class-token-free, average-pooled ViT; a plain
    state dict keeps its classifier (num_classes read from it) and timm's input config for `arch`.
    """
    extracted = extract(read_checkpoint(path), path, options.variant)
    kwargs: dict[str, Any] = {}
    if extracted.kind == "ijepa" or _is_gap_vit(arch, extracted.backbone):
        kwargs.update(GAP_VIT)
    kwargs["num_classes"] = _classifier_width(arch, extracted.backbone) if extracted.kind == "state-dict" else 0
    kwargs.update(options.model_kwargs)
    model = create_backbone(arch, options.input_size, False, kwargs)
    load_backbone(
        model,
        extracted,
        f"teacher weights {path}",
        teacher,
        fallback_hint=f"the file must be a state dict of timm's {arch!r}",
    )
    head = projection_head(extracted, model, path)
    input_config = None
    if extracted.kind != "state-dict":
        size = options.input_size or model.pretrained_cfg.get("input_size", (3, 224, 224))[-1]
        input_config = InputConfig((size, size), IMAGENET_MEAN, IMAGENET_STD)
    return Built(model, head, describe_source(path, extracted), input_config)


def _is_gap_vit(arch: str, state: dict) -> bool:
    """A timm VisionTransformer architecture and a ViT state dict without a class token."""
    vit_keys = "patch_embed.proj.weight" in state and "pos_embed" in state and "cls_token" not in state
    return vit_keys and arch.split(".")[0] in timm.list_models(module="vision_transformer")


def _classifier_width(arch: str, state: dict) -> int:
    """num_classes of the classifier in `state` (0 when it has none)."""
    for key in _classifier_keys(arch):
        weight = state.get(f"{key}.weight")
        if weight is not None and weight.ndim == 2:
            return weight.shape[0]
    return 0


def _classifier_keys(timm_name: str) -> list[str]:
    cfg = timm.models.get_pretrained_cfg(timm_name.split(".")[0]) if "." not in timm_name else None
    cfg = cfg or timm.models.get_pretrained_cfg(timm_name)
    classifier = getattr(cfg, "classifier", None) or "head"
    return [classifier] if isinstance(classifier, str) else list(classifier)
