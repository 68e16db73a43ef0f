"""Agglomerate's adaptor heads outside distillkit: the student's embedding and feature maps mapped to each
teacher's, as `distillkit export RUN --heads` writes them (AM-RADIO's use of its adaptors, arXiv 2312.06709).

    heads = load_heads("runs/my-run/student-safetensors-heads")      # {role: AdaptorHead}
    embedding, student_map = student_features(student, images)        # images as the student expects them
    heads["teacher"](embedding)                                        # (B, D_t): the teacher's pooled embedding
    heads["teacher"].dense(student_map)                                # (B, H_t * W_t, C_t): its patch tokens
    # a run with strategy.agglomerate.dense_layers of several layers has a dense head on each of them:
    maps = student_maps(student, images, heads["teacher"].dense_layers)  # {layer: that layer's map}
    {layer: heads["teacher"].dense(m, layer) for layer, m in maps.items()}  # each: (B, H_t * W_t, C_t)

The files, in `<export>/heads/`, one pair per teacher role, are all that is needed (this module is plain
PyTorch and can be rewritten from this description):

    <role>.safetensors   float32 tensors `<path>.<layer>.weight` and `.bias`, path `summary`, and unless the run
                         had dense_weight 0 `dense` (the deepest dense layer's head) and `dense_layer<s>` for
                         every other dense layer s; layer:
                           fc1      Linear in_dim -> hidden_dim
                           fc2      Linear hidden_dim -> out_dim         out_dim: the standardised width
                           restore  Linear out_dim -> teacher_dim        the training's standardiser undone
    <role>.json          `format` "distillkit-adaptor-head", `version` 1; `role`; `teacher` (name, architecture,
                         input_size, mean, std, ...); `student` (architecture, input_size, source);
                         `standardize` (phi_s, zscore or none); `summary` and `dense` (null without dense
                         heads): in_dim, hidden_dim, out_dim, teacher_dim, and for dense `layer` (the student
                         layer it reads, an index into model.feature_info; absent in files written before dense
                         stages: the last layer), student_grid and teacher_grid ([rows, columns]), resample (the
                         rule below); `dense_stages` (empty or absent with one dense layer): the other dense
                         layers' heads, ascending, each with the keys of `dense` and `path` ("dense_layer<s>",
                         the prefix of its tensors)

Each path computes  y = fc2(relu(fc1(x)))  (the standardised target it was trained on) and then
restore(y) = y @ restore.weight^T + restore.bias, the teacher's own space. The standardisers are affine, and
restore holds their inverse: phi_s (x - mu) W^T with W = H[:, :d] U^T / alpha is undone by
x = mu + alpha^2 y W (the padded coordinates of y dropped); zscore (x - mu) / sqrt(var + 1e-6) by
x = mu + y sqrt(var + 1e-6); none by the identity. Before the standardiser's first update it is the identity.
Every dense path of a teacher restores through the same standardiser (one per teacher in training).

- summary: x is the student's pooled embedding (B, in_dim): the exported student's `model(images)` (timm,
  num_classes 0), i.e. `model.forward_head(model.forward_features(images), pre_logits=True)`. The output
  estimates the teacher's pooled embedding (its forward_head(..., pre_logits=True)) of the same image, seen at
  the teacher's own input size and normalisation.
- dense (and each of dense_stages): x is the student's layer `layer` before its final norm,
  `model.forward_intermediates(images, indices=[layer], norm=False)` (`student_maps`; the last layer,
  len(model.feature_info) - 1, is what `student_features` gives): a CNN's stage map (B, in_dim, h, w), or a
  ViT block's tokens without the class / register tokens, (B, h * w, in_dim) in row-major order, as a (h, w)
  map, (h, w) = student_grid. fc1 and fc2 run on every position of the student's grid; the map (B, out_dim,
  h, w) is resampled to the teacher's grid (H, W) = teacher_grid: adaptive average pooling when h >= H and
  w >= W, else bilinear interpolation with align_corners=False; restore then runs on every position. The
  output (B, H * W, teacher_dim), row-major, estimates the teacher's last layer before its final norm: a ViT's
  patch tokens, a CNN's last stage map flattened. (Both resamplings average with weights that sum to 1, so
  restoring before or after resampling gives the same result.) Every dense layer's head estimates the same
  teacher layer; training regressed the mean of their losses.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Sequence

import torch.nn.functional as F
from torch import Tensor, nn

from .errors import UsageError

HEADS_FOLDER = "heads"
HEAD_FORMAT = "distillkit-adaptor-head"
HEAD_FORMAT_VERSION = 1
RESAMPLE_RULE = (
    "adaptive average pooling when the student's grid is at least the teacher's in both directions, "
    "else bilinear interpolation (align_corners=False)"
)


class HeadPath(nn.Module):
    """fc1 -> ReLU -> fc2 (the standardised target), then restore (the teacher's space)."""

    def __init__(self, in_dim: int, hidden_dim: int, out_dim: int, teacher_dim: int):
        super().__init__()
        self.fc1 = nn.Linear(in_dim, hidden_dim)
        self.fc2 = nn.Linear(hidden_dim, out_dim)
        self.restore = nn.Linear(out_dim, teacher_dim)

    def standardised(self, x: Tensor) -> Tensor:
        return self.fc2(F.relu(self.fc1(x)))

    def forward(self, x: Tensor) -> Tensor:
        return self.restore(self.standardised(x))


def _path(dims: dict[str, Any]) -> HeadPath:
    return HeadPath(dims["in_dim"], dims["hidden_dim"], dims["out_dim"], dims["teacher_dim"])


class AdaptorHead(nn.Module):
    """One teacher's heads, built from its <role>.json: `head(embedding)` gives the teacher-space pooled
    embedding, `head.dense(student_map, layer)` the teacher-space tokens at the teacher's grid from the student's
    map of one of `dense_layers`."""

    def __init__(self, config: dict[str, Any]):
        super().__init__()
        self.config = config
        self.role = config["role"]
        self.summary_path = _path(config["summary"])
        dense = config.get("dense")
        self.dense_path = _path(dense) if dense else None
        self.teacher_grid = tuple(dense["teacher_grid"]) if dense else None
        stages = (config.get("dense_stages") or []) if dense else []
        self.stage_paths = nn.ModuleDict({stage["path"]: _path(stage) for stage in stages})
        self.stage_configs = {stage["layer"]: stage for stage in stages}
        self.deepest_layer = dense.get("layer", -1) if dense else None

    @property
    def dense_layers(self) -> list[int]:
        """The student layers the dense heads read, ascending (the deepest last; -1, the last layer, for files
        written before dense stages); [] without dense heads."""
        if self.dense_path is None:
            return []
        return sorted(self.stage_configs) + [self.deepest_layer]

    def forward(self, embedding: Tensor) -> Tensor:
        """(B, in_dim) student embedding -> (B, teacher_dim) in the teacher's space."""
        return self.summary_path(embedding)

    def dense(self, student_map: Tensor, layer: int | None = None) -> Tensor:
        """The student's layer `layer` (None: the deepest of `dense_layers`), a map (B, C, h, w) or ViT tokens
        (B, h * w, C) -> (B, H * W, teacher_dim): the teacher's tokens at its grid (H, W), in its space."""
        if self.dense_path is None:
            raise UsageError(
                f"the heads of teacher {self.role!r} have no dense path: the run was trained with "
                "strategy.agglomerate.dense_weight=0"
            )
        if layer is None or layer == self.deepest_layer:
            path, dims = self.dense_path, self.config["dense"]
        elif layer in self.stage_configs:
            dims = self.stage_configs[layer]
            path = self.stage_paths[dims["path"]]
        else:
            raise UsageError(
                f"the heads of teacher {self.role!r} have dense paths for the student's layers {self.dense_layers}, "
                f"not layer {layer}; pass one of them (None = the deepest)"
            )
        maps = _as_map(student_map, dims.get("student_grid"))
        batch, _, rows, columns = maps.shape
        tokens = path.standardised(maps.flatten(2).transpose(1, 2))
        grid = tokens.transpose(1, 2).reshape(batch, tokens.shape[-1], rows, columns)
        return path.restore(_resample(grid, self.teacher_grid).flatten(2).transpose(1, 2))

    def load_weights(self, weights: dict[str, Tensor], source: str) -> None:
        """Load `<path>.<layer>.<weight|bias>` tensors, every one of them and no other."""
        paths = {"summary": self.summary_path, "dense": self.dense_path, **self.stage_paths}
        expected = {f"{name}.{key}" for name, path in paths.items() if path is not None for key in path.state_dict()}
        if set(weights) != expected:
            missing, unexpected = sorted(expected - set(weights)), sorted(set(weights) - expected)
            raise UsageError(
                f"{source} does not match its json (missing {missing[:3]}, unexpected {unexpected[:3]}); "
                "export the heads again"
            )
        for name, path in paths.items():
            if path is not None:
                path.load_state_dict({k[len(name) + 1 :]: v for k, v in weights.items() if k.startswith(name + ".")})


def _as_map(features: Tensor, grid: list[int] | None = None) -> Tensor:
    """(B, C, H, W) stays; (B, N, C) tokens become (B, C, rows, columns): the head's student_grid when it has N
    cells, else a square grid."""
    if features.dim() == 4:
        return features
    count = features.shape[1] if features.dim() == 3 else 0
    if grid is not None and count and grid[0] * grid[1] == count:
        rows, columns = grid
    else:
        rows = columns = math.isqrt(count)
    if rows == 0 or rows * columns != count:
        raise UsageError(
            f"the student map has shape {tuple(features.shape)}; expected (B, C, H, W) maps or the tokens of the "
            f"student's patch grid {grid} (or a square one), (B, N, C)"
        )
    return features.transpose(1, 2).reshape(features.shape[0], features.shape[2], rows, columns)


def _resample(maps: Tensor, size: tuple[int, int]) -> Tensor:
    """(B, C, h, w) -> (B, C, *size) by RESAMPLE_RULE."""
    if tuple(maps.shape[-2:]) == tuple(size):
        return maps
    if maps.shape[-2] >= size[0] and maps.shape[-1] >= size[1]:
        return F.adaptive_avg_pool2d(maps, size)
    return F.interpolate(maps, size=size, mode="bilinear", align_corners=False)


def student_features(model: nn.Module, images: Tensor) -> tuple[Tensor, Tensor]:
    """The student's inputs to the heads from one pass: its pooled embedding (B, D) and its last layer before
    the final norm, a CNN's map (B, C, h, w) or a ViT's patch tokens (B, h * w, C). `images` resized and
    normalised as the student expects (its config.json's pretrained_cfg)."""
    is_vit = hasattr(model, "blocks") and hasattr(model, "patch_embed")
    final, (last,) = model.forward_intermediates(
        images, indices=[len(model.feature_info) - 1], norm=False, output_fmt="NLC" if is_vit else "NCHW"
    )
    return model.forward_head(final, pre_logits=True), last


def student_maps(model: nn.Module, images: Tensor, layers: Sequence[int]) -> dict[int, Tensor]:
    """The student's inputs to the dense heads of `layers` (an AdaptorHead's `dense_layers`; indices into
    model.feature_info, negative from the end) from one pass: layer -> that layer before the final norm, a CNN's
    stage map (B, C, h, w) or a ViT block's patch tokens (B, h * w, C), keyed as given."""
    is_vit = hasattr(model, "blocks") and hasattr(model, "patch_embed")
    total = len(model.feature_info)
    resolved = {layer: layer + total if layer < 0 else layer for layer in layers}
    outside = [layer for layer, index in resolved.items() if not 0 <= index < total]
    if outside:
        raise UsageError(
            f"student_maps: layers {outside} are not layers of this {total}-layer student; pass the heads' "
            "dense_layers (indices into model.feature_info)"
        )
    indices = sorted(set(resolved.values()))
    taps = model.forward_intermediates(
        images,
        indices=indices,
        norm=False,
        output_fmt="NLC" if is_vit else "NCHW",
        intermediates_only=True,
        stop_early=True,
    )
    by_index = dict(zip(indices, taps))
    return {layer: by_index[index] for layer, index in resolved.items()}


def heads_folder(path: str | Path) -> Path:
    """The heads/ folder of the export folder `path`, or `path` itself (a heads/ folder)."""
    path = Path(path).expanduser()
    folder = path / HEADS_FOLDER if (path / HEADS_FOLDER).is_dir() else path
    if not any(folder.glob("*.json")):
        raise UsageError(
            f"{path} holds no adaptor heads (expected {HEADS_FOLDER}/<role>.json and <role>.safetensors); "
            "export them with: distillkit export RUN --heads"
        )
    return folder


def read_head_config(path: Path) -> dict[str, Any]:
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
        config["role"], config["summary"]["in_dim"]
    except (OSError, ValueError, KeyError, TypeError):
        raise UsageError(f"{path} is damaged or not an adaptor head's json; export the heads again") from None
    if config.get("format") != HEAD_FORMAT or config.get("version") != HEAD_FORMAT_VERSION:
        raise UsageError(
            f"{path} is not a {HEAD_FORMAT} json of version {HEAD_FORMAT_VERSION} (it says "
            f"{config.get('format')!r}, version {config.get('version')!r}); export the heads with this distillkit"
        )
    return config


def load_heads(path: str | Path) -> dict[str, AdaptorHead]:
    """role -> its AdaptorHead (eval mode), from an export folder or its heads/ folder."""
    from safetensors.torch import load_file

    heads = {}
    for config_file in sorted(heads_folder(path).glob("*.json")):
        config = read_head_config(config_file)
        weights_file = config_file.with_suffix(".safetensors")
        if not weights_file.is_file():
            raise UsageError(f"{config_file} has no {weights_file.name} beside it; export the heads again")
        head = AdaptorHead(config)
        head.load_weights(load_file(str(weights_file)), str(weights_file))
        heads[config["role"]] = head.eval()
    return heads
