"""Evaluating embeddings: weighted k-NN and linear-probe accuracy, parameter counts, CPU latency.

k-NN follows DINO (Caron et al. 2021, eval_knn.py): cosine similarity of l2-normalised
embeddings, the k nearest training images vote for their class with weight exp(sim / T).
The linear probe is multinomial logistic regression on standardised frozen embeddings,
fitted full-batch with L-BFGS and a small L2 penalty.
"""

from __future__ import annotations

import statistics
import time
from contextlib import contextmanager
from typing import Callable, Iterator

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

from ..conv_taps import cropped_taps
from ..data.loading import loader_options
from ..data.sources import Subset, collate_skipping_bad
from ..data.views import as_views
from ..norm_folding import folded_copy, folded_norms

Embed = Callable[[Tensor], Tensor]  # raw [0, 1] views -> (B, D) embeddings


def embed_dataset(
    embed: Embed,
    dataset: Dataset,
    batch_size: int = 256,
    num_workers: int | str = 0,
    device: torch.device | str = "cpu",
    on_batch: Callable[[int], None] | None = None,
) -> tuple[Tensor, Tensor]:
    """Embeddings (N, D) float32 and labels (N,) of every image, each seen whole and unflipped, on `device`."""
    outputs, labels = embed_outputs(
        lambda views: {"embedding": embed(views)}, dataset, batch_size, num_workers, device, on_batch
    )
    return outputs["embedding"], labels


@contextmanager
def inference_form(model: nn.Module, input_size: tuple[int, int]) -> Iterator[nn.Module]:
    """Within the context, `model` (in eval mode) embeds as a deployment runs it: its batch norms folded into
    their convolutions, in place (`norm_folding.folded_norms`), and on the CPU its convolutions' padding-only
    taps skipped (`conv_taps.cropped_taps`). The same embeddings within float rounding; a MobileNetV3-Small
    at 32 px embeds ~1.7x as many images per second on one CPU thread. On exit the model is as it was."""
    with folded_norms(model, input_size), cropped_taps(model):
        yield model


def embed_outputs(
    embed: Callable[[Tensor], dict[str, Tensor]],
    dataset: Dataset,
    batch_size: int = 256,
    num_workers: int | str = 0,
    device: torch.device | str = "cpu",
    on_batch: Callable[[int], None] | None = None,
) -> tuple[dict[str, Tensor], Tensor]:
    """Several named outputs per image from one pass, batched on `device` under inference mode: name -> (N, D)
    float32 and labels (N,), both on `device` (normal tensors: the probe trains on them). `on_batch(n)` is
    told the number of images of each batch (a progress bar)."""
    loader = DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=False,
        collate_fn=collate_skipping_bad,
        **loader_options(num_workers, dataset, device, persistent=False),  # workers ("auto" resolved), pinning
    )
    outputs, labels = [], []
    for batch in loader:
        if batch.images is not None:
            with torch.inference_mode():
                views = as_views(batch.images.to(device, non_blocking=True))
                outputs.append({name: out.float() for name, out in embed(views).items()})
            labels.append(batch.labels.to(device))
        if on_batch is not None:
            on_batch(len(batch.bad) + (len(batch.labels) if batch.labels is not None else 0))
    # torch.cat outside inference mode makes normal tensors
    return {name: torch.cat([out[name] for out in outputs]) for name in outputs[0]}, torch.cat(labels)


def knn_accuracy(
    train_features: Tensor,
    train_labels: Tensor,
    test_features: Tensor,
    test_labels: Tensor,
    k: int = 20,
    temperature: float = 0.07,
    chunk: int = 1024,
) -> float:
    """Weighted k-NN top-1 accuracy: votes exp(cos / T) from the k most similar training images."""
    train = F.normalize(train_features.float(), dim=1)
    test = F.normalize(test_features.float(), dim=1)
    num_classes = int(max(train_labels.max(), test_labels.max())) + 1
    k = min(k, train.shape[0])
    correct = 0
    for start in range(0, test.shape[0], chunk):
        similarity = test[start : start + chunk] @ train.T
        top_sim, top_idx = similarity.topk(k, dim=1)
        votes = torch.zeros(top_sim.shape[0], num_classes, device=top_sim.device)
        votes.scatter_add_(1, train_labels[top_idx], (top_sim / temperature).exp())
        correct += (votes.argmax(1) == test_labels[start : start + chunk]).sum().item()
    return correct / test.shape[0]


def linear_probe_accuracy(
    train_features: Tensor,
    train_labels: Tensor,
    test_features: Tensor,
    test_labels: Tensor,
    steps: int = 300,
    l2: float = 1e-4,
    seed: int = 0,
) -> float:
    """Top-1 accuracy of a logistic-regression probe on standardised embeddings."""
    mean = train_features.mean(0, keepdim=True)
    std = train_features.std(0, keepdim=True).clamp_min(1e-6)
    x_train = ((train_features - mean) / std).float()
    x_test = ((test_features - mean) / std).float()
    num_classes = int(max(train_labels.max(), test_labels.max())) + 1
    generator = torch.Generator().manual_seed(seed)
    # (classes, dims), nn.Linear's layout: the weight gradient is then grad^T @ x, which BLAS computes ~30x
    # faster on the CPU than x^T @ grad for (60000, 1280) embeddings and 10 classes
    weight = (torch.randn(x_train.shape[1], num_classes, generator=generator) * 0.01).T.contiguous()
    weight = weight.to(x_train.device).requires_grad_(True)  # drawn on the CPU: the same start on every device
    bias = torch.zeros(num_classes, device=x_train.device, requires_grad=True)
    optimizer = torch.optim.LBFGS(
        [weight, bias], lr=1.0, max_iter=steps, history_size=20, line_search_fn="strong_wolfe"
    )

    def closure():
        optimizer.zero_grad()
        loss = F.cross_entropy(F.linear(x_train, weight, bias), train_labels) + l2 * weight.pow(2).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        optimizer.step(closure)
    with torch.no_grad():
        return (F.linear(x_test, weight, bias).argmax(1) == test_labels).float().mean().item()


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


Timed = tuple[Callable[[Tensor], Tensor], tuple[int, int], bool]  # (the callable, input size, channels last)


def cpu_latency_ms(model: nn.Module, input_size: tuple[int, int], channels_last: bool, runs: int = 30) -> float:
    """Median single-image forward time of one model on the CPU, in milliseconds (`cpu_latencies_ms`)."""
    return cpu_latencies_ms({"model": (model, input_size, channels_last)}, runs)["model"]


def cpu_latencies_ms(models: dict[str, Timed], runs: int = 30) -> dict[str, float]:
    """name -> median single-image forward time on the CPU, in milliseconds, of every model, timed round-robin
    (`runner_latencies_ms`) so that a change in the machine's load falls on all of them alike.

    Each model is timed as a deployment runs it: with its batch norms folded into the convolutions before them
    (`norm_folding.folded_copy`, as ONNX and TorchScript exporters and a folded teacher do), so a teacher and
    its student compare alike. The models are moved outside inference mode (moving them inside would turn their
    parameters into inference tensors) and their devices and training modes are restored afterwards.
    """
    placed = {name: (next(model.parameters()).device, model.training) for name, (model, _, _) in models.items()}
    for model, _, _ in models.values():
        model.eval().cpu()
    deployed = {name: (_as_deployed(model, size, last), size, last) for name, (model, size, last) in models.items()}
    try:
        return runner_latencies_ms(deployed, runs)
    finally:
        for name, (model, _, _) in models.items():
            device, was_training = placed[name]
            model.to(device).train(was_training)


def _as_deployed(model: nn.Module, input_size: tuple[int, int], channels_last: bool) -> nn.Module:
    folded = folded_copy(model, input_size)
    return folded.to(memory_format=torch.channels_last) if channels_last and folded is not model else folded


def runner_latency_ms(
    run: Callable[[Tensor], Tensor], input_size: tuple[int, int], runs: int = 30, channels_last: bool = False
) -> float:
    """Median single-image time of any callable on the CPU (a model, an ONNX session, a TorchScript
    module), after 5 warm-up runs, in milliseconds."""
    return runner_latencies_ms({"run": (run, input_size, channels_last)}, runs)["run"]


def runner_latencies_ms(runners: dict[str, Timed], runs: int = 30) -> dict[str, float]:
    """name -> median single-image time of each callable on the CPU, in milliseconds: 5 warm-up rounds, then
    `runs` rounds that each time every callable once, in turn. Interleaved, the latencies of a teacher and its
    student are measured under the same load, so their ratio holds on a busy machine too."""
    inputs = {}
    for name, (_, input_size, channels_last) in runners.items():
        x = torch.rand(1, 3, *input_size)
        inputs[name] = x.contiguous(memory_format=torch.channels_last) if channels_last else x
    times: dict[str, list[float]] = {name: [] for name in runners}
    with torch.no_grad():
        for round_ in range(runs + 5):
            for name, (run, _, _) in runners.items():
                start = time.perf_counter()
                run(inputs[name])
                if round_ >= 5:
                    times[name].append((time.perf_counter() - start) * 1000)
    return {name: statistics.median(values) for name, values in times.items()}


def eval_subset(dataset: Dataset, max_items: int, seed: int) -> Dataset:
    """A seeded random subset of at most `max_items` images (all of them when fewer)."""
    if len(dataset) <= max_items:
        return dataset
    chosen = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(seed))[:max_items]
    return Subset(dataset, sorted(chosen.tolist()))


def score_embeddings(
    train: tuple[Tensor, Tensor],
    test: tuple[Tensor, Tensor],
    k: int,
    temperature: float,
    probe_steps: int,
    seed: int = 0,
) -> dict[str, float]:
    return {
        "knn_top1": knn_accuracy(*train, *test, k=k, temperature=temperature),
        "probe_top1": linear_probe_accuracy(*train, *test, steps=probe_steps, seed=seed),
    }
