"""Convolutions that skip their padding-only taps compute what the full convolution computes."""

import random

import pytest
import timm
import torch
import torch.nn.functional as F
from torch import nn

from distillkit.conv_taps import CroppedTapsConv2d, cropped_taps, reachable_taps


def _configs(count: int):
    rng = random.Random(0)
    while count:
        kernel, stride, dilation = rng.choice([1, 2, 3, 5, 7]), rng.choice([1, 2, 3]), rng.choice([1, 1, 2])
        padding, height, width = rng.randint(0, 4), rng.randint(1, 7), rng.randint(1, 7)
        channels = rng.choice([4, 6])
        if min(height, width) + 2 * padding - dilation * (kernel - 1) - 1 < 0:
            continue
        count -= 1
        yield (
            kernel,
            stride,
            dilation,
            padding,
            height,
            width,
            channels,
            rng.choice([1, 2, channels]),
            rng.random() < 0.5,
        )


@pytest.mark.parametrize(
    "kernel,stride,dilation,padding,height,width,channels,groups,channels_last", list(_configs(160))
)
def test_outputs_and_gradients_match_the_full_convolution(
    kernel, stride, dilation, padding, height, width, channels, groups, channels_last
):
    torch.manual_seed(kernel * 100 + height * 10 + width)
    weight = torch.randn(channels, channels // groups, kernel, kernel, requires_grad=True)
    bias = torch.randn(channels, requires_grad=True)
    layout = torch.channels_last if channels_last else torch.contiguous_format
    x = torch.randn(3, channels, height, width).to(memory_format=layout).requires_grad_()
    expected = F.conv2d(x, weight, bias, stride, padding, dilation, groups)  # the reference: torch's own op
    expected_grads = torch.autograd.grad((expected**2).sum(), (x, weight, bias))

    conv = nn.Conv2d(channels, channels, kernel, stride, padding, dilation, groups)
    with torch.no_grad():
        conv.weight.copy_(weight)
        conv.bias.copy_(bias)
    with cropped_taps(conv):
        got = conv(x)
        grads = torch.autograd.grad((got**2).sum(), (x, conv.weight, conv.bias))
    assert got.shape == expected.shape
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    for g, e in zip(grads, expected_grads):
        torch.testing.assert_close(g, e, atol=1e-4, rtol=1e-4)


def test_reachable_taps_by_hand():
    # a 1-wide map, 5 taps, padding 2: only the centre tap reads the pixel
    assert reachable_taps(1, 5, 1, 2, 1) == (2, 2, 1)
    # 2 wide, stride 2, padding 2: the single output reads rows -2..2, the pixel rows 0, 1 are taps 2, 3
    assert reachable_taps(2, 5, 2, 2, 1) == (2, 3, 1)
    # a large map reads every tap
    assert reachable_taps(16, 3, 1, 1, 1) == (0, 2, 16)


def test_the_context_restores_the_model_and_keeps_its_state_dict():
    model = timm.create_model("mobilenetv3_small_050", num_classes=0)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with cropped_taps(model):
        assert any(type(m) is CroppedTapsConv2d for m in model.modules())
        assert model.state_dict().keys() == before.keys()
    assert not any(type(m) is CroppedTapsConv2d for m in model.modules())
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_a_small_student_trains_the_same_with_cropped_taps():
    """MobileNetV3 at 32 px ends on 1 x 1 maps with 5 x 5 kernels: loss and every gradient unchanged."""
    torch.manual_seed(0)
    model = timm.create_model("mobilenetv3_small_050", num_classes=0).to(memory_format=torch.channels_last)
    x = torch.randn(8, 3, 32, 32).to(memory_format=torch.channels_last)

    def loss_and_grads():
        model.zero_grad()
        loss = model(x).pow(2).mean()
        loss.backward()
        return loss.detach(), [p.grad.clone() for p in model.parameters()]

    small_maps = []
    for m in model.modules():
        if type(m) is nn.Conv2d and m.kernel_size == (5, 5):
            m.register_forward_hook(lambda mod, inputs, out: small_maps.append(inputs[0].shape[-1] == 1) and None)
    loss, grads = loss_and_grads()
    assert any(small_maps)  # the case the cropping is for is there
    with cropped_taps(model):
        cropped_loss, cropped_grads = loss_and_grads()
    torch.testing.assert_close(cropped_loss, loss, atol=1e-5, rtol=1e-5)
    for got, expected in zip(cropped_grads, grads):
        torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-3)


@pytest.mark.parametrize("size", [1, 2, 8])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("kind", ["pointwise", "channelwise"])
def test_one_by_one_convolutions_on_small_maps_are_matrix_products(monkeypatch, kind, bias, size):
    """1 x 1 kernels (and 5 x 5 ones cropped to their centre on a 1 x 1 map) skip oneDNN: same values, same
    gradients, the same channels-last layout out."""
    import distillkit.conv_taps as conv_taps

    calls = []
    original = getattr(conv_taps, kind)
    monkeypatch.setattr(conv_taps, kind, lambda *args: calls.append(kind) or original(*args))
    torch.manual_seed(size)
    channels, kernel = 12, 5 if size == 1 else 1
    groups = 1 if kind == "pointwise" else channels
    conv = nn.Conv2d(channels, 24 if groups == 1 else channels, kernel, padding=kernel // 2, groups=groups, bias=bias)
    x = torch.randn(4, channels, size, size).to(memory_format=torch.channels_last).requires_grad_()
    expected = F.conv2d(x, conv.weight, conv.bias, padding=kernel // 2, groups=groups)
    expected_grads = torch.autograd.grad((expected**2).sum(), [x, *conv.parameters()])
    with cropped_taps(conv):
        got = conv(x)
        grads = torch.autograd.grad((got**2).sum(), [x, *conv.parameters()])
    assert calls == [kind]
    assert got.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    for g, e in zip(grads, expected_grads):
        torch.testing.assert_close(g, e, atol=1e-4, rtol=1e-4)


def test_large_maps_keep_the_convolution(monkeypatch):
    import distillkit.conv_taps as conv_taps

    monkeypatch.setattr(conv_taps, "pointwise", lambda *args: pytest.fail("a 16 x 16 map took the matrix product"))
    conv = nn.Conv2d(8, 8, 1)
    with cropped_taps(conv):
        conv(torch.randn(2, 8, 16, 16).to(memory_format=torch.channels_last))
