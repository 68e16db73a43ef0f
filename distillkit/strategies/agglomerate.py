"""Agglomerate: one student, many teachers; per teacher an adaptor head on the student regresses that
teacher's standardised pooled embedding (summary) and token map (dense).

AM-RADIO (Ranzinger, Heinrich, Kautz, Molchanov, "AM-RADIO: Agglomerative Vision Foundation Model - Reduce All
Domains Into One", CVPR 2024, arXiv 2312.06709; adaptor heads: NVlabs/RADIO radio/adaptor_mlp.py), with PHI-S
target standardisation (arXiv 2410.01680; standardize.py) and UNIC's teacher dropping (Sariyildiz,
Weinzaepfel, Lucas, Larlus, Kalantidis, "UNIC: Universal Classification Models via Multi-teacher
Distillation", ECCV 2024, arXiv 2408.05088; official code naver/unic modeling/teacher_dropping.py). For every
teacher t of the roles read (`teachers`; None = every teacher of the recipe) and image b:

    y_t = N_t(f_t(x))                 its pooled embedding, standardised (N_t: zscore, phi_s or none)
    p_t = h_t(f_S(x))                 h_t = Linear -> ReLU -> Linear (hidden `head_hidden`, default the
                                      teacher's width) on the student's pooled embedding
    S_tb = c_s (1 - cos(p_tb, y_tb)) + l_s mean_d SmoothL1_beta(p_tbd - y_tbd)
    Y_t = M_t(T_t(x))                 its last block's patch tokens (ViT) or last stage map (CNN) on its own
                                      grid, standardised per channel by a second standardiser M_t
    P_ts = R_t(g_ts(F_s(x)))          for every student layer s of `dense_layers` (default [-1]: the last):
                                      g_ts = the same MLP per token, one per layer, on the student's layer s,
                                      a ViT block's patch tokens as its patch grid or a CNN stage map;
                                      R_t resamples its output to the teacher's grid
    D_tbs = mean_k [c_d (1 - cos(P_tsbk, Y_tbk)) + l_d mean_c SmoothL1_beta(P_tsbkc - Y_tbkc)]
           (dense_loss mse: mean_{k,c} (P_tsbkc - Y_tbkc)^2)
    D_tb = mean_s D_tbs               equal weights; one layer: D_tb = D_tbs

    L = sum_t w_t sum_b m_tb (S_tb + lambda_d D_tb) / Z,   Z = sum_t sum_b w_t m_tb

w_t: the teachers' shares (`weights`, default equal), normalised to sum 1 so the loss does not grow with the
number of teachers; lambda_d = `dense_weight` (0: no dense heads, and no teacher layers are requested);
m_tb = 1 unless teachers are dropped. Terms: `agglomerate.<role>.summary` = sum_b m_tb S_tb / Z and
`agglomerate.<role>.dense` = sum_b m_tb D_tb / Z, weighted w_t and w_t lambda_d; without dropping Z = B and each
term is its batch mean.

- Loss weights: AM-RADIO's summary loss is the cosine distance (c_s = 1, l_s = 0) and its feature loss
  0.9 cosine + 0.1 Smooth-L1 (c_d = 0.9, l_d = 0.1), beta 1; these are the defaults. UNIC uses 0.5 / 0.5 for both.
- Teacher dropping (UNIC, `teacher_drop` = p; UNIC's code uses 0.5, ours defaults to 0 = off): per image,
  the teacher with the largest loss S_tb + lambda_d D_tb is always kept and every other one is dropped
  (m_tb = 0) independently with probability p; Z then counts the kept (image, teacher) pairs, as UNIC's
  coefficients normalised by their sum. The draws come from a generator seeded by the global torch RNG for
  the whole global batch, and every process keeps its own rows (as hidden's masks), so one process and
  several draw the same. [D: UNIC ranks by its per-image loss, the mean of the class-token and patch-token
  losses; ours by S_tb + lambda_d D_tb, which the shares do not scale. A dropped pair keeps its head in the
  graph with a zero factor, so DDP sees every parameter used.]
- Dense layers [D]: `dense_layers` holds block / stage indices (negative from the end) or relative depths in
  (0, 1], resolved as strategy dense's `student_layers` ([0.5, 0.75, 1.0] = the levels of strides 8, 16, 32 on
  timm CNNs); entries that resolve to the same layer count once. Every layer regresses the same target Y_t
  through its own head, at the teacher's resolution (strategy dense instead resamples the target to each
  stage's grid), and the layers share the teacher's standardiser M_t. The stages are averaged, not summed, so
  lambda_d keeps its meaning whatever their number, and the term contract stays one dense term per teacher.
  AM-RADIO puts its adaptors on the last layer only (the default); multi-stage heads follow FitNets' hints
  (Romero et al., ICLR 2015, arXiv 1412.6550) and strategy dense.
- Resampling R_t [D]: when the student's grid is at least the teacher's in both directions, adaptive average
  pooling (every student cell counts); otherwise bilinear interpolation (align_corners False). The head runs
  on the student's grid, before resampling.
- Standardisers: `standardize` (default phi_s), moments of momentum `moments_momentum`, updated after each
  step from the gathered global batch (the dense ones from every token of it); before the first update the
  targets are raw. [D: phi_s by default: with it every teacher's target has unit variance in every output
  dimension by one scalar scale, so the Smooth-L1 / MSE terms of different teachers are comparable and the
  cosine geometry of each is kept; zscore rescales each dimension on its own, which changes the angles the
  cosine terms compare.] A phi_s head predicts n >= d values (standardize.py pads widths without a Hadamard
  matrix).

Heads: `heads[role]["summary"]`, `heads[role]["dense"]` (g_ts of the deepest dense layer) and
`heads[role]["dense_layer<s>"]` (g_ts of every other dense layer s, its resolved index) (`adaptor_heads()`);
their outputs are in the standardised space of `standardizers[role]["summary" / "dense"]` (one dense
standardiser per teacher), whose `restore` maps them to the teacher's.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Literal, Mapping

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import UsageError
from ..features import FeatureRequest, Features, num_layers, resolve_layer
from ..roles import PRIMARY_TEACHER
from .base import Gather, StepInputs, Strategy
from .dense import as_grid_map, grid_of
from .registry import register_strategy
from .standardize import Standardize, make_standardizer
from .summaries import SUMMARIES
from .toolbox import (
    as_map,
    check_fraction,
    check_non_negative,
    check_positive,
    fp32,
    generator_from_global_rng,
    mlp_head,
    process_share,
)


@dataclass
class AgglomerateConfig:
    weight: float = 1.0
    teachers: list[str] | None = None  # the roles read; None = every teacher role of the recipe
    weights: dict[str, float] | None = None  # each role's relative share (unnamed roles: 1); None = equal
    standardize: Standardize = "phi_s"
    moments_momentum: float = 0.99
    phi_s_refresh: int = 200  # phi_s: its transform is recomputed after updates 1, 2, 4, ... then every this many
    summary_cosine: float = 1.0  # c_s
    summary_smooth_l1: float = 0.0  # l_s
    dense_weight: float = 1.0  # lambda_d; 0 = pooled embeddings only
    dense_layers: list[int | float] = field(default_factory=lambda: [-1])  # the student layers s the dense heads read
    dense_loss: Literal["cosine_smooth_l1", "mse"] = "cosine_smooth_l1"
    dense_cosine: float = 0.9  # c_d
    dense_smooth_l1: float = 0.1  # l_d
    beta: float = 1.0  # Smooth-L1 beta
    head_hidden: int | None = None  # the adaptor MLPs' hidden width; None = the teacher's width
    teacher_drop: float = 0.0  # UNIC's drop probability p

    def __post_init__(self):
        check_fraction("agglomerate", self, ("moments_momentum",), one_allowed=False)
        check_fraction("agglomerate", self, ("teacher_drop",))
        check_non_negative(
            "agglomerate",
            self,
            ("summary_cosine", "summary_smooth_l1", "dense_weight", "dense_cosine", "dense_smooth_l1"),
        )
        check_positive("agglomerate", self, ("beta", "head_hidden", "phi_s_refresh"))
        if self.summary_cosine + self.summary_smooth_l1 == 0:
            raise UsageError(
                "strategy.agglomerate.summary_cosine and summary_smooth_l1 are both 0: the summary heads would "
                "learn nothing; give one of them a positive weight"
            )
        dense_terms = self.dense_cosine + self.dense_smooth_l1
        if self.dense_weight > 0 and self.dense_loss == "cosine_smooth_l1" and dense_terms == 0:
            raise UsageError(
                "strategy.agglomerate.dense_cosine and dense_smooth_l1 are both 0; give one a positive weight, "
                "or set dense_weight=0 to leave the dense path out"
            )
        if not self.dense_layers:
            raise UsageError(
                "strategy.agglomerate.dense_layers names no student layer; name some, e.g. [-1] (the last, the "
                "default) or [0.5, 0.75, 1.0] (strides 8, 16, 32 on timm CNNs)"
            )
        if self.teachers is not None:
            if not self.teachers:
                raise UsageError("strategy.agglomerate.teachers names no role; name some, or null for every teacher")
            if len(set(self.teachers)) != len(self.teachers):
                raise UsageError(f"strategy.agglomerate.teachers names a role twice: {self.teachers}")
        if self.weights is not None:
            self.weights = {role: _share(role, value) for role, value in self.weights.items()}
            unread = [role for role in self.weights if self.teachers is not None and role not in self.teachers]
            if unread:
                raise UsageError(
                    f"strategy.agglomerate.weights gives a share to {unread[0]!r}, a role the strategy does not "
                    f"read (it reads {', '.join(self.teachers)}); remove it or add that teacher"
                )


def _share(role: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
        raise UsageError(
            f"strategy.agglomerate.weights.{role} must be a positive number, got {value!r}; to leave a teacher "
            "out, list the others in strategy.agglomerate.teachers"
        )
    return float(value)


def teacher_shares(config: AgglomerateConfig, roles: tuple[str, ...]) -> dict[str, float]:
    """w_t: each role's share (`weights`, 1 for a role it does not name), normalised to sum 1."""
    raw = {role: (config.weights or {}).get(role, 1.0) for role in roles}
    total = sum(raw.values())
    return {role: value / total for role, value in raw.items()}


def dense_plan(config: AgglomerateConfig, total: int) -> tuple[int, ...]:
    """The student layers the dense heads read: `dense_layers` resolved on a student of `total` layers (as
    strategy dense's `stage_plan`), ascending, entries that resolve to the same layer once."""
    layers = set()
    for depth in config.dense_layers:
        try:
            layers.add(resolve_layer(depth, total))
        except UsageError as e:
            raise UsageError(
                f"strategy agglomerate's dense heads read the student's layers {list(config.dense_layers)}, but "
                f"{e}; change strategy.agglomerate.dense_layers (block or stage indices, negative from the end, "
                "or relative depths in (0, 1])"
            ) from None
    return tuple(sorted(layers))


def dense_head_names(layers: tuple[int, ...]) -> dict[int, str]:
    """Student layer -> the key of its dense head: "dense" for the deepest, "dense_layer<index>" for the others."""
    return {layer: "dense" if layer == max(layers) else f"dense_layer{layer}" for layer in layers}


def matching_loss(prediction: Tensor, target: Tensor, cosine: float, smooth_l1: float, beta: float) -> Tensor:
    """cosine (1 - cos(p, y)) + smooth_l1 mean_c SmoothL1_beta(p_c - y_c) over the last dimension, in fp32;
    the shape of the others."""
    prediction, target = fp32(prediction), fp32(target)
    loss = torch.zeros(prediction.shape[:-1], device=prediction.device)
    if cosine > 0:
        loss = loss + cosine * (1.0 - F.cosine_similarity(prediction, target, dim=-1))
    if smooth_l1 > 0:
        loss = loss + smooth_l1 * F.smooth_l1_loss(prediction, target, reduction="none", beta=beta).mean(-1)
    return loss


def resample(maps: Tensor, size: tuple[int, int]) -> Tensor:
    """(B, C, H, W) -> (B, C, *size): adaptive average pooling when shrinking (or keeping) both sides,
    else bilinear interpolation (align_corners False)."""
    if tuple(maps.shape[-2:]) == tuple(size):
        return maps
    if maps.shape[-2] >= size[0] and maps.shape[-1] >= size[1]:
        return F.adaptive_avg_pool2d(maps, size)
    return F.interpolate(maps, size=size, mode="bilinear", align_corners=False)


def as_tokens(features: Tensor) -> Tensor:
    """(B, N, C) tokens stay; (B, C, H, W) maps become (B, H * W, C)."""
    return features.flatten(2).transpose(1, 2) if features.dim() == 4 else features


def dense_prediction(head: nn.Module, student_map: Tensor, grid: tuple[int, int]) -> Tensor:
    """R(g(F)): the head on every position of the student's map (B, C_s, h, w), its output map resampled to
    the teacher's `grid` (H, W); (B, H * W, out_dim) in row-major order."""
    batch, _, rows, columns = student_map.shape
    tokens = head(as_tokens(student_map))  # (B, h w, out_dim), on the student's grid
    maps = tokens.transpose(1, 2).reshape(batch, tokens.shape[-1], rows, columns)
    return as_tokens(resample(maps, grid))


def drop_draws(batch: int, teachers: int, generator: torch.Generator, world: int, rank: int) -> Tensor:
    """Uniform draws (batch, teachers) for this process's rows: the whole global batch's (world * batch rows)
    are drawn, and process `rank` keeps rows rank * batch .. (rank + 1) * batch - 1."""
    draws = torch.rand(world * batch, teachers, generator=generator)
    return draws[rank * batch : (rank + 1) * batch]


def keep_mask(losses: Tensor, drop: float, draws: Tensor) -> Tensor:
    """UNIC's teacher dropping: m (T, B), 1 = kept. `losses` (T, B) per teacher and image, `draws` (B, T)
    uniform in [0, 1): the teacher of the largest loss of each image is kept, every other one is dropped
    when its draw is below `drop`."""
    kept = draws.T.to(losses.device) >= drop
    worst = losses.argmax(0)
    kept = kept | (torch.arange(losses.shape[0], device=losses.device)[:, None] == worst[None, :])
    return kept.to(losses.dtype)


@register_strategy
class Agglomerate(Strategy):
    name = "agglomerate"
    Config = AgglomerateConfig
    summary = SUMMARIES["agglomerate"]

    @classmethod
    def bind_roles(cls, config: AgglomerateConfig, roles: tuple[str, ...]) -> AgglomerateConfig:
        """teachers: None reads every role of the recipe (none: the primary one, which check_roles reports)."""
        if config.teachers is not None or not roles:
            return config
        return dataclasses.replace(config, teachers=list(roles))

    @classmethod
    def teacher_roles(cls, config: AgglomerateConfig) -> tuple[str, ...]:
        return tuple(config.teachers) if config.teachers is not None else (PRIMARY_TEACHER,)

    @classmethod
    def teacher_requests(
        cls, config: AgglomerateConfig, teachers: Mapping, student: nn.Module
    ) -> dict[str, FeatureRequest]:
        request = FeatureRequest(embedding=True, layers=(-1,) if config.dense_weight > 0 else ())
        return {role: request for role in cls.teacher_roles(config)}

    @classmethod
    def student_request(cls, config: AgglomerateConfig) -> FeatureRequest:
        return FeatureRequest(embedding=True, layers=tuple(config.dense_layers) if config.dense_weight > 0 else ())

    @classmethod
    def check_teachers(cls, config: AgglomerateConfig, teachers: Mapping) -> None:
        if config.dense_weight == 0:
            return
        for role in cls.teacher_roles(config):
            try:
                num_layers(teachers[role].full_model)
            except UsageError as e:
                raise UsageError(
                    f"strategy agglomerate regresses the last token or feature map of teacher {role!r} "
                    f"({teachers[role].name}), which has none: {e}; set strategy.agglomerate.dense_weight=0 "
                    "to distil its pooled embedding only"
                ) from None

    @classmethod
    def check_student(cls, config: AgglomerateConfig, student: nn.Module) -> None:
        if config.dense_weight == 0:
            return
        try:
            total = num_layers(student)
        except UsageError as e:
            raise UsageError(
                f"strategy agglomerate's dense heads read the student's layers {list(config.dense_layers)}: {e}; "
                "or set strategy.agglomerate.dense_weight=0"
            ) from None
        dense_plan(config, total)

    @classmethod
    def build(
        cls,
        config: AgglomerateConfig,
        teachers: Mapping,
        teacher_probes: Mapping[str, Features],
        student: nn.Module,
        student_probe: Features,
    ) -> "Agglomerate":
        layers = dense_plan(config, num_layers(student)) if config.dense_weight > 0 else ()
        return cls(config, teacher_probes, student_probe, layers, grid_of(student))

    def __init__(
        self,
        config: AgglomerateConfig,
        teacher_probes: Mapping[str, Features],
        student_probe: Features,
        dense_layers: tuple[int, ...],
        student_grid: tuple[int, int] | None,
    ):
        """dense_layers: the resolved student layers the dense heads read (`dense_plan`; () when dense_weight
        is 0); student_grid: a token student's patch grid (`grid_of`), None for a conv net."""
        super().__init__(config)
        self.roles = self.teacher_roles(config)
        self.shares = teacher_shares(config, self.roles)
        # w_t on the module's device: the loss builds no tensor from host values (a copy would wait for the device)
        self.register_buffer("share_vector", torch.tensor([self.shares[r] for r in self.roles]), persistent=False)
        self.dense = config.dense_weight > 0
        self.dense_layers = tuple(dense_layers) if self.dense else ()
        self.dense_head_names = dense_head_names(self.dense_layers) if self.dense else {}
        self.student_grid = student_grid
        student_width = student_probe.embedding.shape[1]
        student_channels = {layer: m.shape[1] for layer, m in self.student_maps(student_probe).items()}
        self.grids: dict[str, tuple[int, int]] = {}
        heads, standardizers = {}, {}
        for role in self.roles:
            probe = teacher_probes[role]
            width = probe.embedding.shape[1]
            summary = make_standardizer(config.standardize, width, config.moments_momentum, config.phi_s_refresh)
            heads[role] = {"summary": mlp_head(student_width, config.head_hidden or width, summary.out_dim)}
            standardizers[role] = {"summary": summary}
            if self.dense:
                grid = as_map(last_layer(probe), f"the last layer of teacher {role!r}")
                channels, self.grids[role] = grid.shape[1], tuple(grid.shape[-2:])
                dense = make_standardizer(config.standardize, channels, config.moments_momentum, config.phi_s_refresh)
                for layer, name in self.dense_head_names.items():
                    heads[role][name] = mlp_head(student_channels[layer], config.head_hidden or channels, dense.out_dim)
                standardizers[role]["dense"] = dense
        self.heads = nn.ModuleDict({role: nn.ModuleDict(h) for role, h in heads.items()})
        self.standardizers = nn.ModuleDict({role: nn.ModuleDict(s) for role, s in standardizers.items()})

    def adaptor_heads(self) -> dict[str, nn.Module]:
        """role -> its heads ("summary"; unless dense_weight is 0 "dense", on the deepest of the dense layers,
        and "dense_layer<s>" on each other one), outputs in standardised space."""
        return {role: self.heads[role] for role in self.roles}

    def student_maps(self, student: Features) -> dict[int, Tensor]:
        """F_s for every dense layer s: the student's layer as a (B, C_s, h_s, w_s) map (a token student's
        tokens reshaped to its patch grid); {} when dense_weight is 0."""
        return {
            layer: as_grid_map(student.layers[layer], self.student_grid, f"the student's layer {layer}")
            for layer in self.dense_layers
        }

    def term_weights(self) -> dict[str, float]:
        weights = {}
        for role, share in self.shares.items():
            weights[f"{role}.summary"] = share
            if self.dense:
                weights[f"{role}.dense"] = share * self.config.dense_weight
        return weights

    def forward(self, step: StepInputs) -> dict[str, Tensor]:
        config = self.config
        student = step.student
        student_maps = self.student_maps(student)
        summaries, denses = [], []
        for role in self.roles:
            teacher = step.views_of(role)[0]
            prediction = self.heads[role]["summary"](student.embedding)
            with torch.autocast(device_type=prediction.device.type, enabled=False):
                target = self.standardizers[role]["summary"](fp32(teacher.embedding))
                summaries.append(
                    matching_loss(prediction, target, config.summary_cosine, config.summary_smooth_l1, config.beta)
                )
            if self.dense:
                denses.append(self._dense_loss(role, student_maps, teacher))
        with torch.autocast(device_type=summaries[0].device.type, enabled=False):
            summary = torch.stack(summaries)  # (T, B)
            dense = torch.stack(denses) if self.dense else torch.zeros_like(summary)
            per_image = summary + config.dense_weight * dense
            keep = self._keep(per_image.detach())
            normaliser = (self.share_vector[:, None] * keep).sum()
            terms = {}
            for t, role in enumerate(self.roles):
                terms[f"{role}.summary"] = (keep[t] * summary[t]).sum() / normaliser
                if self.dense:
                    terms[f"{role}.dense"] = (keep[t] * dense[t]).sum() / normaliser
        return terms

    def _dense_loss(self, role: str, student_maps: Mapping[int, Tensor], teacher: Features) -> Tensor:
        """D_tb for one teacher, the mean over the dense layers s of D_tbs: (B,)."""
        teacher_layer = last_layer(teacher)
        device = teacher_layer.device.type
        with torch.autocast(device_type=device, enabled=False):
            target = self.standardizers[role]["dense"](as_tokens(fp32(teacher_layer)))
        stages = []
        for layer, name in self.dense_head_names.items():
            prediction = dense_prediction(self.heads[role][name], student_maps[layer], self.grids[role])
            with torch.autocast(device_type=device, enabled=False):
                stages.append(self._token_loss(prediction, target))
        with torch.autocast(device_type=device, enabled=False):
            return torch.stack(stages).mean(0)

    def _token_loss(self, prediction: Tensor, target: Tensor) -> Tensor:
        """(B, K, C) each -> (B,): the mean over tokens of the matching loss, or of the squared error."""
        config = self.config
        if config.dense_loss == "mse":
            return (fp32(prediction) - target).pow(2).mean(dim=(1, 2))
        return matching_loss(prediction, target, config.dense_cosine, config.dense_smooth_l1, config.beta).mean(1)

    def _keep(self, losses: Tensor) -> Tensor:
        """m (T, B): all ones, or UNIC's teacher dropping drawn for the global batch."""
        if self.config.teacher_drop == 0 or len(self.roles) == 1:
            return torch.ones_like(losses)
        world, rank = process_share()
        draws = drop_draws(losses.shape[1], losses.shape[0], generator_from_global_rng(), world, rank)
        return keep_mask(losses, self.config.teacher_drop, draws)

    def after_step(self, step: StepInputs, gather: Gather) -> None:
        if self.config.standardize == "none":
            return
        for role in self.roles:
            teacher = step.views_of(role)[0]
            self.standardizers[role]["summary"].update(gather(fp32(teacher.embedding)))
            if self.dense:
                tokens = gather(as_tokens(fp32(last_layer(teacher))))
                self.standardizers[role]["dense"].update(tokens.reshape(-1, tokens.shape[-1]))


def last_layer(features: Features) -> Tensor:
    """The deepest tapped layer of `features`: tokens (B, N, C) or a map (B, C, H, W)."""
    return features.layers[max(features.layers)]
