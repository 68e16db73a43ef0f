"""Early exits: a student's representation after block (ViT) or stage (CNN) k, as its own model.

Blocks are indexed as `forward_intermediates` and `distillkit.features.resolve_layer` index them
(timm `feature_info`): a ViT's transformer blocks, a CNN's stem and stage ends. The representation
at block k is what an early-exit (SDSSL-style) student reads there:

- ViT: the tokens after block k through the model's own final norm, pooled as its `global_pool`
  ([CLS] token or average), i.e. the full model with the blocks after k removed.
- CNN: the feature map of index k, average-pooled to (B, C).
"""

from __future__ import annotations

import copy

import torch
from torch import Tensor, nn

from .errors import UsageError
from .features import is_token_model, num_layers


def resolve_exit(model: nn.Module, block: int) -> int:
    """`block` as a non-negative index (negative counts from the end), or a UsageError naming the range."""
    total = num_layers(model)
    if not -total <= block < total:
        raise UsageError(
            f"exit block {block} is out of range: {type(model).__name__} has {total} blocks, "
            f"so the exit block must be in 0..{total - 1} (or -{total}..-1, counting from the end)"
        )
    return block % total


def truncate(model: nn.Module, block: int) -> nn.Module:
    """A copy of `model` (eval mode) whose output is its representation at `block`."""
    block = resolve_exit(model, block)
    pruned = copy.deepcopy(model).eval()
    if is_token_model(pruned):
        # keeps patch embedding, blocks 0..block, final norm and pooling: a plain timm ViT of depth block + 1
        pruned.prune_intermediate_layers([block], prune_norm=False, prune_head=False)
        return pruned
    pruned.prune_intermediate_layers([block], prune_norm=True, prune_head=True)
    return StageExit(pruned, block).eval()


class StageExit(nn.Module):
    """A CNN cut after feature index `block`: its map there, average-pooled."""

    def __init__(self, model: nn.Module, block: int):
        super().__init__()
        self.model = model
        self.block = block
        self.num_features = model.feature_info[block]["num_chs"]

    def forward(self, x: Tensor) -> Tensor:
        (feature_map,) = self.model.forward_intermediates(x, indices=[self.block], intermediates_only=True)
        return feature_map.mean(dim=(2, 3))


def exit_meaning(model: nn.Module) -> str:
    """What a cut model returns, in words, for model cards."""
    if is_token_model(model):
        return (
            "the tokens after that block through the final norm, pooled as the whole model pools "
            f"(global_pool={model.global_pool!r})"
        )
    return "the feature map there, average-pooled"


def block_embeddings(model: nn.Module, x: Tensor) -> list[Tensor]:
    """The representation at every block (as `truncate` defines it) from one forward pass: (B, D_k) each."""
    indices = list(range(num_layers(model)))
    if not is_token_model(model):
        maps = model.forward_intermediates(x, indices=indices, intermediates_only=True)
        return [m.mean(dim=(2, 3)) for m in maps]
    has_prefix = bool(getattr(model, "num_prefix_tokens", 0))  # class / register tokens, split off by timm
    outputs = model.forward_intermediates(
        x, indices=indices, norm=True, output_fmt="NLC", return_prefix_tokens=has_prefix, intermediates_only=True
    )
    tokens = [torch.cat([prefix, patches], dim=1) for patches, prefix in outputs] if has_prefix else outputs
    return [model.forward_head(t, pre_logits=True) for t in tokens]
