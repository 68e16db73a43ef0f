"""A run's report: RUN_DIR/report.html, self-contained (plots embedded as PNG data URIs, inline CSS),
and the plots as PNG files in RUN_DIR/plots/, from what `compress` wrote there: recipe.yaml,
metrics.jsonl and result.json. It leads with the verdict (`distillkit.verdict`: the share of the
teacher-minus-random-init gap the student recovers), then the plots, the results and the recipe. What a
run lacks (no evaluation, no labels, a run stopped before result.json) is said in the report instead of
plotted.

A pretraining run (`distillkit pretrain`: its recipe has `teacher: null`, its result.json rows are
target_encoder / encoder / random_init) gets its own page: it leads with verdict.pretraining_verdict (the
accuracy points the target encoder, the teacher it becomes, is above its random init), plots the loss and the
targets' spread, the encoder's online k-NN against its random init, and ends with its outputs
(RUN/<method>.pth, RUN/teacher/) and the `distillkit compress` command that distils from them.
"""

from __future__ import annotations

import base64
import html
import json
import shlex
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import yaml

from . import __version__, plots
from .errors import UsageError
from .io import atomic_path, write_text
from .verdict import GAP_METRICS, is_pretraining, points_above_random_init, pretraining_verdict, signed_points, verdict

REPORT_FILE = "report.html"
PLOTS_DIR = "plots"
MODELS = {
    "teacher": "teacher",
    "student": "student",
    "student_random_init": "student (random init)",
    "student_start": "student (pretrained start)",
}
PRETRAIN_MODELS = {
    "target_encoder": "target encoder (the teacher)",
    "encoder": "encoder (trained)",
    "random_init": "random init",
}
SPREAD_TERM = "target_std"  # a pretraining strategy's diagnostic, logged as <method>.target_std
_NOT_TERMS = {"step", "epoch", "lr", "images_per_s"}  # the other numbers of a step line are loss terms
_NO_RESULT = "not available: the run has no result.json (it stopped, or is still running, before its evaluation)"
FOLD_ROWS = 8  # a table longer than this folds away in <details>


@dataclass
class Run:
    """What a run folder holds; an unreadable file is left empty and named in `problems`."""

    path: Path
    recipe: dict[str, Any]
    steps: list[dict[str, Any]]  # metrics.jsonl step lines
    epochs: list[dict[str, Any]]  # metrics.jsonl epoch_end lines
    result: dict[str, Any] | None  # result.json: written when the run finished
    problems: list[str] = field(default_factory=list)
    # metrics.jsonl's online_reference line: the teacher's and the random-init student's online k-NN on the
    # split the per-epoch online k-NN uses (written before the first epoch; runs before it lack it)
    reference: dict[str, Any] = field(default_factory=dict)

    @property
    def pretraining(self) -> bool:
        """A `distillkit pretrain` run: its recipe has `teacher: null` (compress refuses one), or its result
        rows are a pretraining run's."""
        metrics = (self.result or {}).get("metrics")
        return self.recipe.get("teacher", False) is None or (isinstance(metrics, dict) and is_pretraining(metrics))

    @property
    def method(self) -> str:
        """A pretraining run's method: its one strategy (bootleg)."""
        return " + ".join(self.recipe.get("strategy") or {}) or "-"

    @property
    def arch(self) -> str:
        return str((self.recipe.get("student") or {}).get("name", "-"))


def report(run_dir: str | Path) -> Path:
    """Write (or rewrite) RUN_DIR/report.html and RUN_DIR/plots/*.png; returns the report's path."""
    run = read_run(run_dir)
    figures = []
    for stem, title, draw in _PRETRAIN_PLOTS if run.pretraining else _PLOTS:
        drawn = draw(run)
        png_path = run.path / PLOTS_DIR / f"{stem}.png"
        if isinstance(drawn, bytes):
            with atomic_path(png_path) as tmp:
                tmp.write_bytes(drawn)
        else:
            png_path.unlink(missing_ok=True)  # a plot from an earlier report that no longer applies
        figures.append((title, drawn))
    target = run.path / REPORT_FILE
    write_text(target, _html(run, figures))
    return target


def read_run(run_dir: str | Path) -> Run:
    path = Path(run_dir)
    if not path.is_dir():
        raise UsageError(f"{path} is not a folder; pass a run folder written by distillkit compress or pretrain")
    if not (path / "recipe.yaml").is_file():
        raise UsageError(
            f"{path} is not a distillkit run folder: it has no recipe.yaml, which compress and pretrain write when "
            "a run starts"
        )
    problems: list[str] = []
    recipe = _read(path / "recipe.yaml", yaml.safe_load, problems)
    result = _read(path / "result.json", json.loads, problems) if (path / "result.json").exists() else None
    lines = []
    if (path / "metrics.jsonl").exists():
        text = _read(path / "metrics.jsonl", str, problems) or ""
        for line in text.splitlines():
            try:
                lines.append(json.loads(line))
            except ValueError:  # e.g. the last line of a run killed while writing it
                problems.append(f"metrics.jsonl: an unreadable line was skipped ({line[:60]!r})")
    else:
        problems.append("metrics.jsonl is missing: no step was logged")
    lines = [line for line in lines if isinstance(line, dict)]
    references = [line for line in lines if line.get("online_reference")]
    return Run(
        path=path,
        recipe=recipe if isinstance(recipe, dict) else {},
        steps=[line for line in lines if "epoch_end" not in line and "step" in line],
        epochs=[line for line in lines if "epoch_end" in line],
        result=result if isinstance(result, dict) else None,
        problems=problems,
        reference=references[-1] if references else {},
    )


def _read(path: Path, parse: Callable[[str], Any], problems: list[str]) -> Any:
    try:
        return parse(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, yaml.YAMLError) as e:
        problems.append(f"{path.name} could not be read ({type(e).__name__}: {e})")
        return None


# -- plots: PNG bytes, or the sentence that says why there is none ---------------------------------


def _loss_plot(run: Run) -> bytes | str:
    if not run.steps:
        return "not available: metrics.jsonl has no step lines yet (one is written every train.log_every steps)"
    terms = list(
        dict.fromkeys(
            k for line in run.steps for k, v in line.items() if k not in _NOT_TERMS and isinstance(v, (int, float))
        )
    )
    if run.pretraining:  # the spread is not a loss: it has its own plot
        terms = [name for name in terms if name != _spread_term(run)]
    series = {name: [line.get(name) for line in run.steps] for name in terms}
    # a lone term is the loss itself (weight 1): one curve, not the same one drawn twice
    series = {name: v for name, v in series.items() if name == "loss" or v != series.get("loss")}
    return plots.loss_curves([line["step"] for line in run.steps], series)


def _spread_term(run: Run) -> str:
    return f"{run.method}.{SPREAD_TERM}"


def _spread_plot(run: Run) -> bytes | str:
    """A pretraining run's target spread over steps, with its collapse_std warning level."""
    term = _spread_term(run)
    logged = [line for line in run.steps if isinstance(line.get(term), (int, float))]
    if not logged:
        return f"not available: metrics.jsonl has no {term} values yet (one is written every train.log_every steps)"
    strategy = (run.recipe.get("strategy") or {}).get(run.method)
    floor = _number(strategy.get("collapse_std")) if isinstance(strategy, dict) else None
    return plots.spread_curve([line["step"] for line in logged], [line[term] for line in logged], floor=floor)


def _online_knn_plot(run: Run) -> bytes | str:
    scored = [line for line in run.epochs if "online_knn_top1" in line]
    if scored and run.pretraining:  # the encoder against its random init: there is no teacher level
        return plots.online_knn_curve(
            [line["epoch_end"] for line in scored],
            [line["online_knn_top1"] for line in scored],
            random_init=_number(run.reference.get("student_random_init_knn_top1")),
            model="encoder",
        )
    if scored:
        return plots.online_knn_curve(
            [line["epoch_end"] for line in scored],
            [line["online_knn_top1"] for line in scored],
            teacher=_number(run.reference.get("teacher_knn_top1")),
            random_init=_number(run.reference.get("student_random_init_knn_top1")),
        )
    evaluation = run.recipe.get("eval") or {}
    if evaluation.get("enabled") is False:
        return "not measured: eval.enabled is false"
    if "online_images" not in evaluation:
        return "not measured: this run's recipe has no eval.online_images (written before online k-NN existed)"
    if evaluation["online_images"] == 0:
        return "not measured: eval.online_images is 0 (off)"
    if not run.epochs:
        return "not measured yet: no epoch ran to its end"
    return "not measured: the data has no labelled held-out split"


def _accuracy_plot(run: Run) -> bytes | str:
    if run.result is None:
        return _NO_RESULT
    rows = {name: row for name, row in _model_rows(run).items() if "knn_top1" in row}
    if not rows:
        return _eval_missing(run)
    judged = _verdict(run)
    if run.pretraining:
        title = "target encoder vs encoder vs random init"
        if judged:
            title += f"\nthe target encoder vs its random init: {signed_points(judged['points'])} points (k-NN / probe)"
        return plots.accuracy_bars(rows, title=title)
    return plots.accuracy_bars(rows, gap=judged["gap"] if judged else None)


def _size_latency_plot(run: Run) -> bytes | str:
    if run.result is None:
        return _NO_RESULT
    rows = {name: row for name, row in _model_rows(run).items() if "params" in row and "latency_ms" in row}
    return plots.size_latency_bars(rows) if rows else "not available: result.json holds no parameter counts"


_PLOTS = (
    ("loss", "Loss terms over steps", _loss_plot),
    ("online_knn", "Online k-NN accuracy over epochs", _online_knn_plot),
    ("accuracy", "Teacher / student / random-init student: k-NN and linear probe", _accuracy_plot),
    ("size_latency", "Size and CPU latency", _size_latency_plot),
)
_PRETRAIN_PLOTS = (
    ("loss", "Loss over steps", _loss_plot),
    ("target_std", "Spread of the targets over steps (collapse watch)", _spread_plot),
    ("online_knn", "Online k-NN accuracy of the encoder over epochs", _online_knn_plot),
    ("accuracy", "Target encoder / encoder / random init: k-NN and linear probe", _accuracy_plot),
    ("size_latency", "Size and CPU latency", _size_latency_plot),
)


def _models(run: Run) -> dict[str, str]:
    return PRETRAIN_MODELS if run.pretraining else MODELS


def _model_rows(run: Run) -> dict[str, dict[str, Any]]:
    metrics = (run.result or {}).get("metrics") or {}
    return {name: metrics[name] for name in _models(run) if isinstance(metrics.get(name), dict)}


def _verdict(run: Run) -> dict[str, Any] | None:
    """Always from the model rows, never from a gap stored in result.json."""
    return (pretraining_verdict if run.pretraining else verdict)(_model_rows(run))


def _number(value: Any) -> float | None:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def _eval_missing(run: Run) -> str:
    if (run.recipe.get("eval") or {}).get("enabled") is False:
        return "not measured: eval.enabled is false"
    return "not measured: the data has no labelled held-out split"


# -- HTML ------------------------------------------------------------------------------------------

_CSS = """
body { font-family: system-ui, sans-serif; max-width: 62rem; margin: 2rem auto; padding: 0 1rem; color: #222; }
h1 { font-size: 1.5rem; } h2 { font-size: 1.15rem; margin-top: 2rem; border-bottom: 1px solid #ddd; }
table { border-collapse: collapse; margin: .5rem 0; } th, td { padding: .3rem .8rem; border-bottom: 1px solid #eee; }
th { text-align: left; background: #f6f6f6; } td.num { text-align: right; font-variant-numeric: tabular-nums; }
td.num, td:first-child { white-space: nowrap; }
.missing { color: #8a5a00; background: #fff7e0; padding: .5rem .8rem; border-radius: 4px; }
.verdict { font-size: 1.15rem; padding: .8rem 1rem; border-radius: 6px; border-left: .45rem solid; margin: 1rem 0; }
.verdict .level { display: block; font-size: .8rem; font-weight: 700; text-transform: uppercase;
  letter-spacing: .05em; }
.verdict.good { background: #e8f5e9; border-color: #2e7d32; color: #1b4d1f; }
.verdict.fair { background: #fff4e0; border-color: #e69500; color: #6b4500; }
.verdict.bad { background: #fdecea; border-color: #c62828; color: #7f1212; }
.verdict.unknown { background: #f3f3f3; border-color: #999; color: #444; }
.warning { background: #c62828; color: #fff; padding: .6rem 1rem; border-radius: 6px; margin: 1rem 0; }
details { margin: .5rem 0; } summary { cursor: pointer; color: #555; }
figure { margin: 1rem 0; } img { max-width: 100%; } figcaption { font-weight: 600; margin-bottom: .3rem; }
footer { margin-top: 3rem; color: #888; font-size: .85rem; }
"""


def _html(run: Run, figures: list[tuple[str, bytes | str]]) -> str:
    missing = run.problems + [f"{title}: {drawn}" for title, drawn in figures if isinstance(drawn, str)]
    if run.pretraining:
        heading = f"distillkit pretraining run <code>{_e(run.path.name)}</code>: {_e(run.method)}, "
        heading += f"<code>{_e(run.arch)}</code>"
        page_title = f"distillkit pretraining run {_e(run.path.name)} ({_e(run.method)}, {_e(run.arch)})"
    else:
        heading = f"distillkit run <code>{_e(run.path.name)}</code>"
        page_title = f"distillkit run {_e(run.path.name)}"
    body = [f"<h1>{heading}</h1>", _verdict_box(run)]
    if missing:
        body.append(
            '<div class="missing"><strong>Missing from this report</strong><ul>'
            + "".join(f"<li>{_e(m)}</li>" for m in missing)
            + "</ul></div>"
        )
    body.append("<h2>Plots</h2>")
    for title, drawn in figures:
        if isinstance(drawn, bytes):
            uri = "data:image/png;base64," + base64.b64encode(drawn).decode("ascii")
            body.append(f'<figure><figcaption>{_e(title)}</figcaption><img src="{uri}" alt="{_e(title)}"></figure>')
        else:
            body.append(f'<figure><figcaption>{_e(title)}</figcaption><p class="missing">{_e(drawn)}</p></figure>')
    body += ["<h2>Results</h2>", _results(run)]
    body += ["<h2>Recipe</h2>", _table(_summary(run))]
    if run.pretraining:
        body += ["<h2>Outputs</h2>", _outputs(run)]
    body.append(
        f"<footer>written by distillkit {__version__}; regenerate with: distillkit report {_e(str(run.path))}</footer>"
    )
    return (
        '<!doctype html>\n<html lang="en"><head><meta charset="utf-8">'
        f"<title>{page_title}</title><style>{_CSS}</style></head>\n<body>\n" + "\n".join(body) + "\n</body></html>\n"
    )


# the labels name the level only: the red warning under a bad verdict says what is wrong and what to try
_LEVELS = {"good": "good student", "fair": "fair student", "bad": "bad student"}
_PRETRAIN_LEVELS = {"good": "the target encoder beats its random init", "bad": "bad teacher"}


def _verdict_box(run: Run) -> str:
    """How good the student is, first thing on the page; a red warning with advice when it is bad."""
    judged = _verdict(run)
    if judged is None:
        if run.result is None:
            why = "the run has no result.json yet (it stopped, or is still running, before its evaluation)"
        elif not any("knn_top1" in row for row in _model_rows(run).values()):
            why = (
                "the run has no k-NN / linear-probe accuracies ("
                + _eval_missing(run).removeprefix("not measured: ")
                + ")"
            )
        elif run.pretraining:
            why = "result.json has no random-init row to compare the target encoder with"
        else:
            why = "the teacher is no better than the random-init student, so there is no gap to recover"
        who = "the target encoder (the teacher) is" if run.pretraining else "the student is"
        return (
            '<div class="verdict unknown"><span class="level">no verdict</span>'
            f"How good {who} is not known: {_e(why)}.</div>"
        )
    text = judged["text"][:1].upper() + judged["text"][1:]
    label = (_PRETRAIN_LEVELS if run.pretraining else _LEVELS)[judged["level"]]
    box = f'<div class="verdict {_e(judged["level"])}"><span class="level">{_e(label)}</span>{_e(text)}.</div>'
    if judged["level"] == "bad" and judged.get("advice"):
        box += f'<div class="warning"><strong>Warning:</strong> {_e(judged["advice"])}.</div>'
    return box


def _summary(run: Run) -> list[list[str]]:
    recipe, result = run.recipe, run.result
    teacher = (recipe.get("teacher") or {}).get("name", "-")
    others = "".join(f", {role}: {t.get('name')}" for role, t in (recipe.get("teachers") or {}).items())
    train = recipe.get("train") or {}
    data = recipe.get("data") or {}
    source = (result or {}).get("data_source") or data.get("source", "-")
    train_images, seen = (_number((result or {}).get(key)) for key in ("train_images", "images_seen"))
    if train_images is not None:  # what the run really trained on, not what the recipe asked for
        used = f"; trained on {train_images:,.0f} images" + (f", {seen:,.0f} images seen" if seen is not None else "")
    elif seen is not None:
        used = f"; {seen:,.0f} images seen"
    else:
        used = ""
    if train_images is None and _number(data.get("limit")):
        used += f" (requested limit {data['limit']:,} images; the source may have had fewer)"
    if result is not None:
        steps, status = str(result.get("steps", "-")), "finished"
        timings = result.get("timings") or {}
        wall = ", ".join(f"{name} {seconds:.1f} s" for name, seconds in timings.items())
    else:
        steps = f"{run.steps[-1]['step']} logged so far" if run.steps else "none logged"
        status, wall = "stopped or still running: no result.json", "unknown: no result.json"
    epochs = train.get("epochs", "-")
    budget = (
        f"{train['images']:,} images" if _number(train.get("images")) else f"{epochs} epoch{'' if epochs == 1 else 's'}"
    )
    planned = budget + (f", at most {train['max_steps']} steps" if train.get("max_steps") else "")
    if run.pretraining:
        model_args = (recipe.get("student") or {}).get("model_args") or {}
        args = ", ".join(f"{key}={value}" for key, value in model_args.items())
        models = [
            ["teacher(s)", "none: pretraining (the target encoder, an EMA copy of the encoder, is its own teacher)"],
            ["ViT", run.arch + (f" ({args})" if args else "")],
        ]
    else:
        models = [["teacher(s)", f"{teacher}{others}"], ["student", run.arch]]
    return [
        ["status", status],
        *models,
        ["strategy", " + ".join(recipe.get("strategy") or {}) or "-"],
        ["data", f"{source}{used}"],
        ["planned", f"{planned}; batch {train.get('batch_size', '-')}, lr {train.get('lr', '-')}"],
        ["steps", steps],
        ["epochs finished", str(len(run.epochs))],
        ["wall time", wall or "-"],
    ]


def _results(run: Run) -> str:
    """The comparison table, the last logged step, and the online k-NN per epoch (folded when long)."""
    parts = [_comparison(run)]
    if run.steps:
        last = run.steps[-1]
        terms = [k for k, v in last.items() if k not in _NOT_TERMS and isinstance(v, (int, float))]
        parts.append(f"<p>last logged step ({last['step']}):</p>" + _table([[f"{last[k]:.4f}" for k in terms]], terms))
    scored = [line for line in run.epochs if "online_knn_top1" in line]
    if scored:
        parts.append(_online_knn(run, scored))
    return "\n".join(parts)


RESULT_COLUMNS = [
    "model",
    "k-NN top-1",
    "linear probe top-1",
    "gap recovered (k\u2011NN / probe)",
    "params",
    "CPU latency (1 image)",
]


PRETRAIN_RESULT_COLUMNS = RESULT_COLUMNS[:3] + ["vs random init (k\u2011NN / probe points)"] + RESULT_COLUMNS[4:]


def _comparison(run: Run) -> str:
    """Teacher / student / random init (a pretraining run: target encoder / encoder / random init), with the
    evaluation split they were scored on."""
    rows, judged = _model_rows(run), _verdict(run)
    if not rows:
        what = "target encoder / encoder" if run.pretraining else "teacher / student"
        return (
            f'<p class="missing">{what} comparison: '
            f"{_e(_NO_RESULT if run.result is None else 'result.json holds no metrics')}</p>"
        )
    if run.pretraining:  # the points each trained network is above the same ViT at random init
        metrics = (run.result or {}).get("metrics") or {}
        points = {name: points_above_random_init(metrics, name) for name in ("target_encoder", "encoder")}
        extra, columns = {name: signed_points(p) for name, p in points.items() if p}, PRETRAIN_RESULT_COLUMNS
    else:
        extra, columns = ({"student": _gap(judged["gap"])} if judged else {}), RESULT_COLUMNS
    table = _table(
        [
            [
                _models(run)[name],
                _pct(row.get("knn_top1")),
                _pct(row.get("probe_top1")),
                extra.get(name, "-"),
                f"{row['params']:,} ({row['params'] / 1e6:.2f} M)" if "params" in row else "-",
                f"{row['latency_ms']:.2f} ms" if "latency_ms" in row else "-",
            ]
            for name, row in rows.items()
        ],
        columns,
    )
    split = (run.result or {}).get("metrics", {}).get("eval_split")
    if split:
        table += (
            f"\n<p>held-out evaluation: k-NN bank / probe training set of {_count(split['train_images'])} "
            f"images, {_count(split['test_images'])} held-out images scored.</p>"
        )
    return table


def _online_knn(run: Run, scored: list[dict]) -> str:
    references = [
        f"{label} {_pct(value)}"
        for label, value in (
            ("teacher", None if run.pretraining else _number(run.reference.get("teacher_knn_top1"))),
            (
                "encoder at random init" if run.pretraining else "student at random init",
                _number(run.reference.get("student_random_init_knn_top1")),
            ),
        )
        if value is not None
    ]
    intro = (
        f"<p>online k-NN{' of the encoder' if run.pretraining else ''} at each epoch's end (a small held-out split)"
        + (f"; on the same split: {_e(', '.join(references))}" if references else "")
        + ":</p>"
    )
    rows = [
        [str(line["epoch_end"]), _pct(line["online_knn_top1"]), f"{line.get('online_knn_seconds', 0):.2f}"]
        for line in scored
    ]
    table = _table(rows, ["epoch", "online k-NN top-1", "online eval seconds"])
    return intro + "\n" + _fold(table, len(scored), f"{len(scored)} epochs: show the table")


def _outputs(run: Run) -> str:
    """A pretraining run's checkpoint and timm teacher folder, and the command that distils from them."""
    result = run.result or {}
    names = [Path(str(result[key])).name for key in ("checkpoint", "teacher_dir") if result.get(key)]
    if len(names) < 2:
        why = _NO_RESULT if run.result is None else "result.json names no checkpoint / teacher_dir"
        return f'<p class="missing">outputs: {_e(why)}</p>'
    checkpoint, teacher_dir = (run.path / name for name in names)
    where = [
        [
            checkpoint.name,
            str(checkpoint) + ("" if checkpoint.is_file() else " (missing from the folder)"),
            "the I-JEPA-layout checkpoint: encoder, predictor, target_encoder, args",
        ],
        [
            f"{teacher_dir.name}/",
            str(teacher_dir) + ("" if teacher_dir.is_dir() else " (missing from the folder)"),
            "the target encoder as a timm local-dir export (model.safetensors + config.json)",
        ],
    ]
    weights = shlex.quote(str(checkpoint))
    command = f"distillkit compress --teacher {shlex.quote(run.method)} --teacher-weights {weights}"
    return _table(where) + f"\n<p>distil a student from it:</p>\n<pre><code>{_e(command)}</code></pre>"


def _fold(table: str, rows: int, summary: str) -> str:
    """A long table folds away in <details>; a short one is shown as it is."""
    return table if rows <= FOLD_ROWS else f"<details><summary>{_e(summary)}</summary>{table}</details>"


def _gap(gap: dict[str, float]) -> str:
    return " / ".join(f"{gap[key]:.0%}" if key in gap else "-" for key in GAP_METRICS)


def _table(rows: list[list[str]], columns: list[str] | None = None) -> str:
    """An HTML table; without `columns` a key-value table whose first cells are headers."""
    head = "<tr>" + "".join(f"<th>{_e(c)}</th>" for c in columns) + "</tr>" if columns else ""
    first, rest = ("td", '<td class="num">') if columns else ("th", "<td>")
    body = "".join(
        f"<tr><{first}>{_e(row[0])}</{first}>" + "".join(f"{rest}{_e(c)}</td>" for c in row[1:]) + "</tr>"
        for row in rows
    )
    return f"<table>{head}{body}</table>"


def _count(value: Any) -> str:
    return f"{value:,}" if isinstance(value, int) and not isinstance(value, bool) else _e(value)


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{value:.2%}"


def _e(text: str) -> str:
    return html.escape(str(text))
