"""`Features`: what a model exposes for one batch, and `FeatureRequest`: what a strategy asks for.

Teachers and students produce `Features`; strategies consume them and never touch models' insides.
Extraction uses timm's `forward_intermediates`, which every timm model answers, so one path
serves ViTs and CNNs. Attention relations of ViT blocks come from hooks (relations.py).
`forward_kept_tokens` runs a ViT on some of its patch tokens only (masked and token-dropping
strategies), and a few accessors (`patch_grid`, `attention_width`, `layer_channels`) give the shapes
strategies size their heads by.
"""

from __future__ import annotations

import inspect
import math
from dataclasses import dataclass, field
from typing import Callable

import torch
from timm.models.vision_transformer import VisionTransformer
from torch import Tensor, nn

from .errors import UsageError
from .relations import capture_qk


@dataclass
class Features:
    """Outputs of one network for one batch of views.

    embedding:  pooled pre-logits embedding, (B, D)
    projection: the teacher's own projection-head embedding, (B, P), when it has one
    layers:     block index -> tokens (B, N, C) for ViTs (prefix tokens removed) or maps (B, C, H, W)
    logits:     class logits (B, num_classes), when the model has a classifier
    relations:  ViT block index -> that block's attention queries and keys, stacked: (2, B, heads, N, d_head)
                with the prefix tokens first (N counts them); `distillkit.relations.relation_maps` turns
                them into softmax(q k^T / sqrt(d)) maps (B, heads, N, N)
    prefix_tokens: how many of the N relation tokens are prefix (class, register) tokens
    block_embeddings: block index -> that block's output pooled as the model pools its last one, (B, C):
                ViTs: the final norm, then the model's own pooling (class token, or the patch-token mean
                for global_pool='avg', then fc_norm); conv nets: the global average of the stage map
    """

    embedding: Tensor | None = None
    projection: Tensor | None = None
    layers: dict[int, Tensor] = field(default_factory=dict)
    logits: Tensor | None = None
    relations: dict[int, Tensor] = field(default_factory=dict)
    prefix_tokens: int = 0
    block_embeddings: dict[int, Tensor] = field(default_factory=dict)

    def named(self) -> dict[str, Tensor]:
        """Every tensor under a flat name ("embedding", "layers.3", "relations.5", "block_embeddings.0", ...)."""
        named = {
            name: getattr(self, name)
            for name in ("embedding", "projection", "logits")
            if getattr(self, name) is not None
        }
        for kind in ("layers", "relations", "block_embeddings"):
            named.update({f"{kind}.{i}": t for i, t in getattr(self, kind).items()})
        return named

    @classmethod
    def from_named(cls, named: dict[str, Tensor], prefix_tokens: int = 0) -> "Features":
        """The inverse of `named`."""
        features = cls(prefix_tokens=prefix_tokens)
        for name, tensor in named.items():
            kind, _, index = name.partition(".")
            if index:
                getattr(features, kind)[int(index)] = tensor
            else:
                setattr(features, kind, tensor)
        return features


def _batch_dim(name: str) -> int:
    """Where a flat-named tensor (`Features.named`) holds the batch: relations are (2, B, heads, N, d)."""
    return 1 if name.startswith("relations.") else 0


def cat_batches(parts: list[Features]) -> Features:
    """The Features of consecutive batches joined into one batch (the inverse of `split_batch`)."""
    named = [part.named() for part in parts]
    joined = {name: torch.cat([n[name] for n in named], dim=_batch_dim(name)) for name in named[0]}
    return Features.from_named(joined, prefix_tokens=parts[0].prefix_tokens)


def split_batch(features: Features, sizes: list[int]) -> list[Features]:
    """The Features of one batch as those of its consecutive parts of `sizes` images (views, no copies)."""
    pieces = {name: t.split(sizes, dim=_batch_dim(name)) for name, t in features.named().items()}
    return [
        Features.from_named({name: parts[i] for name, parts in pieces.items()}, features.prefix_tokens)
        for i in range(len(sizes))
    ]


@dataclass(frozen=True)
class FeatureRequest:
    """What a strategy needs from a network.

    `layers` holds block indices (int, negative counts from the end) or relative depths
    (float in (0, 1], e.g. 0.5 = the block half-way down); `resolve_layers` turns them into indices.
    `relations` names ViT blocks the same way; each gives its attention queries and keys.
    `block_embeddings` names blocks the same way, or is "all"; each gives its pooled embedding.
    """

    embedding: bool = False
    projection: bool = False
    layers: tuple[int | float, ...] = ()
    logits: bool = False
    relations: tuple[int | float, ...] = ()
    block_embeddings: tuple[int | float, ...] | str = ()

    def merge(self, other: "FeatureRequest") -> "FeatureRequest":
        return FeatureRequest(
            embedding=self.embedding or other.embedding,
            projection=self.projection or other.projection,
            layers=tuple(dict.fromkeys(self.layers + other.layers)),
            logits=self.logits or other.logits,
            relations=tuple(dict.fromkeys(self.relations + other.relations)),
            block_embeddings=merge_blocks(self.block_embeddings, other.block_embeddings),
        )

    @property
    def needs_head(self) -> bool:
        """Whether the final norm and pooling are needed (anything beyond taps of blocks)."""
        return self.embedding or self.projection or self.logits or bool(self.block_embeddings)


def merge_blocks(a: tuple[int | float, ...] | str, b: tuple[int | float, ...] | str) -> tuple[int | float, ...] | str:
    """Union of two block selections, where "all" absorbs the other."""
    if "all" in (a, b):
        return "all"
    return tuple(dict.fromkeys(a + b))


def num_layers(model: nn.Module) -> int:
    """How many tappable layers `forward_intermediates` indexes: blocks (ViT) or stage ends (CNN)."""
    info = getattr(model, "feature_info", None)
    if not info:
        raise UsageError(
            f"{type(model).__name__} exposes no feature_info, so its layers cannot be tapped; "
            "use a timm model that supports forward_intermediates"
        )
    return len(info)


def resolve_layer(depth: int | float, total: int) -> int:
    """Resolve a block index or relative depth to a non-negative index in [0, total)."""
    if isinstance(depth, bool):
        raise UsageError(f"layer {depth!r} is not a block index or a relative depth")
    if isinstance(depth, float):
        if not 0.0 < depth <= 1.0:
            raise UsageError(f"relative layer depth {depth} must be in (0, 1]; e.g. 0.5 or 1.0")
        return max(0, min(total - 1, math.ceil(depth * total - 1e-9) - 1))
    index = depth + total if depth < 0 else depth
    if not 0 <= index < total:
        raise UsageError(f"layer index {depth} is out of range for a model with {total} layers")
    return index


def resolve_layers(depths: tuple[int | float, ...], total: int) -> tuple[int, ...]:
    return tuple(dict.fromkeys(resolve_layer(d, total) for d in depths))


def extract_features(model: nn.Module, x: Tensor, request: FeatureRequest) -> Features:
    """Run a timm model once and collect what `request` asks for.

    Without layer or relation taps this is a plain forward (`model.forward_features` + `forward_head`);
    with taps it is one `forward_intermediates` call, so the final embedding and the taps come from the
    same pass, and a pass that needs no head stops after the deepest tapped block. Relations are read
    by hooks on the tapped ViT blocks during that pass. Projection heads are the teacher's business.
    """
    wants_head = request.embedding or request.logits
    features = Features()
    total = num_layers(model) if request.layers or request.relations or request.block_embeddings else 0
    layers = resolve_layers(request.layers, total) if request.layers else ()
    relations = resolve_relations(model, request.relations, total) if request.relations else ()
    blocks = (
        tuple(range(total)) if request.block_embeddings == "all" else resolve_layers(request.block_embeddings, total)
    )
    taps = sorted(set(layers) | set(relations) | set(blocks))
    if not taps and not wants_head:
        return features
    final = None
    with capture_qk(model.blocks if relations else None, relations) as captured:
        if taps:
            prefix = {"return_prefix_tokens": True} if blocks and is_token_model(model) else {}
            out = model.forward_intermediates(
                x,
                indices=taps,
                norm=False,
                output_fmt=_layer_format(model),
                intermediates_only=not wants_head,
                stop_early=not wants_head,
                **prefix,
            )
            final, intermediates = out if wants_head else (None, out)
            by_index = dict(zip(taps, intermediates))
            features.layers = {i: _without_prefix(by_index[i]) for i in sorted(layers)}
            features.block_embeddings = {i: _block_embedding(model, by_index[i]) for i in blocks}
        else:
            final = model.forward_features(x)
    if relations:
        features.relations = {i: captured[i] for i in sorted(relations)}
        features.prefix_tokens = getattr(model, "num_prefix_tokens", 0)
    if request.embedding:
        features.embedding = model.forward_head(final, pre_logits=True)
    if request.logits:
        features.logits = model.forward_head(final)
    return features


class Extractor:
    """`extract_features`, eager or through `torch.compile` (teacher.compile / student.compile).

    Compiled, each request gets its own graph (a function of the input only, returning named tensors);
    requests with attention relations stay eager, since their forward hooks are registered per call.
    The first call of each compiled graph pays the compilation (tens of seconds on a CPU).
    """

    def __init__(self, compile: bool = False, backend: str = "inductor"):
        self.compile = compile
        self.backend = backend  # torch.compile's; tests use "aot_eager" (the same graphs, no code generation)
        self._graphs: dict[tuple[int, FeatureRequest], Callable] = {}

    def __call__(self, model: nn.Module, x: Tensor, request: FeatureRequest) -> Features:
        if not self.compile or request.relations:
            return extract_features(model, x, request)
        key = (id(model), request)
        graph = self._graphs.get(key)
        if graph is None:
            graph = self._graphs[key] = torch.compile(
                lambda x: extract_features(model, x, request).named(), backend=self.backend
            )
        return Features.from_named(graph(x))


def _without_prefix(tap: Tensor | tuple[Tensor, Tensor]) -> Tensor:
    """A tap taken with `return_prefix_tokens` is (patch tokens, prefix tokens) for models with prefix tokens."""
    return tap[0] if isinstance(tap, tuple) else tap


def _block_embedding(model: nn.Module, tap: Tensor | tuple[Tensor, Tensor]) -> Tensor:
    """One block's output pooled as the model pools its last block (see `Features.block_embeddings`)."""
    if isinstance(tap, tuple):
        tap = torch.cat([tap[1], tap[0]], dim=1)  # prefix tokens first, as the model holds them
    if tap.dim() == 4:
        return tap.mean((2, 3))
    return model.forward_head(model.norm(tap), pre_logits=True)


def resolve_relations(model: nn.Module, depths: tuple[int | float, ...], total: int) -> tuple[int, ...]:
    """Block indices of the requested relations; only ViT-like models have attention blocks."""
    if not is_token_model(model):
        raise UsageError(
            f"attention relations were requested from {type(model).__name__}, a conv net without "
            "attention blocks; relation strategies need a ViT (e.g. a mae-*, dino-* or vit-tiny model)"
        )
    return resolve_layers(depths, total)


def is_token_model(model: nn.Module) -> bool:
    """ViT-like models (patch embedding + blocks of tokens), as opposed to conv nets."""
    return hasattr(model, "blocks") and hasattr(model, "patch_embed")


def _layer_format(model: nn.Module) -> str:
    """Token models give (B, N, C) tokens; conv nets give (B, C, H, W) maps."""
    return "NLC" if is_token_model(model) else "NCHW"


def probe_features(model: nn.Module, request: FeatureRequest, input_size: tuple[int, int]) -> Features:
    """A dry forward on zeros (batch 2), to learn output shapes before building heads."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            param = next(model.parameters())
            x = torch.zeros(2, 3, *input_size, device=param.device, dtype=param.dtype)
            return extract_features(model, x, request)
    finally:
        model.train(was_training)


def pools_blocks(model: nn.Module) -> bool:
    """Whether `extract_features` can give the model's `block_embeddings`: conv nets always; token models
    when their `forward_intermediates` returns the prefix (class) tokens."""
    return (
        not is_token_model(model) or "return_prefix_tokens" in inspect.signature(model.forward_intermediates).parameters
    )


def layer_channels(model: nn.Module) -> list[int]:
    """The channels of every tappable layer (a ViT's: its width), from timm's `feature_info`."""
    return [info["num_chs"] for info in model.feature_info]


def patch_grid(model: nn.Module) -> tuple[int, int]:
    """A token model's patch grid, (rows, columns)."""
    return tuple(model.patch_embed.grid_size)


def attention_width(model: nn.Module) -> tuple[int, int]:
    """A ViT's attention heads and query / key width (heads x head dim), from its first block."""
    attn = model.blocks[0].attn
    return attn.num_heads, attn.num_heads * attn.head_dim


def gather_tokens(tokens: Tensor, index: Tensor) -> Tensor:
    """tokens (B, N, C), index (B, K) -> (B, K, C)."""
    return tokens.gather(1, index.unsqueeze(-1).expand(-1, -1, tokens.shape[-1]))


def runs_on_kept_tokens(model: nn.Module) -> bool:
    """Whether `forward_kept_tokens` can run `model`: a timm VisionTransformer."""
    return isinstance(model, VisionTransformer)


def forward_kept_tokens(
    model: VisionTransformer, x: Tensor, keep: Tensor, layers: tuple[int, ...] = (), relations: tuple[int, ...] = ()
) -> tuple[Tensor, Features]:
    """A timm ViT on its prefix tokens and the kept patch tokens only: patch and position embedding,
    `norm_pre`, then only the kept tokens through the blocks and the final norm (dropped tokens cost
    nothing; `patch_drop` is skipped, the choice of tokens replaces it).

    keep: (B, K) flat patch indices. Returns the kept patch tokens after the final norm, (B, K, D), and
    Features holding the raw kept patch tokens of blocks `layers` and the queries and keys of blocks
    `relations` (prefix tokens first, `prefix_tokens` of them)."""
    tokens = model.norm_pre(model._pos_embed(model.patch_embed(x)))
    prefix = model.num_prefix_tokens
    tokens = torch.cat([tokens[:, :prefix], gather_tokens(tokens[:, prefix:], keep)], dim=1)
    features = Features(prefix_tokens=prefix)
    with capture_qk(model.blocks, tuple(relations)) as captured:
        for index, block in enumerate(model.blocks):
            tokens = block(tokens)
            if index in layers:
                features.layers[index] = tokens[:, prefix:]
    features.relations = dict(captured)
    return model.norm(tokens)[:, prefix:], features
