"""Attention relations of ViT blocks: the queries and keys each block attends with.

timm's attention is fused (`F.scaled_dot_product_attention`), so the attention probabilities never
exist as a tensor. A forward pre-hook on each selected block takes the block's input `x_in` and
recomputes what its attention sees: `q, k = split(blk.attn.qkv(blk.norm1(x_in)))`, then
`blk.attn.q_norm` / `k_norm`. The relation of a block is `softmax(q k^T / sqrt(d_head))` per head
(`relation_maps`); queries and keys are kept rather than the maps because strategies need to
restrict them to visible tokens before the softmax, or re-split them into another number of heads
(MiniLMv2-style relation heads) for a student with fewer heads.

Gradients flow through the recomputation, so students get relations too.
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from typing import Iterator

import torch
from torch import Tensor, nn

from .errors import UsageError


def block_qk(block: nn.Module, x: Tensor) -> Tensor:
    """Queries and keys of `block`'s attention for block input `x` (B, N, C): a (2, B, heads, N, d_head) tensor."""
    attn = getattr(block, "attn", None)
    qkv = getattr(attn, "qkv", None)
    norm1 = getattr(block, "norm1", None)
    if not isinstance(qkv, nn.Linear) or norm1 is None or not hasattr(attn, "num_heads"):
        raise UsageError(
            f"attention relations need timm ViT blocks with a fused attn.qkv projection; "
            f"{type(block).__name__} has none"
        )
    if any(hasattr(attn, name) for name in ("rope", "relative_position_bias_table", "rel_pos")):
        raise UsageError(
            f"{type(attn).__name__} adds rotary or relative position terms to its attention logits; "
            "its relations would not match q k^T, so they are not supported"
        )
    batch, tokens, _ = x.shape
    heads = attn.num_heads
    head_dim = getattr(attn, "head_dim", qkv.out_features // (3 * heads))
    bias = qkv.bias
    q_bias = getattr(attn, "q_bias", None)
    if q_bias is not None:  # BEiT-style separate q / v biases, no k bias
        bias = torch.cat((q_bias, torch.zeros_like(q_bias), attn.v_bias))
    projected = nn.functional.linear(norm1(x), qkv.weight, bias)
    q, k, _ = projected.reshape(batch, tokens, 3, heads, head_dim).permute(2, 0, 3, 1, 4).unbind(0)
    return torch.stack(
        (attn.q_norm(q) if hasattr(attn, "q_norm") else q, attn.k_norm(k) if hasattr(attn, "k_norm") else k)
    )


@contextmanager
def capture_qk(blocks: nn.Module, indices: tuple[int, ...]) -> Iterator[dict[int, Tensor]]:
    """While active, every forward of `blocks[i]` (i in `indices`) stores its `block_qk` under i."""
    captured: dict[int, Tensor] = {}
    handles = []

    def hook_for(index: int):
        def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
            x = args[0] if args else kwargs["x"]
            captured[index] = block_qk(module, x)

        return hook

    try:
        for index in indices:
            handles.append(blocks[index].register_forward_pre_hook(hook_for(index), with_kwargs=True))
        yield captured
    finally:
        for handle in handles:
            handle.remove()


def relation_maps(qk: Tensor, heads: int | None = None, keep: Tensor | None = None) -> Tensor:
    """softmax(q k^T / sqrt(d)) per head, (B, H, N, N), from a (2, B, H, N, d) `qk` of `Features.relations`.

    heads: re-split the concatenated queries and keys into this many heads (d = H * d_head / heads).
    keep:  (B, M) token indices (prefix tokens included if wanted); rows and columns are restricted to
           them before the softmax, which renormalises the attention over the kept tokens.
    """
    q, k = qk.unbind(0)
    if keep is not None:
        index = keep[:, None, :, None].expand(-1, q.shape[1], -1, q.shape[-1])
        q, k = q.gather(2, index), k.gather(2, index)
    if heads is not None and heads != q.shape[1]:
        q, k = (_resplit(t, heads) for t in (q, k))
    logits = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])
    return logits.float().softmax(dim=-1).to(q.dtype)


def _resplit(t: Tensor, heads: int) -> Tensor:
    batch, old_heads, tokens, dim = t.shape
    width = old_heads * dim
    if width % heads:
        raise UsageError(
            f"cannot split {width} attention channels into {heads} relation heads; choose a divisor of {width}"
        )
    return t.transpose(1, 2).reshape(batch, tokens, heads, width // heads).transpose(1, 2)
