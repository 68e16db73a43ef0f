"""Batch norms folded into the convolutions before them: the formula by hand, the same outputs on real timm
networks, the refusal when a convolution's output is read twice, teachers folded, latency timed on copies,
folding for the length of a scoring pass and undone exactly after it."""

from __future__ import annotations

import copy

import pytest
import timm
import torch
from torch import nn

from distillkit.conv_taps import CroppedTapsConv2d
from distillkit.evaluate.metrics import cpu_latencies_ms, embed_dataset, inference_form
from distillkit.inputs import InputConfig, prepare_input
from distillkit.norm_folding import FoldedNorm, fold_batch_norms, folded_norms
from distillkit.teachers.base import Teacher


def _randomise_norms(model: nn.Module, seed: int = 0) -> nn.Module:
    """Running statistics and affine parameters far from the identity, so a wrong fold shows."""
    generator = torch.Generator().manual_seed(seed)
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            c = module.num_features
            module.running_mean.copy_(torch.randn(c, generator=generator))
            module.running_var.copy_(torch.rand(c, generator=generator) * 2 + 0.1)
            if module.affine:
                module.weight.data.copy_(torch.randn(c, generator=generator))
                module.bias.data.copy_(torch.randn(c, generator=generator))
    return model.eval()


def test_fold_matches_the_formula_by_hand():
    torch.manual_seed(0)
    net = _randomise_norms(nn.Sequential(nn.Conv2d(3, 4, 3, padding=1, bias=True), nn.BatchNorm2d(4), nn.ReLU()))
    conv, norm = copy.deepcopy(net[0]), copy.deepcopy(net[1])
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        expected = net(x)

    assert fold_batch_norms(net, (8, 8)) == 1
    scale = norm.weight / torch.sqrt(norm.running_var + norm.eps)  # s = gamma / sqrt(var + eps)
    torch.testing.assert_close(net[0].weight, conv.weight * scale.view(4, 1, 1, 1))
    torch.testing.assert_close(net[0].bias, (conv.bias - norm.running_mean) * scale + norm.bias)
    assert isinstance(net[1], FoldedNorm)
    with torch.no_grad():
        torch.testing.assert_close(net(x), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "name", ["mobilenetv3_small_100", "tf_mobilenetv3_small_minimal_100", "efficientnet_lite0", "resnet18"]
)
def test_timm_networks_give_the_same_outputs_folded(name):
    torch.manual_seed(0)
    model = _randomise_norms(timm.create_model(name, num_classes=0))
    norms = sum(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    x = torch.rand(3, 3, 64, 64)
    with torch.no_grad():
        expected = model(x)

    folded = fold_batch_norms(model, (64, 64))
    assert folded == norms  # every norm of these networks follows a convolution
    assert not any(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    with torch.no_grad():
        got = model(x)
    # float32 rounding through ~50 folded layers of randomised norms: 2.9e-4 of the largest output on an AVX-512
    # CPU (under 1e-4 on AVX2); a wrong fold is off by the order of the outputs themselves
    assert (got - expected).abs().max() <= 1e-3 * expected.abs().max()


class ReadsTheConvolutionTwice(nn.Module):
    """The convolution's output feeds the norm and, unnormalised, the sum: folding would change the sum."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.norm = nn.BatchNorm2d(4)

    def forward(self, x):
        c = self.conv(x)
        return self.norm(c) + c


def test_a_convolution_read_twice_is_left_as_it_was():
    net = _randomise_norms(ReadsTheConvolutionTwice())
    weight, bias, norm = net.conv.weight, net.conv.bias, net.norm
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        expected = net(x)

    assert fold_batch_norms(net, (8, 8)) == 0
    assert net.conv.weight is weight and net.conv.bias is bias and net.norm is norm
    with torch.no_grad():
        torch.testing.assert_close(net(x), expected, rtol=0, atol=0)


def test_a_norm_in_training_mode_is_not_folded():
    net = _randomise_norms(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))).train()
    assert fold_batch_norms(net, (8, 8)) == 0
    assert isinstance(net[1], nn.BatchNorm2d)


def test_a_teacher_is_folded_and_embeds_as_the_network_it_was_given():
    torch.manual_seed(0)
    model = _randomise_norms(timm.create_model("mobilenetv3_small_100", num_classes=0))
    reference = copy.deepcopy(model)
    loaded_params = sum(p.numel() for p in model.parameters())
    config = InputConfig((64, 64), (0.5, 0.5, 0.5), (0.25, 0.25, 0.25))

    teacher = Teacher("mnv3", model, config, "test")
    assert teacher.folded_norms > 0
    assert teacher.describe()["params"] == loaded_params  # the network as loaded, not its folded form
    views = torch.rand(4, 3, 48, 48)
    with torch.no_grad():
        expected = reference(prepare_input(views, config, False))
    got = teacher.embed(views)
    assert (got - expected).abs().max() <= 1e-4 * expected.abs().max()


def test_latency_times_a_folded_copy_and_leaves_the_model_alone():
    model = _randomise_norms(timm.create_model("mobilenetv3_small_100", num_classes=0)).train()
    before = {k: v.clone() for k, v in model.state_dict().items()}

    latency = cpu_latencies_ms({"student": (model, (32, 32), False)}, runs=2)["student"]

    assert latency > 0
    assert model.training  # its mode restored
    assert any(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    after = model.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)


def test_folded_norms_folds_for_the_context_only_and_puts_back_the_same_objects():
    torch.manual_seed(0)
    model = _randomise_norms(timm.create_model("mobilenetv3_small_100", num_classes=0))
    parameters = dict(model.named_parameters())
    modules = dict(model.named_modules())
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.rand(3, 3, 32, 32)
    with torch.no_grad():
        expected = model(x)

    with folded_norms(model, (32, 32)) as folded:
        assert folded is model
        assert not any(isinstance(m, nn.BatchNorm2d) for m in model.modules())
        with torch.no_grad():
            got = model(x)
    assert (got - expected).abs().max() <= 1e-4 * expected.abs().max()

    assert dict(model.named_parameters()).keys() == parameters.keys()
    assert all(p is parameters[name] for name, p in model.named_parameters())  # the optimiser's own tensors
    assert all(m is modules[name] for name, m in model.named_modules())
    after = model.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)


def test_folded_norms_undoes_the_fold_when_the_pass_fails():
    model = _randomise_norms(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)))
    norm = model[1]
    with pytest.raises(RuntimeError, match="scoring failed"):
        with folded_norms(model, (8, 8)):
            assert isinstance(model[1], FoldedNorm)
            raise RuntimeError("scoring failed")
    assert model[1] is norm


def test_inference_form_embeds_as_the_model_does_and_leaves_it_as_it_was():
    """What scoring runs (norms folded, padding-only taps skipped) against the plain network, on real images'
    worth of batches; afterwards the convolutions are plain nn.Conv2d again."""
    torch.manual_seed(0)
    model = _randomise_norms(timm.create_model("tf_mobilenetv3_small_minimal_100", num_classes=0))
    generator = torch.Generator().manual_seed(1)
    images = [(torch.randint(0, 256, (1, 32, 32), dtype=torch.uint8, generator=generator), i % 3, i) for i in range(40)]
    config = InputConfig((32, 32), (0.5, 0.5, 0.5), (0.25, 0.25, 0.25))

    def embed(views):
        return model(prepare_input(views, config, False))

    expected, labels = embed_dataset(embed, images, batch_size=16)
    with inference_form(model, (32, 32)):
        assert any(isinstance(m, CroppedTapsConv2d) for m in model.modules())
        got, got_labels = embed_dataset(embed, images, batch_size=16)
    assert torch.equal(got_labels, labels)
    assert (got - expected).abs().max() <= 1e-4 * expected.abs().max()
    assert not any(isinstance(m, (CroppedTapsConv2d, FoldedNorm)) for m in model.modules())
