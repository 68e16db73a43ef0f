"""The default `distillkit compress` run, timed: prints one JSON line of metrics and timings.

    python benchmarks/default_run.py [--out DIR] [--fresh-machine] [--score-full] [--set key=value ...]

Checks the default's promises (issue 13): the run finishes in under 10 minutes on 2 CPU cores, and the
exported student recovers most of the teacher-minus-random-init gap.

--fresh-machine  runs compress as a new user on an offline machine would: Debian's Fashion-MNIST hidden
                 (a private mount namespace with an empty tmpfs over /usr/share/datasets; needs root and
                 `unshare`) and DISTILLKIT_CACHE an empty folder, so only the bundled subset is there.
--score-full     afterwards scores the export with plain timm (`timm.create_model("local-dir:...")`), the
                 teacher and the same student at its random init on the full Fashion-MNIST: k-NN bank and
                 probe fitted on all 60,000 training images, all 10,000 test images scored.
--warm-cache     keeps the user cache (DISTILLKIT_CACHE or ~/.cache/distillkit) as it is. Without it every run
                 starts from an empty user cache, as a user's first run does: the teacher runs in the first
                 epoch (filling the teacher cache) instead of being read from an earlier run's entry.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

HIDDEN_DATA = "/usr/share/datasets"


def run_default(out: str, overrides: list[str]) -> dict:
    import distillkit

    start = time.perf_counter()
    result = distillkit.compress(out=out, overwrite=True, set=overrides)
    wall = time.perf_counter() - start
    m = result.metrics
    return {
        "wall_s": round(wall, 1),
        "timings_s": {k: round(v, 1) for k, v in result.timings.items()},
        "steps": result.steps,
        "images_seen": result.images_seen,
        "train_images": result.train_images,
        "data": result.data_source,
        "teacher_cache": result.teacher_cache,
        **{
            f"{name}_{metric}": round(m[name][metric], 4)
            for name in ("teacher", "student", "student_random_init")
            for metric in ("knn_top1", "probe_top1")
            if metric in m.get(name, {})
        },
        "gap_recovered": {k: round(v, 3) for k, v in m.get("gap_recovered", {}).items()},
        "student_params": m["student"]["params"],
        "teacher_params": m["teacher"]["params"],
        "student_latency_ms": m["student"]["latency_ms"],
        "teacher_latency_ms": m["teacher"]["latency_ms"],
    }


def run_with_empty_cache(out: str, overrides: list[str]) -> dict:
    """`run_default` with DISTILLKIT_CACHE an empty folder for the run (removed afterwards), as on a first run."""
    empty_cache = tempfile.mkdtemp(prefix="distillkit-empty-cache-")
    before = os.environ.get("DISTILLKIT_CACHE")
    os.environ["DISTILLKIT_CACHE"] = empty_cache
    try:
        return run_default(out, overrides) | {"user_cache": "empty"}
    finally:
        if before is None:
            del os.environ["DISTILLKIT_CACHE"]
        else:
            os.environ["DISTILLKIT_CACHE"] = before
        shutil.rmtree(empty_cache, ignore_errors=True)


def run_on_fresh_machine(out: str, overrides: list[str]) -> dict:
    """This script's own run, in a mount namespace where Debian's data is hidden, with an empty user cache."""
    if shutil.which("unshare") is None or os.geteuid() != 0:
        raise SystemExit("--fresh-machine needs root and util-linux's unshare (to hide /usr/share/datasets)")
    empty_cache = tempfile.mkdtemp(prefix="distillkit-empty-cache-")
    inner = [sys.executable, os.path.abspath(__file__), "--inner", "--out", out] + [f"--set={o}" for o in overrides]
    script = f"mount -t tmpfs tmpfs {HIDDEN_DATA} && exec " + " ".join(f"'{a}'" for a in inner)
    env = {**os.environ, "DISTILLKIT_CACHE": empty_cache}
    env.pop("DISTILLKIT_FASHION_MNIST", None)
    done = subprocess.run(["unshare", "-m", "sh", "-c", script], env=env, stdout=subprocess.PIPE, text=True)
    shutil.rmtree(empty_cache, ignore_errors=True)
    if done.returncode != 0:
        raise SystemExit(f"the fresh-machine run failed (exit {done.returncode})")
    return json.loads(done.stdout.strip().splitlines()[-1])


def score_full(student_dir: Path, seed: int) -> dict:
    """Plain timm loads the export; the teacher and the random-init student are scored the same way."""
    import timm
    import torch.nn.functional as F
    import yaml

    from distillkit.data.sources import is_full_fashion_mnist, load_fashion_mnist
    from distillkit.evaluate import embed_dataset, score_embeddings
    from distillkit.features import FeatureRequest
    from distillkit.student import create_student, student_spec
    from distillkit.teachers import load_teacher
    from distillkit.verdict import gap_recovered

    train, test, where = load_fashion_mnist()
    if not is_full_fashion_mnist(where):
        raise SystemExit("--score-full needs the full Fashion-MNIST (apt-get install dataset-fashion-mnist)")
    config = json.loads((student_dir / "config.json").read_text())
    size = config["pretrained_cfg"]["input_size"][-1]
    mean = torch.tensor(config["pretrained_cfg"]["mean"]).view(1, 3, 1, 1)
    std = torch.tensor(config["pretrained_cfg"]["std"]).view(1, 3, 1, 1)

    def as_timm_user(model):  # what a user of the export does: resize, normalise, call the model
        model = model.eval()
        return lambda views: model(
            (F.interpolate(views, size=(size, size), mode="bilinear", antialias=True) - mean) / std
        )

    exported = timm.create_model(f"local-dir:{student_dir}", pretrained=True)
    spec = student_spec(yaml.safe_load((student_dir.parent / "recipe.yaml").read_text())["student"]["name"])
    random_init = create_student(spec, size, seed=seed)
    teacher = load_teacher("efficientnet-lite0", None, 64, True)
    request = FeatureRequest(embedding=True)
    rows = {}
    with torch.no_grad():
        for name, embed in (
            ("teacher", lambda v: teacher(v, request).embedding),
            ("student", as_timm_user(exported)),
            ("student_random_init", as_timm_user(random_init)),
        ):
            rows[name] = score_embeddings(embed_dataset(embed, train), embed_dataset(embed, test), 20, 0.07, 300)
    return {
        "full_test_set": {name: {k: round(v, 4) for k, v in row.items()} for name, row in rows.items()},
        "full_test_set_gap_recovered": {k: round(v, 3) for k, v in gap_recovered(rows).items()},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=None, help="run folder (default: a temporary folder)")
    parser.add_argument("--set", action="append", default=[], help="recipe override, e.g. train.images=240000")
    parser.add_argument("--fresh-machine", action="store_true", help="hide Debian's data, empty user cache")
    parser.add_argument("--score-full", action="store_true", help="score the export with plain timm on the full set")
    parser.add_argument("--warm-cache", action="store_true", help="keep the user cache (default: an empty one)")
    parser.add_argument("--inner", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    out = args.out or tempfile.mkdtemp(prefix="distillkit-default-")
    if args.inner:
        print(json.dumps(run_default(out, args.set)))
        return
    record = {"benchmark": "default_run", "fresh_machine": args.fresh_machine}
    if args.fresh_machine:
        record.update(run_on_fresh_machine(out, args.set))
    elif args.warm_cache:
        record.update(run_default(out, args.set))
    else:
        record.update(run_with_empty_cache(out, args.set))
    if args.score_full:
        seed = next((int(o.split("=", 1)[1]) for o in args.set if o.startswith("train.seed=")), 0)
        record.update(score_full(Path(out) / "student", seed))
    record["machine"] = {
        "cpus": os.cpu_count(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "platform": platform.platform(),
    }
    record["overrides"] = args.set
    print(json.dumps(record))


if __name__ == "__main__":
    main()
