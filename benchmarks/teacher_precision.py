"""The frozen teacher in bf16 vs fp32: speed and what it does to the features. Prints one JSON line.

    python benchmarks/teacher_precision.py [--bank 2000] [--test 1000] [--batch 128]

EfficientNet-Lite0 (real ImageNet weights, 64 px) embeds Fashion-MNIST with `teacher.precision` fp32 and
bf16 (the teacher's own autocast). Reported: ms per batch of `--batch` views for each (median of 5 after
a warm-up), the cosine between bf16 and fp32 embeddings (mean, min), and the teacher's k-NN accuracy
(bank `--bank` training images, `--test` held-out images scored) from each. `auto` picks bf16 only on GPUs
that support it; this measures whether bf16 would cost accuracy, and what it buys on this machine.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time

import torch
import torch.nn.functional as F

from distillkit.data import open_data
from distillkit.evaluate import embed_dataset, eval_subset, knn_accuracy
from distillkit.features import FeatureRequest
from distillkit.teachers import load_teacher

EMBEDDING = FeatureRequest(embedding=True)


def batch_ms(teacher, views: torch.Tensor) -> float:
    teacher(views, EMBEDDING)  # warm-up
    times = []
    for _ in range(5):
        start = time.perf_counter()
        teacher(views, EMBEDDING)
        times.append(1000 * (time.perf_counter() - start))
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bank", type=int, default=2000)
    parser.add_argument("--test", type=int, default=1000)
    parser.add_argument("--batch", type=int, default=128)
    args = parser.parse_args()
    teacher = load_teacher("efficientnet-lite0", input_size=64)
    images = open_data("builtin:fashion-mnist", limit=None, seed=0, val_fraction=0.1, load_size=64)
    bank, test = eval_subset(images.train_all, args.bank, 0), eval_subset(images.test, args.test, 0)
    views = torch.rand(args.batch, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    record = {
        "benchmark": "teacher_precision",
        "teacher": teacher.name,
        "px": 64,
        "batch": args.batch,
        "data": images.source,
    }
    embeddings = {}
    for precision in ("fp32", "bf16"):
        teacher.precision = precision
        record[f"{precision}_ms_per_batch"] = round(batch_ms(teacher, views), 1)
        embed = lambda v: teacher(v, EMBEDDING).embedding  # noqa: E731
        embeddings[precision] = (embed_dataset(embed, bank), embed_dataset(embed, test))
        (bank_x, bank_y), (test_x, test_y) = embeddings[precision]
        record[f"{precision}_knn_top1"] = round(knn_accuracy(bank_x, bank_y, test_x, test_y, 20, 0.07), 4)
    cosine = F.cosine_similarity(embeddings["bf16"][1][0], embeddings["fp32"][1][0])
    record.update(
        cosine_mean=round(cosine.mean().item(), 5),
        cosine_min=round(cosine.min().item(), 5),
        machine=f"{platform.machine()}, {os.cpu_count()} cpus, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads",
    )
    print(json.dumps(record))


if __name__ == "__main__":
    main()
