"""Evaluation: weighted k-NN against a hand computation, the linear probe, parameter counts, latency."""

from __future__ import annotations

import math
import time

import pytest
import torch
from torch import nn

from distillkit.evaluate import count_params, cpu_latency_ms, knn_accuracy, linear_probe_accuracy
from distillkit.evaluate.metrics import cpu_latencies_ms, runner_latencies_ms

pytestmark = pytest.mark.usefixtures("one_cpu_thread")


def _at(angle_deg: float, radius: float = 1.0) -> list[float]:
    a = math.radians(angle_deg)
    return [radius * math.cos(a), radius * math.sin(a)]


# Six training points on rays (radii differ: k-NN uses cosine similarity, so they must not matter).
TRAIN = [(0, 3.0, 0), (80, 0.5, 1), (-80, 2.0, 1), (180, 1.0, 2), (150, 4.0, 2), (210, 0.7, 0)]
# Test points: angle and true label.
TEST = [(0, 0), (180, 0), (95, 1)]


def _data():
    train_x = torch.tensor([_at(a, r) for a, r, _ in TRAIN])
    train_y = torch.tensor([y for _, _, y in TRAIN])
    test_x = torch.tensor([_at(a, 1.5) for a, _ in TEST])
    test_y = torch.tensor([y for _, y in TEST])
    return train_x, train_y, test_x, test_y


def _hand_prediction(test_angle: float, k: int, temperature: float) -> int:
    """DINO-style vote: the k most cosine-similar training points vote exp(cos / T) for their label."""
    sims = sorted(((math.cos(math.radians(test_angle - a)), y) for a, _, y in TRAIN), reverse=True)[:k]
    votes: dict[int, float] = {}
    for sim, label in sims:
        votes[label] = votes.get(label, 0.0) + math.exp(sim / temperature)
    return max(votes, key=votes.get)


def test_hand_computation_is_weighted_not_majority():
    """The example is built so that weighting changes the answer for test points 0 and 2.

    point 0 (0 deg):   neighbours A(0 deg, cos 1, label 0), B/C (+-80 deg, cos .174, label 1)
                       votes: 0 -> e^2 = 7.39, 1 -> 2 e^.347 = 2.83  => 0 (a majority vote says 1)
    point 1 (180 deg): D(180, 1, label 2), E(150, .866, 2), F(210, .866, 0) => 2 (true label 0: wrong)
    point 2 (95 deg):  B(80, .966, 1), E(150, .574, 2), D(180, .087, 2)
                       votes: 1 -> e^1.93 = 6.90, 2 -> e^1.15 + e^.17 = 4.34  => 1 (majority says 2)
    """
    assert [_hand_prediction(a, 3, 0.5) for a, _ in TEST] == [0, 2, 1]
    assert math.exp(1 / 0.5) == pytest.approx(7.389, abs=1e-3)
    assert 2 * math.exp(math.cos(math.radians(80)) / 0.5) == pytest.approx(2.83, abs=1e-2)


@pytest.mark.parametrize("chunk", [1, 2, 1024])
def test_knn_accuracy_matches_hand_computation(chunk):
    train_x, train_y, test_x, test_y = _data()
    acc = knn_accuracy(train_x, train_y, test_x, test_y, k=3, temperature=0.5, chunk=chunk)
    assert acc == pytest.approx(2 / 3)


def test_knn_accuracy_perfect_and_k_larger_than_the_training_set():
    train_x, train_y, test_x, _ = _data()
    predictions = torch.tensor([0, 2, 1])
    assert knn_accuracy(train_x, train_y, test_x, predictions, k=3, temperature=0.5) == 1.0
    # k clamps to the 6 training points: every point votes, weights still decide
    expected = [_hand_prediction(a, 6, 0.5) for a, _ in TEST]
    assert knn_accuracy(train_x, train_y, test_x, torch.tensor(expected), k=50, temperature=0.5) == 1.0


def test_knn_accuracy_k1_is_nearest_neighbour():
    train_x, train_y, test_x, _ = _data()
    nearest = torch.tensor([0, 2, 1])  # A, D, B
    assert knn_accuracy(train_x, train_y, test_x, nearest, k=1) == 1.0


def _blobs(n_per_class: int, generator: torch.Generator, dim: int = 8, classes: int = 3):
    centres = torch.eye(classes, dim) * 10
    x = torch.cat([centres[c] + torch.randn(n_per_class, dim, generator=generator) for c in range(classes)])
    y = torch.arange(classes).repeat_interleave(n_per_class)
    return x, y


def test_linear_probe_separable_blobs():
    g = torch.Generator().manual_seed(0)
    train = _blobs(50, g)
    test = _blobs(20, g)
    assert linear_probe_accuracy(*train, *test, steps=100) == 1.0


def test_linear_probe_random_labels_is_near_chance():
    g = torch.Generator().manual_seed(1)
    train_x = torch.randn(200, 8, generator=g)
    train_y = torch.randint(0, 2, (200,), generator=g)
    test_x = torch.randn(400, 8, generator=g)
    test_y = torch.randint(0, 2, (400,), generator=g)
    acc = linear_probe_accuracy(train_x, train_y, test_x, test_y, steps=100)
    assert 0.4 <= acc <= 0.6


def test_linear_probe_is_deterministic_and_does_not_modify_inputs():
    g = torch.Generator().manual_seed(2)
    train = _blobs(10, g)
    test = _blobs(5, g)
    before = train[0].clone()
    a = linear_probe_accuracy(*train, *test, steps=20, seed=3)
    b = linear_probe_accuracy(*train, *test, steps=20, seed=3)
    assert a == b
    assert torch.equal(train[0], before)


def _tiny_net() -> nn.Module:
    # 3*4 + 4 = 16 and 4*2*3*3 + 2 = 74, plus BatchNorm2d(2): 2 + 2 = 4  -> 94
    return nn.Sequential(
        nn.Conv2d(3, 4, 1), nn.Conv2d(4, 2, 3), nn.BatchNorm2d(2), nn.AdaptiveAvgPool2d(1), nn.Flatten()
    )


def test_count_params():
    net = _tiny_net()
    assert count_params(net) == 94
    assert count_params(net) == sum(p.numel() for p in net.parameters())
    frozen = _tiny_net().requires_grad_(False)
    assert count_params(frozen) == 94


@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("channels_last", [True, False])
def test_cpu_latency_ms_leaves_the_model_as_it_was(training, channels_last):
    net = _tiny_net().train(training)
    running_mean = net[2].running_mean.clone()
    ms = cpu_latency_ms(net, (16, 16), channels_last=channels_last, runs=3)
    assert isinstance(ms, float)
    assert ms > 0 and math.isfinite(ms)
    assert net.training is training
    assert all(m.training is training for m in net.modules())
    assert next(net.parameters()).device.type == "cpu"
    assert all(p.requires_grad for p in net.parameters())
    assert torch.equal(net[2].running_mean, running_mean)  # timed in eval mode: BN statistics untouched
    # the model still trains afterwards (no inference tensors left behind)
    net(torch.rand(2, 3, 8, 8)).sum().backward()


def test_latencies_are_timed_in_turn_so_a_load_change_falls_on_every_model():
    calls = []
    runners = {
        name: (lambda x, n=name: calls.append((n, tuple(x.shape))), size, False)
        for name, size in (("teacher", (8, 8)), ("student", (4, 4)))
    }
    latencies = runner_latencies_ms(runners, runs=3)
    assert set(latencies) == {"teacher", "student"} and all(v >= 0 for v in latencies.values())
    assert calls == [("teacher", (1, 3, 8, 8)), ("student", (1, 3, 4, 4))] * 8  # 5 warm-up + 3 timed rounds


def test_a_slow_model_times_slower_than_a_fast_one_timed_beside_it():
    slow, fast = _tiny_net(), _tiny_net()
    slow.register_forward_hook(lambda *_: time.sleep(0.02))
    latencies = cpu_latencies_ms({"slow": (slow, (8, 8), False), "fast": (fast, (8, 8), True)}, runs=5)
    assert latencies["slow"] >= 20.0 > latencies["fast"]
    assert slow.training and fast.training  # restored


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cpu_latency_ms_keeps_a_cuda_model_trainable():
    net = _tiny_net().cuda().train()
    cpu_latency_ms(net, (16, 16), channels_last=False, runs=2)
    assert next(net.parameters()).device.type == "cuda"
    assert not any(p.is_inference() for p in net.parameters())
    net(torch.rand(2, 3, 8, 8, device="cuda")).sum().backward()
    assert all(p.grad is not None for p in net.parameters())


# ----------------------------------------------------------------------------- on the training device


def _images(n: int = 40, seed: int = 0):
    from distillkit.data.sources import TensorImages

    generator = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (n, 3, 16, 16), dtype=torch.uint8, generator=generator)
    return TensorImages(images, torch.arange(n) % 4)


def test_batched_inference_mode_embedding_equals_one_image_at_a_time():
    """The device path (batched, inference mode, outputs left on the device) against a plain loop over the
    images, each embedded alone as `model(x)`: equal within float tolerance, and normal tensors the probe can
    train on."""
    from distillkit.data.views import as_views
    from distillkit.evaluate import embed_dataset

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten()).eval()
    dataset, seen = _images(), []
    features, labels = embed_dataset(model, dataset, batch_size=16, device="cpu", on_batch=seen.append)
    with torch.no_grad():
        expected = torch.cat([model(as_views(dataset[i][0][None])) for i in range(len(dataset))])
    assert torch.allclose(features, expected, atol=1e-6)
    assert torch.equal(labels, torch.arange(40) % 4)
    assert seen == [16, 16, 8] and not features.is_inference()
    assert 0.0 <= linear_probe_accuracy(features, labels, features, labels, steps=5) <= 1.0


def test_a_device_that_is_not_there_is_refused():
    from distillkit import UsageError
    from distillkit.evaluate.exported import eval_device

    assert eval_device("cpu") == torch.device("cpu")
    if not torch.cuda.is_available():
        assert eval_device(None) == torch.device("cpu") or eval_device(None).type == "mps"
        with pytest.raises(UsageError, match="--device cuda:3: not usable on this machine"):
            eval_device("cuda:3")
    with pytest.raises(UsageError, match="--device toaster"):
        eval_device("toaster")
