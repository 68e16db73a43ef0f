"""The self-supervised zoo: MAE, MoCo v2, MoCo v3, DINO and Bootleg teachers.

Each name fixes a timm architecture, the checkpoint layouts it accepts and its official file. Without
--teacher-weights the official file is downloaded once into the cache (online) or the error names it
(offline). The networks load strictly; MoCo teachers keep their MLP projector as the projection head.
Test suites shrink the networks with `load_teacher(..., model_kwargs=dict(depth=2, ...))`.
"""

from __future__ import annotations

from pathlib import Path

from torch import nn

from ..errors import UsageError
from ..inputs import InputConfig
from .build import create_backbone, load_backbone, random_model
from .checkpoint import read_checkpoint
from .download import fetch_weights
from .formats import FORMAT_NAMES, Extracted, extract
from .guess import guess_teacher
from .heads import mlp_head
from .spec import RANDOM_WEIGHTS, TEACHERS, BuildOptions, Built, TeacherSpec

FAIR = "https://dl.fbaipublicfiles.com"
CC_BY_NC = "CC-BY-NC-4.0"
GAP_VIT = {"class_token": False, "global_pool": "avg", "fc_norm": False}  # I-JEPA-style: no class token

LAYOUTS = {
    "mae": "MAE's mae_pretrain_vit_*.pth ({'model': encoder}), a *_full.pth / mae_visualize_*.pth file with "
    "its decoder, or a plain timm state dict",
    "moco-v2": "MoCo v2's moco_v2_*ep_pretrain.pth.tar ({'state_dict': module.encoder_q. ...}) or a plain "
    "timm state dict (projection head under fc.)",
    "moco-v3": "MoCo v3's {vit-s,vit-b,r-50}-*ep.pth.tar ({'state_dict': module.base_encoder. ...}) or a plain "
    "timm state dict (projection head under head. / fc.)",
    "dino": "DINO's dino_*_pretrain.pth (a plain state dict) or *_full_checkpoint.pth ({'teacher', 'student', ...})",
    "bootleg": "an I-JEPA-layout training checkpoint ({'encoder', 'predictor', 'target_encoder', ...}, keys "
    "prefixed module.; target_encoder is used, --set teacher.variant=encoder picks the context "
    "encoder) or a plain timm state dict of {arch} built with class_token=False, global_pool='avg', "
    "fc_norm=False",
}


def build_ssl_teacher(spec: TeacherSpec, options: BuildOptions) -> Built:
    """Build a zoo teacher from `options.weights`, the cached / downloaded official file, or random init."""
    size = options.input_size or spec.input_size
    kwargs = {"num_classes": 0, **spec.model_kwargs, **options.model_kwargs}
    input_config = InputConfig((size, size), spec.mean, spec.std)
    if options.weights == RANDOM_WEIGHTS:
        model = random_model(spec.architecture, size, spec.is_vit, kwargs)
        return Built(model, None, "random init (smoke tests only)", input_config)
    path = Path(options.weights).expanduser() if options.weights else _official_file(spec)
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
    return Built(model, head, describe_source(path, extracted), input_config)


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


def describe_source(path: Path, extracted: Extracted) -> str:
    variant = f", {extracted.variant} network" if extracted.variant else ""
    return f"file {path} ({extracted.format_name}{variant})"


def _official_file(spec: TeacherSpec) -> Path:
    if spec.url is None:
        raise UsageError(
            f"teacher {spec.name}: no public checkpoint is known (the Bootleg paper, arXiv 2603.15553, released "
            f"none). Pass your own with --teacher-weights FILE: {spec.layout}"
        )
    return fetch_weights(spec.url, f"teacher {spec.name}", sha256=spec.sha256)


def _wrong_format(spec: TeacherSpec, path: Path, extracted: Extracted) -> str:
    accepted = " or ".join(FORMAT_NAMES[k] for k in spec.formats if k != "state-dict")
    guess = guess_teacher(extracted.kind, extracted.backbone)
    return (
        f"{path} is a {extracted.format_name}, not a checkpoint of teacher {spec.name} (which takes a "
        f"{accepted}, or a plain state dict)" + (f"; {guess}" if guess else "")
    )


def _register(name: str, architecture: str, family: str, description: str, **fields) -> None:
    url = fields.get("url")
    source = "official download, or a file" if url else "your file only (none public)"
    TEACHERS.register(
        name,
        TeacherSpec(
            name=name,
            architecture=architecture,
            weights_source=source,
            description=description,
            build=build_ssl_teacher,
            layout=LAYOUTS[family].replace("{arch}", architecture),
            **fields,
        ),
    )


for _size, _arch, _vit, _dim, _params in (
    ("b", "vit_base_patch16_224", "ViT-B/16", 768, 86),
    ("l", "vit_large_patch16_224", "ViT-L/16", 1024, 304),
    ("h", "vit_huge_patch14_224", "ViT-H/14", 1280, 632),
):
    _long = {"b": "base", "l": "large", "h": "huge"}[_size]
    _register(
        f"mae-vit{_size}",
        _arch,
        "mae",
        f"MAE {_vit} encoder (He et al. 2022), ImageNet-1k self-supervised, {_params}M params; timm hub: {_arch}.mae",
        embed_dim=_dim,
        url=f"{FAIR}/mae/pretrain/mae_pretrain_vit_{_long}.pth",
        license=CC_BY_NC,
        formats=("mae-full", "state-dict"),
        is_vit=True,
    )

_register(
    "moco-v2-r50",
    "resnet50",
    "moco-v2",
    "MoCo v2 ResNet-50, 800 epochs, with its projection head Linear(2048, 2048) - ReLU - Linear(2048, 128)",
    embed_dim=2048,
    projection_dim=128,
    license=CC_BY_NC,
    url=f"{FAIR}/moco/moco_checkpoints/moco_v2_800ep/moco_v2_800ep_pretrain.pth.tar",
    formats=("moco-v2", "state-dict"),
    head_prefix="fc.",
)
_register(
    "moco-v3-vits",
    "vit_small_patch16_224",
    "moco-v3",
    "MoCo v3 ViT-S/16 with 12 heads (not timm's 6), 300 epochs, with its 3-layer projector (4096 hidden, 256 out)",
    embed_dim=384,
    projection_dim=256,
    license=CC_BY_NC,
    url=f"{FAIR}/moco-v3/vit-s-300ep/vit-s-300ep.pth.tar",
    formats=("moco-v3", "state-dict"),
    head_prefix="head.",
    model_kwargs={"num_heads": 12},
    is_vit=True,
)
_register(
    "moco-v3-vitb",
    "vit_base_patch16_224",
    "moco-v3",
    "MoCo v3 ViT-B/16, 300 epochs, with its 3-layer projector (4096 hidden, 256 out)",
    embed_dim=768,
    projection_dim=256,
    license=CC_BY_NC,
    url=f"{FAIR}/moco-v3/vit-b-300ep/vit-b-300ep.pth.tar",
    formats=("moco-v3", "state-dict"),
    head_prefix="head.",
    is_vit=True,
)
_register(
    "moco-v3-r50",
    "resnet50",
    "moco-v3",
    "MoCo v3 ResNet-50, 1000 epochs, with its 2-layer projector (4096 hidden, 256 out)",
    embed_dim=2048,
    projection_dim=256,
    license=CC_BY_NC,
    url=f"{FAIR}/moco-v3/r-50-1000ep/r-50-1000ep.pth.tar",
    formats=("moco-v3", "state-dict"),
    head_prefix="fc.",
)
for _name, _arch, _vit, _dim, _file in (
    ("dino-vits16", "vit_small_patch16_224", "ViT-S/16", 384, "dino_deitsmall16_pretrain"),
    ("dino-vitb16", "vit_base_patch16_224", "ViT-B/16", 768, "dino_vitbase16_pretrain"),
    ("dino-vitb8", "vit_base_patch8_224", "ViT-B/8", 768, "dino_vitbase8_pretrain"),
):
    _register(
        _name,
        _arch,
        "dino",
        f"DINO {_vit} teacher backbone (Caron et al. 2021), ImageNet-1k self-supervised; timm hub: {_arch}.dino",
        embed_dim=_dim,
        license="Apache-2.0",
        url=f"{FAIR}/dino/{_file}/{_file}.pth",
        formats=("dino-full", "state-dict"),
        is_vit=True,
    )
for _size, _arch, _dim in (
    ("s", "vit_small_patch16_224", 384),
    ("b", "vit_base_patch16_224", 768),
    ("l", "vit_large_patch16_224", 1024),
):
    _register(
        f"bootleg-vit{_size}",
        _arch,
        "bootleg",
        f"Bootleg (hidden-layer self-distillation, I-JEPA family) "
        f"ViT-{_size.upper()}/16, no class token, average-pooled; bring your own checkpoint",
        embed_dim=_dim,
        formats=("ijepa", "state-dict"),
        model_kwargs=GAP_VIT,
        is_vit=True,
    )
