"""`distillkit eval`: k-NN / linear-probe accuracy, classifier top-1, parameters and CPU latency of one
model (an exported student in any format, or any `timm:<name>`), optionally with the k-NN accuracy at
every block. ONNX and TorchScript exports are run by their own runtimes (onnxruntime, torch.jit), so
what is scored is the file that gets deployed."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import timm
import torch
from torch import Tensor, nn

from ..data import check_data_source, open_data
from ..errors import UsageError
from ..exits import block_embeddings
from ..export import WEIGHTS_FILE, load_student, read_config, student_folder
from ..features import is_token_model, num_layers
from ..inputs import InputConfig, prepare_input
from ..registry import did_you_mean
from ..runtimes import ONNX_FILE, TORCHSCRIPT_FILE, onnx_params, require_onnx, run_onnx, run_torchscript
from .metrics import (
    count_params,
    cpu_latency_ms,
    embed_outputs,
    eval_subset,
    inference_form,
    knn_accuracy,
    runner_latency_ms,
    score_embeddings,
)


def evaluate_student(
    student: str | Path,
    data: str = "builtin:fashion-mnist",
    max_train: int = 10000,
    max_test: int = 10000,
    knn_k: int = 20,
    knn_temperature: float = 0.07,
    probe_steps: int = 300,
    seed: int = 0,
    weights: str | Path | None = None,
    per_block: bool = False,
    device: str | None = None,
) -> dict[str, Any]:
    """Evaluate `student` on `data`'s held-out split, on `device` (None: a GPU when there is one, else the CPU;
    ONNX files run on the CPU, in onnxruntime; latency is always the CPU's). `student` is an export folder (or
    its run folder) or `timm:<name>`: with timm's hub weights, or with `weights`, a local state dict file.
    Returns knn_top1, probe_top1, params, latency_ms; top1 of the model's own classifier when it has one whose
    class count is the data's (classes in the data's order: sorted folder names), else top1_skipped with the
    reason; with `per_block`, per_block: one {"block", "knn_top1"} per block, each block's representation
    pooled as `distillkit export --exit-at` does."""
    check_data_source(data)
    device = eval_device(device)
    deployed = _deployed_file(student)
    if deployed is not None:
        if weights is not None:
            raise UsageError("--weights is for timm:<name> models; an exported student carries its own weights")
        scoring = (knn_k, knn_temperature, probe_steps, seed)
        return _evaluate_file(deployed, data, max_train, max_test, *scoring, per_block, device)
    model, input_config = open_model(str(student), weights)
    model.to(device)
    images = open_data(data, limit=None, seed=seed, val_fraction=0.1, load_size=max(input_config.size))
    if images.test is None or not images.num_classes:
        raise UsageError(f"{data} has no labelled held-out images; evaluation needs class subfolders")
    channels_last = not is_token_model(model)
    head_skipped = _head_mismatch(model, images.num_classes)

    def outputs(views: Tensor) -> dict[str, Tensor]:
        x = prepare_input(views, input_config, channels_last)
        features = model.forward_features(x)
        out = {"embedding": model.forward_head(features, pre_logits=True)}
        if head_skipped is None:
            out["logits"] = model.forward_head(features)
        if per_block:
            out.update({f"block{i}": e for i, e in enumerate(block_embeddings(model, x))})
        return out

    with inference_form(model, input_config.size):
        train, train_labels = embed_outputs(outputs, eval_subset(images.train_all, max_train, seed), device=device)
        test, test_labels = embed_outputs(outputs, eval_subset(images.test, max_test, seed), device=device)
    bank, queries = (train["embedding"], train_labels), (test["embedding"], test_labels)
    metrics: dict[str, Any] = score_embeddings(bank, queries, knn_k, knn_temperature, probe_steps, seed=seed)
    if head_skipped is None:
        metrics["top1"] = (test["logits"].argmax(1) == test_labels).float().mean().item()
    else:
        metrics["top1_skipped"] = head_skipped
    if per_block:
        metrics["per_block"] = _per_block(model, (train, train_labels), (test, test_labels), knn_k, knn_temperature)
    metrics["params"] = count_params(model)
    metrics["latency_ms"] = round(cpu_latency_ms(model, input_config.size, channels_last), 3)
    return metrics


def _per_block(model: nn.Module, train, test, k: int, temperature: float) -> list[dict[str, Any]]:
    """k-NN top-1 of each block's pooled representation (what `distillkit export --exit-at` would keep)."""
    (bank, bank_labels), (queries, query_labels) = train, test
    return [
        {
            "block": i,
            "knn_top1": knn_accuracy(
                bank[f"block{i}"], bank_labels, queries[f"block{i}"], query_labels, k=k, temperature=temperature
            ),
        }
        for i in range(num_layers(model))
    ]


def open_model(student: str, weights: str | Path | None) -> tuple[nn.Module, InputConfig]:
    """The model (eval mode) and the input it expects: size, mean and std."""
    if student.startswith("timm:"):
        model = _timm_model(student[len("timm:") :], weights)
        cfg = timm.data.resolve_data_config({}, model=model)
        return model.eval(), InputConfig(
            size=tuple(cfg["input_size"][1:]), mean=tuple(cfg["mean"]), std=tuple(cfg["std"])
        )
    if weights is not None:
        raise UsageError("--weights is for timm:<name> models; an exported student carries its own weights")
    folder = student_folder(student)
    cfg = read_config(folder)["pretrained_cfg"]
    return load_student(folder), InputConfig(
        size=tuple(cfg["input_size"][1:]), mean=tuple(cfg["mean"]), std=tuple(cfg["std"])
    )


def _deployed_file(student: str | Path) -> Path | None:
    """The ONNX or TorchScript file to run: only one named explicitly. A folder is scored from its
    model.safetensors (loading it runs no code); a folder holding only a runtime file is refused with the
    command that runs it, so a file someone dropped into a folder is never executed unasked."""
    if str(student).startswith("timm:"):
        return None
    path = Path(student).expanduser()
    if path.is_file() and path.name in (ONNX_FILE, TORCHSCRIPT_FILE):
        return path
    if path.is_dir() and not (path / WEIGHTS_FILE).is_file() and not (path / "student" / WEIGHTS_FILE).is_file():
        found = [path / f for f in (ONNX_FILE, TORCHSCRIPT_FILE) if (path / f).is_file()]
        if found:
            raise UsageError(
                f"{path} holds no {WEIGHTS_FILE}, only {found[0].name}; distillkit runs an ONNX or "
                f"TorchScript file only when it is named: distillkit eval {found[0]}"
            )
    return None


def _evaluate_file(
    path: Path,
    data: str,
    max_train: int,
    max_test: int,
    knn_k: int,
    knn_temperature: float,
    probe_steps: int,
    seed: int,
    per_block: bool,
    device: torch.device,
) -> dict[str, Any]:
    """k-NN, probe, parameters and latency of an ONNX / TorchScript export, run by its own runtime (ONNX on
    the CPU; TorchScript on `device`)."""
    if per_block:
        raise UsageError(
            f"{path.name} returns the embedding only, so --per-block cannot tap its blocks; evaluate "
            "the safetensors export (or the run folder) with --per-block"
        )
    cfg = read_config(path.parent)["pretrained_cfg"]
    input_config = InputConfig(size=tuple(cfg["input_size"][1:]), mean=tuple(cfg["mean"]), std=tuple(cfg["std"]))
    if path.name == ONNX_FILE:
        require_onnx()
        run, params, device = run_onnx(path), onnx_params(path), torch.device("cpu")
    else:
        module = run_torchscript(path).to(device)
        run, params = module, count_params(module)
    images = open_data(data, limit=None, seed=seed, val_fraction=0.1, load_size=max(input_config.size))
    if images.test is None or not images.num_classes:
        raise UsageError(f"{data} has no labelled held-out images; evaluation needs class subfolders")
    embed = lambda views: {"embedding": run(prepare_input(views, input_config, False).contiguous())}  # noqa: E731
    train, train_labels = embed_outputs(embed, eval_subset(images.train_all, max_train, seed), device=device)
    test, test_labels = embed_outputs(embed, eval_subset(images.test, max_test, seed), device=device)
    bank, queries = (train["embedding"], train_labels), (test["embedding"], test_labels)
    metrics: dict[str, Any] = score_embeddings(bank, queries, knn_k, knn_temperature, probe_steps, seed=seed)
    metrics["top1_skipped"] = f"{path.name} returns the embedding only (exports carry no classifier head)"
    metrics["params"] = params
    if path.name != ONNX_FILE:
        module.cpu()
    metrics["latency_ms"] = round(runner_latency_ms(run, input_config.size), 3)
    return metrics


def eval_device(name: str | None) -> torch.device:
    """`--device`: None picks a GPU (CUDA, then Apple MPS) when there is one, else the CPU; a named device
    must exist on this machine."""
    if name is None:
        if torch.cuda.is_available():
            return torch.device("cuda")
        mps = getattr(torch.backends, "mps", None)
        return torch.device("mps" if mps is not None and mps.is_available() else "cpu")
    try:
        device = torch.device(name)
        torch.empty(1, device=device)
    except (RuntimeError, AssertionError, AttributeError) as e:
        raise UsageError(f"--device {name}: not usable on this machine ({str(e).splitlines()[0]}); use cpu") from None
    return device


def _timm_model(name: str, weights: str | Path | None) -> nn.Module:
    from ..hub import create_pretrained
    from ..teachers.checkpoint import load_exact, read_checkpoint, unwrap_state_dict

    if not name or not timm.is_model(name):
        raise UsageError(f"unknown timm model {name!r}: {did_you_mean(name, timm.list_models())}")
    if weights is None:
        return create_pretrained(name, f"timm:{name}", "Download the weights elsewhere and pass --weights FILE.")
    state = unwrap_state_dict(read_checkpoint(weights), weights)
    cfg = timm.models.get_pretrained_cfg(name)
    classifier = cfg.classifier if cfg is not None else None  # the head's module name, e.g. "head" or "fc"
    head = state.get(f"{classifier}.weight") if isinstance(classifier, str) else None
    # the file's head decides the class count; a backbone-only file gives a model without a head
    model = timm.create_model(name, pretrained=False, num_classes=0 if head is None else head.shape[0])
    load_exact(model, state, str(weights), hint=f"pass a state dict of timm's {name}")
    return model


def _head_mismatch(model: nn.Module, data_classes: int) -> str | None:
    """Why the model's classifier cannot be scored on the data, or None when it can."""
    classes = getattr(model, "num_classes", 0)
    if not classes:
        return "the model has no classifier head"
    if classes != data_classes:
        return f"the classifier head has {classes} classes and the data {data_classes}"
    return None
