"""What `distillkit list` shows: the shipped teachers, students, strategies and recipes as rows (dicts, one
per name, keys in snake_case as `--json` prints them), read from the light modules only (the zoo's catalog,
the student specs, the strategies' summaries, the recipe files), so listing loads no torch or timm."""

from __future__ import annotations

from typing import Any

from .recipe import find_recipe, list_recipes


def teacher_rows() -> list[dict[str, Any]]:
    """The zoo, then the two kinds of teacher named by pattern."""
    from .teachers.catalog import TEACHERS

    rows = []
    for name in TEACHERS:
        spec = TEACHERS.get(name)
        rows.append(
            {
                "name": name,
                "architecture": spec.architecture,
                "embedding": spec.embedding_dims,
                "weights": spec.weights_source,
                "license": spec.license or "-",
                "description": spec.description,
            }
        )
    rows.append(_pattern("timm:<model name>", "any timm model", "timm hub, or a file", "any timm model"))
    rows.append(_pattern("file:<path>", "--arch <timm name>", "the file", "any checkpoint file"))
    return rows


def _pattern(name: str, architecture: str, weights: str, description: str) -> dict[str, Any]:
    return {"name": name, "architecture": architecture, "embedding": "-", "weights": weights, "license": "-",
            "description": description}  # fmt: skip


def student_rows() -> list[dict[str, Any]]:
    from .student_specs import shipped_specs

    rows = [
        {"name": name, "timm_model": spec.timm, "input_size": spec.input_size, "description": spec.description}
        for name, spec in shipped_specs().items()
    ]
    pattern = {"timm_model": "any timm model", "input_size": 224, "description": "or a spec .yaml file of your own"}
    return rows + [{"name": "timm:<model name>", **pattern}]


def strategy_rows() -> list[dict[str, Any]]:
    from .strategies.summaries import SUMMARIES

    return [{"name": name, "summary": summary} for name, summary in sorted(SUMMARIES.items())]


def recipe_rows() -> list[dict[str, Any]]:
    """Each shipped recipe with its first comment line as the description."""
    rows = []
    for name in list_recipes():
        lines = find_recipe(name).read_text(encoding="utf-8").splitlines()
        first = next((line.lstrip("# ") for line in lines if line.startswith("#")), "")
        rows.append({"name": name, "description": first})
    return rows


ROWS = {"teachers": teacher_rows, "students": student_rows, "strategies": strategy_rows, "recipes": recipe_rows}
# the table's columns: row key -> header (--json prints every key)
COLUMNS = {
    "teachers": {"name": "name", "architecture": "architecture", "embedding": "embedding", "weights": "weights",
                 "license": "license"},
    "students": {"name": "name", "timm_model": "timm model", "input_size": "input size", "description": "description"},
    "strategies": {"name": "name", "summary": "what it does"},
    "recipes": {"name": "name", "description": "description"},
}  # fmt: skip
