"""How good a distilled student is: the share of the teacher-minus-random-init gap it recovers, in
numbers and in words. No heavy imports: the report and the model card use it without torch."""

from __future__ import annotations

from typing import Any

GAP_METRICS = ("knn_top1", "probe_top1")


def gap_recovered(metrics: dict[str, Any]) -> dict[str, float]:
    """The share of the teacher-minus-random-init gap the student recovers, per accuracy metric:

        gap = (student - random_init) / (teacher - random_init)

    1.0 = as good as the teacher, 0 = no better than the untrained network, < 0 = worse than it. A
    metric is left out when a row lacks it or the teacher is no better than random init (no gap)."""
    teacher, student, random_init = (metrics.get(name) or {} for name in ("teacher", "student", "student_random_init"))
    out = {}
    for key in GAP_METRICS:
        if key in teacher and key in student and key in random_init and teacher[key] > random_init[key]:
            out[key] = (student[key] - random_init[key]) / (teacher[key] - random_init[key])
    return out


def verdict(metrics: dict[str, Any]) -> dict[str, Any] | None:
    """How good the student is, in words: None without accuracies. `level` is good (>= 0.8 of both
    gaps), fair (above random init on both), or bad (not above its random init on some metric)."""
    gap = gap_recovered(metrics)
    if not gap:
        return None
    worst = min(gap.values())
    level = "good" if worst >= 0.8 else "fair" if worst > 0 else "bad"
    parts = " and ".join(
        f"{value:.0%} of the {'k-NN' if key == 'knn_top1' else 'linear-probe'} gap" for key, value in gap.items()
    )
    text = f"the student recovers {parts} between its random init and the teacher"
    advice = None
    if level == "bad":
        advice = (
            "the distilled student is no better than the same network at random init: train longer "
            "(--set train.images=N or --epochs), keep the teacher cache on so epochs are cheap, or try "
            "another strategy (distillkit list strategies)"
        )
    return {"level": level, "gap": gap, "text": text, "advice": advice}
