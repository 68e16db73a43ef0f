"""Evaluation, all in one place: the metrics (`metrics.py`: weighted k-NN, linear probe, parameters, CPU
latency, embedding a dataset), a finished run's teacher / student / random-init comparison (`run.py`), the
online k-NN at every epoch's end (`online.py`) and `distillkit eval` of an exported or timm model
(`exported.py`). Every network is embedded the same way: a function from raw [0, 1] views to embeddings
(`Teacher.embed`, `Student.embed`, or an exported file's runner)."""

from .exported import evaluate_student
from .metrics import (
    Embed,
    count_params,
    cpu_latency_ms,
    embed_dataset,
    embed_outputs,
    eval_subset,
    knn_accuracy,
    linear_probe_accuracy,
    runner_latency_ms,
    score_embeddings,
)
from .online import OnlineKnn
from .run import evaluate_run, score_networks

__all__ = [
    "Embed",
    "OnlineKnn",
    "count_params",
    "cpu_latency_ms",
    "embed_dataset",
    "embed_outputs",
    "eval_subset",
    "evaluate_run",
    "evaluate_student",
    "knn_accuracy",
    "linear_probe_accuracy",
    "runner_latency_ms",
    "score_embeddings",
    "score_networks",
]
