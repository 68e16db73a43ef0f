"""The frozen-teacher zoo: every official checkpoint layout, written by hand for a small network of the
right family, loads through distillkit and answers exactly what the reference network answers; broken,
foreign and unsafe files get one clear report; without a file the offline error names the download."""

from __future__ import annotations

import argparse
import io
import os
import time

import numpy as np
import pytest
import timm
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import nn
from typer.testing import CliRunner

from distillkit import load_teacher
from distillkit.cli import app
from distillkit.errors import UsageError
from distillkit.features import FeatureRequest
from distillkit.recipe import resolve_recipe
from distillkit.teachers import TEACHERS
from distillkit.teachers.download import fetch_weights
from distillkit.teachers.zoo import RANDOM_WEIGHTS

pytestmark = pytest.mark.usefixtures("one_cpu_thread")

MEAN = torch.tensor((0.485, 0.456, 0.406)).view(1, 3, 1, 1)
STD = torch.tensor((0.229, 0.224, 0.225)).view(1, 3, 1, 1)
SMALL_VIT = dict(depth=2, embed_dim=64, num_heads=4)
SMALL_RESNET = dict(layers=(1, 1, 1, 1), channels=(8, 16, 32, 64), stem_width=8)  # 256-d embedding


class RunsCodeWhenUnpickled:
    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch '{self.marker}'",))


def _randomised(model: nn.Module, seed: int) -> nn.Module:
    """Every parameter and float buffer perturbed, so a tensor in the wrong place changes the outputs."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for tensor in list(model.parameters()) + [b for b in model.buffers() if b.is_floating_point()]:
            tensor.add_(torch.randn(tensor.shape, generator=generator) * 0.1)
        for module in model.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm) and module.running_var is not None:
                module.running_var.uniform_(0.5, 1.5, generator=generator)
    return model.eval()


def _vit(arch: str, seed: int, size: int = 32, **kwargs) -> nn.Module:
    model = timm.create_model(arch, pretrained=False, num_classes=0, img_size=size, **{**SMALL_VIT, **kwargs})
    return _randomised(model, seed)


def _resnet(seed: int) -> nn.Module:
    return _randomised(timm.create_model("resnet50", pretrained=False, num_classes=0, **SMALL_RESNET), seed)


def _mlp(dims: list[int], bias: bool, bn: bool, last_bn: bool, seed: int) -> nn.Sequential:
    """MoCo's _build_mlp written out: Linear [BN] ReLU ... Linear [BN(affine=False)]."""
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(dims[:-1], dims[1:])):
        layers.append(nn.Linear(a, b, bias=bias))
        if i < len(dims) - 2:
            if bn:
                layers.append(nn.BatchNorm1d(b))
            layers.append(nn.ReLU())
        elif last_bn:
            layers.append(nn.BatchNorm1d(b, affine=False))
    return _randomised(nn.Sequential(*layers), seed)


def _prefixed(prefix: str, state: dict) -> dict:
    return {prefix + k: v for k, v in state.items()}


def _expected(model: nn.Module, views: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model.forward_head(model.forward_features((views - MEAN) / STD), pre_logits=True)


def _views(size: int = 32, seed: int = 5) -> torch.Tensor:
    return torch.rand(2, 3, size, size, generator=torch.Generator().manual_seed(seed))


def _close(a: torch.Tensor, b: torch.Tensor) -> bool:
    return torch.allclose(a, b, atol=1e-5, rtol=1e-4)


def _args() -> argparse.Namespace:
    return argparse.Namespace(arch="vit_small", patch_size=16, lr=np.float64(5e-4), epochs=100, output_dir="/out")


# ----------------------------------------------------------------------------- MAE


@pytest.mark.parametrize(
    "name,arch,size",
    [
        ("mae-vitb", "vit_base_patch16_224", 32),
        ("mae-vitl", "vit_large_patch16_224", 32),
        ("mae-vith", "vit_huge_patch14_224", 28),
    ],
)
def test_mae_pretrain_and_full_checkpoints(tmp_path, name, arch, size):
    reference = _vit(arch, seed=1, size=size)
    encoder = reference.state_dict()
    torch.save({"model": encoder}, tmp_path / "mae_pretrain.pth")
    decoder = {
        "mask_token": torch.randn(1, 1, 32),
        "decoder_embed.weight": torch.randn(32, 64),
        "decoder_pos_embed": torch.randn(1, 5, 32),
        "decoder_blocks.0.norm1.weight": torch.randn(32),
        "decoder_norm.weight": torch.randn(32),
        "decoder_pred.weight": torch.randn(768, 32),
    }
    torch.save(
        {
            "model": {**encoder, **decoder},
            "optimizer": {"state": {}, "param_groups": []},
            "epoch": 799,
            "scaler": {"scale": 65536.0},
            "args": _args(),
        },
        tmp_path / "mae_visualize.pth",
    )
    views = _views(size)
    for file in ("mae_pretrain.pth", "mae_visualize.pth"):
        teacher = load_teacher(name, weights=tmp_path / file, input_size=size, model_kwargs=SMALL_VIT)
        assert teacher.input_config.mean == pytest.approx((0.485, 0.456, 0.406))
        assert not teacher.has_projection and not teacher.has_logits
        out = teacher(views, FeatureRequest(embedding=True))
        assert _close(out.embedding, _expected(reference, views))
    assert "decoder" in teacher.source and "MAE" in teacher.source


# ----------------------------------------------------------------------------- MoCo v2


def test_moco_v2_checkpoint_with_projection_head_and_momentum_encoder(tmp_path):
    query, key = _resnet(2), _resnet(3)
    head_q = _mlp([256, 256, 32], bias=True, bn=False, last_bn=False, seed=4)
    head_k = _mlp([256, 256, 32], bias=True, bn=False, last_bn=False, seed=5)
    assert [type(m) for m in head_q] == [nn.Linear, nn.ReLU, nn.Linear]  # fc.0, fc.1 (ReLU), fc.2
    state = {
        **_prefixed("module.encoder_q.", query.state_dict()),
        **_prefixed("module.encoder_q.fc.", head_q.state_dict()),
        **_prefixed("module.encoder_k.", key.state_dict()),
        **_prefixed("module.encoder_k.fc.", head_k.state_dict()),
        "module.queue": torch.randn(32, 64),
        "module.queue_ptr": torch.zeros(1, dtype=torch.long),
    }
    optimizer = torch.optim.SGD(query.parameters(), lr=0.03, momentum=0.9).state_dict()
    path = tmp_path / "moco_v2_800ep_pretrain.pth.tar"
    torch.save({"epoch": 800, "arch": "resnet50", "state_dict": state, "optimizer": optimizer}, path)
    views = _views()
    for variant, backbone, head in ((None, query, head_q), ("momentum", key, head_k)):
        teacher = load_teacher("moco-v2-r50", weights=path, input_size=32, variant=variant, model_kwargs=SMALL_RESNET)
        out = teacher(views, FeatureRequest(embedding=True, projection=True))
        embedding = _expected(backbone, views)
        assert _close(out.embedding, embedding)
        with torch.no_grad():
            assert _close(out.projection, head(embedding))
        assert out.projection.shape == (2, 32)


# ----------------------------------------------------------------------------- MoCo v3


def _moco_v3_file(tmp_path, base, momentum, head_b, head_m, head_prefix):
    state = {
        **_prefixed("module.base_encoder.", base.state_dict()),
        **_prefixed(f"module.base_encoder.{head_prefix}", head_b.state_dict()),
        **_prefixed("module.momentum_encoder.", momentum.state_dict()),
        **_prefixed(f"module.momentum_encoder.{head_prefix}", head_m.state_dict()),
        "module.predictor.0.weight": torch.randn(16, 16),
        "module.predictor.1.running_mean": torch.zeros(16),
    }
    path = tmp_path / "moco-v3.pth.tar"
    torch.save(
        {
            "epoch": 300,
            "arch": "vit_small",
            "state_dict": state,
            "optimizer": {"state": {0: {"exp_avg": torch.zeros(3)}}, "param_groups": [{"lr": 1.5e-4, "params": [0]}]},
            "scaler": {"scale": 65536.0, "growth_factor": 2.0, "_growth_tracker": 0},
        },
        path,
    )
    return path


def test_moco_v3_vits_has_12_heads_and_its_3_layer_projector(tmp_path):
    # MoCo v3's ViT-S: 384 wide with 12 heads (timm's and DINO's ViT-S have 6)
    base = _vit("vit_small_patch16_224", seed=6, depth=1, embed_dim=384, num_heads=12)
    momentum = _vit("vit_small_patch16_224", seed=7, depth=1, embed_dim=384, num_heads=12)
    head_b = _mlp([384, 64, 64, 16], bias=False, bn=True, last_bn=True, seed=8)
    head_m = _mlp([384, 64, 64, 16], bias=False, bn=True, last_bn=True, seed=9)
    keys = sorted({k.split(".")[0] for k in head_b.state_dict()}, key=int)
    assert keys == ["0", "1", "3", "4", "6", "7"]  # the spec's head.0/1/3/4/6/7 layout
    path = _moco_v3_file(tmp_path, base, momentum, head_b, head_m, "head.")
    views = _views()
    for variant, backbone, head in ((None, base, head_b), ("momentum", momentum, head_m)):
        teacher = load_teacher("moco-v3-vits", weights=path, input_size=32, variant=variant, model_kwargs=dict(depth=1))
        out = teacher(views, FeatureRequest(embedding=True, projection=True))
        embedding = _expected(backbone, views)
        assert _close(out.embedding, embedding)
        with torch.no_grad():
            assert _close(out.projection, head(embedding))
    six_heads = timm.create_model("vit_small_patch16_224", num_classes=0, img_size=32, depth=1, num_heads=6).eval()
    six_heads.load_state_dict(base.state_dict())
    assert not _close(_expected(six_heads, views), _expected(base, views))  # the head count matters


def test_moco_v3_vitb_and_r50(tmp_path):
    views = _views()
    vit, vit_m = _vit("vit_base_patch16_224", seed=10), _vit("vit_base_patch16_224", seed=11)
    vit_head = _mlp([64, 48, 48, 16], bias=False, bn=True, last_bn=True, seed=12)
    path = _moco_v3_file(tmp_path, vit, vit_m, vit_head, vit_head, "head.")
    teacher = load_teacher("moco-v3-vitb", weights=path, input_size=32, model_kwargs=SMALL_VIT)
    out = teacher(views, FeatureRequest(projection=True, embedding=True))
    assert _close(out.embedding, _expected(vit, views))
    with torch.no_grad():
        assert _close(out.projection, vit_head(out.embedding))

    resnet, resnet_m = _resnet(13), _resnet(14)
    fc = _mlp([256, 64, 16], bias=False, bn=True, last_bn=True, seed=15)
    assert [type(m) for m in fc] == [nn.Linear, nn.BatchNorm1d, nn.ReLU, nn.Linear, nn.BatchNorm1d]
    assert not fc[4].affine and fc[0].bias is None
    (tmp_path / "r50").mkdir()
    path = _moco_v3_file(tmp_path / "r50", resnet, resnet_m, fc, fc, "fc.")
    teacher = load_teacher("moco-v3-r50", weights=path, input_size=32, model_kwargs=SMALL_RESNET)
    out = teacher(views, FeatureRequest(projection=True, embedding=True))
    assert _close(out.embedding, _expected(resnet, views))
    with torch.no_grad():
        assert _close(out.projection, fc(out.embedding))
    assert teacher.describe()["has_projection"]


# ----------------------------------------------------------------------------- DINO


@pytest.mark.parametrize(
    "name,arch",
    [
        ("dino-vits16", "vit_small_patch16_224"),
        ("dino-vitb16", "vit_base_patch16_224"),
        ("dino-vitb8", "vit_base_patch8_224"),
    ],
)
def test_dino_backbone_and_full_checkpoints(tmp_path, name, arch):
    teacher_net, student_net = _vit(arch, seed=16), _vit(arch, seed=17)
    torch.save(teacher_net.state_dict(), tmp_path / "backbone.pth")
    dino_head = {
        "head.mlp.0.weight": torch.randn(32, 64),
        "head.last_layer.weight_g": torch.randn(128, 1),
        "head.last_layer.weight_v": torch.randn(128, 32),
    }
    full = {
        "student": {**_prefixed("module.backbone.", student_net.state_dict()), **_prefixed("module.", dino_head)},
        "teacher": {**_prefixed("backbone.", teacher_net.state_dict()), **dino_head},
        "optimizer": {"state": {}, "param_groups": [{"lr": 5e-4, "weight_decay": np.float64(0.04)}]},
        "epoch": 100,
        "args": _args(),
        "dino_loss": {"center": torch.randn(1, 128)},
        "fp16_scaler": None,
    }
    torch.save(full, tmp_path / "full_checkpoint.pth")
    views = _views()
    for file, variant, network in (
        ("backbone.pth", None, teacher_net),
        ("full_checkpoint.pth", None, teacher_net),
        ("full_checkpoint.pth", "student", student_net),
    ):
        teacher = load_teacher(name, weights=tmp_path / file, input_size=32, variant=variant, model_kwargs=SMALL_VIT)
        out = teacher(views, FeatureRequest(embedding=True, layers=(0,)))
        assert _close(out.embedding, _expected(network, views)), (file, variant)
        assert not teacher.has_projection  # the DINO head is dropped
    with pytest.raises(UsageError, match="holding one network"):
        load_teacher(name, weights=tmp_path / "backbone.pth", variant="student", model_kwargs=SMALL_VIT)


# ----------------------------------------------------------------------------- Bootleg / I-JEPA


def _gap_vit(seed: int) -> nn.Module:
    return _vit("vit_small_patch16_224", seed, class_token=False, global_pool="avg", fc_norm=False)


def test_bootleg_takes_ijepa_layout_and_plain_state_dicts(tmp_path):
    target, context = _gap_vit(18), _gap_vit(19)
    assert target.cls_token is None and "cls_token" not in target.state_dict()
    torch.save(
        {
            "encoder": _prefixed("module.", context.state_dict()),
            "predictor": {"module.predictor_embed.weight": torch.randn(32, 64)},
            "target_encoder": _prefixed("module.", target.state_dict()),
            "opt": {"state": {}, "param_groups": []},
            "scaler": None,
            "epoch": 300,
            "loss": np.float32(0.25),
            "batch_size": 64,
            "world_size": 8,
            "lr": 1e-3,
        },
        tmp_path / "ijepa.pth.tar",
    )
    save_file({k: v.contiguous() for k, v in target.state_dict().items()}, str(tmp_path / "plain.safetensors"))
    views = _views()
    for file, variant, network in (
        ("ijepa.pth.tar", None, target),
        ("ijepa.pth.tar", "encoder", context),
        ("plain.safetensors", None, target),
    ):
        teacher = load_teacher(
            "bootleg-vits", weights=tmp_path / file, input_size=32, variant=variant, model_kwargs=SMALL_VIT
        )
        out = teacher(views, FeatureRequest(embedding=True))
        assert _close(out.embedding, _expected(network, views)), (file, variant)
        with torch.no_grad():  # average of the normed patch tokens: no class token
            tokens = network.forward_features((views - MEAN) / STD)
        assert tokens.shape[1] == 4 and _close(out.embedding, tokens.mean(1))


def test_bootleg_without_a_file_says_what_to_pass():
    with pytest.raises(UsageError) as info:
        load_teacher("bootleg-vitb")
    message = str(info.value)
    assert "no public checkpoint" in message and "--teacher-weights" in message
    assert "target_encoder" in message and "class_token=False" in message


# ----------------------------------------------------------------------------- file:<path>, timm:<name>


def test_file_teacher_with_arch_unpacks_known_layouts(tmp_path):
    network = _vit("vit_small_patch16_224", seed=20, depth=1, embed_dim=384, num_heads=6)
    path = tmp_path / "dino_full.pth"
    torch.save({"teacher": _prefixed("backbone.", network.state_dict()), "student": {}, "args": _args()}, path)
    teacher = load_teacher(f"file:{path}", arch="vit_small_patch16_224", input_size=32, model_kwargs=dict(depth=1))
    views = _views()
    assert _close(teacher(views, FeatureRequest(embedding=True)).embedding, _expected(network, views))
    assert teacher.input_config.mean == pytest.approx((0.485, 0.456, 0.406))  # a self-supervised layout
    # the same file through timm:<name> + --teacher-weights
    teacher = load_teacher("timm:vit_small_patch16_224", weights=path, input_size=32, model_kwargs=dict(depth=1))
    assert _close(teacher(views, FeatureRequest(embedding=True)).embedding, _expected(network, views))


def test_file_teacher_needs_arch_and_an_existing_file(tmp_path):
    with pytest.raises(UsageError, match="--arch"):
        load_teacher(f"file:{tmp_path / 'x.pth'}")
    with pytest.raises(UsageError, match="does not exist"):
        load_teacher(f"file:{tmp_path / 'x.pth'}", arch="resnet18")
    with pytest.raises(UsageError, match="did you mean"):
        load_teacher(f"file:{tmp_path / 'x.pth'}", arch="resnet19")
    with pytest.raises(UsageError, match="--arch is for file:"):
        load_teacher("dino-vits16", arch="vit_small_patch16_224")


def test_variants_are_checked_before_loading():
    with pytest.raises(UsageError, match="choose one of 'base' .*'momentum'"):
        load_teacher("moco-v3-vits", variant="momentun")
    with pytest.raises(UsageError, match="no variants"):
        load_teacher("efficientnet-lite0", variant="student")
    with pytest.raises(UsageError, match="choose one of"):
        load_teacher("dino-vits16", variant="encoder")


# ----------------------------------------------------------------------------- position embeddings


def test_position_embeddings_are_resampled_to_the_input_size(tmp_path):
    network = _vit("vit_base_patch16_224", seed=21, size=64)  # a 4x4 grid
    torch.save(network.state_dict(), tmp_path / "dino64.pth")
    teacher = load_teacher("dino-vitb16", weights=tmp_path / "dino64.pth", input_size=32, model_kwargs=SMALL_VIT)
    pos = network.pos_embed.detach()
    grid = pos[:, 1:].reshape(1, 4, 4, 64).permute(0, 3, 1, 2)
    resized = F.interpolate(grid, size=(2, 2), mode="bicubic", antialias=True, align_corners=False)
    expected = torch.cat([pos[:, :1], resized.permute(0, 2, 3, 1).reshape(1, 4, 64)], dim=1)
    assert teacher.model.pos_embed.shape == (1, 5, 64)
    assert torch.allclose(teacher.model.pos_embed, expected, atol=1e-6)
    assert teacher(_views(), FeatureRequest(embedding=True)).embedding.shape == (2, 64)
    # the default input size is the spec's 224 (a 14x14 grid)
    teacher = load_teacher("dino-vitb16", weights=tmp_path / "dino64.pth", model_kwargs=SMALL_VIT)
    assert teacher.input_config.size == (224, 224) and teacher.model.pos_embed.shape == (1, 197, 64)


# ----------------------------------------------------------------------------- safety and reports


def test_training_checkpoint_with_code_is_refused(tmp_path):
    network = _vit("vit_small_patch16_224", seed=22, depth=1, embed_dim=384, num_heads=6)
    marker = tmp_path / "hacked"
    path = tmp_path / "dino_full_evil.pth"
    torch.save(
        {
            "teacher": _prefixed("backbone.", network.state_dict()),
            "student": {},
            "args": RunsCodeWhenUnpickled(str(marker)),
        },
        path,
    )
    with pytest.raises(UsageError, match="refused") as info:
        load_teacher("dino-vits16", weights=path, model_kwargs=dict(depth=1))
    assert str(path) in str(info.value)
    assert not marker.exists()


def test_numpy_1_scalars_in_a_checkpoint_load(tmp_path):
    """Files written under numpy 1.x name `numpy.core.multiarray.scalar`; both spellings are allowed."""
    network = _vit("vit_small_patch16_224", seed=23, depth=1, embed_dim=384, num_heads=6)
    buffer = io.BytesIO()
    torch.save(
        {"model": network.state_dict(), "epoch": np.int64(3), "loss": np.float64(0.5)},
        buffer,
        _use_new_zipfile_serialization=False,
    )
    data = buffer.getvalue()
    assert b"numpy._core.multiarray\nscalar" in data
    path = tmp_path / "numpy1.pth"
    path.write_bytes(data.replace(b"numpy._core.multiarray\nscalar", b"numpy.core.multiarray\nscalar"))
    teacher = load_teacher("dino-vits16", weights=path, input_size=32, model_kwargs=dict(depth=1))
    views = _views()
    assert _close(teacher(views, FeatureRequest(embedding=True)).embedding, _expected(network, views))


def test_truncated_training_checkpoint(tmp_path):
    base = _vit("vit_small_patch16_224", seed=24, depth=1, embed_dim=384, num_heads=12)
    head = _mlp([384, 32, 32, 16], bias=False, bn=True, last_bn=True, seed=25)
    path = _moco_v3_file(tmp_path, base, base, head, head, "head.")
    data = path.read_bytes()
    truncated = tmp_path / "truncated.pth.tar"
    truncated.write_bytes(data[: len(data) // 2])
    with pytest.raises(UsageError, match="truncated") as info:
        load_teacher("moco-v3-vits", weights=truncated, model_kwargs=dict(depth=1))
    assert str(truncated) in str(info.value)


def test_wrong_architecture_report_names_format_and_the_right_teacher(tmp_path):
    vitb = _vit("vit_base_patch16_224", seed=26, depth=1, embed_dim=768, num_heads=12)
    path = tmp_path / "dino_vitb16.pth"
    torch.save(vitb.state_dict(), path)
    with pytest.raises(UsageError) as info:
        load_teacher("dino-vits16", weights=path, input_size=32, model_kwargs=dict(depth=1))
    message = str(info.value)
    assert str(path) in message and "shape mismatches" in message
    assert "file format: plain state dict" in message
    assert "ViT-B/16" in message and "--teacher dino-vitb16" in message


@pytest.mark.parametrize(
    "writer,loaded_as,guess",
    [
        ("moco_v3_vits", "dino-vits16", "moco-v3-vits"),
        ("moco_v2", "mae-vitb", "moco-v2-r50"),
        ("ijepa_vits", "dino-vits16", "bootleg-vits"),
        ("dino_full_vits", "moco-v3-vits", "dino-vits16"),
        ("mae_full_vitb", "dino-vitb16", "mae-vitb"),
    ],
)
def test_wrong_format_report_guesses_the_teacher(tmp_path, writer, loaded_as, guess):
    path = tmp_path / f"{writer}.pth"
    if writer == "moco_v3_vits":
        net = _vit("vit_small_patch16_224", seed=27, depth=1, embed_dim=384, num_heads=12)
        torch.save({"state_dict": _prefixed("module.base_encoder.", net.state_dict())}, path)
    elif writer == "moco_v2":
        state = _prefixed("module.encoder_q.", timm.create_model("resnet50", num_classes=0).state_dict())
        torch.save({"epoch": 200, "arch": "resnet50", "state_dict": {**state, "module.queue": torch.zeros(2, 2)}}, path)
    elif writer == "ijepa_vits":
        net = timm.create_model(
            "vit_small_patch16_224",
            num_classes=0,
            depth=1,
            img_size=32,
            class_token=False,
            global_pool="avg",
            fc_norm=False,
        )
        torch.save({"encoder": {}, "predictor": {}, "target_encoder": _prefixed("module.", net.state_dict())}, path)
    elif writer == "dino_full_vits":
        net = _vit("vit_small_patch16_224", seed=28, depth=1, embed_dim=384, num_heads=6)
        torch.save({"teacher": _prefixed("backbone.", net.state_dict()), "student": {}, "args": _args()}, path)
    else:
        net = _vit("vit_base_patch16_224", seed=29, depth=1, embed_dim=768, num_heads=12)
        torch.save({"model": {**net.state_dict(), "mask_token": torch.zeros(1, 1, 512)}}, path)
    with pytest.raises(UsageError) as info:
        load_teacher(loaded_as, weights=path, model_kwargs=dict(depth=1))
    message = str(info.value)
    assert str(path) in message and f"not a checkpoint of teacher {loaded_as}" in message
    assert f"use --teacher {guess}" in message


# ----------------------------------------------------------------------------- downloads


URL_TEACHERS = [n for n in TEACHERS if TEACHERS.get(n).url]


def test_every_published_teacher_has_its_official_url():
    urls = {n: TEACHERS.get(n).url for n in URL_TEACHERS}
    assert urls["mae-vitb"] == "https://dl.fbaipublicfiles.com/mae/pretrain/mae_pretrain_vit_base.pth"
    assert urls["mae-vith"] == "https://dl.fbaipublicfiles.com/mae/pretrain/mae_pretrain_vit_huge.pth"
    assert urls["moco-v2-r50"].endswith("/moco/moco_checkpoints/moco_v2_800ep/moco_v2_800ep_pretrain.pth.tar")
    assert urls["moco-v3-vits"] == "https://dl.fbaipublicfiles.com/moco-v3/vit-s-300ep/vit-s-300ep.pth.tar"
    assert urls["moco-v3-r50"] == "https://dl.fbaipublicfiles.com/moco-v3/r-50-1000ep/r-50-1000ep.pth.tar"
    assert urls["dino-vitb8"] == "https://dl.fbaipublicfiles.com/dino/dino_vitbase8_pretrain/dino_vitbase8_pretrain.pth"
    assert len(URL_TEACHERS) == 10 and not any(n.startswith("bootleg") for n in URL_TEACHERS)


@pytest.mark.parametrize("name", URL_TEACHERS)
def test_offline_without_weights_names_the_file_and_the_flag(no_network, monkeypatch, tmp_path, name):
    monkeypatch.setenv("DISTILLKIT_CACHE", str(tmp_path))
    start = time.perf_counter()
    with pytest.raises(UsageError) as info:
        load_teacher(name)
    assert time.perf_counter() - start < 5
    message = str(info.value)
    assert TEACHERS.get(name).url in message and "--teacher-weights FILE" in message
    assert message.count("\n") == 0  # one message


def test_download_goes_to_the_cache_and_is_reused(monkeypatch, tmp_path):
    network = _vit("vit_small_patch16_224", seed=30, depth=1, embed_dim=384, num_heads=6)
    served = tmp_path / "server" / "dino_deitsmall16_pretrain.pth"
    served.parent.mkdir()
    torch.save(network.state_dict(), served)
    monkeypatch.setenv("DISTILLKIT_CACHE", str(tmp_path / "cache"))
    path = fetch_weights(served.as_uri(), "teacher test")  # urllib reads file:// URLs like http ones
    assert path == tmp_path / "cache" / "weights" / served.name
    assert path.read_bytes() == served.read_bytes()
    # a cached file is used without the network, under the zoo name
    teacher = load_teacher("dino-vits16", input_size=32, model_kwargs=dict(depth=1))
    views = _views()
    assert _close(teacher(views, FeatureRequest(embedding=True)).embedding, _expected(network, views))
    assert str(path) in teacher.source


# ----------------------------------------------------------------------------- CLI, recipe


def test_list_teachers_shows_the_zoo():
    result = CliRunner().invoke(app, ["list", "teachers"], env={"COLUMNS": "200"})
    assert result.exit_code == 0
    for name in ("mae-vith", "moco-v2-r50", "moco-v3-vits", "dino-vitb8", "bootleg-vitl", "file:<path>"):
        assert name in result.output
    assert "384 / proj 256" in result.output and "vit_huge_patch14_224" in result.output


def test_arch_option_and_variant_reach_the_recipe_and_are_checked_before_loading(tmp_path):
    recipe = resolve_recipe(
        None, {"teacher": "file:x.pth", "arch": "vit_small_patch16_224"}, overrides=["teacher.variant=student"]
    )
    assert recipe.teacher.arch == "vit_small_patch16_224" and recipe.teacher.variant == "student"
    result = CliRunner().invoke(
        app,
        [
            "compress",
            "--teacher",
            f"file:{tmp_path / 'missing.pth'}",
            "--arch",
            "resnet18",
            "--out",
            str(tmp_path / "run"),
        ],
    )
    assert result.exit_code == 2 and "does not exist" in result.output
    result = CliRunner().invoke(
        app,
        ["compress", "--teacher", "moco-v3-vits", "--set", "teacher.variant=studnet", "--out", str(tmp_path / "run")],
    )
    assert result.exit_code == 2 and "teacher.variant" in result.output
    assert not (tmp_path / "run").exists()


def test_a_moco_checkpoint_nested_under_model_is_read_where_it_was_recognised(tmp_path):
    """Re-saved training checkpoints sometimes keep the MoCo state dict under "model" (not "state_dict"):
    recognised as MoCo from there, it must also be read from there."""
    query, key = _resnet(2), _resnet(3)
    state = {**_prefixed("module.encoder_q.", query.state_dict()), **_prefixed("module.encoder_k.", key.state_dict())}
    path = tmp_path / "moco_v2_model_key.pth"
    torch.save({"epoch": 200, "model": state}, path)
    teacher = load_teacher("moco-v2-r50", weights=path, input_size=32, model_kwargs=SMALL_RESNET)
    assert _close(teacher(_views(), FeatureRequest(embedding=True)).embedding, _expected(query, _views()))


def test_random_lite0_takes_its_model_arguments(tells):
    """A random-weight Lite0 (smoke tests) is built with the model arguments it is given."""
    with tells("random weights"):
        narrow = load_teacher("efficientnet-lite0", RANDOM_WEIGHTS, 64, model_kwargs={"drop_rate": 0.3})
        whole = load_teacher("efficientnet-lite0", RANDOM_WEIGHTS, 64)
    assert narrow.model.drop_rate == 0.3 and whole.model.drop_rate == 0.0
