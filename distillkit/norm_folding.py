"""Folding a frozen teacher's batch norms into the convolutions that feed them: the same outputs, faster.

A teacher never leaves eval mode, so each BatchNorm2d after a convolution is a fixed per-channel affine map
of that convolution's output. With the convolution's weight W and bias b (0 when it has none), and the
norm's running mean mu and variance var, eps, and affine gamma and beta:

    BN(conv(x)) = conv'(x),   W' = W * s (per output channel),   b' = (b - mu) * s + beta,
    s = gamma / sqrt(var + eps)

(the standard inference fold; torch's `fuse_conv_bn_weights` computes it). The norm then only runs what
comes after it (timm's `BatchNormAct2d`: its dropout and activation), and the pass over the activations it
cost is gone: EfficientNet-Lite0 at 64 px embeds ~1.2-1.35x as many images per second on 2 CPU cores.

Which norm follows which convolution is read from one forward pass on a random batch (a norm whose input is
the very tensor a convolution returned, each called once), and the folded network is checked against the
original on that batch: when any output differs by more than float rounding (a convolution output that is
also read elsewhere, an unusual norm), every change is undone and the teacher runs as loaded.
"""

from __future__ import annotations

import copy
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator

import torch
from timm.layers import BatchNormAct2d
from torch import Tensor, nn
from torch.nn.utils.fusion import fuse_conv_bn_weights

TOLERANCE = 1e-4  # largest difference allowed, relative to the output's largest magnitude


class FoldedNorm(nn.Module):
    """What is left of a norm folded into its convolution: timm's BatchNormAct2d dropout and activation."""

    def __init__(self, norm: nn.Module):
        super().__init__()
        self.drop = getattr(norm, "drop", nn.Identity())
        self.act = getattr(norm, "act", nn.Identity())

    def forward(self, x: Tensor) -> Tensor:
        return self.act(self.drop(x))


@dataclass
class _Fold:
    conv: nn.Conv2d
    norm: nn.BatchNorm2d
    parent: nn.Module
    attribute: str
    weight: nn.Parameter
    bias: nn.Parameter | None


def fold_batch_norms(model: nn.Module, input_size: tuple[int, int]) -> int:
    """Fold every batch norm of `model` (in eval mode) that directly follows a convolution; returns how many
    were folded (0 when the folded model would not give the same outputs: it is then left as it was)."""
    return len(_fold_checked(model, input_size))


@contextmanager
def folded_norms(model: nn.Module, input_size: tuple[int, int]) -> Iterator[nn.Module]:
    """Within the context, `model` (in eval mode) runs with its batch norms folded, in place; afterwards it is
    exactly as it was (its own parameter and norm objects put back). For scoring a model that goes on training or
    is exported next: the speed of the folded network without a copy of it."""
    folds = _fold_checked(model, input_size)
    try:
        yield model
    finally:
        for fold in reversed(folds):
            _undo(fold)


def _fold_checked(model: nn.Module, input_size: tuple[int, int]) -> list[_Fold]:
    """The folds made in `model`, none when the folded model's outputs on a probe batch differ from its own."""
    if not any(_foldable(m) for m in model.modules()):
        return []
    probe = torch.rand(2, 3, *input_size, generator=torch.Generator().manual_seed(0))
    device = next(model.parameters()).device
    probe = probe.to(device)
    pairs, expected = _conv_norm_pairs(model, probe)
    folds = [_fold(model, conv, norm) for conv, norm in pairs]
    if not folds:
        return []
    with torch.no_grad():
        got = model(probe)
    if not _same(expected, got):
        for fold in reversed(folds):
            _undo(fold)
        return []
    return folds


def folded_copy(model: nn.Module, input_size: tuple[int, int]) -> nn.Module:
    """`model` (in eval mode) as a deployment runs it: a copy with its batch norms folded, or `model` itself
    when it has none to fold (a ViT, a teacher folded already)."""
    if not any(_foldable(m) for m in model.modules()):
        return model
    folded = copy.deepcopy(model)
    fold_batch_norms(folded, input_size)
    return folded


def _foldable(module: nn.Module) -> bool:
    return type(module) in (nn.BatchNorm2d, BatchNormAct2d) and module.track_running_stats and not module.training


def _conv_norm_pairs(model: nn.Module, probe: Tensor) -> tuple[list[tuple[nn.Conv2d, nn.Module]], object]:
    """(convolution, norm) pairs where the norm's input is the convolution's output, each module called once
    in a forward pass on `probe`; and the model's outputs on it."""
    produced: dict[int, tuple[nn.Module, Tensor]] = {}  # id(output) -> (conv, output): kept alive, ids unique
    fed: list[tuple[nn.Module, nn.Module]] = []
    calls: dict[int, int] = {}

    def after_conv(module, args, output):
        calls[id(module)] = calls.get(id(module), 0) + 1
        produced[id(output)] = (module, output)

    def before_norm(module, args):
        calls[id(module)] = calls.get(id(module), 0) + 1
        source = produced.get(id(args[0]))
        if source is not None and source[1] is args[0]:
            fed.append((source[0], module))

    hooks = [m.register_forward_hook(after_conv) for m in model.modules() if isinstance(m, nn.Conv2d)]
    hooks += [m.register_forward_pre_hook(before_norm) for m in model.modules() if _foldable(m)]
    try:
        with torch.no_grad():
            expected = model(probe)
    finally:
        for hook in hooks:
            hook.remove()
    fed_by = [conv for conv, _ in fed]
    pairs = [
        (conv, norm) for conv, norm in fed if calls[id(conv)] == 1 and calls[id(norm)] == 1 and fed_by.count(conv) == 1
    ]
    return pairs, expected


def _fold(model: nn.Module, conv: nn.Conv2d, norm: nn.Module) -> _Fold:
    parent, attribute = _owner(model, norm)
    fold = _Fold(conv, norm, parent, attribute, conv.weight, conv.bias)
    weight, bias = fuse_conv_bn_weights(
        conv.weight, conv.bias, norm.running_mean, norm.running_var, norm.eps, norm.weight, norm.bias
    )
    conv.weight, conv.bias = weight.requires_grad_(False), bias.requires_grad_(False)
    setattr(parent, attribute, FoldedNorm(norm))
    return fold


def _undo(fold: _Fold) -> None:
    fold.conv.weight, fold.conv.bias = fold.weight, fold.bias
    setattr(fold.parent, fold.attribute, fold.norm)


def _owner(model: nn.Module, module: nn.Module) -> tuple[nn.Module, str]:
    for name, candidate in model.named_modules():
        if candidate is module:
            parent_name, _, attribute = name.rpartition(".")
            return model.get_submodule(parent_name), attribute
    raise ValueError("the norm is not part of the model")


def _same(expected, got) -> bool:
    """Whether two model outputs (tensors, or tuples / lists / dicts of them) agree within float rounding."""
    if isinstance(expected, Tensor):
        if not isinstance(got, Tensor) or got.shape != expected.shape:
            return False
        scale = expected.abs().max().clamp_min(1e-6)
        return bool(((got - expected).abs().max() <= TOLERANCE * scale).item())
    if isinstance(expected, dict):
        same_keys = isinstance(got, dict) and expected.keys() == got.keys()
        return same_keys and all(_same(expected[k], got[k]) for k in expected)
    if isinstance(expected, (tuple, list)):
        return len(expected) == len(got) and all(_same(e, g) for e, g in zip(expected, got))
    return expected == got
