"""What the console shows after a run or an evaluation: the results table and the verdict. A pretraining
run's metrics (target_encoder / encoder / random_init rows, `distillkit pretrain`) get their own rows, a
points-above-random-init column and verdict.pretraining_verdict."""

from __future__ import annotations

from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from .verdict import GAP_METRICS, gap_recovered, is_pretraining, points_above_random_init, run_verdict, signed_points

ROWS = {
    "teacher": "teacher",
    "student": "student",
    "student_start": "student at its pretrained start",
    "student_random_init": "student random init",
}
PRETRAIN_ROWS = {
    "target_encoder": "target encoder (the teacher)",
    "encoder": "encoder (trained)",
    "random_init": "random init",
}
POINTS_COLUMN = "vs random init (k-NN / probe points)"


def results_table(metrics: dict[str, Any]) -> Table:
    if is_pretraining(metrics):
        return _pretraining_table(metrics)
    table = Table(title="distillkit results (held-out split)")
    table.add_column("model")
    gap = gap_recovered(metrics)
    for column in ("k-NN top-1", "linear probe top-1", "params", "CPU latency (1 image)") + (
        ("gap recovered (k-NN / probe)",) if gap else ()
    ):
        table.add_column(column, justify="right")
    for name, label in ROWS.items():
        row = metrics.get(name)
        if row is None:
            continue
        table.add_row(
            label,
            f"{row['knn_top1']:.2%}" if "knn_top1" in row else "-",
            f"{row['probe_top1']:.2%}" if "probe_top1" in row else "-",
            f"{row['params'] / 1e6:.2f} M",
            f"{row['latency_ms']:.1f} ms",
            *(
                (" / ".join(f"{gap[k]:.0%}" if k in gap else "-" for k in GAP_METRICS) if name == "student" else "",)
                if gap
                else ()
            ),
        )
    return table


def _pretraining_table(metrics: dict[str, Any]) -> Table:
    """Target encoder / encoder / random init, with the points each trained network is above random init."""
    table = Table(title="distillkit pretraining results (held-out split)")
    table.add_column("model")
    for column in ("k-NN top-1", "linear probe top-1", "params", "CPU latency (1 image)", POINTS_COLUMN):
        table.add_column(column, justify="right")
    for name, label in PRETRAIN_ROWS.items():
        row = metrics.get(name)
        if not isinstance(row, dict):
            continue
        points = points_above_random_init(metrics, name) if name != "random_init" else {}
        table.add_row(
            label,
            f"{row['knn_top1']:.2%}" if "knn_top1" in row else "-",
            f"{row['probe_top1']:.2%}" if "probe_top1" in row else "-",
            f"{row['params'] / 1e6:.2f} M" if "params" in row else "-",
            f"{row['latency_ms']:.1f} ms" if "latency_ms" in row else "-",
            signed_points(points) if points else "",
        )
    return table


def print_results(console: Console, metrics: dict[str, Any]) -> None:
    """The table, then the verdict in its colour, with a red warning and what to try when it is bad."""
    if "eval_split" not in metrics:
        console.print("[yellow]no labelled held-out split: k-NN and linear-probe accuracy were skipped[/]")
    console.print(results_table(metrics))
    said = run_verdict(metrics)
    if said is None:
        return
    colour = {"good": "green", "fair": "yellow", "bad": "bold red"}[said["level"]]
    console.print(f"[{colour}]{escape(said['text'])}[/]", highlight=False)
    if said["advice"]:
        console.print(f"[bold red]warning: {escape(said['advice'])}[/]", highlight=False)
