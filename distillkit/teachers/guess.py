"""Guessing which zoo teacher a checkpoint belongs to, for hints in error reports.

The guess combines the file's layout (MoCo, DINO, I-JEPA, MAE prefixes) with the network's shape read
from its tensors: ViT width, patch size, class token; ResNet-50 blocks. An I-JEPA-layout ViT of another size is
the `bootleg` teacher's, which reads any size from the file. Attention heads cannot be read
from weights, which is why a MoCo v3 ViT-S (12 heads) is told apart from a DINO ViT-S (6 heads) by
its layout only.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from .checkpoint import StateDict

# (layout kind, network) -> zoo name; layout None = any layout whose own entry is missing.
_ZOO = {
    ("moco-v2", "resnet50"): "moco-v2-r50",
    ("moco-v3", "resnet50"): "moco-v3-r50",
    ("moco-v3", "vit-s/16"): "moco-v3-vits",
    ("moco-v3", "vit-b/16"): "moco-v3-vitb",
    ("dino-full", "vit-s/16"): "dino-vits16",
    ("dino-full", "vit-b/16"): "dino-vitb16",
    ("dino-full", "vit-b/8"): "dino-vitb8",
    ("mae-full", "vit-b/16"): "mae-vitb",
    ("mae-full", "vit-l/16"): "mae-vitl",
    ("mae-full", "vit-h/14"): "mae-vith",
    ("ijepa", "vit-s/16 gap"): "bootleg-vits",
    ("ijepa", "vit-b/16 gap"): "bootleg-vitb",
    ("ijepa", "vit-l/16 gap"): "bootleg-vitl",
    (None, "vit-s/16"): "dino-vits16",
    (None, "vit-b/16"): "mae-vitb or dino-vitb16",
    (None, "vit-b/8"): "dino-vitb8",
    (None, "vit-l/16"): "mae-vitl",
    (None, "vit-h/14"): "mae-vith",
    (None, "vit-s/16 gap"): "bootleg-vits",
    (None, "vit-b/16 gap"): "bootleg-vitb",
    (None, "vit-l/16 gap"): "bootleg-vitl",
}

_LAYOUT_NAMES = {
    "moco-v2": "MoCo v2",
    "moco-v3": "MoCo v3",
    "dino-full": "DINO",
    "mae-full": "MAE",
    "ijepa": "I-JEPA / Bootleg",
}
_VIT_SIZES = {192: "t", 384: "s", 768: "b", 1024: "l", 1280: "h"}


@dataclass(frozen=True)
class Network:
    """What a backbone state dict looks like: a label for the table above and words for people."""

    label: str  # e.g. "vit-s/16", "vit-b/16 gap", "resnet50"
    words: str  # e.g. "ViT-S/16 (384-d, 12 blocks, class token)"
    timm_arch: str | None  # a timm architecture that fits, for file:<path> --arch


def describe_network(state: StateDict) -> Network | None:
    """Recognise a ViT or a ResNet from its tensors; None for anything else."""
    proj = state.get("patch_embed.proj.weight")
    if proj is not None and proj.ndim == 4:
        width, patch = proj.shape[0], proj.shape[-1]
        depth = len({m.group(1) for k in state if (m := re.match(r"blocks\.(\d+)\.", k))})
        size = _VIT_SIZES.get(width)
        gap = "cls_token" not in state
        label = f"vit-{size}/{patch}" + (" gap" if gap else "") if size else f"vit-{width}d/{patch}"
        words = (
            f"ViT-{size.upper() if size else f'{width}d'}/{patch} "
            f"({width}-d, {depth} block{'' if depth == 1 else 's'}, "
            + ("no class token, average-pooled" if gap else "class token")
            + ")"
        )
        arch = _timm_vit(size, patch)
        return Network(label, words, arch)
    if "conv1.weight" in state and "layer4.0.conv1.weight" in state:
        blocks = [len({m.group(1) for k in state if (m := re.match(rf"layer{i}\.(\d+)\.", k))}) for i in range(1, 5)]
        bottleneck = "layer1.0.conv3.weight" in state
        depth = sum(blocks) * (3 if bottleneck else 2) + 2
        name = f"resnet{depth}"
        return Network(name, f"ResNet-{depth} (blocks {blocks})", name)
    return None


def guess_teacher(kind: str, state: StateDict) -> str | None:
    """'this looks like a MoCo v3 ViT-S/16 (...): use --teacher moco-v3-vits', or None without a guess."""
    network = describe_network(state)
    if network is None:
        return None
    layout = _LAYOUT_NAMES.get(kind)
    name = _ZOO.get((kind, network.label))
    if name is None and kind == "ijepa" and network.label.startswith("vit-"):
        name = "bootleg"  # any other ViT in I-JEPA's layout: its own size, read from the file
    name = name or _ZOO.get((None, network.label))
    what = f"a {layout + ' ' if layout else ''}{network.words}"
    if name:
        names = " or ".join(f"--teacher {n}" for n in name.split(" or "))
        return f"this looks like {what}: use {names}"
    if network.timm_arch:
        return f"this looks like {what}: use --teacher file:PATH --arch {network.timm_arch}"
    return f"this looks like {what}"


def _timm_vit(size: str | None, patch: int) -> str | None:
    """The timm ViT of that width and patch; file:<path> teachers drop its class token when the file has none."""
    import timm

    names = {"t": "tiny", "s": "small", "b": "base", "l": "large", "h": "huge"}
    name = f"vit_{names[size]}_patch{patch}_224" if size else None
    return name if name and timm.is_model(name) else None
