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
        yield kernel, stride, dilation, padding, height, width, channels, rng.choice([1, 2, channels])


@pytest.mark.parametrize("kernel,stride,dilation,padding,height,width,channels,groups", list(_configs(120)))
def test_outputs_and_gradients_match_the_full_convolution(
    kernel, stride, dilation, padding, height, width, channels, groups
):
    torch.manual_seed(kernel * 100 + height * 10 + width)
    weight = torch.randn(channels, channels // groups, kernel, kernel, requires_grad=True)
    bias = torch.randn(channels, requires_grad=True)
    x = torch.randn(3, channels, height, width, requires_grad=True)
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
