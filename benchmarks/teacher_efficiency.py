"""What each of the frozen teacher's efficiencies is worth, measured one at a time: prints one JSON line.

    python benchmarks/teacher_efficiency.py [--batch 128] [--rounds 5] [--no-compile]

Each variant changes one thing against the teacher as distillkit runs it (eval mode, inference mode,
channels_last for conv nets, fp32 on CPUs, only the blocks a strategy reads), on the same synthetic
views; the variants are interleaved round by round and the median ms per batch is reported:

  EfficientNet-Lite0 (real weights) at 64 px, the embedding:
    distillkit          as compress runs it
    nchw                channels_last off (NCHW inputs and weights)
    no_grad             torch.no_grad instead of torch.inference_mode
    autograd            no gradient guard at all (what a loop that forgets it pays)
    compiled            teacher.compile: extraction through torch.compile (compile time reported apart)
  ViT-S/16 (random weights) at 112 px, block 6 of 12 (a hidden-layer strategy's request):
    vit_pruned          distillkit: the teacher pruned to the blocks read
    vit_unpruned        not pruned: extraction still stops after the deepest tap (forward_intermediates'
                        stop_early), so this differs only in the blocks held (memory), not in compute
    vit_all_blocks      every block run, as a loop that taps a full forward does
  MobileNetV3-Small at 32 px, one training step of the student (forward, backward, SGD):
    student_eager       as compress runs it
    student_compiled    student.compile (compile time reported apart)
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
import warnings

import torch
import torch.nn.functional as F

from distillkit.features import Extractor, FeatureRequest, extract_features
from distillkit.student import create_student, student_input_config, student_spec
from distillkit.teachers import load_teacher, prepare_input
from distillkit.teachers.zoo import RANDOM_WEIGHTS

EMBEDDING = FeatureRequest(embedding=True)


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return (time.perf_counter() - start) * 1000


def lite0_variants(batch: int, compile: bool) -> tuple[dict, dict]:
    views = torch.rand(batch, 3, 64, 64)
    teacher = load_teacher("efficientnet-lite0", None, 64, True)
    nchw = load_teacher("efficientnet-lite0", None, 64, False)
    raw = lambda: prepare_input(views, teacher.input_config, True)  # noqa: E731

    def no_grad():
        with torch.no_grad():
            extract_features(teacher.model, raw(), EMBEDDING)

    variants = {
        "distillkit": lambda: teacher(views, EMBEDDING),
        "nchw": lambda: nchw(views, EMBEDDING),
        "no_grad": no_grad,
        "autograd": lambda: extract_features(teacher.model, raw(), EMBEDDING),
    }
    setup = {}
    if compile:
        compiled = load_teacher("efficientnet-lite0", None, 64, True)
        compiled.extractor = Extractor(compile=True)
        setup["compiled_first_call_s"] = round(timed(lambda: compiled(views, EMBEDDING)) / 1000, 1)
        out, ref = compiled(views, EMBEDDING).embedding, teacher(views, EMBEDDING).embedding
        setup["compiled_max_abs_diff"] = float((out - ref).abs().max())
        variants["compiled"] = lambda: compiled(views, EMBEDDING)
    return variants, setup


def vit_variants(batch: int) -> dict:
    views = torch.rand(batch, 3, 112, 112)
    request = FeatureRequest(layers=(0.5,))
    whole = load_teacher("timm:vit_small_patch16_224", RANDOM_WEIGHTS, 112, True)
    pruned = load_teacher("timm:vit_small_patch16_224", RANDOM_WEIGHTS, 112, True)
    assert pruned.prune(request) and pruned.pruned_to == 6
    x = prepare_input(views, whole.input_config, False)

    def all_blocks():
        with torch.inference_mode():
            whole.model.forward_intermediates(x, indices=[5], intermediates_only=True, stop_early=False)

    return {
        "vit_unpruned": lambda: whole(views, request),
        "vit_pruned": lambda: pruned(views, request),
        "vit_all_blocks": all_blocks,
    }


def student_variants(batch: int, compile: bool) -> tuple[dict, dict]:
    views = torch.rand(batch, 3, 32, 32)
    target = torch.randn(batch, 1024)

    def trainer(extractor: Extractor):
        model = create_student(student_spec("mobilenetv3-small"), 32, seed=0).to(memory_format=torch.channels_last)
        config = student_input_config(model, 32)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)

        def step():
            features = extractor(model, prepare_input(views, config, True), EMBEDDING)
            loss = 1 - F.cosine_similarity(features.embedding, target).mean()
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

        return step

    variants = {"student_eager": trainer(Extractor())}
    setup = {}
    if compile:
        compiled = trainer(Extractor(compile=True))
        setup["student_compiled_first_step_s"] = round(timed(compiled) / 1000, 1)
        variants["student_compiled"] = compiled
    return variants, setup


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile variants")
    args = parser.parse_args()
    warnings.simplefilter("ignore")  # the ViT's random weights are announced with a warning
    lite0, setup = lite0_variants(args.batch, not args.no_compile)
    students, student_setup = student_variants(args.batch, not args.no_compile)
    variants = {**lite0, **vit_variants(args.batch // 4), **students}
    for fn in variants.values():  # warm-up
        for _ in range(2):
            fn()
    times = {name: [] for name in variants}
    for _ in range(args.rounds):
        for name, fn in variants.items():
            times[name].append(timed(fn))
    ms = {name: round(statistics.median(t), 1) for name, t in times.items()}
    effect = {
        "channels_last_speedup": round(ms["nchw"] / ms["distillkit"], 2),
        "inference_mode_vs_no_grad": round(ms["no_grad"] / ms["distillkit"], 2),
        "no_grad_guard_vs_autograd": round(ms["autograd"] / ms["distillkit"], 2),
        "pruned_vs_unpruned": round(ms["vit_unpruned"] / ms["vit_pruned"], 2),
        "pruned_vs_all_blocks": round(ms["vit_all_blocks"] / ms["vit_pruned"], 2),
    }
    if "compiled" in ms:
        effect["teacher_compile_speedup"] = round(ms["distillkit"] / ms["compiled"], 2)
        effect["student_compile_speedup"] = round(ms["student_eager"] / ms["student_compiled"], 2)
    print(
        json.dumps(
            {
                "benchmark": "teacher_efficiency",
                "batch": args.batch,
                "vit_batch": args.batch // 4,
                "rounds": args.rounds,
                "ms_per_batch": ms,
                "effect": effect,
                **setup,
                **student_setup,
                "machine": f"{platform.machine()}, {os.cpu_count()} cpus, torch {torch.__version__}, "
                f"{torch.get_num_threads()} threads",
            }
        )
    )


if __name__ == "__main__":
    main()
