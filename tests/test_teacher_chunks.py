"""A frozen teacher runs large CPU batches in chunks (`teachers/cpu_chunks.py`): the chunk size comes from its
largest activation, and the chunked batch gives the whole batch's features."""

from __future__ import annotations

import timm
import torch
from torch import nn

from distillkit.features import FeatureRequest
from distillkit.teachers import InputConfig, Teacher
from distillkit.teachers.cpu_chunks import CHUNK_BYTES

HALF = InputConfig((32, 32), (0.5, 0.5, 0.5), (0.5, 0.5, 0.5))


def _whole_and_chunked(teacher: Teacher, views: torch.Tensor, request: FeatureRequest, chunk: int):
    teacher.cpu_chunk = None
    whole = teacher(views, request)
    teacher.cpu_chunk = chunk
    return whole, teacher(views, request)


def _assert_same(whole, chunked):
    assert whole.named().keys() == chunked.named().keys()
    for name, tensor in whole.named().items():
        torch.testing.assert_close(chunked.named()[name], tensor, rtol=1e-5, atol=1e-5, msg=name)
    assert chunked.prefix_tokens == whole.prefix_tokens


def test_the_chunk_keeps_the_largest_activation_under_the_budget():
    """A 3 -> 8 channel convolution at 32 px returns 8 x 32 x 32 floats per image: 32 KiB, the largest output."""
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten())
    teacher = Teacher("tiny", model.eval(), HALF, "test")
    assert teacher.cpu_chunk == CHUNK_BYTES // (8 * 32 * 32 * 4)


def test_a_chunked_cnn_batch_gives_the_whole_batchs_features():
    model = timm.create_model("resnet18", pretrained=False, num_classes=10).eval()
    teacher = Teacher("resnet18", model, HALF, "test")
    views = torch.rand(7, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    request = FeatureRequest(embedding=True, logits=True, layers=(1, -1))
    whole, chunked = _whole_and_chunked(teacher, views, request, chunk=3)  # chunks of 3, 3 and 1
    _assert_same(whole, chunked)
    assert chunked.embedding.shape == (7, 512) and not chunked.embedding.is_inference()


def test_a_chunked_vit_batch_keeps_relations_batched_on_their_second_dimension():
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, num_classes=0).eval()
    teacher = Teacher("vit", model, HALF, "test")
    views = torch.rand(5, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    request = FeatureRequest(embedding=True, layers=(-1,), relations=(-1,))
    whole, chunked = _whole_and_chunked(teacher, views, request, chunk=2)
    _assert_same(whole, chunked)
    assert chunked.relations[11].shape[:2] == (2, 5)


def test_a_network_without_a_plain_forward_runs_whole_batches():
    class FeaturesOnly(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3)

        def forward(self, x):
            raise NotImplementedError("features come from forward_intermediates")

    teacher = Teacher("features-only", FeaturesOnly().eval(), HALF, "test", fold_norms=False)
    assert teacher.cpu_chunk is None
