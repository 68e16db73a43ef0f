"""`Teacher`: a frozen network with its own input size and normalisation, answering `Features`.

Frozen means: parameters never require grad, the module stays in eval mode even when `.train()` is
called (mdistiller's lesson), and every forward runs under `torch.inference_mode()`. Being frozen, its batch
norms are folded into the convolutions before them (`norm_folding`: the same outputs, faster). Views arrive as
raw [0, 1] images; the teacher resizes and normalises them itself (timm's `normalize_input` idea).

A teacher whose strategies only tap early blocks can be pruned for training (`prune`): the blocks,
final norm and head nobody reads are dropped from the network it runs; `unprune` brings them back
(evaluation needs the embedding).
"""

from __future__ import annotations

import copy
import itertools

import torch
from torch import Tensor, nn

from ..errors import UsageError
from ..features import (
    Extractor,
    FeatureRequest,
    Features,
    cat_batches,
    is_token_model,
    num_layers,
    resolve_layers,
)
from ..inputs import InputConfig, prepare_input
from ..norm_folding import fold_batch_norms
from .cpu_chunks import chunk_images, largest_output_bytes


def probe_at(name: str, model: nn.Module, size: tuple[int, int]) -> int:
    """A forward of 2 random images at `size`: a network that cannot run there (a map shrunk below a kernel, a
    fixed input size) is refused at load with what to set, not inside training. Returns its largest activation
    in bytes per image (`cpu_chunks.largest_output_bytes`; 0 for a network without a plain forward)."""
    param = next(model.parameters(), None)
    probe = torch.rand(2, 3, *size, generator=torch.Generator().manual_seed(0))
    if param is not None:
        probe = probe.to(param.device)
    try:
        return largest_output_bytes(model, probe)
    except NotImplementedError:  # no plain forward (features come from forward_intermediates): nothing to probe
        return 0
    except (RuntimeError, AssertionError, ValueError) as e:
        pretrained = (getattr(model, "pretrained_cfg", None) or {}).get("input_size")
        hint = f" (its pretrained size is {pretrained[-2]} x {pretrained[-1]})" if pretrained else ""
        raise UsageError(
            f"teacher {name} cannot run on {size[0]} x {size[1]} px images: {str(e).strip()}. Set "
            f"teacher.input_size to a size the network accepts{hint}"
        ) from None


class Teacher(nn.Module):
    def __init__(
        self,
        name: str,
        model: nn.Module,
        input_config: InputConfig,
        source: str,
        projection_head: nn.Module | None = None,
        channels_last: bool = True,
        precision: str = "auto",
        compile: bool = False,
        fold_norms: bool = True,
    ):
        super().__init__()
        self.name = name
        self.model = model
        self.projection_head = projection_head
        self.input_config = input_config
        self.source = source
        self.precision = precision  # auto | fp32 | bf16: the teacher's own autocast, whatever the student's
        self.extractor = Extractor(compile=compile)  # training's requests; `embed` always runs eagerly
        self.requires_grad_(False)
        super().train(False)
        self.num_params = _params(model)  # as loaded: folding merges each norm's parameters into a conv bias
        self.cpu_chunk = chunk_images(probe_at(name, model, input_config.size))  # images per CPU forward
        self.folded_norms = fold_batch_norms(model, input_config.size) if fold_norms else 0
        self.channels_last = channels_last and not is_token_model(model)
        if self.channels_last:
            self.model.to(memory_format=torch.channels_last)

    def resolved_precision(self, device: torch.device) -> str:
        """What `precision` runs as on `device`: bf16 for bf16, or for auto on a GPU that supports bf16; fp32
        otherwise. On CPUs auto stays fp32: without bf16 hardware (AVX512-BF16 / AMX) bf16 is slower there."""
        auto_bf16 = device.type == "cuda" and torch.cuda.is_bf16_supported()
        return "bf16" if self.precision == "bf16" or (self.precision == "auto" and auto_bf16) else "fp32"

    def autocast(self, device: torch.device):
        """The teacher's own autocast (`resolved_precision`). The features handed to strategies are fp32
        either way (see `forward`)."""
        bf16 = self.resolved_precision(device) == "bf16"
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=bf16)

    def train(self, mode: bool = True) -> "Teacher":
        return super().train(False)  # a teacher never leaves eval mode

    @property
    def has_projection(self) -> bool:
        return self.projection_head is not None

    @property
    def has_logits(self) -> bool:
        return getattr(self.full_model, "num_classes", 0) > 0

    @property
    def is_vit(self) -> bool:
        return is_token_model(self.model)

    @property
    def num_layers(self) -> int:
        return num_layers(self.full_model)

    @property
    def full_model(self) -> nn.Module:
        """The whole network, also while a pruned copy of it runs (`prune`)."""
        whole = self.__dict__.get("_unpruned")
        return self.model if whole is None else whole

    @property
    def pruned_to(self) -> int | None:
        """How many layers the running network keeps after `prune`; None when it is whole."""
        return self.__dict__.get("_pruned_to")

    def prune(self, request: FeatureRequest) -> bool:
        """Run only what `request` reads: drop later blocks, the final norm and the head.

        Applies when the request taps layers or relations and needs no embedding, projection or
        logits. The pruned network is a structural copy sharing the parameters (timm's
        `prune_intermediate_layers` on it); the whole one is kept, unregistered, for `unprune`.
        Returns whether anything was pruned.
        """
        taps = request.layers + request.relations
        if self.pruned_to is not None or request.needs_head or not taps:
            return False
        if not hasattr(self.model, "prune_intermediate_layers"):
            return False
        indices = sorted(set(resolve_layers(taps, self.num_layers)))
        shared = {id(t): t for t in itertools.chain(self.model.parameters(), self.model.buffers())}
        pruned = copy.deepcopy(self.model, shared)
        pruned.prune_intermediate_layers(indices, prune_norm=True, prune_head=True)
        self.__dict__["_unpruned"] = self.model
        self.__dict__["_pruned_to"] = indices[-1] + 1
        self.model = pruned
        return True

    def unprune(self) -> None:
        """Run the whole network again. Blocks the pruned copy did not hold stay where they were:
        move the teacher (`.to(device)`) afterwards."""
        whole = self.__dict__.pop("_unpruned", None)
        self.__dict__.pop("_pruned_to", None)
        if whole is not None:
            self.model = whole

    def forward(self, views: Tensor, request: FeatureRequest) -> Features:
        return self._extract(views, request, self.extractor)

    def embed(self, views: Tensor) -> Tensor:
        """Raw [0, 1] views -> the pooled embedding (B, D), eagerly (evaluation compiles no graphs)."""
        return self._extract(views, FeatureRequest(embedding=True), _EAGER).embedding

    def _extract(self, views: Tensor, request: FeatureRequest, extractor: Extractor) -> Features:
        chunk = self.cpu_chunk
        if views.device.type == "cpu" and chunk is not None and views.shape[0] > chunk:  # see cpu_chunks
            starts = range(0, views.shape[0], chunk)
            return cat_batches([self._extract(views[s : s + chunk], request, extractor) for s in starts])
        if self.pruned_to is not None:
            self._check_within_pruned(request)
            # absolute indices, so relative depths keep meaning the whole network's blocks
            request = FeatureRequest(
                layers=resolve_layers(request.layers, self.num_layers),
                relations=resolve_layers(request.relations, self.num_layers),
            )
        with torch.inference_mode(), self.autocast(views.device):
            x = prepare_input(views, self.input_config, self.channels_last)
            wanted = FeatureRequest(
                embedding=request.embedding or request.projection,
                layers=request.layers,
                logits=request.logits,
                relations=request.relations,
            )
            features = extractor(self.model, x, wanted)
            if request.projection:
                features.projection = self.projection_head(features.embedding)
        # Inference tensors cannot be saved for backward; strategies mix them with student tensors.
        return Features(
            embedding=_clone(features.embedding) if request.embedding else None,
            projection=_clone(features.projection),
            layers={k: _clone(v) for k, v in features.layers.items()},
            logits=_clone(features.logits),
            relations={k: _clone(v) for k, v in features.relations.items()},
            prefix_tokens=features.prefix_tokens,
        )

    def _check_within_pruned(self, request: FeatureRequest) -> None:
        deepest = max(resolve_layers(request.layers + request.relations, self.num_layers), default=-1)
        if request.needs_head or deepest >= self.pruned_to:
            raise UsageError(
                f"teacher {self.name} was pruned to its first {self.pruned_to} layers for training and "
                "cannot give the embedding, projection, logits or deeper layers; call "
                "teacher.unprune() first"
            )

    def describe(self) -> dict:
        model = self.full_model
        return {
            "name": self.name,
            "architecture": getattr(model, "pretrained_cfg", {}).get("architecture", type(model).__name__),
            "source": self.source,
            "precision": self.precision,
            "input_size": list(self.input_config.size),
            "mean": list(self.input_config.mean),
            "std": list(self.input_config.std),
            "embed_dim": getattr(model, "num_features", None),
            "has_projection": self.has_projection,
            "has_logits": self.has_logits,
            "params": self.num_params + _params(self.projection_head),
        }


_EAGER = Extractor()


def _params(module: nn.Module | None) -> int:
    return 0 if module is None else sum(p.numel() for p in module.parameters())


def _clone(t: Tensor | None) -> Tensor | None:
    """A normal fp32 tensor (not an inference tensor) of a teacher output, bf16 or fp32."""
    if t is None:
        return None
    return t.float() if t.dtype != torch.float32 else t.clone()
