"""Teachers from the Hugging Face Hub: `timm:hf-hub:<repo>`, `timm:<model>.<tag>`, and the zoo's MAE / DINO
entries loading timm's Hub copy or the official file with the same tensors. Offline: a Hugging Face cache
filled the way huggingface_hub fills it, and real connection failures (`no_network`: a proxy on a closed port).
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import pytest
import timm
import torch
from huggingface_hub import constants
from safetensors.torch import save_file
from torch import nn

from distillkit import UsageError, load_teacher
from distillkit.features import FeatureRequest
from distillkit.hub import HubUnavailable, hub_repo, hub_weights
from distillkit.teachers.download import cached_path
from distillkit.teachers.spec import TEACHERS

SMALL_VIT = dict(depth=2, embed_dim=64, num_heads=4)
COMMIT = "0123456789abcdef0123456789abcdef01234567"


def _randomised(model: nn.Module, seed: int) -> nn.Module:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for tensor in model.parameters():
            tensor.add_(torch.randn(tensor.shape, generator=generator) * 0.1)
    return model.eval()


def _in_hf_cache(repo_id: str, files: dict[str, Path]) -> Path:
    """`files` placed in the Hugging Face cache as `hf_hub_download` leaves them: a snapshot folder named by
    its commit, and refs/main pointing at it."""
    repo = Path(constants.HF_HUB_CACHE) / f"models--{repo_id.replace('/', '--')}"
    snapshot = repo / "snapshots" / COMMIT
    snapshot.mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(COMMIT)
    for name, source in files.items():
        shutil.copyfile(source, snapshot / name)
    return snapshot


@pytest.fixture
def offline_hf_cache(no_network, monkeypatch):
    """HF_HUB_OFFLINE as a user sets it, over an empty cache and a network that refuses every connection."""
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)


def _embedding(teacher, size: int = 32) -> torch.Tensor:
    views = torch.rand(2, 3, size, size, generator=torch.Generator().manual_seed(3))
    return teacher(views, FeatureRequest(embedding=True)).embedding


# ----------------------------------------------------------------------------- the zoo's Hub copies


def _mae_official(network: nn.Module, path: Path) -> Path:
    """MAE's mae_visualize_*.pth layout: {'model': encoder + decoder, 'optimizer', 'epoch', ...}."""
    decoder = {"mask_token": torch.randn(1, 1, 32), "decoder_embed.weight": torch.randn(32, 64)}
    torch.save({"model": {**network.state_dict(), **decoder}, "epoch": 799}, path)
    return path


def _dino_official(network: nn.Module, path: Path) -> Path:
    """DINO's dino_*_pretrain.pth layout: the teacher backbone's plain state dict."""
    torch.save(network.state_dict(), path)
    return path


@pytest.mark.parametrize(
    "name,arch,official",
    [("mae-vitb", "vit_base_patch16_224", _mae_official), ("dino-vits16", "vit_small_patch16_224", _dino_official)],
)
def test_zoo_teacher_from_its_hub_copy_equals_the_official_file(offline_hf_cache, tmp_path, name, arch, official):
    network = _randomised(timm.create_model(arch, num_classes=0, img_size=32, **SMALL_VIT), seed=7)
    official_file = official(network, tmp_path / "official.pth")
    save_file(network.state_dict(), tmp_path / "model.safetensors")  # timm's Hub copy: a timm-layout safetensors
    spec = TEACHERS.get(name)
    _in_hf_cache(hub_repo(spec.hub), {"model.safetensors": tmp_path / "model.safetensors"})

    from_hub = load_teacher(name, input_size=32, model_kwargs=SMALL_VIT)
    from_official = load_teacher(name, weights=official_file, input_size=32, model_kwargs=SMALL_VIT)

    assert f"models--timm--{spec.hub}" in from_hub.source
    hub_state, official_state = from_hub.model.state_dict(), from_official.model.state_dict()
    assert hub_state.keys() == official_state.keys()
    assert all(torch.equal(hub_state[k], official_state[k]) for k in hub_state)
    assert torch.equal(_embedding(from_hub), _embedding(from_official))


def test_official_file_in_distillkits_cache_comes_before_the_hub(offline_hf_cache, tmp_path):
    spec = TEACHERS.get("dino-vits16")
    official = _randomised(timm.create_model(spec.architecture, num_classes=0, img_size=32, **SMALL_VIT), seed=1)
    hub_copy = _randomised(timm.create_model(spec.architecture, num_classes=0, img_size=32, **SMALL_VIT), seed=2)
    cached_path(spec.url).parent.mkdir(parents=True)
    _dino_official(official, cached_path(spec.url))
    save_file(hub_copy.state_dict(), tmp_path / "model.safetensors")
    _in_hf_cache(hub_repo(spec.hub), {"model.safetensors": tmp_path / "model.safetensors"})

    teacher = load_teacher("dino-vits16", input_size=32, model_kwargs=SMALL_VIT)

    assert str(cached_path(spec.url)) in teacher.source
    assert torch.equal(teacher.model.state_dict()["cls_token"], official.state_dict()["cls_token"])


def test_zoo_teacher_offline_with_neither_copy_names_both_fast(no_network, tmp_path):
    spec = TEACHERS.get("mae-vitb")
    start = time.perf_counter()
    with pytest.raises(UsageError) as info:
        load_teacher("mae-vitb")
    assert time.perf_counter() - start < 5
    message = str(info.value)
    assert spec.url in message and "timm/vit_base_patch16_224.mae" in message and "--teacher-weights FILE" in message
    assert "cannot be reached" in message


def test_hub_weights_without_the_network_fails_fast(no_network):
    start = time.perf_counter()
    with pytest.raises(HubUnavailable, match="cannot be reached"):
        hub_weights("timm/vit_small_patch16_224.dino")
    assert time.perf_counter() - start < 5


# ----------------------------------------------------------------------------- timm:hf-hub:<repo>, timm:<model>.<tag>


def test_timm_hf_hub_teacher_loads_a_users_hub_model(offline_hf_cache, tmp_path):
    """A model pushed with timm's own `save_for_hf` (config.json + model.safetensors), read from the cache."""
    network = _randomised(timm.create_model("resnet18", num_classes=0, layers=(1, 1, 1, 1)), seed=4)
    folder = tmp_path / "pushed"
    timm.models.save_for_hf(network, folder, model_args={"layers": [1, 1, 1, 1], "num_classes": 0})
    _in_hf_cache("someone/tiny-resnet", {f.name: f for f in folder.iterdir()})

    teacher = load_teacher("timm:hf-hub:someone/tiny-resnet", input_size=32, fold_norms=False)

    state = teacher.model.state_dict()
    assert all(torch.equal(state[k], v) for k, v in network.state_dict().items())
    assert _embedding(teacher).shape == (2, 512)


def test_timm_hf_hub_teacher_offline_fails_fast_with_what_to_do(no_network):
    start = time.perf_counter()
    with pytest.raises(UsageError) as info:
        load_teacher("timm:hf-hub:timm/vit_small_patch14_dinov2.lvd142m")
    assert time.perf_counter() - start < 5
    message = str(info.value)
    assert "timm/vit_small_patch14_dinov2.lvd142m" in message and "cannot be reached" in message
    assert "--teacher-weights FILE" in message


@pytest.mark.parametrize(
    "name,match",
    [
        ("timm:hf-hub:no-owner", "hf-hub:<owner>/<repository>"),
        ("timm:hf-hub:a/b/c", "hf-hub:<owner>/<repository>"),
        ("timm:resnet18.not_a_tag", "no weights tagged 'not_a_tag' for resnet18.*a1_in1k"),
    ],
)
def test_bad_hub_names_are_refused_before_anything_loads(name, match):
    with pytest.raises(UsageError, match=match):
        load_teacher(name)


def test_a_tagged_timm_teacher_reads_its_tags_hub_repository(offline_hf_cache, tmp_path):
    network = _randomised(timm.create_model("resnet18", num_classes=1000), seed=5)
    save_file(network.state_dict(), tmp_path / "model.safetensors")
    _in_hf_cache("timm/resnet18.a1_in1k", {"model.safetensors": tmp_path / "model.safetensors"})

    teacher = load_teacher("timm:resnet18.a1_in1k", input_size=32, fold_norms=False)

    assert torch.equal(teacher.model.state_dict()["conv1.weight"], network.state_dict()["conv1.weight"])
