"""Projection heads rebuilt from their tensors: the MLP projectors of MoCo v2 and MoCo v3.

The projectors are `nn.Sequential`s of Linear and BatchNorm1d layers with parameter-free ReLUs in
between, saved under their Sequential indices:

    MoCo v2 (fc):         0 Linear(2048, 2048)         1 ReLU  2 Linear(2048, 128)
    MoCo v3 ResNet (fc):  0 Linear(2048, 4096, no bias) 1 BN  2 ReLU  3 Linear(4096, 256, no bias)  4 BN(affine=False)
    MoCo v3 ViT (head):   0 Linear  1 BN  2 ReLU  3 Linear  4 BN  5 ReLU  6 Linear  7 BN(affine=False)

`mlp_head` reads the layer kinds and sizes from the tensors (a 2-d `weight` is a Linear, a `running_mean`
a BatchNorm1d, a missing index a ReLU) and loads them strictly, so the dims are never hard-coded.
"""

from __future__ import annotations

from pathlib import Path

from torch import nn

from ..errors import UsageError
from .checkpoint import StateDict, load_exact


def mlp_head(state: StateDict, source: str | Path) -> nn.Sequential:
    """An eval-mode projection head holding exactly the tensors of `state` (keys "<index>.<name>")."""
    layers: dict[int, dict[str, object]] = {}
    for key, tensor in state.items():
        index, _, name = key.partition(".")
        if not index.isdigit() or not name:
            raise UsageError(
                f"{source}: projection-head tensor {key!r} is not '<layer index>.<name>'; "
                "only MLP projectors (Linear / BatchNorm1d / ReLU) are supported"
            )
        layers.setdefault(int(index), {})[name] = tensor
    modules: list[nn.Module] = []
    for index in range(max(layers) + 1 if layers else 0):
        params = layers.get(index)
        if params is None:
            modules.append(nn.ReLU(inplace=False))
        elif "running_mean" in params:
            affine = "weight" in params
            modules.append(nn.BatchNorm1d(params["running_mean"].shape[0], affine=affine))
        elif "weight" in params and params["weight"].ndim == 2:
            out_dim, in_dim = params["weight"].shape
            modules.append(nn.Linear(in_dim, out_dim, bias="bias" in params))
        else:
            raise UsageError(
                f"{source}: projection-head layer {index} holds {', '.join(sorted(params))}, "
                "neither a Linear nor a BatchNorm1d"
            )
    head = nn.Sequential(*modules)
    load_exact(head, state, f"{source} (projection head)")
    return head.eval()
