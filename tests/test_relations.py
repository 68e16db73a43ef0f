"""Attention relations of ViT blocks (queries / keys -> softmax(q k^T / sqrt(d))) for teachers and
students, and pruning a frozen teacher to the blocks its strategies read."""

from __future__ import annotations

import math

import pytest
import timm
import torch
from torch import nn

from distillkit.errors import UsageError
from distillkit.features import FeatureRequest, extract_features
from distillkit.relations import relation_maps
from distillkit.teachers import InputConfig, Teacher

pytestmark = pytest.mark.usefixtures("one_cpu_thread")

HALF = InputConfig((32, 32), (0.5, 0.5, 0.5), (0.5, 0.5, 0.5))


def _tiny_vit(seed: int = 0, **kwargs) -> nn.Module:
    torch.manual_seed(seed)
    model = timm.create_model(
        "vit_tiny_patch16_224", pretrained=False, num_classes=0, img_size=32, **{"depth": 3, **kwargs}
    )
    with torch.no_grad():  # LayerNorms away from their identity init, so norm1 matters
        for module in model.modules():
            if isinstance(module, nn.LayerNorm):
                module.weight.normal_(1.0, 0.2)
                module.bias.normal_(0.0, 0.2)
    return model.eval()


def _naive_attention(model: nn.Module, x: torch.Tensor) -> list[torch.Tensor]:
    """Per block: the attention probabilities written out from the weights, block by block."""
    maps = []
    with torch.no_grad():
        h = model.norm_pre(model._pos_embed(model.patch_embed(x)))
        for block in model.blocks:
            attn = block.attn
            heads, width = attn.num_heads, h.shape[-1]
            d = width // heads
            y = block.norm1(h)
            w, b = attn.qkv.weight, attn.qkv.bias
            q = y @ w[:width].T + b[:width]
            k = y @ w[width : 2 * width].T + b[width : 2 * width]
            q = q.reshape(*q.shape[:2], heads, d).transpose(1, 2)
            k = k.reshape(*k.shape[:2], heads, d).transpose(1, 2)
            q, k = attn.q_norm(q), attn.k_norm(k)
            logits = torch.einsum("bhnd,bhmd->bhnm", q, k) / math.sqrt(d)
            maps.append(torch.softmax(logits, dim=-1))
            h = block(h)
    return maps


def _timm_attention(model: nn.Module, x: torch.Tensor) -> dict[int, torch.Tensor]:
    """The probabilities timm itself computes on its unfused path (captured at attn_drop)."""
    seen: dict[int, torch.Tensor] = {}
    handles = []
    for i, block in enumerate(model.blocks):
        block.attn.fused_attn = False
        handles.append(
            block.attn.attn_drop.register_forward_hook(
                lambda m, args, out, i=i: seen.__setitem__(i, out.detach().clone())
            )
        )
    try:
        with torch.no_grad():
            model(x)
    finally:
        for handle in handles:
            handle.remove()
        for block in model.blocks:
            block.attn.fused_attn = True
    return seen


def test_relations_equal_a_naive_computation_from_the_block_weights():
    model = _tiny_vit()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        features = extract_features(model, x, FeatureRequest(relations=(0, -1)))
    assert sorted(features.relations) == [0, 2]
    assert features.prefix_tokens == 1
    naive = _naive_attention(model, x)
    for index, qk in features.relations.items():
        assert qk.shape == (2, 2, 3, 5, 64)  # q/k, batch, heads, 1 + 4 tokens, head dim
        maps = relation_maps(qk)
        assert maps.shape == (2, 3, 5, 5)
        assert torch.allclose(maps, naive[index], atol=1e-5)
        assert torch.allclose(maps.sum(-1), torch.ones(2, 3, 5), atol=1e-5)


def test_relations_match_timm_attention_with_qk_norm():
    model = _tiny_vit(seed=1, qk_norm=True)
    with torch.no_grad():
        for block in model.blocks:
            block.attn.q_norm.weight.normal_(1.0, 0.3)
            block.attn.k_norm.bias.normal_(0.0, 0.3)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        features = extract_features(model, x, FeatureRequest(relations=(0.5, 1.0), embedding=True))
    reference = _timm_attention(model, x)
    for index, qk in features.relations.items():
        assert torch.allclose(relation_maps(qk), reference[index], atol=1e-5)
    naive = _naive_attention(model, x)
    assert torch.allclose(relation_maps(features.relations[2]), naive[2], atol=1e-5)
    with torch.no_grad():
        assert torch.allclose(features.embedding, model(x), atol=1e-5)  # the same single pass


def test_relation_maps_restricted_to_kept_tokens_and_resplit_heads():
    torch.manual_seed(0)
    qk = torch.randn(2, 2, 4, 6, 8)  # q/k, B, H, N, d
    keep = torch.tensor([[0, 2, 5], [0, 1, 3]])
    maps = relation_maps(qk, keep=keep)
    for b in range(2):
        q, k = qk[0, b][:, keep[b]], qk[1, b][:, keep[b]]
        expected = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(8), dim=-1)
        assert torch.allclose(maps[b], expected, atol=1e-6)
    two_heads = relation_maps(qk, heads=2)
    q = qk[0].transpose(1, 2).reshape(2, 6, 32)  # heads concatenated back to width 32
    k = qk[1].transpose(1, 2).reshape(2, 6, 32)
    for h in range(2):
        qh, kh = q[..., h * 16 : (h + 1) * 16], k[..., h * 16 : (h + 1) * 16]
        expected = torch.softmax(qh @ kh.transpose(-1, -2) / 4.0, dim=-1)
        assert torch.allclose(two_heads[:, h], expected, atol=1e-6)
    with pytest.raises(UsageError, match="cannot split"):
        relation_maps(qk, heads=3)


def test_student_relations_carry_gradients():
    model = _tiny_vit(seed=2).train()
    features = extract_features(model, torch.randn(2, 3, 32, 32), FeatureRequest(relations=(1,)))
    relation_maps(features.relations[1])[:, :, 0].sum().backward()
    assert model.blocks[1].attn.qkv.weight.grad is not None
    assert model.blocks[1].attn.qkv.weight.grad.abs().sum() > 0
    assert model.blocks[2].attn.qkv.weight.grad is None  # the pass stopped after block 1


def test_teacher_relations_are_plain_tensors():
    teacher = Teacher("vit", _tiny_vit(seed=3), HALF, "test")
    views = torch.rand(2, 3, 32, 32)
    out = teacher(views, FeatureRequest(relations=(-1,), layers=(0,)))
    assert sorted(out.relations) == [2] and sorted(out.layers) == [0]
    assert not out.relations[2].is_inference() and out.prefix_tokens == 1
    naive = _naive_attention(teacher.model, (views - 0.5) / 0.5)
    assert torch.allclose(relation_maps(out.relations[2]), naive[2], atol=1e-5)


def test_relations_from_a_cnn_are_refused():
    resnet = timm.create_model("resnet18", pretrained=False, num_classes=0).eval()
    with pytest.raises(UsageError, match="conv net"):
        extract_features(resnet, torch.randn(1, 3, 32, 32), FeatureRequest(relations=(1,)))
    teacher = Teacher("r18", resnet, HALF, "test")
    with pytest.raises(UsageError, match="relation"):
        teacher(torch.rand(1, 3, 32, 32), FeatureRequest(relations=(0.5,)))


def test_requests_merge_relations():
    merged = FeatureRequest(relations=(1, 0.5)).merge(FeatureRequest(relations=(0.5, -1), embedding=True))
    assert merged.relations == (1, 0.5, -1) and merged.embedding


# ----------------------------------------------------------------------------- pruning


def test_pruning_a_vit_keeps_the_requested_outputs_and_drops_later_blocks():
    model = _tiny_vit(seed=4, depth=6)
    teacher = Teacher("vit", model, HALF, "test")
    request = FeatureRequest(layers=(1, 0.5), relations=(0,))
    views = torch.rand(2, 3, 32, 32)
    before = teacher(views, request)
    embedding = teacher(views, FeatureRequest(embedding=True)).embedding
    assert teacher.prune(request)
    assert len(teacher.model.blocks) == 3 and teacher.pruned_to == 3
    assert isinstance(teacher.model.norm, nn.Identity)
    assert len(teacher.full_model.blocks) == 6 and teacher.num_layers == 6
    assert teacher.model.blocks[0].attn.qkv.weight is model.blocks[0].attn.qkv.weight  # shared, not copied
    after = teacher(views, request)
    assert sorted(after.layers) == sorted(before.layers) == [1, 2]
    for index in before.layers:
        assert torch.equal(after.layers[index], before.layers[index])
    assert torch.equal(after.relations[0], before.relations[0])
    with pytest.raises(UsageError, match="pruned"):
        teacher(views, FeatureRequest(embedding=True))
    with pytest.raises(UsageError, match="pruned"):
        teacher(views, FeatureRequest(layers=(4,)))
    assert teacher.describe()["embed_dim"] == 192
    teacher.unprune()
    assert teacher.pruned_to is None and len(teacher.model.blocks) == 6
    assert torch.equal(teacher(views, FeatureRequest(embedding=True)).embedding, embedding)


def test_pruning_a_resnet_and_when_nothing_can_be_pruned():
    torch.manual_seed(5)
    resnet = timm.create_model("resnet18", pretrained=False, num_classes=10).eval()
    teacher = Teacher("r18", resnet, HALF, "test")
    views = torch.rand(2, 3, 64, 64)
    request = FeatureRequest(layers=(1,))
    before = teacher(views, request)
    assert not teacher.prune(FeatureRequest(layers=(1,), logits=True))  # logits need the whole network
    assert not teacher.prune(FeatureRequest(embedding=True))
    assert teacher.prune(request)
    assert len(teacher.model.layer2) == 0 and len(teacher.model.layer4) == 0
    assert len(teacher.full_model.layer4) == 2 and teacher.has_logits
    assert torch.equal(teacher(views, request).layers[1], before.layers[1])
