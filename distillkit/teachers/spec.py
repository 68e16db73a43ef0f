"""What a named teacher is: `TeacherSpec`, the `TEACHERS` registry, and what its builder gets and returns."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Mapping

from ..registry import Registry

if TYPE_CHECKING:  # annotations only: the zoo's names load no torch (see catalog.py)
    from torch import nn

    from ..inputs import InputConfig

RANDOM_WEIGHTS = "random"  # weights value for smoke tests: random init, never for real runs

GAP_VIT = {"class_token": False, "global_pool": "avg", "fc_norm": False}  # I-JEPA-style: no class token

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class BuildOptions:
    """What `load_teacher` passes on to a builder."""

    weights: str | None = None  # a local file; None = the spec's own source (package, download)
    input_size: int | None = None  # pixels; None = the spec's input size
    variant: str | None = None  # which network of a multi-network training checkpoint
    model_kwargs: Mapping[str, Any] = field(default_factory=dict)  # extra timm.create_model arguments


@dataclass
class Built:
    """A builder's result: the frozen network, its projection head and where the weights came from."""

    model: nn.Module
    head: nn.Module | None
    source: str
    input_config: InputConfig | None = None  # None = resolved from the timm model's pretrained config


@dataclass(frozen=True)
class TeacherSpec:
    """A named teacher of the zoo.

    `build(spec, options)` makes the network; the other fields describe it for `distillkit list teachers`
    and for error messages.
    """

    name: str
    architecture: str  # timm model name
    weights_source: str  # where the weights come from, for `distillkit list teachers`
    description: str
    build: Callable[["TeacherSpec", BuildOptions], Built]
    embed_dim: int | None = None  # pooled embedding width
    projection_dim: int | None = None  # projection-head output width, when the teacher keeps its head
    url: str | None = None  # the official checkpoint file, downloaded when no weights are given
    hub: str | None = None  # timm `<model>.<tag>` whose Hugging Face Hub weights equal the official file
    sha256: str | None = None  # the official file's hash, checked after a download when known (none published yet)
    license: str | None = None  # of the weights
    input_size: int = 224  # pixels
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    model_kwargs: Mapping[str, Any] = field(default_factory=dict)  # fixed timm.create_model arguments
    formats: tuple[str, ...] = ()  # checkpoint kinds accepted (distillkit.teachers.formats)
    head_prefix: str | None = None  # key prefix of a projection head kept with the backbone ("fc.", "head.")
    is_vit: bool = False  # the timm model takes img_size and has position embeddings
    layout: str = ""  # the checkpoint file layouts it accepts, in words

    @property
    def embedding_dims(self) -> str:
        """'768', or '2048 / proj 128', for listings."""
        if self.embed_dim is None:
            return "-"
        return f"{self.embed_dim}" + (f" / proj {self.projection_dim}" if self.projection_dim else "")


TEACHERS: Registry[TeacherSpec] = Registry("teacher")
