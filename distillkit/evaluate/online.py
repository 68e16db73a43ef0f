"""Online k-NN: a cheap accuracy of the student at every epoch's end, on a small fixed labelled subset.

The student is embedded detached (no gradient, eval mode, then its mode restored) and with the
random-number state put back afterwards, so the training trajectory is the same with it on or off.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
from torch.utils.data import Dataset

from ..recipe import Recipe
from ..student import Student
from .metrics import embed_dataset, eval_subset, knn_accuracy


@dataclass
class OnlineKnn:
    bank: Dataset  # labelled training images the test images vote with
    test: Dataset  # labelled held-out images scored
    k: int
    temperature: float
    num_workers: int | str = 0  # data.num_workers: a number or "auto"

    @classmethod
    def from_recipe(cls, recipe: Recipe, images) -> "OnlineKnn | None":
        """The recipe's online k-NN on `images` (an ImageData); None when off or the data has no labelled
        held-out split."""
        n = recipe.eval.online_images
        if not (recipe.eval.enabled and n and images.test is not None and images.num_classes):
            return None
        return cls(
            bank=eval_subset(images.train_all, n, recipe.train.seed),
            test=eval_subset(images.test, n // 2, recipe.train.seed),
            k=recipe.eval.knn_k,
            temperature=recipe.eval.knn_temperature,
            num_workers=recipe.data.num_workers,
        )

    def __call__(self, student: Student) -> dict[str, float]:
        """{"online_knn_top1": accuracy, "online_knn_seconds": time it took}."""
        start = time.perf_counter()
        model = student.model
        was_training = model.training
        model.eval()
        try:
            top1 = self.score(student.embed, next(model.parameters()).device)
        finally:
            model.train(was_training)
        return {"online_knn_top1": round(top1, 6), "online_knn_seconds": round(time.perf_counter() - start, 3)}

    def references(self, teacher, student: Student) -> dict:
        """The levels the student's curve is read against, on the same split: the frozen teacher's embedding
        and the student before its first step (its random init). One metrics.jsonl line."""
        record = {"online_reference": True}
        # a teacher pruned for training has no final embedding to score; pretraining has no teacher
        if teacher is not None and teacher.pruned_to is None:
            device = next(teacher.model.parameters()).device
            teacher_top1 = self.score(teacher.embed, device)
            record["teacher_knn_top1"] = round(teacher_top1, 6)
        record["student_random_init_knn_top1"] = self(student)["online_knn_top1"]
        return record

    def score(self, embed, device: torch.device) -> float:
        """k-NN top-1 of `embed` (views -> embeddings), without moving training's random numbers."""
        # DataLoader iterators draw a seed from the global generator: fork it so training's draws do not move
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            bank = embed_dataset(embed, self.bank, num_workers=self.num_workers, device=device)
            test = embed_dataset(embed, self.test, num_workers=self.num_workers, device=device)
        return knn_accuracy(*bank, *test, k=self.k, temperature=self.temperature)
