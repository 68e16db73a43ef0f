"""The helpers strategies share, so that no strategy borrows from another's module.

- config checks, run while a recipe is validated: `check_positive`, `check_non_negative`, `check_fraction`;
- `all_gather`: every process's rows, in rank order, inside a loss (contrastive negatives);
- `gather_tokens`: pick tokens by index (kept, context or target tokens; defined in features.py, which
  runs a ViT on kept tokens with it);
- the teacher's embedding target, its pooled embedding or its projection head's output, chosen by a
  `teacher_embed: auto | projection | embedding` key: `uses_projection`, `check_teacher_embed`,
  `embedding_request`, `teacher_vector`;
- losses several strategies use: `kd_loss` (Hinton KD), `labelled_ce`, `regression_loss`;
- for strategies that run the student themselves: `peer_features`, `generator_from_global_rng`;
- small pieces: `as_map`, `mlp_head`, `fp32`.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Iterable, Literal

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import UsageError
from ..features import FeatureRequest, Features, extract_features, gather_tokens  # noqa: F401  (gather_tokens: shared)

TeacherEmbed = Literal["auto", "projection", "embedding"]  # auto = the projection if the teacher has one


# ----------------------------------------------------------------------------- config checks


def check_positive(strategy: str, config: Any, keys: Iterable[str]) -> None:
    """Each key of `config` is > 0 or None (None stands for a default)."""
    for key in keys:
        value = getattr(config, key)
        if value is not None and value <= 0:
            raise UsageError(f"strategy.{strategy}.{key} must be positive, got {value}")


def check_non_negative(strategy: str, config: Any, keys: Iterable[str]) -> None:
    for key in keys:
        value = getattr(config, key)
        if value < 0:
            raise UsageError(f"strategy.{strategy}.{key} must be 0 or more, got {value}")


def check_fraction(strategy: str, config: Any, keys: Iterable[str], one_allowed: bool = True) -> None:
    """Each key is in [0, 1], or in [0, 1) when `one_allowed` is false."""
    for key in keys:
        value = getattr(config, key)
        if not (0.0 <= value <= 1.0 if one_allowed else 0.0 <= value < 1.0):
            raise UsageError(f"strategy.{strategy}.{key} must be in [0, 1{']' if one_allowed else ')'}, got {value}")


# ----------------------------------------------------------------------------- processes


class _AllGather(torch.autograd.Function):
    """all_gather whose backward sums every process's gradient of the gathered rows and keeps its own."""

    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:
        ctx.rows, ctx.rank = x.shape[0], dist.get_rank()
        parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, x.contiguous())
        return torch.cat(parts)

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:
        grad = grad.contiguous()
        dist.all_reduce(grad)
        return grad[ctx.rank * ctx.rows : (ctx.rank + 1) * ctx.rows]


def all_gather(x: Tensor) -> tuple[Tensor, int]:
    """Every process's rows of `x` in rank order, (world * B, ...), and the row where this process's own
    start, B * rank; `x` itself and 0 without torch.distributed or with one process.

    Differentiable, as SimCLR's `tpu_cross_replica_concat`: the backward all-reduces the gradient of the
    gathered rows and keeps this process's, so with DDP's gradient mean the update is the one of a single
    process holding the global batch. A tensor without gradient gives rows without (SDSSL's keys).
    State updates after the loss use the `gather` the training loop passes to `after_step` instead."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return x, 0
    return _AllGather.apply(x), x.shape[0] * dist.get_rank()


# ----------------------------------------------------------------------------- the teacher's embedding target


def uses_projection(teacher_embed: TeacherEmbed, teacher: Any) -> bool:
    """`teacher_embed` auto | projection | embedding -> whether to distil the teacher's projection."""
    if teacher_embed == "auto":
        return bool(teacher.has_projection)
    return teacher_embed == "projection"


def check_teacher_embed(strategy: str, teacher_embed: TeacherEmbed, teacher: Any) -> None:
    if teacher_embed == "projection" and not teacher.has_projection:
        raise UsageError(
            f"strategy.{strategy}.teacher_embed = projection, but teacher {teacher.name!r} has no "
            "projection head; use auto or embedding"
        )


def embedding_request(teacher_embed: TeacherEmbed, teacher: Any) -> FeatureRequest:
    """Ask the teacher for its projection-head output or for its pooled embedding, not both."""
    projection = uses_projection(teacher_embed, teacher)
    return FeatureRequest(embedding=not projection, projection=projection)


def teacher_vector(features: Features, use_projection: bool) -> Tensor:
    """The teacher's pooled embedding or its projection-head output, (B, D)."""
    return features.projection if use_projection else features.embedding


# ----------------------------------------------------------------------------- shared losses


def kd_loss(student_logits: Tensor, teacher_logits: Tensor, temperature: float) -> Tensor:
    """Hinton KD (Hinton, Vinyals, Dean 2014, arXiv 1503.02531), in fp32:

    L = T^2 * (1/B) sum_b KL(softmax(t_b / T) || softmax(s_b / T))   (summed over classes)"""
    with torch.autocast(device_type=student_logits.device.type, enabled=False):
        log_p_student = F.log_softmax(fp32(student_logits) / temperature, dim=1)
        p_teacher = F.softmax(fp32(teacher_logits) / temperature, dim=1)
        return F.kl_div(log_p_student, p_teacher, reduction="batchmean") * temperature**2


def labelled_ce(logits: Tensor, labels: Tensor | None, strategy: str) -> Tensor | None:
    """CE(logits_b, y_b) averaged over the rows with a label (y >= 0; -1 = unlabelled), in fp32; None
    when the step carries no labels at all.

    A batch without any labelled row gives 0 * sum(logits): nothing to learn, but the head stays in
    the autograd graph, which DDP needs (every parameter must get a gradient each step)."""
    if labels is None:
        return None
    labels = labels.to(logits.device)
    keep = labels >= 0
    if not bool(keep.any()):
        return fp32(logits).sum() * 0.0
    kept = labels[keep]
    if int(kept.max()) >= logits.shape[1]:
        raise UsageError(
            f"strategy {strategy!r}: a label is {int(kept.max())} but the classifier has {logits.shape[1]} "
            f"classes; set strategy.{strategy}.ce_classes to the number of classes in the data"
        )
    with torch.autocast(device_type=logits.device.type, enabled=False):
        return F.cross_entropy(fp32(logits[keep]), kept)


def regression_loss(prediction: Tensor, target: Tensor, loss: str, beta: float) -> Tensor:
    """Element mean of Smooth-L1_beta(prediction - target) (`loss` smooth_l1, as Bootleg) or of the
    squared error (mse), in fp32."""
    with torch.autocast(device_type=prediction.device.type, enabled=False):
        prediction, target = fp32(prediction), fp32(target)
        if loss == "smooth_l1":
            return F.smooth_l1_loss(prediction, target, beta=beta)
        return F.mse_loss(prediction, target)


# ----------------------------------------------------------------------------- strategies that run the student


def peer_features(student: nn.Module, x: Tensor, peer_request: FeatureRequest) -> dict[str, Any]:
    """The `Features` fields the objective's other strategies need from the student (`peer_request`),
    from one full forward; none without a request. A strategy running the student adds its own."""
    full = extract_features(student, x, peer_request) if peer_request != FeatureRequest() else Features()
    return {f.name: getattr(full, f.name) for f in dataclasses.fields(Features)}


def process_share() -> tuple[int, int]:
    """(number of processes, this process's rank); (1, 0) without a process group."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_world_size(), torch.distributed.get_rank()
    return 1, 0


def generator_from_global_rng() -> torch.Generator:
    """A CPU generator seeded by one draw of the global torch RNG, which checkpoints save and restore."""
    return torch.Generator().manual_seed(int(torch.randint(0, 2**62, (1,))))


# ----------------------------------------------------------------------------- small pieces


def as_map(features: Tensor, what: str) -> Tensor:
    """(B, C, H, W) maps stay; (B, N, C) tokens of a square grid become (B, C, sqrt N, sqrt N)."""
    if features.dim() == 4:
        return features
    side = math.isqrt(features.shape[1]) if features.dim() == 3 else 0
    if side == 0 or side * side != features.shape[1]:
        raise UsageError(
            f"{what} has shape {tuple(features.shape)}; expected (B, C, H, W) maps or the tokens of a square patch grid"
        )
    return features.transpose(1, 2).reshape(features.shape[0], features.shape[2], side, side)


def mlp_head(in_dim: int, hidden_dim: int, out_dim: int) -> nn.Sequential:
    """Linear -> ReLU -> Linear, the projection head SEED puts on the student."""
    return nn.Sequential(nn.Linear(in_dim, hidden_dim), nn.ReLU(inplace=True), nn.Linear(hidden_dim, out_dim))


def heads_per_view(head: nn.Module, views: list[Tensor]) -> list[Tensor]:
    """`head` (one layer or an nn.Sequential of them) applied to each view's rows as one batch: every layer
    but the batch norms on all rows at once (Linear, ReLU, ...: row-wise, so the same numbers), each batch
    norm on each view's rows alone (statistics and running-moment updates per view, in view order, as
    separate `head(view)` calls give). One matrix product of V x B rows instead of V of B: on the CPU the
    weight gradient of a 1024 -> 1280 Linear at B = 128 runs ~1.4x slower per row than at 256 (MKL,
    1 thread). Returns one output per view."""
    rows = [v.shape[0] for v in views]
    x = torch.cat(views) if len(views) > 1 else views[0]
    for layer in head if isinstance(head, nn.Sequential) else [head]:
        if isinstance(layer, nn.modules.batchnorm._BatchNorm) and len(views) > 1:
            x = torch.cat([layer(part) for part in x.split(rows)])
        else:
            x = layer(x)
    return list(x.split(rows))


def fp32(t: Tensor) -> Tensor:
    return t.float() if t.dtype != torch.float32 else t
