"""The `simclr` strategy (the no-teacher baseline): NT-Xent against the SimCLR formula written out in
float64, its head, that it reads no teacher (the training loop never runs one, through the real
`compress`), that gradients reach the student, and that it composes with a distillation strategy."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import warnings

import pytest
import timm
import torch
from safetensors.torch import load_file
from torch import nn

import distillkit
import distillkit.api as api
from distillkit.errors import UsageError
from distillkit.features import Features
from distillkit.recipe import resolve_recipe
from distillkit.strategies import Objective, StepInputs
from distillkit.strategies.simclr import Simclr, SimclrConfig, nt_xent
from distillkit.strategies.toolbox import all_gather
from distillkit.student import Student, create_student, student_spec
from distillkit.teachers import InputConfig, Teacher
from distillkit.train.step import DistillModule

pytestmark = pytest.mark.usefixtures("one_cpu_thread")

IMAGENET = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))


# ----------------------------------------------------------------------------- the loss, from the formula


def reference_nt_xent(za: torch.Tensor, zb: torch.Tensor, tau: float) -> float:
    """1/N sum_n [l(a_n, b_n) + l(b_n, a_n)], l(i, j) = -log exp(s_ij/tau) / sum_{k != i} exp(s_ik/tau),
    s = cosine similarity, over the 2N views a_1..a_N, b_1..b_N; explicit loops in float64."""
    n = za.shape[0]
    z = [v / v.norm() for v in torch.cat([za, zb]).double()]

    def pair_loss(i: int, j: int) -> float:
        numerator = math.exp(float(z[i] @ z[j]) / tau)
        denominator = sum(math.exp(float(z[i] @ z[k]) / tau) for k in range(2 * n) if k != i)
        return -math.log(numerator / denominator)

    return sum(pair_loss(k, k + n) + pair_loss(k + n, k) for k in range(n)) / n


@pytest.mark.parametrize("n, tau", [(5, 0.5), (4, 0.1), (1, 0.5)])
def test_nt_xent_matches_the_simclr_formula(n, tau):
    generator = torch.Generator().manual_seed(n)
    za, zb = torch.randn(n, 7, generator=generator) * 3, torch.randn(n, 7, generator=generator)
    assert nt_xent(za, zb, tau).item() == pytest.approx(reference_nt_xent(za, zb, tau), rel=1e-5, abs=1e-6)


def test_nt_xent_is_low_for_matching_views_and_symmetric():
    generator = torch.Generator().manual_seed(0)
    za = torch.randn(6, 16, generator=generator)
    shuffled = torch.randn(6, 16, generator=generator)
    assert nt_xent(za, za + 0.01 * shuffled, 0.1) < nt_xent(za, shuffled, 0.1)
    assert nt_xent(za, shuffled, 0.5).item() == pytest.approx(nt_xent(shuffled, za, 0.5).item(), rel=1e-6)


def test_rows_of_one_process_are_the_batch():
    x = torch.randn(4, 3)
    gathered, offset = all_gather(x)
    assert gathered is x and offset == 0


HALF_BATCH = """
import sys, torch, torch.distributed as dist
from distillkit.strategies.simclr import nt_xent
rank = int(sys.argv[1])
dist.init_process_group("gloo", init_method="file://" + sys.argv[2], rank=rank, world_size=2)
za, zb = torch.randn(2, 6, 5, generator=torch.Generator().manual_seed(0)).unbind(0)
mine = [z[3 * rank:3 * rank + 3].clone().requires_grad_() for z in (za, zb)]
loss = nt_xent(*mine, 0.5)
loss.backward()
print(loss.item(), *(g for z in mine for g in z.grad.flatten().tolist()))
"""


def test_two_processes_contrast_with_both_halves_and_send_gradients_back(tmp_path):
    """Each process contrasts its 3 images with the 6 of both, and the backward sums both processes'
    gradients of its rows: the mean of the two losses is the one-process loss, and each process's
    gradient is twice the one-process one (DDP's mean over 2 processes then gives the same update)."""
    runs = [
        subprocess.Popen(
            [sys.executable, "-c", HALF_BATCH, str(r), str(tmp_path / "store")],
            stdout=subprocess.PIPE,
            text=True,
            env={**os.environ, "OMP_NUM_THREADS": "1"},
        )
        for r in range(2)
    ]
    answers = [[float(v) for v in run.communicate(timeout=120)[0].split()] for run in runs]
    za, zb = torch.randn(2, 6, 5, generator=torch.Generator().manual_seed(0)).unbind(0)
    whole = [z.clone().requires_grad_() for z in (za, zb)]
    loss = nt_xent(*whole, 0.5)
    loss.backward()
    assert (answers[0][0] + answers[1][0]) / 2 == pytest.approx(loss.item(), rel=1e-5)
    for rank, answer in enumerate(answers):
        expected = torch.stack([2 * z.grad[3 * rank : 3 * rank + 3] for z in whole])
        assert torch.allclose(torch.tensor(answer[1:]).view(2, 3, 5), expected, atol=1e-6)


def test_strategy_loss_is_nt_xent_of_its_head_over_both_views():
    torch.manual_seed(0)
    strategy = Simclr(SimclrConfig(temperature=0.3), Features(embedding=torch.randn(2, 20)))
    kinds = [type(m).__name__ for m in strategy.head]
    assert kinds == ["Linear", "BatchNorm1d", "ReLU", "Linear"]
    assert [m.out_features for m in strategy.head if isinstance(m, nn.Linear)] == [20, 128]  # hidden = width
    student = [Features(embedding=torch.randn(6, 20)) for _ in range(2)]
    terms = strategy(StepInputs([], student, None, 0.0))
    assert set(terms) == set(strategy.term_weights()) == {"simclr"}
    with torch.no_grad():  # the head in train mode, both views as one batch (BN statistics over 2N)
        z = strategy.head(torch.cat([student[0].embedding, student[1].embedding]))
    assert terms["simclr"].item() == pytest.approx(reference_nt_xent(z[:6], z[6:], 0.3), rel=1e-5)

    small = Simclr(SimclrConfig(projection_hidden_dim=8, projection_dim=4), Features(embedding=torch.randn(2, 20)))
    assert [m.out_features for m in small.head if isinstance(m, nn.Linear)] == [8, 4]


def test_bad_settings_and_students_are_refused():
    with pytest.raises(UsageError, match="strategy.simclr.temperature"):
        resolve_recipe({"strategy": {"simclr": {"temperature": 0}}})
    with pytest.raises(UsageError, match="simclr needs one pooled embedding"):
        Simclr(SimclrConfig(), Features(embedding=torch.randn(2, 4, 20)))
    strategy = Simclr(SimclrConfig(), Features(embedding=torch.randn(2, 20)))
    with pytest.raises(UsageError, match="2 views"):
        strategy(StepInputs([], [Features(embedding=torch.randn(4, 20))], None, 0.0))


# ----------------------------------------------------------------------------- no teacher, gradients, composition


@pytest.fixture(scope="module")
def teacher():
    torch.manual_seed(0)
    model = timm.create_model("test_efficientnet", pretrained=False, num_classes=0).eval()
    return Teacher("tiny-cnn", model, InputConfig((32, 32), *IMAGENET), "random, test only")


def objective_and_module(strategies: dict, teacher):
    torch.manual_seed(1)
    student = timm.create_model("test_efficientnet", pretrained=False, num_classes=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        objective = Objective.build(resolve_recipe({"strategy": strategies}).strategy, teacher, student, 32)
    return objective, DistillModule(Student(student, None, InputConfig((32, 32), *IMAGENET), False), objective)


def test_reads_no_teacher_and_gradients_reach_the_student(teacher):
    objective, module = objective_and_module({"simclr": {}}, teacher)
    assert objective.num_views == 2
    assert objective.teacher_requests({"teacher": teacher}, module.student) == {}  # the loop runs no teacher
    generator = torch.Generator().manual_seed(2)
    views = [torch.rand(8, 3, 32, 32, generator=generator) for _ in range(2)]
    loss, terms, step = module(views, {}, None, 0.0)  # what the loop passes for an empty request
    assert step.teacher_views == [] and step.other_teachers == {} and set(terms) == {"simclr"}
    loss.backward()
    grads = [p.grad for p in module.student.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert sum(g.abs().sum() for g in grads) > 0
    assert all(p.grad is None for p in teacher.parameters())


def test_composes_with_seed(teacher):
    objective, module = objective_and_module({"seed": {"queue_size": 16}, "simclr": {"weight": 0.5}}, teacher)
    requests = objective.teacher_requests({"teacher": teacher}, module.student)
    assert list(requests) == ["teacher"] and objective.num_views == 2
    generator = torch.Generator().manual_seed(2)
    views = [torch.rand(8, 3, 32, 32, generator=generator) for _ in range(2)]
    teachers = {"teacher": [teacher(v, requests["teacher"]) for v in views]}
    loss, terms, _ = module(views, teachers, None, 0.0)
    assert set(terms) == {"seed", "simclr"}
    assert loss.item() == pytest.approx(terms["seed"].item() + 0.5 * terms["simclr"].item(), rel=1e-5)


def test_compress_trains_the_student_without_ever_running_the_teacher(tmp_path, monkeypatch):
    """The real `compress` on the shipped recipe, shrunk: a teacher forward during training raises; the
    teacher still gives the evaluation its row."""
    phase = {"training": False}
    calls = {"train": 0, "eval": 0}
    extract = Teacher._extract  # every teacher forward, training's requests and evaluation's embed alike

    def guarded(self, views, request, extractor):
        if phase["training"]:
            calls["train"] += 1
            raise AssertionError("the simclr baseline ran the teacher during training")
        calls["eval"] += 1
        return extract(self, views, request, extractor)

    def training(*args, **kwargs):
        phase["training"] = True
        try:
            return train(*args, **kwargs)
        finally:
            phase["training"] = False

    train = api.train
    monkeypatch.setattr(Teacher, "_extract", guarded)
    monkeypatch.setattr(api, "train", training)
    overrides = [
        "teacher.input_size=32",
        "student.input_size=32",
        "eval.max_train=48",
        "eval.max_test=32",
        "eval.probe_steps=5",
        "eval.latency_runs=1",
        "eval.online_images=0",
    ]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = distillkit.compress(
            "simclr-cnn",
            student="mobilenetv3-small",
            limit=64,
            batch_size=16,
            max_steps=2,
            out=tmp_path / "run",
            set=overrides,
            quiet=True,
        )
    assert result.steps == 2 and calls["train"] == 0
    assert calls["eval"] > 0 and "knn_top1" in result.metrics["teacher"]  # the teacher row is still there
    lines = [json.loads(line) for line in (result.run_dir / "metrics.jsonl").read_text().splitlines()]
    logged = [line for line in lines if "loss" in line]
    assert logged and all(math.isfinite(line["simclr"]) for line in logged)

    exported = load_file(str(result.student_dir / "model.safetensors"))
    initial = create_student(student_spec("mobilenetv3-small"), 32, seed=0).state_dict()
    assert not torch.equal(exported["conv_stem.weight"], initial["conv_stem.weight"])  # the student learned
    assert not any(key.startswith("head") for key in exported)  # the projection head stays behind
