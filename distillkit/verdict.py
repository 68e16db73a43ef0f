"""How good a distilled student is: the share of the teacher-minus-random-init gap it recovers, in
numbers and in words; and how good a pretraining run's target encoder (the teacher it becomes) is: the
accuracy points it is above the same network at random init. No heavy imports: the report and the model
card use it without torch."""

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
    """How good the student is, in words: None without accuracies. `level` is good (>= 0.8 of the gap on every
    measured metric), fair (above its random init on every one), or bad (not above its random init on some).
    A metric on which the teacher is no better than the student's random init has no gap to recover: the
    verdict then says so and compares the student with its random init in points, and a student below its
    random init there is bad too (the advice: a stronger teacher)."""
    rows = {name: metrics.get(name) or {} for name in ("teacher", "student", "student_random_init")}
    student, random_init = rows["student"], rows["student_random_init"]
    measured = [key for key in GAP_METRICS if key in student and key in random_init]
    if not measured:
        return None
    gap = gap_recovered(metrics)
    no_gap = [key for key in measured if key not in gap]
    below = [key for key in measured if student[key] <= random_init[key]]
    level = "bad" if below else "good" if not no_gap and min(gap.values()) >= 0.8 else "fair"
    clauses = []
    if gap:
        parts = " and ".join(f"{value:.0%} of the {_GAP_WORDS[key]} gap" for key, value in gap.items())
        clauses.append(f"the student recovers {parts} between its random init and the teacher")
    if no_gap:
        clauses.append("; ".join(_no_gap_clause(rows, key) for key in no_gap))
    advice = None
    if level == "bad" and any(key in no_gap for key in below):
        advice = (
            "the teacher is no better than the student's own random init, so distilling it cannot make a better "
            "student: use a stronger teacher (its pretrained weights: --teacher-weights FILE, or another one: "
            "distillkit list teachers) or one trained on data like yours"
        )
    elif level == "bad":
        advice = (
            "the distilled student is no better than the same network at random init: train longer "
            "(--set train.images=N or --epochs), keep the teacher cache on so epochs are cheap, or try "
            "another strategy (distillkit list strategies)"
        )
    return {"level": level, "gap": gap, "text": "; ".join(clauses), "advice": advice}


_GAP_WORDS = {"knn_top1": "k-NN", "probe_top1": "linear-probe"}


def _no_gap_clause(rows: dict[str, dict[str, Any]], key: str) -> str:
    """'the teacher is no better than the student's random init on k-NN (74.1 vs 79.1 %): the student is 18.1
    points below its random init on k-NN' (without the teacher's row: only the second half)."""
    words = "k-NN" if key == "knn_top1" else "the linear probe"
    teacher, student, random_init = (rows[name].get(key) for name in ("teacher", "student", "student_random_init"))
    points = 100 * (student - random_init)
    close = 0 < abs(points) < 0.05  # would print as "0.0 points"
    student_part = f"within 0.05 points of its random init on {words}" if close else _clause(points, words, True)
    if teacher is None:
        return f"no teacher accuracy on {words}: the student is {student_part}"
    return (
        f"the teacher is no better than the student's random init on {words} ({100 * teacher:.1f} vs "
        f"{100 * random_init:.1f} %): the student is {student_part}"
    )


# -- pretraining runs (`distillkit pretrain`): no teacher to recover a gap to ------------------------------

PRETRAIN_ROWS = ("target_encoder", "encoder", "random_init")  # result.json's model rows of a pretraining run
_METRIC_WORDS = {"knn_top1": "k-NN", "probe_top1": "the linear probe"}


def is_pretraining(metrics: dict[str, Any]) -> bool:
    """A pretraining run's metrics: their rows are target_encoder / encoder / random_init, not teacher / student."""
    return isinstance(metrics.get("target_encoder"), dict)


def points_above_random_init(metrics: dict[str, Any], name: str = "target_encoder") -> dict[str, float]:
    """How many accuracy points (percentage points) row `name` is above the same network at random init:

        points = 100 * (row - random_init)

    per metric of GAP_METRICS that both rows have; < 0 = below it, 0 = level with it."""
    row, random_init = (metrics.get(key) or {} for key in (name, "random_init"))
    return {key: 100 * (row[key] - random_init[key]) for key in GAP_METRICS if key in row and key in random_init}


def pretraining_verdict(metrics: dict[str, Any]) -> dict[str, Any] | None:
    """How good a pretraining run's target encoder (the EMA copy that becomes the teacher) is, in words: None
    without accuracies. `level` is good (above its random init on every measured metric) or bad (level with
    or below it on some: it would teach no more than an untrained network); `points` is
    points_above_random_init's dict."""
    points = points_above_random_init(metrics)
    if not points:
        return None
    level = "good" if min(points.values()) > 0 else "bad"
    clauses = [_clause(value, _METRIC_WORDS[key], first=i == 0) for i, (key, value) in enumerate(points.items())]
    text = "the target encoder (the teacher) is " + " and ".join(clauses)
    advice = None
    if level == "bad":
        advice = (
            "the pretrained target encoder is no better than the same ViT at random init, so it would teach "
            "nothing: train longer (--max-steps, --epochs or --set train.images=N; its EMA copy moves slowly at "
            "first), try another learning rate (--lr), or a larger model (--arch, e.g. vit_small_patch16_224)"
        )
    return {"level": level, "points": points, "text": text, "advice": advice}


def run_verdict(metrics: dict[str, Any]) -> dict[str, Any] | None:
    """The verdict that fits the run: pretraining_verdict for a pretraining run's metrics, else verdict."""
    return pretraining_verdict(metrics) if is_pretraining(metrics) else verdict(metrics)


def signed_points(points: dict[str, float]) -> str:
    """'+20.7 / -3.0' in GAP_METRICS order: '0.0' when level, '-' for a metric that is missing."""
    return " / ".join(
        "-" if key not in points else "0.0" if points[key] == 0 else f"{points[key]:+.1f}" for key in GAP_METRICS
    )


def _clause(value: float, metric: str, first: bool) -> str:
    """'20.7 points above its random init on k-NN'; later clauses drop 'its random init'."""
    reference = " its random init" if first else ""
    if value == 0:
        return f"level{' with' if first else ''}{reference} on {metric}"
    return f"{abs(value):.1f} points {'above' if value > 0 else 'below'}{reference} on {metric}"
