"""The self-supervised zoo: MAE, MoCo v2, MoCo v3, DINO and Bootleg teachers.

Each name fixes a timm architecture, the checkpoint layouts it accepts and its official file. Without
--teacher-weights, MAE and DINO load timm's copy on the Hugging Face Hub (`<arch>.mae`, `<arch>.dino`: the
same tensors as the official file) when it is in the Hugging Face cache or the Hub answers, otherwise the
official file, downloaded once into distillkit's cache; offline, the error names both and the flag.
The networks load strictly; MoCo teachers keep their MLP projector as the projection head.
Test suites shrink the networks with `load_teacher(..., model_kwargs=dict(depth=2, ...))`.
"""

from __future__ import annotations

from pathlib import Path

from torch import nn

from ..errors import UsageError
from ..hub import HubUnavailable, hub_repo, hub_weights
from ..inputs import InputConfig
from .build import create_backbone, load_backbone, random_model
from .checkpoint import read_checkpoint
from .download import cached_path, fetch_weights
from .formats import FORMAT_NAMES, Extracted, extract
from .guess import guess_teacher
from .heads import mlp_head
from .spec import RANDOM_WEIGHTS, BuildOptions, Built, TeacherSpec


def build_ssl_teacher(spec: TeacherSpec, options: BuildOptions) -> Built:
    """Build a zoo teacher from `options.weights`, the cached / downloaded official file, or random init."""
    size = options.input_size or spec.input_size
    kwargs = {"num_classes": 0, **spec.model_kwargs, **options.model_kwargs}
    input_config = InputConfig((size, size), spec.mean, spec.std)
    if options.weights == RANDOM_WEIGHTS:
        model = random_model(spec.architecture, size, spec.is_vit, kwargs)
        return Built(model, None, "random init (smoke tests only)", input_config)
    path = Path(options.weights).expanduser() if options.weights else _weights_file(spec)
    extracted = extract(read_checkpoint(path), path, options.variant, spec.head_prefix)
    if extracted.kind not in spec.formats:
        raise UsageError(_wrong_format(spec, path, extracted))
    model = create_backbone(spec.architecture, size, spec.is_vit, kwargs)
    load_backbone(
        model,
        extracted,
        f"teacher weights {path}",
        spec.name,
        fallback_hint=f"{spec.name} takes {spec.layout}, of timm's {spec.architecture}",
    )
    head = projection_head(extracted, model, path) if spec.head_prefix else None
    source = describe_source(path, extracted, official=not options.weights)
    return Built(model, head, source, input_config)


def projection_head(extracted: Extracted, model: nn.Module, path: Path) -> nn.Module | None:
    """The checkpoint's MLP projector, checked to take the backbone's pooled embedding."""
    if not extracted.head:
        return None
    head = mlp_head(extracted.head, path)
    first = next((m for m in head if isinstance(m, nn.Linear)), None)
    if first is None:
        raise UsageError(f"{path}: the projection head holds no Linear layer; the file is damaged")
    if first.in_features != model.num_features:
        raise UsageError(
            f"{path}: the projection head takes {first.in_features}-d inputs but the backbone "
            f"gives {model.num_features}-d embeddings; the file mixes two networks"
        )
    return head


def describe_source(path: Path, extracted: Extracted, official: bool = False) -> str:
    """Where a teacher's weights came from: "file PATH (layout)", or "official file ..." for the zoo's own
    download (the model card gives the zoo's licence to those only)."""
    variant = f", {extracted.variant} network" if extracted.variant else ""
    return f"{'official file' if official else 'file'} {path} ({extracted.format_name}{variant})"


def _weights_file(spec: TeacherSpec) -> Path:
    """The official file when distillkit's cache holds it, else timm's Hub copy (cached, or the Hub answers),
    else the official file downloaded."""
    if spec.url is None:
        raise UsageError(
            f"teacher {spec.name}: no public checkpoint is known (the Bootleg paper, arXiv 2603.15553, released "
            f"none). Pass your own with --teacher-weights FILE: {spec.layout}"
        )
    hub_problem = None
    if spec.hub is not None and not cached_path(spec.url).is_file():
        repo = hub_repo(spec.hub)
        try:
            return hub_weights(repo)
        except HubUnavailable as e:
            hub_problem = f"its Hugging Face Hub copy {repo} could not be used either: {e}"
    try:
        return fetch_weights(spec.url, f"teacher {spec.name}", sha256=spec.sha256)
    except UsageError as e:
        if hub_problem is None:
            raise
        raise UsageError(f"{e} ({hub_problem})") from None


def _wrong_format(spec: TeacherSpec, path: Path, extracted: Extracted) -> str:
    accepted = " or ".join(FORMAT_NAMES[k] for k in spec.formats if k != "state-dict")
    guess = guess_teacher(extracted.kind, extracted.backbone)
    return (
        f"{path} is a {extracted.format_name}, not a checkpoint of teacher {spec.name} (which takes a "
        f"{accepted}, or a plain state dict)" + (f"; {guess}" if guess else "")
    )
