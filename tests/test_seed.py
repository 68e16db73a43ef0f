"""SEED: the loss against an independent float64 computation, the strategy, its queue, the objective.

The reference below is written from docs/methods.md#seed, not from the implementation:

    a_S = [z_S.z_T, z_S.q_1 .. z_S.q_K] / tau_S
    p_T = softmax([z_T.z_T, z_T.q_1 .. z_T.q_K] / tau_T)
    L   = -sum_j p_T[j] log_softmax(a_S)[j], averaged over the batch
"""

from __future__ import annotations

import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from distillkit.errors import UsageError
from distillkit.features import FeatureRequest, Features
from distillkit.strategies import STRATEGIES, Objective, StepInputs
from distillkit.strategies.seed import EmbeddingQueue, Seed, SeedConfig, seed_loss

pytestmark = pytest.mark.usefixtures("one_cpu_thread")


# ----------------------------------------------------------------------------- reference

# Hand-made, B=3, D=4, K=5. Queue rows 0, 1 and 4 are close to teacher rows 0, 1 and 2, so with
# tau_teacher = 0.07 the teacher target is a genuine distribution, not one-hot.
TEACHER = [[1.0, 0.5, -0.2, 0.1], [0.2, -1.0, 0.4, 0.3], [-0.3, 0.2, 0.9, -0.6]]
STUDENT = [[0.8, 0.1, 0.3, -0.2], [0.5, -0.7, -0.1, 0.6], [-0.2, 0.6, 0.7, 0.1]]
QUEUE = [
    [0.9, 0.6, -0.1, 0.2],
    [0.1, -0.9, 0.5, 0.2],
    [-1.0, 0.0, 0.2, 0.3],
    [0.3, 0.3, 0.3, -0.9],
    [-0.2, 0.1, 1.0, -0.5],
]


def _unit_rows(rows) -> list[list[float]]:
    out = []
    for row in rows:
        norm = math.sqrt(sum(v * v for v in row))
        out.append([v / norm for v in row])
    return out


def _dot(a, b) -> float:
    return sum(x * y for x, y in zip(a, b))


def reference_target(z_t, queue, tau_t) -> list[list[float]]:
    targets = []
    for t in z_t:
        logits = [_dot(t, t) / tau_t] + [_dot(t, q) / tau_t for q in queue]
        m = max(logits)
        e = [math.exp(v - m) for v in logits]
        s = sum(e)
        targets.append([v / s for v in e])
    return targets


def reference_seed_loss(z_s, z_t, queue, tau_s, tau_t) -> float:
    """Plain-Python float64 SEED loss, one sample at a time."""
    z_s, z_t, queue = (np.asarray(a, dtype=np.float64).tolist() for a in (z_s, z_t, queue))
    targets = reference_target(z_t, queue, tau_t)
    total = 0.0
    for s, t, p in zip(z_s, z_t, targets):
        logits = [_dot(s, t) / tau_s] + [_dot(s, q) / tau_s for q in queue]
        m = max(logits)
        log_norm = m + math.log(sum(math.exp(v - m) for v in logits))
        total += -sum(pj * (aj - log_norm) for pj, aj in zip(p, logits))
    return total / len(z_s)


def _t(rows) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.float32)


def _step(teacher: torch.Tensor, student: torch.Tensor, projection: torch.Tensor | None = None) -> StepInputs:
    return StepInputs(
        teacher_views=[Features(embedding=teacher, projection=projection)],
        student_views=[Features(embedding=student)],
        labels=None,
        progress=0.0,
    )


def _linear_shapes(module: nn.Module) -> list[tuple[int, int]]:
    return [(m.in_features, m.out_features) for m in module.modules() if isinstance(m, nn.Linear)]


def _make_seed(**config) -> Seed:
    return Seed(
        SeedConfig(**config),
        teacher_probe=Features(embedding=torch.zeros(2, 6)),
        student_probe=Features(embedding=torch.zeros(2, 5)),
    )


# ----------------------------------------------------------------------------- seed_loss


def test_reference_target_is_soft_at_tau_0_07_and_one_hot_at_1e_4():
    """Sanity of the test data itself: tau_teacher 0.07 really gives a spread target."""
    z_t, queue = _unit_rows(TEACHER), _unit_rows(QUEUE)
    soft = reference_target(z_t, queue, 0.07)
    assert max(max(row) for row in soft) < 0.9
    hard = reference_target(z_t, queue, 1e-4)
    assert min(row[0] for row in hard) > 1 - 1e-12


@pytest.mark.parametrize("tau_teacher", [0.07, 1e-4])
def test_seed_loss_matches_float64_reference(tau_teacher):
    z_s, z_t, queue = _unit_rows(STUDENT), _unit_rows(TEACHER), _unit_rows(QUEUE)
    got = seed_loss(_t(z_s), _t(z_t), _t(queue), tau_student=0.2, tau_teacher=tau_teacher)
    want = reference_seed_loss(z_s, z_t, queue, 0.2, tau_teacher)
    assert got.dtype == torch.float32
    assert got.dim() == 0
    assert got.item() == pytest.approx(want, abs=1e-5, rel=1e-5)


def test_seed_loss_with_tiny_tau_teacher_is_infonce_with_teacher_as_positive():
    """Spec 1.1: with tau_T = 1e-4 and no near-duplicate queue entry, SEED = cross-entropy to column 0."""
    z_s, z_t, queue = _t(_unit_rows(STUDENT)), _t(_unit_rows(TEACHER)), _t(_unit_rows(QUEUE))
    logits = torch.cat([(z_s * z_t).sum(1, keepdim=True), z_s @ queue.T], 1) / 0.2
    infonce = F.cross_entropy(logits, torch.zeros(3, dtype=torch.long))
    assert seed_loss(z_s, z_t, queue, 0.2, 1e-4).item() == pytest.approx(infonce.item(), abs=1e-5)


def test_seed_loss_gradient_reaches_the_student_only():
    z_s = _t(_unit_rows(STUDENT)).requires_grad_(True)
    z_t = _t(_unit_rows(TEACHER))
    seed_loss(z_s, z_t, _t(_unit_rows(QUEUE)), 0.2, 0.07).backward()
    assert z_s.grad is not None and torch.isfinite(z_s.grad).all() and z_s.grad.abs().sum() > 0


# ----------------------------------------------------------------------------- the strategy


def test_seed_is_registered():
    assert STRATEGIES.get("seed") is Seed


def test_head_maps_student_width_to_teacher_width():
    seed = _make_seed(queue_size=8)
    assert _linear_shapes(seed.head) == [(5, 5), (5, 6)]
    assert any(isinstance(m, nn.ReLU) for m in seed.head.modules())
    assert tuple(seed.queue.embeddings.shape) == (8, 6)
    assert torch.allclose(seed.queue.embeddings.norm(dim=1), torch.ones(8), atol=1e-5)
    assert int(seed.queue.pointer) == 0


def test_head_hidden_dim_config():
    seed = _make_seed(queue_size=8, head_hidden_dim=7)
    assert _linear_shapes(seed.head) == [(5, 7), (7, 6)]


def test_head_and_queue_are_part_of_the_module_state():
    """Heads are optimised and queues checkpointed with the strategy."""
    seed = _make_seed(queue_size=8)
    state = seed.state_dict()
    assert "queue.embeddings" in state and "queue.pointer" in state
    assert sum(p.numel() for p in seed.parameters()) == (5 * 5 + 5) + (5 * 6 + 6)


def test_forward_equals_seed_loss_of_normalised_head_output():
    torch.manual_seed(0)
    seed = _make_seed(queue_size=8)
    teacher, student = torch.randn(3, 6), torch.randn(3, 5)
    out = seed(_step(teacher, student))
    assert set(out) == {"seed"}
    with torch.no_grad():
        z_s = F.normalize(seed.head(student), dim=1)
    z_t = F.normalize(teacher, dim=1)
    want = reference_seed_loss(z_s.numpy(), z_t.numpy(), seed.queue.embeddings.numpy(), 0.2, 1e-4)
    assert out["seed"].item() == pytest.approx(want, abs=1e-5, rel=1e-5)
    # the loss trains the head
    out["seed"].backward()
    assert all(p.grad is not None for p in seed.head.parameters())


def test_forward_uses_configured_temperatures():
    torch.manual_seed(1)
    seed = _make_seed(queue_size=8, tau_student=0.5, tau_teacher=0.1)
    teacher, student = torch.randn(4, 6), torch.randn(4, 5)
    loss = seed(_step(teacher, student))["seed"]
    with torch.no_grad():
        z_s = F.normalize(seed.head(student), dim=1)
    want = reference_seed_loss(
        z_s.numpy(), F.normalize(teacher, dim=1).numpy(), seed.queue.embeddings.numpy(), 0.5, 0.1
    )
    assert loss.item() == pytest.approx(want, abs=1e-5, rel=1e-5)


def test_forward_does_not_touch_the_queue():
    seed = _make_seed(queue_size=8)
    before = seed.queue.embeddings.clone()
    seed(_step(torch.randn(3, 6), torch.randn(3, 5)))
    assert torch.equal(seed.queue.embeddings, before)
    assert int(seed.queue.pointer) == 0


def test_after_step_pushes_normalised_teacher_embeddings():
    torch.manual_seed(2)
    seed = _make_seed(queue_size=8)
    before = seed.queue.embeddings.clone()
    teacher = torch.randn(3, 6) * 5
    step = _step(teacher, torch.randn(3, 5))
    seed.after_step(step, lambda t: t)
    queue = seed.queue.embeddings
    assert torch.allclose(queue[:3], F.normalize(teacher, dim=1), atol=1e-6)
    assert torch.equal(queue[3:], before[3:])
    assert int(seed.queue.pointer) == 3


def test_after_step_pushes_what_gather_returns():
    """In DDP the gather concatenates every process's batch; all of it is enqueued."""
    seed = _make_seed(queue_size=8)
    teacher = torch.randn(3, 6)
    seen = []

    def gather(t):
        seen.append(t)
        return torch.cat([t, -t])

    seed.after_step(_step(teacher, torch.randn(3, 5)), gather)
    assert len(seen) == 1 and torch.allclose(seen[0], F.normalize(teacher, dim=1), atol=1e-6)
    z_t = F.normalize(teacher, dim=1)
    assert torch.allclose(seed.queue.embeddings[:6], torch.cat([z_t, -z_t]), atol=1e-6)
    assert int(seed.queue.pointer) == 6


def test_projection_teacher_uses_the_projection():
    seed = Seed(
        SeedConfig(queue_size=8),
        teacher_probe=Features(embedding=torch.zeros(2, 6), projection=torch.zeros(2, 4)),
        student_probe=Features(embedding=torch.zeros(2, 5)),
    )
    assert _linear_shapes(seed.head) == [(5, 5), (5, 4)]
    assert tuple(seed.queue.embeddings.shape) == (8, 4)
    torch.manual_seed(3)
    embedding, projection, student = torch.randn(3, 6), torch.randn(3, 4), torch.randn(3, 5)
    loss = seed(_step(embedding, student, projection=projection))["seed"]
    with torch.no_grad():
        z_s = F.normalize(seed.head(student), dim=1)
    want = reference_seed_loss(
        z_s.numpy(), F.normalize(projection, dim=1).numpy(), seed.queue.embeddings.numpy(), 0.2, 1e-4
    )
    assert loss.item() == pytest.approx(want, abs=1e-5, rel=1e-5)


def test_embed_dim_must_match_the_teacher():
    with pytest.raises(UsageError, match="embed_dim"):
        _make_seed(queue_size=8, embed_dim=7)
    assert _linear_shapes(_make_seed(queue_size=8, embed_dim=6).head)[-1] == (5, 6)


@pytest.mark.parametrize("bad", [{"queue_size": 0}, {"tau_student": 0.0}, {"tau_teacher": -1.0}])
def test_invalid_config_is_a_usage_error(bad):
    with pytest.raises(UsageError):
        _make_seed(**{"queue_size": 8, **bad})


def test_projection_requested_from_teacher_without_projection_is_rejected():
    teacher = SimpleNamespace(has_projection=False, name="tiny-teacher")
    with pytest.raises(UsageError, match="tiny-teacher"):
        Seed.check_teachers(SeedConfig(teacher_embed="projection"), {"teacher": teacher})
    Seed.check_teachers(SeedConfig(teacher_embed="auto"), {"teacher": teacher})
    Seed.check_teachers(SeedConfig(teacher_embed="embedding"), {"teacher": teacher})


def test_teacher_request_follows_teacher_embed():
    plain = SimpleNamespace(has_projection=False, name="plain")
    with_proj = SimpleNamespace(has_projection=True, name="proj")

    def request(config, teacher):
        return Seed.teacher_requests(config, {"teacher": teacher}, None)

    assert request(SeedConfig(), plain) == {"teacher": FeatureRequest(embedding=True)}
    assert request(SeedConfig(), with_proj) == {"teacher": FeatureRequest(projection=True)}
    assert request(SeedConfig(teacher_embed="embedding"), with_proj) == {"teacher": FeatureRequest(embedding=True)}
    assert Seed.student_request(SeedConfig()) == FeatureRequest(embedding=True)


# ----------------------------------------------------------------------------- the queue


def _rows(start: int, n: int, dim: int = 3) -> torch.Tensor:
    """Rows whose first entry is their id, easy to track."""
    return torch.tensor([[float(i)] + [0.0] * (dim - 1) for i in range(start, start + n)])


def _ids(queue: EmbeddingQueue) -> list[int]:
    return [int(v) for v in queue.embeddings[:, 0].tolist()]


def test_queue_fifo_and_wrap_around():
    queue = EmbeddingQueue(5, 3)
    queue.push(_rows(100, 3))
    assert _ids(queue)[:3] == [100, 101, 102]
    assert int(queue.pointer) == 3
    queue.push(_rows(200, 4))
    # 200, 201 fill slots 3, 4; 202, 203 wrap to slots 0, 1 overwriting the oldest (100, 101)
    assert _ids(queue) == [202, 203, 102, 200, 201]
    assert int(queue.pointer) == 7 % 5 == 2
    assert torch.equal(queue.embeddings, torch.cat([_rows(202, 2), _rows(102, 1), _rows(200, 2)]))
    # the next push overwrites the oldest remaining entry (102) first
    queue.push(_rows(300, 1))
    assert _ids(queue) == [202, 203, 300, 200, 201]
    assert int(queue.pointer) == 3


@pytest.mark.parametrize("start_pointer", [0, 3])
@pytest.mark.parametrize("batch", [5, 8, 12])
def test_queue_push_of_a_large_batch_keeps_the_newest_rows(start_pointer, batch):
    queue = EmbeddingQueue(5, 3)
    # reference: a ring buffer filled one row at a time
    ring = [None] * 5
    pointer = 0
    for row in range(start_pointer):
        queue.push(_rows(row, 1))
        ring[pointer] = row
        pointer = (pointer + 1) % 5
    queue.push(_rows(1000, batch))
    for row in range(1000, 1000 + batch):
        ring[pointer] = row
        pointer = (pointer + 1) % 5
    assert _ids(queue) == ring
    assert int(queue.pointer) == pointer
    # the newest `size` rows survive and, read from the pointer on, run oldest to newest
    in_order = [_ids(queue)[(pointer + i) % 5] for i in range(5)]
    assert in_order == list(range(1000 + batch - 5, 1000 + batch))


def test_queue_push_casts_and_detaches():
    queue = EmbeddingQueue(4, 3)
    batch = _rows(7, 2).to(torch.bfloat16).requires_grad_(True)
    queue.push(batch)
    assert queue.embeddings.dtype == torch.float32
    assert not queue.embeddings.requires_grad
    assert _ids(queue)[:2] == [7, 8]


# ----------------------------------------------------------------------------- precision


def test_bfloat16_embeddings_give_the_float32_loss():
    """Teacher outputs in bf16 (no autocast) and both sides in bf16 under autocast, as in training."""
    torch.manual_seed(4)
    seed = _make_seed(queue_size=8, tau_teacher=0.07)
    teacher = torch.randn(4, 6).to(torch.bfloat16)
    student = torch.randn(4, 5).to(torch.bfloat16)
    reference = seed(_step(teacher.float(), student.float()))["seed"]

    mixed = seed(_step(teacher, student.float()))["seed"]
    assert mixed.dtype == torch.float32
    assert mixed.item() == pytest.approx(reference.item(), rel=1e-5)

    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = seed(_step(teacher, student))["seed"]
    assert low.dtype == torch.float32
    assert low.item() == pytest.approx(reference.item(), rel=1e-2)


def test_seed_loss_similarities_stay_fp32_under_autocast():
    z_s, z_t, queue = _unit_rows(STUDENT), _unit_rows(TEACHER), _unit_rows(QUEUE)
    want = reference_seed_loss(z_s, z_t, queue, 0.2, 0.07)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = seed_loss(_t(z_s), _t(z_t), _t(queue), 0.2, 0.07)
    assert got.dtype == torch.float32
    assert got.item() == pytest.approx(want, abs=1e-5, rel=1e-5)


# ----------------------------------------------------------------------------- objective


def test_objective_weights_a_single_strategy():
    torch.manual_seed(5)
    seed = _make_seed(queue_size=8)
    step = _step(torch.randn(3, 6), torch.randn(3, 5))
    objective = Objective({"seed": seed}, {"seed": 0.5})
    total, terms = objective(step)
    term = seed(step)["seed"]
    assert set(terms) == {"seed"}
    assert terms["seed"].item() == pytest.approx(term.item(), rel=1e-6)
    assert not terms["seed"].requires_grad
    assert total.item() == pytest.approx(0.5 * term.item(), rel=1e-6)
    assert total.requires_grad


def test_objective_sums_two_weighted_strategies_and_updates_both():
    torch.manual_seed(6)
    first, second = _make_seed(queue_size=8), _make_seed(queue_size=8, tau_teacher=0.07)
    step = _step(torch.randn(3, 6), torch.randn(3, 5))
    objective = Objective({"a": first, "b": second}, {"a": 0.5, "b": 2.0})
    total, terms = objective(step)
    expected = 0.5 * first(step)["seed"].item() + 2.0 * second(step)["seed"].item()
    assert total.item() == pytest.approx(expected, rel=1e-6)
    assert set(terms) == {"a.seed", "b.seed"}
    assert objective.num_views == 1
    objective.after_step(step, lambda t: t)
    assert int(first.queue.pointer) == int(second.queue.pointer) == 3


class _ZeroTermSeed(Seed):
    def term_weights(self) -> dict[str, float]:
        return {"seed": 0.0}


def test_objective_with_only_zero_term_weights_is_a_usage_error():
    seed = _ZeroTermSeed(
        SeedConfig(queue_size=8), Features(embedding=torch.zeros(2, 6)), Features(embedding=torch.zeros(2, 5))
    )
    with pytest.raises(UsageError, match="weight 0"):
        Objective({"seed": seed}, {"seed": 1.0})(_step(torch.randn(3, 6), torch.randn(3, 5)))


def test_objective_with_only_zero_recipe_weights_is_a_usage_error():
    seed = _make_seed(queue_size=8)
    with pytest.raises(UsageError, match="weight 0"):
        Objective({"seed": seed}, {"seed": 0.0})(_step(torch.randn(3, 6), torch.randn(3, 5)))


# ----------------------------------------------------------------------------- optimisation


def test_loss_falls_when_training_head_and_student():
    torch.manual_seed(7)
    x = torch.randn(32, 16)
    teacher = torch.randn(32, 8)
    student = nn.Linear(16, 12)
    seed = Seed(
        SeedConfig(queue_size=64),
        teacher_probe=Features(embedding=torch.zeros(2, 8)),
        student_probe=Features(embedding=torch.zeros(2, 12)),
    )
    optimizer = torch.optim.SGD(list(student.parameters()) + list(seed.parameters()), lr=0.5, momentum=0.9)
    losses = []
    for i in range(40):
        loss = seed(StepInputs([Features(embedding=teacher)], [Features(embedding=student(x))], None, i / 40))["seed"]
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert all(math.isfinite(v) for v in losses)
    assert losses[-1] < 0.5 * losses[0]
    assert min(losses[-5:]) < min(losses[:5])
