"""Recognising self-supervised training checkpoints and taking one network out of them.

Each official layout (docs/methods.md#checkpoint-layouts) becomes the same thing: a backbone state dict in timm's
key names, plus the tensors of the projection head when the method keeps one.

    kind        file layout                                                  networks (variant)
    moco-v2     {'epoch','arch','state_dict','optimizer'}, module.encoder_q.  query (default), momentum = encoder_k
    moco-v3     {..., 'state_dict'}, module.base_encoder. / momentum_encoder.  base (default), momentum
    dino-full   {'student','teacher','optimizer','epoch','args',...}          teacher (default), student (module.)
    ijepa       {'encoder','predictor','target_encoder',...}, module.         target_encoder (default), encoder
    mae-full    {'model': encoder + decoder_* + mask_token}                    -
    state-dict  a plain state dict, optionally in {'model'} / {'state_dict'}   -
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import Tensor

from ..errors import UsageError
from .checkpoint import StateDict, unwrap_state_dict

FORMAT_NAMES = {
    "moco-v2": "MoCo v2 training checkpoint (module.encoder_q. / encoder_k. / queue)",
    "moco-v3": "MoCo v3 training checkpoint (module.base_encoder. / momentum_encoder. / predictor)",
    "dino-full": "DINO full training checkpoint ({'student', 'teacher', ...})",
    "ijepa": "I-JEPA-layout training checkpoint ({'encoder', 'predictor', 'target_encoder', ...})",
    "mae-full": "MAE checkpoint with its decoder ({'model': encoder + decoder_* + mask_token})",
    "state-dict": "plain state dict",
}

# kind -> {variant: (what it selects, key prefix inside the checkpoint)}; the first entry is the default.
VARIANTS: dict[str, dict[str, tuple[str, str]]] = {
    "moco-v2": {
        "query": ("the query encoder", "module.encoder_q."),
        "momentum": ("the momentum (key) encoder", "module.encoder_k."),
    },
    "moco-v3": {
        "base": ("the base encoder", "module.base_encoder."),
        "momentum": ("the momentum encoder", "module.momentum_encoder."),
    },
    "dino-full": {"teacher": ("the EMA teacher", "teacher"), "student": ("the student", "student")},
    "ijepa": {
        "target_encoder": ("the EMA target encoder", "target_encoder"),
        "encoder": ("the context encoder", "encoder"),
    },
}


@dataclass
class Extracted:
    """One network taken out of a checkpoint file."""

    kind: str  # a key of FORMAT_NAMES
    backbone: StateDict  # timm key names, ready for a strict load
    head: StateDict = field(default_factory=dict)  # projection-head tensors (keys "0.weight", ...), if kept
    variant: str | None = None  # which network, for kinds holding several

    @property
    def format_name(self) -> str:
        return FORMAT_NAMES[self.kind]


def detect_format(checkpoint: Any) -> str:
    """The kind of checkpoint (a key of FORMAT_NAMES), from its top-level and state-dict keys."""
    if not isinstance(checkpoint, dict):
        return "state-dict"
    if "target_encoder" in checkpoint or ("encoder" in checkpoint and "predictor" in checkpoint):
        return "ijepa"
    if "teacher" in checkpoint and "student" in checkpoint:
        return "dino-full"
    keys = [k for k in _training_state(checkpoint) if isinstance(k, str)]
    if any(_strip_module(k).startswith(("encoder_q.", "encoder_k.")) for k in keys):
        return "moco-v2"
    if any(_strip_module(k).startswith(("base_encoder.", "momentum_encoder.")) for k in keys):
        return "moco-v3"
    if any(k.startswith(("decoder_", "mask_token")) for k in keys) and any(k.startswith("blocks.") for k in keys):
        return "mae-full"
    return "state-dict"


def _training_state(checkpoint: dict) -> dict:
    """The state dict inside a training checkpoint: under "state_dict", then "model" (nested or not)."""
    node = checkpoint
    for key in ("state_dict", "model"):
        if isinstance(node.get(key), dict):
            node = node[key]
    return node


def extract(checkpoint: Any, path: str | Path, variant: str | None = None, head_prefix: str | None = None) -> Extracted:
    """Take the backbone (and projection head) selected by `variant` out of `checkpoint`.

    `head_prefix` ("fc." or "head.") splits a projection head off a plain state dict too (MoCo weights
    re-saved as a plain dict); MoCo training checkpoints always keep theirs.
    """
    kind = detect_format(checkpoint)
    variant = _check_variant(kind, variant, path)
    if kind in ("moco-v2", "moco-v3"):
        prefix = VARIANTS[kind][variant][1]
        state = _tensors(_training_state(checkpoint), path)
        if not any(k.startswith(prefix) for k in state):
            prefix = prefix[len("module.") :]  # saved without DistributedDataParallel
        network = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
        if not network:
            raise UsageError(
                f"{path} is a {FORMAT_NAMES[kind]} but holds no '{prefix}' tensors; it is incomplete: download it again"
            )
        head_prefix = "fc." if any(k.startswith("fc.") for k in network) else "head."
        backbone, head = split_head(network, head_prefix)
        return Extracted(kind, backbone, head, variant)
    if kind == "dino-full":
        network = _strip(_tensors(checkpoint[variant], f"{path} ['{variant}']"), "module.")
        backbone = {k[len("backbone.") :]: v for k, v in network.items() if k.startswith("backbone.")}
        # the DINO head (MLP + weight-normed prototypes) is a training device, not a projection head
        backbone.update({k: v for k, v in network.items() if not k.startswith(("backbone.", "head."))})
        return Extracted(kind, backbone, {}, variant)
    if kind == "ijepa":
        if not isinstance(checkpoint.get(variant), dict):
            raise UsageError(
                f"{path} is an {FORMAT_NAMES[kind]} without a '{variant}' entry "
                f"(top-level keys: {', '.join(map(str, checkpoint))})"
            )
        return Extracted(kind, _strip(_tensors(checkpoint[variant], f"{path} ['{variant}']"), "module."), {}, variant)
    if kind == "mae-full":
        state = _strip(_tensors(checkpoint.get("model", checkpoint), path), "module.")
        backbone = {k: v for k, v in state.items() if not k.startswith(("decoder_", "mask_token"))}
        return Extracted(kind, backbone, {}, None)
    state = unwrap_state_dict(checkpoint, path)
    if head_prefix and any(k.startswith(f"{head_prefix}0.") for k in state):
        backbone, head = split_head(state, head_prefix)
        return Extracted(kind, backbone, head, None)
    return Extracted(kind, state, {}, None)


def split_head(state: StateDict, head_prefix: str) -> tuple[StateDict, StateDict]:
    """{'fc.0.weight': ..., 'conv1.weight': ...} -> ({'conv1.weight': ...}, {'0.weight': ...})."""
    head = {k[len(head_prefix) :]: v for k, v in state.items() if k.startswith(head_prefix)}
    backbone = {k: v for k, v in state.items() if not k.startswith(head_prefix)}
    return backbone, head


def describe_variants(kind: str) -> str:
    """ "'base' (the base encoder, the default), 'momentum' (the momentum encoder)"."""
    choices = list(VARIANTS.get(kind, {}).items())
    return ", ".join(
        f"{name!r} ({what}{', the default' if i == 0 else ''})" for i, (name, (what, _)) in enumerate(choices)
    )


def _check_variant(kind: str, variant: str | None, path: str | Path) -> str | None:
    choices = VARIANTS.get(kind)
    if not choices:
        if variant is not None:
            raise UsageError(
                f"teacher.variant {variant!r} picks one network of a training checkpoint that holds several "
                f"(MoCo, DINO full, I-JEPA), but {path} is a {FORMAT_NAMES[kind]} holding one network: "
                "drop teacher.variant, or pass the full training checkpoint"
            )
        return None
    if variant is None:
        return next(iter(choices))
    if variant not in choices:
        raise UsageError(
            f"teacher.variant {variant!r} does not exist in {path}, a {FORMAT_NAMES[kind]}; "
            f"choose one of {describe_variants(kind)}"
        )
    return variant


def _tensors(node: Any, where: str | Path) -> StateDict:
    if not isinstance(node, dict) or not node or not all(isinstance(v, Tensor) for v in node.values()):
        raise UsageError(f"{where} holds no state dict of tensors; the file is damaged or of another kind")
    return node


def _strip(state: StateDict, prefix: str) -> StateDict:
    return {(k[len(prefix) :] if k.startswith(prefix) else k): v for k, v in state.items()}


def _strip_module(key: str) -> str:
    return key[len("module.") :] if key.startswith("module.") else key
