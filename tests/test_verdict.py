"""The verdict when the teacher gives no gap to recover: a teacher no better than the student's own random init
(random weights, a weak or out-of-domain teacher) must not leave a student worse than its random init unjudged."""

from __future__ import annotations

import io

from rich.console import Console

from distillkit.summary import print_results
from distillkit.verdict import verdict

# the shape of a real run: a timm teacher with random weights, 3 steps of `hidden` into EfficientNet-B0
WEAK_TEACHER = {
    "teacher": {"knn_top1": 0.7408, "probe_top1": 0.7481},
    "student": {"knn_top1": 0.6100, "probe_top1": 0.8200},
    "student_random_init": {"knn_top1": 0.7910, "probe_top1": 0.8250},
}


def test_a_student_below_its_random_init_is_bad_even_without_a_gap_to_recover():
    judged = verdict(WEAK_TEACHER)
    assert judged["level"] == "bad"
    assert judged["gap"] == {}  # neither metric has a teacher above random init: no share to compute
    # the numbers, in words: 74.1 vs 79.1 % k-NN and 74.8 vs 82.5 % probe; the student 18.1 / 0.5 points below
    assert "the teacher is no better than the student's random init on k-NN (74.1 vs 79.1 %)" in judged["text"]
    assert "18.1 points below its random init on k-NN" in judged["text"]
    assert "0.5 points below" in judged["text"]
    assert "stronger teacher" in judged["advice"] and "pretrained" in judged["advice"]


def test_a_gap_on_one_metric_does_not_hide_a_loss_on_the_other():
    """The probe has a gap (teacher above random init) and the student recovers 80 % of it; on k-NN the teacher
    is below random init and the student is worse still: bad, not good."""
    rows = {
        "teacher": {"knn_top1": 0.70, "probe_top1": 0.90},
        "student": {"knn_top1": 0.65, "probe_top1": 0.86},
        "student_random_init": {"knn_top1": 0.75, "probe_top1": 0.70},
    }
    judged = verdict(rows)
    assert judged["level"] == "bad" and set(judged["gap"]) == {"probe_top1"}
    assert abs(judged["gap"]["probe_top1"] - 0.8) < 1e-9  # (0.86 - 0.70) / (0.90 - 0.70)
    assert "80% of the linear-probe gap" in judged["text"]


def test_a_student_above_its_random_init_with_no_gap_is_fair_not_good():
    rows = WEAK_TEACHER | {"student": {"knn_top1": 0.80, "probe_top1": 0.83}}
    judged = verdict(rows)
    assert judged["level"] == "fair" and judged["advice"] is None
    assert "0.9 points above its random init on k-NN" in judged["text"]


def test_the_console_warns_in_red_when_the_teacher_gives_no_gap():
    out = io.StringIO()
    rows = {name: row | {"params": 4_000_000, "latency_ms": 10.0} for name, row in WEAK_TEACHER.items()}
    print_results(Console(file=out, width=200, force_terminal=False), rows | {"eval_split": {}})
    said = out.getvalue()
    assert "warning:" in said and "stronger teacher" in said
