"""Student specs: the shipped ones, timm:<name>, a user's own spec file."""

from __future__ import annotations

import pytest
import torch

from distillkit.errors import UsageError
from distillkit.student import (
    StudentSpec,
    create_student,
    list_students,
    model_args_for,
    student_spec,
    uses_channels_last,
)

SHIPPED = {
    # name: (timm architecture, channels_last) as written in students/*.yaml
    "efficientnet-b0": ("efficientnet_b0", True),
    "mobilenetv3": ("mobilenetv3_large_100", True),
    "mobilenetv3-small": ("mobilenetv3_small_100", True),
    "mobilenetv3-small-minimal": ("tf_mobilenetv3_small_minimal_100", True),
    "resnet18": ("resnet18", True),
    "vit-tiny": ("vit_tiny_patch16_224", False),
}


def test_list_students_has_shipped_specs():
    names = list_students()
    for name in SHIPPED:
        assert name in names
    assert "timm:<model name>" in names
    assert len([n for n in names if not n.startswith("timm:")]) == 6


@pytest.mark.parametrize("name", sorted(SHIPPED))
def test_shipped_spec_contents(name):
    spec = student_spec(name)
    assert isinstance(spec, StudentSpec)
    assert spec.name == name
    assert (spec.timm, spec.channels_last) == SHIPPED[name]
    assert spec.input_size == 224
    assert spec.model_args == {}
    assert spec.description


def test_vit_tiny_at_32_px():
    spec = student_spec("vit-tiny")
    assert model_args_for(spec, 32) == {"img_size": 32}
    model = create_student(spec, 32, seed=0).eval()
    with torch.no_grad():
        out = model(torch.zeros(2, 3, 32, 32))
    assert out.shape == (2, 192)  # ViT-Tiny: 192-d pooled embedding, no classifier


def test_conv_student_gets_no_img_size():
    assert model_args_for(student_spec("resnet18"), 32) == {}


def test_create_student_is_deterministic_with_seed():
    spec = student_spec("timm:resnet18")
    a = create_student(spec, 32, seed=3)
    b = create_student(spec, 32, seed=3)
    for (name, pa), (_, pb) in zip(a.state_dict().items(), b.state_dict().items()):
        assert torch.equal(pa, pb), name


def test_timm_student():
    spec = student_spec("timm:resnet18")
    assert spec.name == "timm:resnet18"
    assert spec.timm == "resnet18"
    model = create_student(spec, 32, seed=0).eval()
    assert uses_channels_last(spec, model) is True  # auto: a conv net
    with torch.no_grad():
        out = model(torch.zeros(1, 3, 32, 32))
    assert out.shape == (1, 512)  # resnet18 pooled features


def test_timm_vit_student_is_not_channels_last():
    spec = student_spec("timm:vit_tiny_patch16_224")
    model = create_student(spec, 32, seed=0)
    assert uses_channels_last(spec, model) is False  # auto: a token model
    assert uses_channels_last(spec, model, override=True) is True  # the recipe's choice wins


@pytest.mark.parametrize("name", ["timm:", "timm:resnet_does_not_exist"])
def test_unknown_timm_student(name):
    with pytest.raises(UsageError, match="unknown timm model"):
        student_spec(name)


def test_unknown_student_did_you_mean():
    with pytest.raises(UsageError) as info:
        student_spec("mobilenet")
    message = str(info.value)
    assert "'mobilenet'" in message
    assert "did you mean" in message
    assert "'mobilenetv3'" in message


def test_unknown_student_lists_choices():
    with pytest.raises(UsageError) as info:
        student_spec("qqqqqqq")
    message = str(info.value)
    for name in SHIPPED:
        assert name in message


def test_user_spec_file(tmp_path):
    path = tmp_path / "my-student.yaml"
    path.write_text(
        "timm: resnet18\ninput_size: 48\nchannels_last: false\ndescription: mine\nmodel_args:\n  drop_rate: 0.1\n",
        encoding="utf-8",
    )
    spec = student_spec(str(path))
    assert spec.name == "my-student"  # the file's stem
    assert spec.timm == "resnet18"
    assert spec.input_size == 48
    assert spec.channels_last is False
    assert spec.model_args == {"drop_rate": 0.1}
    model = create_student(spec, 32, seed=0).eval()
    with torch.no_grad():
        assert model(torch.zeros(1, 3, 32, 32)).shape == (1, 512)


def test_user_spec_file_name_key(tmp_path):
    path = tmp_path / "x.yml"
    path.write_text("name: tiny\ntimm: resnet18\n", encoding="utf-8")
    spec = student_spec(str(path))
    assert spec.name == "tiny"
    assert spec.input_size == 224  # StudentSpec default


def test_user_spec_unknown_key(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("timm: resnet18\ninput_sise: 32\n", encoding="utf-8")
    with pytest.raises(UsageError) as info:
        student_spec(str(path))
    message = str(info.value)
    assert "input_sise" in message
    assert "bad.yaml" in message
    assert "input_size" in message


def test_user_spec_unknown_timm_model(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("timm: resnet_does_not_exist\n", encoding="utf-8")
    with pytest.raises(UsageError) as info:
        student_spec(str(path))
    assert "resnet_does_not_exist" in str(info.value)
    assert "bad.yaml" in str(info.value)


def test_user_spec_wrong_type(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("timm: resnet18\ninput_size: large\n", encoding="utf-8")
    with pytest.raises(UsageError, match="input_size"):
        student_spec(str(path))


def test_user_spec_missing_timm(tmp_path):
    path = tmp_path / "nothing.yaml"
    path.write_text("input_size: 32\n", encoding="utf-8")
    with pytest.raises(UsageError, match="timm"):
        student_spec(str(path))


def test_user_spec_not_a_mapping(tmp_path):
    path = tmp_path / "list.yaml"
    path.write_text("- resnet18\n", encoding="utf-8")
    with pytest.raises(UsageError, match="mapping"):
        student_spec(str(path))


def test_user_spec_invalid_yaml(tmp_path):
    path = tmp_path / "broken.yaml"
    path.write_text("timm: [resnet18\n", encoding="utf-8")
    with pytest.raises(UsageError, match="broken.yaml"):
        student_spec(str(path))


def test_missing_spec_file_is_unknown_student(tmp_path):
    with pytest.raises(UsageError, match="unknown student"):
        student_spec(str(tmp_path / "missing.yaml"))


def test_a_timm_name_without_its_prefix_is_pointed_to_timm_prefix():
    """`--student efficientnet_b0` (timm's spelling, not a shipped spec): the error names `timm:efficientnet_b0`
    next to the close spec names, so the user learns both ways in."""
    with pytest.raises(UsageError, match=r"'timm:efficientnet_b0'") as raised:
        student_spec("efficientnet_b0")
    assert "efficientnet-b0" in str(raised.value)  # the shipped spec is still offered
    with pytest.raises(UsageError) as raised:
        student_spec("mobilenet")  # not a timm model name: no timm: suggestion for it
    assert "timm:mobilenet'" not in str(raised.value)


@pytest.mark.parametrize("name", ["mobilenetv3-small", "vit-tiny"])
def test_a_whole_copy_from_a_state_dict_computes_what_the_student_computes(name):
    """Student.with_state: how an FSDP / DeepSpeed run exports (its own model holds one shard): a fresh network
    of the same spec and size loaded with the gathered state dict, with the student's layout and reference."""
    from distillkit.recipe import StudentConfig
    from distillkit.student import Student

    trained = Student.create(StudentConfig(name=name, input_size=32, model_args={"drop_path_rate": 0.0}), seed=0)
    with torch.no_grad():  # move every weight and BatchNorm statistic away from its initial value
        for tensor in trained.model.state_dict().values():
            if tensor.is_floating_point():
                tensor.add_(torch.rand_like(tensor, dtype=torch.float32).to(tensor.dtype) * 0.01)
    trained.model.eval()
    copy = trained.with_state({k: v.clone() for k, v in trained.model.state_dict().items()})
    assert copy.model is not trained.model and copy.channels_last == trained.channels_last
    assert copy.spec == trained.spec and copy.input_config == trained.input_config
    x = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(copy.embed(x), trained.embed(x), rtol=0, atol=0)
    with pytest.raises(RuntimeError, match="Missing key"):
        trained.with_state({})
