"""The report's PNG plots, drawn with matplotlib's Agg canvas (no pyplot: no global backend is touched).

Each function takes what it plots and returns the PNG's bytes.
"""

from __future__ import annotations

import io
from typing import Sequence

MODEL_LABELS = {
    "teacher": "teacher",
    "student": "student",
    "student_random_init": "student\n(random init)",
    "student_start": "student\n(pretrained start)",
    "target_encoder": "target encoder\n(the teacher)",  # a pretraining run's rows (`distillkit pretrain`)
    "encoder": "encoder",
    "random_init": "random init",
}
_COLOURS = {
    "teacher": "#4c72b0",
    "student": "#dd8452",
    "student_random_init": "#8c8c8c",
    "student_start": "#55a868",
    "target_encoder": "#4c72b0",
    "encoder": "#dd8452",
    "random_init": "#8c8c8c",
}


def loss_curves(steps: Sequence[int], terms: dict[str, Sequence[float | None]]) -> bytes:
    """One line per loss term over optimiser steps; None values are gaps."""
    figure, ax = _figure()
    for name, values in terms.items():
        ax.plot(steps, [float("nan") if v is None else v for v in values], label=name, linewidth=1.5)
    ax.set(xlabel="step", ylabel="loss", title="loss terms")
    ax.legend(fontsize="small")
    return _png(figure)


def spread_curve(steps: Sequence[int], values: Sequence[float | None], *, floor: float | None = None) -> bytes:
    """A pretraining run's target spread (bootleg's `target_std`: the per-dimension standard deviation of the
    targets over a batch's tokens) over optimiser steps; `floor` (strategy.<method>.collapse_std), the level
    below which the run warns of collapse, is a dashed red line. None values are gaps."""
    figure, ax = _figure()
    values = [float("nan") if v is None else v for v in values]
    ax.plot(steps, values, color="#4c72b0", linewidth=1.5, marker="o", markersize=3)  # a lone step still shows
    if floor is not None:
        ax.axhline(floor, linestyle="--", linewidth=1.2, color="#c62828", label=f"collapse warning below {floor:g}")
        ax.legend(fontsize="small")
    ax.set(xlabel="step", ylabel="target std", title="spread of the targets (near 0 = collapse)")
    return _png(figure)


def online_knn_curve(
    epochs: Sequence[int],
    top1: Sequence[float],
    *,
    teacher: float | None = None,
    random_init: float | None = None,
    model: str = "student",
) -> bytes:
    """The online k-NN top-1 of `model` (the student; a pretraining run's encoder) at each epoch's end.
    `teacher` / `random_init`: the teacher's and the random-init network's online k-NN on the same split,
    drawn as dashed reference lines; with `random_init` the curve starts from it at epoch 0."""
    from matplotlib.ticker import MaxNLocator

    figure, ax = _figure()
    epochs, top1 = list(epochs), list(top1)
    if random_init is not None and (not epochs or epochs[0] > 0):
        epochs, top1 = [0] + epochs, [random_init] + top1
    ax.plot(epochs, [100 * v for v in top1], marker="o", color=_COLOURS["student"], label=model)
    for name, value, text in (
        ("teacher", teacher, "teacher"),
        ("student_random_init", random_init, f"{model} at random init"),
    ):
        if value is not None:
            ax.axhline(
                100 * value, linestyle="--", linewidth=1.2, color=_COLOURS[name], label=f"{text} ({100 * value:.1f}%)"
            )
    ax.set(xlabel="epoch", ylabel="k-NN top-1 (%)", title=f"online k-NN accuracy of the {model}")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    if teacher is not None or random_init is not None:
        figure.legend(loc="outside lower center", ncols=3, fontsize="small")
    return _png(figure)


def accuracy_bars(
    rows: dict[str, dict[str, float]], gap: dict[str, float] | None = None, *, title: str | None = None
) -> bytes:
    """Grouped bars: k-NN and linear-probe top-1 of each model (`rows`: model -> {knn_top1, probe_top1});
    `gap` (verdict.gap_recovered's dict) goes into the title; `title` replaces the whole title."""
    figure, ax = _figure()
    width = 0.8 / len(rows)
    for i, (model, row) in enumerate(rows.items()):
        values = [100 * row.get("knn_top1", float("nan")), 100 * row.get("probe_top1", float("nan"))]
        bars = ax.bar(
            [x + i * width for x in (0, 1)],
            values,
            width,
            label=MODEL_LABELS.get(model, model),
            color=_COLOURS.get(model),
        )
        ax.bar_label(bars, fmt="%.1f", fontsize="small")
    ax.set_xticks([x + width * (len(rows) - 1) / 2 for x in (0, 1)], ["k-NN top-1", "linear probe top-1"])
    if title is None:
        title = "teacher vs student vs random init"
        if gap:
            shares = " / ".join(f"{gap[key]:.0%}" if key in gap else "-" for key in ("knn_top1", "probe_top1"))
            title += f"\nthe student recovers {shares} of the gap (k-NN / probe)"
    ax.set(ylabel="accuracy on the held-out split (%)", title=title)
    figure.legend(loc="outside lower center", ncols=len(rows), fontsize="small")
    return _png(figure)


def size_latency_bars(rows: dict[str, dict[str, float]]) -> bytes:
    """Side by side: parameters (millions) and single-image CPU latency (ms) of each model."""
    figure, axes = _figure(columns=2)
    labels = [MODEL_LABELS.get(m, m) for m in rows]
    colours = [_COLOURS.get(m) for m in rows]
    for ax, key, scale, title in (
        (axes[0], "params", 1e-6, "parameters (M)"),
        (axes[1], "latency_ms", 1.0, "CPU latency, 1 image (ms)"),
    ):
        bars = ax.bar(labels, [row[key] * scale for row in rows.values()], color=colours)
        ax.bar_label(bars, fmt="%.2f", fontsize="small")
        ax.set_title(title)
    return _png(figure)


def _figure(columns: int = 1):
    from matplotlib.figure import Figure

    figure = Figure(figsize=(6.4 if columns == 1 else 9.6, 4.0), layout="constrained")
    axes = figure.subplots(1, columns)
    if columns == 1:
        axes.grid(alpha=0.3)
    return figure, axes


def _png(figure) -> bytes:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=100)
    return buffer.getvalue()
