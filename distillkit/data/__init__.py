"""Data: image sources (builtin datasets, folders) and batched, replayable augmented views."""

from .augment import apply_augment, sample_augment_params
from .sources import BadImage, Batch, ImageData, check_data_source, collate_skipping_bad, open_data
from .views import BatchViews, ViewConfig, as_views, render_views, sample_view_params

__all__ = [
    "BadImage",
    "Batch",
    "BatchViews",
    "ImageData",
    "ViewConfig",
    "check_data_source",
    "as_views",
    "collate_skipping_bad",
    "open_data",
    "render_views",
    "sample_view_params",
    "apply_augment",
    "sample_augment_params",
]
