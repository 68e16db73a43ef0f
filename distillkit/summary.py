"""What the console shows after a run or an evaluation: the results table and the verdict."""

from __future__ import annotations

from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from .verdict import GAP_METRICS, gap_recovered, verdict

ROWS = {
    "teacher": "teacher",
    "student": "student",
    "student_start": "student at its pretrained start",
    "student_random_init": "student random init",
}


def results_table(metrics: dict[str, Any]) -> Table:
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


def print_results(console: Console, metrics: dict[str, Any]) -> None:
    """The table, then the verdict in its colour, with a red warning and what to try when it is bad."""
    if "eval_split" not in metrics:
        console.print("[yellow]no labelled held-out split: k-NN and linear-probe accuracy were skipped[/]")
    console.print(results_table(metrics))
    said = verdict(metrics)
    if said is None:
        return
    colour = {"good": "green", "fair": "yellow", "bad": "bold red"}[said["level"]]
    console.print(f"[{colour}]{escape(said['text'])}[/]", highlight=False)
    if said["advice"]:
        console.print(f"[bold red]warning: {escape(said['advice'])}[/]", highlight=False)
