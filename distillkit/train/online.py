"""Online k-NN: a cheap accuracy of the student at every epoch's end, on a small fixed labelled subset.

The student is embedded detached (no gradient, eval mode, then its mode restored) and with the
random-number state put back afterwards, so the training trajectory is the same with it on or off.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
from torch import nn
from torch.utils.data import Dataset

from ..evaluate import embed_dataset, eval_subset, knn_accuracy
from ..recipe import Recipe
from ..teachers import InputConfig, prepare_input


@dataclass
class OnlineKnn:
    bank: Dataset  # labelled training images the test images vote with
    test: Dataset  # labelled held-out images scored
    k: int
    temperature: float
    num_workers: int = 0

    @classmethod
    def from_recipe(cls, recipe: Recipe, images) -> "OnlineKnn | None":
        """The recipe's online k-NN on `images` (an ImageData); None when off or the data has no labelled held-out split."""
        n = recipe.eval.online_images
        if not (recipe.eval.enabled and n and images.test is not None and images.num_classes):
            return None
        return cls(bank=eval_subset(images.train_all, n, recipe.train.seed),
                   test=eval_subset(images.test, n // 2, recipe.train.seed),
                   k=recipe.eval.knn_k, temperature=recipe.eval.knn_temperature, num_workers=recipe.data.num_workers)

    def __call__(self, student: nn.Module, student_input: InputConfig, channels_last: bool) -> dict[str, float]:
        """{"online_knn_top1": accuracy, "online_knn_seconds": time it took}."""
        start = time.perf_counter()
        device = next(student.parameters()).device
        was_training = student.training
        embed = lambda views: student(prepare_input(views, student_input, channels_last))  # noqa: E731
        # DataLoader iterators draw a seed from the global generator: fork it so training's draws do not move
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            student.eval()
            try:
                bank = embed_dataset(embed, self.bank, num_workers=self.num_workers, device=device)
                test = embed_dataset(embed, self.test, num_workers=self.num_workers, device=device)
            finally:
                student.train(was_training)
        top1 = knn_accuracy(*bank, *test, k=self.k, temperature=self.temperature)
        return {"online_knn_top1": round(top1, 6), "online_knn_seconds": round(time.perf_counter() - start, 3)}
