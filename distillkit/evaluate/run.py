"""A finished run's comparison: its teacher, its trained student, the same student at random init and, when it
started from pretrained weights, at those."""

from __future__ import annotations

from typing import Any

from ..verdict import gap_recovered
from .metrics import (
    count_params,
    cpu_latencies_ms,
    embed_dataset,
    eval_subset,
    inference_form,
    score_embeddings,
)


def evaluate_run(recipe, teacher, student, images, device="cpu", progress=None) -> dict[str, Any]:
    """k-NN / probe accuracy, parameters and CPU latency of the teacher, the trained student and the same
    student at its random init (`student.at_random_init`) and at its pretrained start (`student_start`, when
    `student.pretrained` / `student.weights` gave one), and the share of the teacher-minus-random-init
    gap the student recovered (`verdict.gap_recovered`). `teacher` and `student` embed raw views with
    `.embed`; `images` is the run's ImageData (no labelled held-out split: accuracy is skipped).

    Embedding and scoring run on `device` (the training device: a GPU when training ran on one), batched,
    under inference mode; latency is always measured on the CPU, the networks in turn (`cpu_latencies_ms`) so
    their ratio holds on a busy machine. `progress` (a rich Progress) shows the
    images embedded."""
    references = {"student": student, "student_random_init": student.at_random_init(recipe.train.seed)}
    start = student.at_start()
    if start is not None:
        references["student_start"] = start
    metrics = score_networks(recipe, {"teacher": teacher, **references}, images, device, progress)
    gap = gap_recovered(metrics)
    if gap:
        metrics["gap_recovered"] = gap
    return metrics


def score_networks(recipe, networks: dict[str, Any], images, device="cpu", progress=None) -> dict[str, Any]:
    """name -> {knn_top1, probe_top1, ..., params, latency_ms} for every network (a Teacher or a Student: anything
    with `embed`, `model`, `input_config` and `channels_last`), on the recipe's evaluation split (accuracy only
    when `images` has a labelled held-out split), plus `eval_split`, the sizes it used."""
    metrics: dict[str, Any] = {}
    labelled = recipe.eval.enabled and images.test is not None and images.num_classes
    if labelled:
        bank = eval_subset(images.train_all, recipe.eval.max_train, recipe.train.seed)
        test = eval_subset(images.test, recipe.eval.max_test, recipe.train.seed)
        metrics["eval_split"] = {"train_images": len(bank), "test_images": len(test)}
    advance = _progress_task(progress, len(networks) * (len(bank) + len(test)) if labelled else 0)
    for name, network in networks.items():
        model, row = network.model, {}
        if labelled:
            model.to(device)
            with inference_form(model, network.input_config.size):
                embedded = [
                    embed_dataset(
                        network.embed, part, num_workers=recipe.data.num_workers, device=device, on_batch=advance
                    )
                    for part in (bank, test)
                ]
            settings = recipe.eval.knn_k, recipe.eval.knn_temperature, recipe.eval.probe_steps
            row.update(score_embeddings(*embedded, *settings, seed=recipe.train.seed))
        row["params"] = getattr(network, "num_params", None) or count_params(model)  # a teacher's: as loaded
        metrics[name] = row
    timed = {name: (n.model, n.input_config.size, n.channels_last) for name, n in networks.items()}
    for name, latency in cpu_latencies_ms(timed, recipe.eval.latency_runs).items():
        metrics[name]["latency_ms"] = round(latency, 3)
    return metrics


def _progress_task(progress, total: int):
    """A progress-bar task counting embedded images, and the function that advances it (None: no bar)."""
    if progress is None or not total:
        return None
    task = progress.add_task("evaluating", total=total, terms="", speed="")
    return lambda images: progress.advance(task, images)
