"""Frozen-teacher forwards on the CPU: a whole batch against the chunks `distillkit/teachers/cpu_chunks.py` picks.

    python benchmarks/teacher_chunks.py [--threads 1] [--rounds 7] [--batch 128]

For each teacher and input size (weights random: nothing is downloaded), images/s of `Teacher.__call__` on
one batch (embedding, logits and the last stage, as kdss asks), run whole and in the teacher's `cpu_chunk`
images at a time, interleaved round by round; the median of `--rounds` each, the largest difference between
the two outputs, and one JSON line.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import timm
import torch

from distillkit.features import FeatureRequest
from distillkit.inputs import InputConfig
from distillkit.teachers.base import Teacher

TEACHERS = [("efficientnet_lite0", 64), ("efficientnet_lite0", 128), ("resnet50", 64), ("vit_small_patch16_224", 224)]


def images_per_s(teacher: Teacher, x: torch.Tensor, request: FeatureRequest) -> float:
    start = time.perf_counter()
    teacher(x, request)
    return x.shape[0] / (time.perf_counter() - start)


def measure(name: str, size: int, batch: int, rounds: int) -> dict:
    model = timm.create_model(name, pretrained=False, img_size=size) if "vit" in name else timm.create_model(name)
    teacher = Teacher(
        name, model, InputConfig((size, size), (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)), source="timm, random init"
    )
    request = FeatureRequest(embedding=True, logits=True, layers=(-1,))
    x = torch.rand(batch, 3, size, size, generator=torch.Generator().manual_seed(0))
    chunk = teacher.cpu_chunk
    rates: dict[str, list[float]] = {"whole": [], "chunked": []}
    outputs = {}
    for round_ in range(rounds + 1):
        for mode in rates:
            teacher.cpu_chunk = None if mode == "whole" else chunk
            if round_ == 0:  # warm-up, and the outputs compared
                outputs[mode] = teacher(x, request).named()
            else:
                rates[mode].append(images_per_s(teacher, x, request))
    diff = max((outputs["whole"][k] - outputs["chunked"][k]).abs().max().item() for k in outputs["whole"])
    whole, chunked = (statistics.median(rates[m]) for m in ("whole", "chunked"))
    return {
        "teacher": name,
        "size": size,
        "chunk": chunk,
        "whole": round(whole),
        "chunked": round(chunked),
        "speedup": round(chunked / whole, 2),
        "max_diff": diff,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--batch", type=int, default=128)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    rows = [measure(name, size, args.batch, args.rounds) for name, size in TEACHERS]
    print(f"{'teacher':<24}{'px':>5}{'chunk':>7}{'whole img/s':>13}{'chunked':>9}{'speed-up':>10}{'max diff':>10}")
    for r in rows:
        print(
            f"{r['teacher']:<24}{r['size']:>5}{str(r['chunk']):>7}{r['whole']:>13}{r['chunked']:>9}"
            f"{r['speedup']:>10}{r['max_diff']:>10.1e}"
        )
    print(json.dumps({"benchmark": "teacher_chunks", "threads": args.threads, "batch": args.batch, "rows": rows}))


if __name__ == "__main__":
    main()
