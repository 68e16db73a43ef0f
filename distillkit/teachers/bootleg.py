"""The `bootleg` teacher: any ViT from a Bootleg / I-JEPA-layout checkpoint, its architecture read from the file.

`distillkit pretrain bootleg` writes RUN/bootleg.pth in I-JEPA's layout (Assran et al. 2023, facebookresearch/ijepa
`save_checkpoint`): {'encoder', 'predictor', 'target_encoder', 'epoch', ...}, each network a timm state dict
with keys prefixed `module.`, plus an `args` dict that records the architecture:

    args = {"arch": "vit_tiny_patch16_224",                    # a timm VisionTransformer name
            "model_kwargs": {"patch_size": 4, "depth": 6, ...},  # timm.create_model arguments
            "input_size": 32, "mean": [...], "std": [...]}       # the input config

The network is `timm.create_model(args.arch, **args.model_kwargs, num_classes=0)` at `img_size` = the input
size (teacher.input_size, else args.input_size), strictly loaded; position embeddings trained at another size
are resampled bicubically (build.fit_pos_embed), as for every ViT teacher.

A file without `args` (an official I-JEPA checkpoint, another tool's) gets its architecture from its tensors:

    patch_embed.proj.weight (D, C, p, p)  -> embed_dim D, in_chans C, patch_size p
    pos_embed (1, N, D)                   -> img_size = sqrt(N) * p (no class token: every token is a patch)
    blocks.<i>.                           -> depth = number of distinct i
    blocks.0.mlp.fc1.weight (H, D)        -> mlp_ratio = H / D
    blocks.0.attn.qkv.bias present        -> qkv_bias
    num_heads: not recorded by any tensor (qkv packs all heads into one (3D, D) matrix); D // 64, the ViT
               convention of 64-d heads, except widths 1280 and 1408 (I-JEPA's ViT-H and ViT-g: 16 heads).
               `load_teacher(..., model_kwargs={"num_heads": n})` overrides it.

with class_token=False, global_pool='avg', fc_norm=False (I-JEPA's encoders average their normed patch
tokens) and ImageNet mean/std, on timm's `vit_base_patch16_224` entry, every size argument overridden.
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any

import timm
from timm.models import is_model_in_modules

from ..errors import UsageError
from ..inputs import InputConfig
from ..messages import warn
from ..registry import did_you_mean
from .build import create_backbone, load_backbone
from .checkpoint import StateDict, read_checkpoint
from .families import describe_source
from .formats import FORMAT_NAMES, extract
from .guess import guess_teacher
from .spec import GAP_VIT, IMAGENET_MEAN, IMAGENET_STD, RANDOM_WEIGHTS, BuildOptions, Built, TeacherSpec

INFERRED_ARCH = "vit_base_patch16_224"  # the timm entry an args-free file is built on, every size overridden
HEAD_DIM = 64  # the ViT convention (ViT-Ti/S/B/L: 192/3, 384/6, 768/12, 1024/16)
HEADS_BY_WIDTH = {1280: 16, 1408: 16}  # I-JEPA's vit_huge and vit_giant: 80- and 88-d heads
PRETRAIN_HINT = "pretrain one with `distillkit pretrain bootleg` (it writes RUN/bootleg.pth)"
REPRETRAIN_HINT = "pretrain a new one with `distillkit pretrain bootleg`"


def build_bootleg(spec: TeacherSpec, options: BuildOptions) -> Built:
    """The ViT of `options.weights`, an I-JEPA-layout file, as its `args` (or its tensors) describe it."""
    if options.weights is None or options.weights == RANDOM_WEIGHTS:
        why = "has no random init" if options.weights == RANDOM_WEIGHTS else "needs --teacher-weights FILE"
        raise UsageError(
            f"teacher {spec.name} reads its architecture from its checkpoint, so it {why}: "
            f"{PRETRAIN_HINT} and pass it with --teacher-weights RUN/bootleg.pth, or pass any I-JEPA-layout "
            "checkpoint ({'encoder', 'predictor', 'target_encoder', ...}). For a smoke test with random weights "
            "use --teacher bootleg-vits --teacher-weights random"
        )
    path = Path(options.weights).expanduser()
    checkpoint = read_checkpoint(path)
    extracted = extract(checkpoint, path, options.variant)
    if extracted.kind != "ijepa":
        guess = guess_teacher(extracted.kind, extracted.backbone) or ""
        if ": use " not in guess:
            guess += f"{': ' if guess else ''}load it with --teacher file:{path} --arch TIMM_MODEL_NAME"
        raise UsageError(
            f"{path} is a {extracted.format_name}, not a checkpoint of teacher {spec.name} (which takes an "
            f"{FORMAT_NAMES['ijepa']}, keys prefixed module.); {guess}"
        )
    args = checkpoint.get("args")
    if isinstance(args, dict) and "arch" in args:
        arch, kwargs, size, mean, std = _from_args(args, path)
        recorded = "its args record"
    else:
        arch, kwargs, size = _inferred(extracted.backbone, path, options.model_kwargs)
        mean, std = IMAGENET_MEAN, IMAGENET_STD
        recorded = "its tensors show"
    size = options.input_size or size
    kwargs = {**kwargs, **options.model_kwargs, "num_classes": 0, "img_size": size}
    try:
        model = create_backbone(arch, size, True, kwargs)
    except (TypeError, ValueError, AssertionError, RuntimeError) as e:
        raise UsageError(
            f"{path}: timm cannot build {arch} with the architecture {recorded} ({_words(kwargs)}): {e}; "
            f"the file is damaged or not a ViT encoder: {REPRETRAIN_HINT}"
        ) from None
    load_backbone(
        model,
        extracted,
        f"teacher weights {path}",
        spec.name,
        fallback_hint=f"the file's {extracted.variant} tensors do not fit the ViT {recorded} "
        f"({arch}, {_words(kwargs)}); the file mixes two runs or was edited: {REPRETRAIN_HINT}",
    )
    return Built(model, None, describe_source(path, extracted), InputConfig((size, size), mean, std))


def _from_args(args: dict, path: Path) -> tuple[str, dict[str, Any], int, tuple, tuple]:
    """(arch, model kwargs, input size, mean, std) from a distillkit-written `args` dict, each checked."""
    arch, kwargs = args["arch"], args.get("model_kwargs") or {}
    if not isinstance(arch, str) or not isinstance(kwargs, dict) or not all(isinstance(k, str) for k in kwargs):
        raise UsageError(
            f"{path}: args.arch must be a timm model name and args.model_kwargs a dict of its arguments; got "
            f"{arch!r} and {type(kwargs).__name__}: the file's args are damaged: {REPRETRAIN_HINT}"
        )
    base = arch.split(".")[0]
    if not timm.is_model(base):
        raise UsageError(
            f"{path}: args.arch {arch!r} is no timm model ({did_you_mean(base, timm.list_models('vit_*'))}); "
            f"the file was written with another timm, or by another tool: {REPRETRAIN_HINT}"
        )
    if not is_model_in_modules(base, ["vision_transformer"]):
        raise UsageError(
            f"{path}: args.arch {arch!r} is not a timm VisionTransformer, and teacher bootleg builds ViTs only; "
            f"load this file with --teacher file:{path} --arch {base}"
        )
    size = args.get("input_size", kwargs.get("img_size", 224))
    mean, std = args.get("mean", IMAGENET_MEAN), args.get("std", IMAGENET_STD)
    if isinstance(size, (list, tuple)) and len(set(size)) == 1:
        size = size[0]
    if not isinstance(size, int) or size <= 0 or not all(_is_triple(v) for v in (mean, std)) or min(std) <= 0:
        raise UsageError(
            f"{path}: args.input_size must be a positive number of pixels and args.mean / args.std three numbers "
            f"each (std > 0); got {size!r}, {mean!r}, {std!r}: the file's args are damaged: {REPRETRAIN_HINT}"
        )
    return arch, dict(kwargs), size, tuple(float(v) for v in mean), tuple(float(v) for v in std)


def _is_triple(value: Any) -> bool:
    return isinstance(value, (list, tuple)) and len(value) == 3 and all(isinstance(v, (int, float)) for v in value)


def _inferred(state: StateDict, path: Path, overrides: dict[str, Any]) -> tuple[str, dict[str, Any], int]:
    """(arch, model kwargs, input size) read from a ViT state dict's tensor shapes (see the module docstring)."""
    proj, pos = state.get("patch_embed.proj.weight"), state.get("pos_embed")
    fc1 = state.get("blocks.0.mlp.fc1.weight")
    if proj is None or pos is None or fc1 is None or proj.ndim != 4 or pos.ndim != 3 or fc1.ndim != 2:
        raise UsageError(
            f"{path} is an {FORMAT_NAMES['ijepa']} but its network is not a ViT (no patch_embed.proj.weight, "
            "pos_embed and blocks.0.mlp.fc1.weight): teacher bootleg builds ViTs only; load it with "
            f"--teacher file:{path} --arch TIMM_MODEL_NAME"
        )
    if "cls_token" in state or "reg_token" in state:
        raise UsageError(
            f"{path} holds a ViT with a class token, and records no architecture (no args): teacher bootleg reads "
            f"class-token-free I-JEPA encoders only; load it with --teacher file:{path} --arch TIMM_VIT_NAME"
        )
    width, channels, patch = proj.shape[0], proj.shape[1], proj.shape[-1]
    tokens, side = pos.shape[1], math.isqrt(pos.shape[1])
    hidden = fc1.shape[0]
    if proj.shape[-2] != patch or side * side != tokens or pos.shape[-1] != width or fc1.shape[1] != width:
        raise UsageError(
            f"{path}: its ViT's tensors do not fit together (patch_embed.proj.weight {tuple(proj.shape)}, pos_embed "
            f"{tuple(pos.shape)}, blocks.0.mlp.fc1.weight {tuple(fc1.shape)}; square patches, a square grid of "
            f"patch tokens and one width expected): the file is damaged or not a ViT encoder"
        )
    depth = len({m.group(1) for key in state if (m := re.match(r"blocks\.(\d+)\.", key))})
    ratio = hidden / width
    if int(width * ratio) != hidden:  # timm's Mlp makes int(dim * mlp_ratio) hidden units
        ratio = (hidden + 0.5) / width
    kwargs = {
        **GAP_VIT,
        "patch_size": patch,
        "in_chans": channels,
        "embed_dim": width,
        "depth": depth,
        "num_heads": HEADS_BY_WIDTH.get(width) or (0 if width % HEAD_DIM else width // HEAD_DIM),
        "mlp_ratio": ratio,
        "qkv_bias": "blocks.0.attn.qkv.bias" in state,
    }
    heads = overrides.get("num_heads", kwargs["num_heads"])
    if "num_heads" in overrides and (not isinstance(heads, int) or heads <= 0 or width % heads):
        raise UsageError(f"model_kwargs num_heads={heads!r} does not divide the {width}-d width of {path}'s ViT")
    if not heads or width % heads:
        raise UsageError(
            f"{path} records no architecture (no args), and the attention heads of its {width}-d ViT cannot be "
            f"read from its tensors ({width} is not a multiple of {HEAD_DIM}-d heads): pass them, "
            "load_teacher(..., model_kwargs={'num_heads': N}), or re-save the file with distillkit's args"
        )
    if "num_heads" not in overrides:
        warn(
            f"{path} records no architecture (no args); read from its tensors: ViT {_words(kwargs)}, input "
            f"{side * patch} px. num_heads={heads} is assumed ({HEAD_DIM}-d heads, the ViT convention): weights do "
            "not record it, and a wrong count gives other embeddings; "
            "load_teacher(..., model_kwargs={'num_heads': N}) sets it"
        )
    return INFERRED_ARCH, kwargs, side * patch


def _words(kwargs: dict[str, Any]) -> str:
    """'patch_size=4, embed_dim=64, depth=2, num_heads=2': the size arguments, for messages."""
    keys = ("patch_size", "embed_dim", "depth", "num_heads", "mlp_ratio", "img_size")
    return ", ".join(f"{k}={kwargs[k]:g}" if isinstance(kwargs[k], float) else f"{k}={kwargs[k]}"
                     for k in keys if k in kwargs)  # fmt: skip
