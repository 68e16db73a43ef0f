"""The `bootleg` teacher: a Bootleg / I-JEPA-layout checkpoint of any ViT size loads with the architecture
its `args` record (or, without args, its tensors show), picks target_encoder or encoder, and answers what
the network that was saved answers; foreign, mismatched and missing files get one clear report."""

from __future__ import annotations

import pytest
import timm
import torch
from safetensors.torch import save_file
from torch import nn
from typer.testing import CliRunner

from distillkit import load_teacher
from distillkit.cli import app
from distillkit.errors import UsageError
from distillkit.features import FeatureRequest
from distillkit.teachers import check_teacher_name
from distillkit.teachers.guess import guess_teacher

pytestmark = pytest.mark.usefixtures("one_cpu_thread")

GAP = {"class_token": False, "global_pool": "avg", "fc_norm": False}
# the two sizes of the tests: timm.create_model kwargs as `distillkit pretrain bootleg` records them
PATCH4 = {"img_size": 32, "patch_size": 4, "depth": 2, "embed_dim": 64, "num_heads": 2, **GAP}
PATCH8 = {"img_size": 32, "patch_size": 8, "depth": 3, "embed_dim": 96, "num_heads": 3, "mlp_ratio": 2.0, **GAP}
HALF = [0.5, 0.5, 0.5]
IMAGENET = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))


def _vit(kwargs: dict, seed: int) -> nn.Module:
    """A timm ViT with every tensor perturbed by seed, so a tensor of the other network changes the outputs."""
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=0, **kwargs)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for tensor in model.parameters():
            tensor.add_(torch.randn(tensor.shape, generator=generator) * 0.1)
    return model.eval()


def _write(path, kwargs: dict, args: bool = True, **extra) -> tuple[nn.Module, nn.Module]:
    """A checkpoint in the layout `distillkit pretrain bootleg` writes; (target encoder, context encoder)."""
    target, context = _vit(kwargs, seed=1), _vit(kwargs, seed=2)
    checkpoint = {
        "encoder": {"module." + k: v for k, v in context.state_dict().items()},
        "predictor": {"module.predictor_embed.weight": torch.randn(32, kwargs["embed_dim"])},
        "target_encoder": {"module." + k: v for k, v in target.state_dict().items()},
        "epoch": 3,
        "step": 120,
        "loss": 0.25,
        "batch_size": 8,
        "world_size": 1,
        "lr": 1e-3,
    }
    if args:
        checkpoint["args"] = {
            "method": "bootleg",
            "arch": "vit_tiny_patch16_224",
            "model_kwargs": kwargs,
            "input_size": 32,
            "mean": HALF,
            "std": HALF,
            "target_layers": [1, kwargs["depth"] - 1],
            "distillkit_version": "test",
        }
    torch.save({**checkpoint, **extra}, path)
    return target, context


def _views(size: int = 32) -> torch.Tensor:
    return torch.rand(2, 3, size, size, generator=torch.Generator().manual_seed(5))


def _embedding(teacher, views: torch.Tensor) -> torch.Tensor:
    return teacher(views, FeatureRequest(embedding=True)).embedding


def _expected(model: nn.Module, views: torch.Tensor, mean, std) -> torch.Tensor:
    """The average of the normed patch tokens (no class token, no fc_norm) of the normalised views."""
    mean, std = torch.tensor(mean).view(1, 3, 1, 1), torch.tensor(std).view(1, 3, 1, 1)
    with torch.no_grad():
        return model.forward_features((views - mean) / std).mean(1)


def _same_tensors(model: nn.Module, reference: nn.Module) -> bool:
    ours, theirs = model.state_dict(), reference.state_dict()
    return ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in theirs)


def _close(a: torch.Tensor, b: torch.Tensor) -> bool:
    return torch.allclose(a, b, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("kwargs", [PATCH4, PATCH8], ids=["patch4-depth2", "patch8-depth3"])
def test_any_vit_size_loads_from_the_args_the_file_records(tmp_path, kwargs):
    path = tmp_path / "bootleg.pth"
    target, context = _write(path, kwargs)
    views = _views()
    for variant, network in ((None, target), ("target_encoder", target), ("encoder", context)):
        teacher = load_teacher("bootleg", weights=path, variant=variant)
        assert _same_tensors(teacher.model, network), variant
        assert _close(_embedding(teacher, views), _expected(network, views, HALF, HALF)), variant
        assert teacher.input_config.size == (32, 32) and teacher.input_config.mean == (0.5, 0.5, 0.5)
        assert teacher.model.patch_embed.patch_size == (kwargs["patch_size"],) * 2
        assert len(teacher.model.blocks) == kwargs["depth"] and teacher.model.num_features == kwargs["embed_dim"]
        assert teacher.model.blocks[0].attn.num_heads == kwargs["num_heads"]
        assert "I-JEPA-layout" in teacher.source and (variant or "target_encoder") in teacher.source
    assert not _close(_expected(target, views, HALF, HALF), _expected(context, views, HALF, HALF))


def test_without_args_the_architecture_is_read_from_the_tensors(tmp_path, tells):
    kwargs = {**PATCH8, "embed_dim": 128, "num_heads": 2}  # 64-d heads: what the convention assumes
    path = tmp_path / "ijepa.pth.tar"
    target, context = _write(path, kwargs, args=False)
    views = _views()
    with tells(r"records no architecture.*patch_size=8, embed_dim=128, depth=3, num_heads=2, mlp_ratio=2.*32 px"):
        teacher = load_teacher("bootleg", weights=path)
    assert _same_tensors(teacher.model, target)
    assert _close(_embedding(teacher, views), _expected(target, views, *IMAGENET))  # ImageNet mean/std
    assert teacher.input_config.size == (32, 32) and teacher.input_config.std == IMAGENET[1]
    teacher = load_teacher("bootleg", weights=path, variant="encoder")
    assert _close(_embedding(teacher, views), _expected(context, views, *IMAGENET))


def test_without_args_model_kwargs_set_the_heads_weights_do_not_record(tmp_path, tells):
    path = tmp_path / "ijepa.pth"
    target, _ = _write(path, PATCH4, args=False)  # 64-d, 2 heads of 32: the convention would say 1
    views = _views()
    with tells(r"num_heads=1 is assumed"):
        assumed = load_teacher("bootleg", weights=path)
    assert _same_tensors(assumed.model, target)  # the tensors fit either way ...
    assert not _close(_embedding(assumed, views), _expected(target, views, *IMAGENET))  # ... the answer does not
    teacher = load_teacher("bootleg", weights=path, model_kwargs={"num_heads": 2})
    assert _close(_embedding(teacher, views), _expected(target, views, *IMAGENET))
    with pytest.raises(UsageError, match=r"num_heads=3 does not divide the 64-d width"):
        load_teacher("bootleg", weights=path, model_kwargs={"num_heads": 3})
    odd = tmp_path / "odd.pth"
    _write(odd, {**PATCH4, "embed_dim": 96, "num_heads": 3}, args=False)  # 96-d: no whole number of 64-d heads
    with pytest.raises(UsageError, match=r"96-d ViT cannot be read.*model_kwargs=\{'num_heads': N\}"):
        load_teacher("bootleg", weights=odd)


def test_teacher_input_size_rebuilds_the_grid_as_for_other_vit_teachers(tmp_path):
    path = tmp_path / "bootleg.pth"
    target, _ = _write(path, PATCH4)
    teacher = load_teacher("bootleg", weights=path, input_size=48)
    assert teacher.input_config.size == (48, 48) and teacher.model.patch_embed.grid_size == (12, 12)
    target.set_input_size(img_size=(48, 48))  # timm's own resampling of the 8 x 8 position embeddings
    views = _views(48)
    assert _close(_embedding(teacher, views), _expected(target, views, HALF, HALF))


def test_without_a_file_says_how_to_make_one(tmp_path):
    for weights in (None, "random"):
        with pytest.raises(UsageError) as info:
            load_teacher("bootleg", weights=weights)
        message = str(info.value)
        assert "distillkit pretrain bootleg" in message and "--teacher-weights" in message
    with pytest.raises(UsageError, match="does not exist"):
        load_teacher("bootleg", weights=tmp_path / "missing.pth")


def test_a_file_of_another_layout_is_refused_with_a_guess(tmp_path):
    network = _vit(PATCH4, seed=3)
    save_file({k: v.contiguous() for k, v in network.state_dict().items()}, str(tmp_path / "plain.safetensors"))
    torch.save({"teacher": network.state_dict(), "student": network.state_dict()}, tmp_path / "dino.pth")
    for name, layout in (("plain.safetensors", "plain state dict"), ("dino.pth", "DINO full training checkpoint (")):
        with pytest.raises(UsageError) as info:
            load_teacher("bootleg", weights=tmp_path / name)
        message = str(info.value)
        assert message.startswith(f"{tmp_path / name} is a {layout}")
        assert "not a checkpoint of teacher bootleg" in message
        assert "I-JEPA-layout" in message and "this looks like a" in message and "ViT-64d/4 (64-d, 2 blocks" in message
        assert message.endswith(f"load it with --teacher file:{tmp_path / name} --arch TIMM_MODEL_NAME")


def test_args_naming_a_non_vit_or_no_timm_model_are_refused(tmp_path):
    path = tmp_path / "bootleg.pth"
    _write(path, PATCH4)
    checkpoint = torch.load(path, weights_only=True)
    for arch, words in (("resnet50", "not a timm VisionTransformer"), ("vit_tinyy_patch16_224", "no timm model")):
        checkpoint["args"]["arch"] = arch
        torch.save(checkpoint, path)
        with pytest.raises(UsageError) as info:
            load_teacher("bootleg", weights=path)
        assert str(path) in str(info.value) and words in str(info.value), arch
    checkpoint["args"].update(arch="vit_tiny_patch16_224", mean=[0.5, 0.5])
    torch.save(checkpoint, path)
    with pytest.raises(UsageError, match=r"args.mean / args.std three numbers"):
        load_teacher("bootleg", weights=path)


def test_tensors_that_do_not_fit_the_args_are_reported(tmp_path):
    path = tmp_path / "bootleg.pth"
    _write(path, PATCH4)
    checkpoint = torch.load(path, weights_only=True)
    checkpoint["args"]["model_kwargs"] = {**PATCH4, "depth": 3, "embed_dim": 96, "num_heads": 3}
    torch.save(checkpoint, path)
    with pytest.raises(UsageError) as info:
        load_teacher("bootleg", weights=path)
    message = str(info.value)
    assert str(path) in message and "does not fit VisionTransformer exactly" in message
    assert "missing keys" in message and "blocks.2." in message and "shape mismatches" in message
    assert "depth=3" in message and "distillkit pretrain bootleg" in message
    checkpoint["args"]["model_kwargs"] = {**PATCH4, "num_heads": 3}  # 64 is no multiple of 3 heads
    torch.save(checkpoint, path)
    with pytest.raises(UsageError, match="timm cannot build vit_tiny_patch16_224"):
        load_teacher("bootleg", weights=path)


def test_an_args_free_file_without_a_vit_is_refused(tmp_path):
    path = tmp_path / "ijepa.pth"
    resnet = timm.create_model("resnet18", num_classes=0)
    torch.save({"encoder": resnet.state_dict(), "predictor": {}, "target_encoder": resnet.state_dict()}, path)
    with pytest.raises(UsageError, match="its network is not a ViT.*--teacher file:"):
        load_teacher("bootleg", weights=path)
    vit = timm.create_model("vit_tiny_patch16_224", num_classes=0, depth=1, img_size=32)  # a class token
    torch.save({"encoder": vit.state_dict(), "predictor": {}, "target_encoder": vit.state_dict()}, path)
    with pytest.raises(UsageError, match="with a class token"):
        load_teacher("bootleg", weights=path)


def test_names_variants_and_arch_are_checked_before_loading():
    with pytest.raises(UsageError) as info:
        check_teacher_name("bootleg", variant="momentum")
    assert "'target_encoder'" in str(info.value) and "'encoder'" in str(info.value)
    with pytest.raises(UsageError, match="--arch is for file:<path> teachers"):
        check_teacher_name("bootleg", arch="vit_small_patch16_224")


def test_other_vit_sizes_in_ijepa_layout_are_guessed_as_bootleg(tmp_path):
    state = _vit(PATCH4, seed=4).state_dict()
    assert guess_teacher("ijepa", state).endswith("use --teacher bootleg")
    standard = _vit({**PATCH4, "patch_size": 16, "embed_dim": 384, "num_heads": 6, "depth": 1}, seed=4)
    assert guess_teacher("ijepa", standard.state_dict()).endswith("use --teacher bootleg-vits")
    path = tmp_path / "bootleg.pth"
    _write(path, PATCH4)
    with pytest.raises(UsageError) as info:  # the fixed-size teacher names the one that reads any size
        load_teacher("bootleg-vits", weights=path)
    assert "does not fit" in str(info.value) and "use --teacher bootleg" in str(info.value)


def test_list_teachers_shows_it():
    result = CliRunner().invoke(app, ["list", "teachers"], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    (line,) = [line for line in result.output.splitlines() if line.split()[:1] == ["bootleg"]]
    assert "any ViT, from the file" in line and "distillkit pretrain bootleg" in line
