"""Every loss term of feature, logits, kdss and hidden against an independent float64 computation
written from its formula (docs/methods.md#feature, #logits, #kdss, #hidden), on small hand-made tensors.

The references below use numpy and plain loops; they share no code with distillkit.strategies.
"""

from __future__ import annotations

import logging
import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from torch import nn

from distillkit.errors import UsageError
from distillkit.features import FeatureRequest, Features
from distillkit.strategies import STRATEGIES, Objective, StepInputs
from distillkit.strategies.feature import Feature, FeatureConfig
from distillkit.strategies.hidden import Hidden, HiddenConfig, MaskedFeatures, normalised_targets, sincos_2d
from distillkit.strategies.kdss import Kdss, KdssConfig, error_select, rotate_views
from distillkit.strategies.logits import Logits, LogitsConfig

pytestmark = pytest.mark.usefixtures("one_cpu_thread")


def teacher_request(strategy, config, teacher) -> FeatureRequest:
    """What `strategy` asks of its one teacher, the primary one."""
    return strategy.teacher_requests(config, {"teacher": teacher}, None)["teacher"]


# ----------------------------------------------------------------------------- references (float64)


def np64(t) -> np.ndarray:
    return t.detach().double().numpy() if isinstance(t, torch.Tensor) else np.asarray(t, dtype=np.float64)


def softmax_rows(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def ref_kd(student: np.ndarray, teacher: np.ndarray, temperature: float) -> float:
    """T^2 * mean over rows of sum_k p_t log(p_t / p_s), p = softmax(./T)."""
    total = 0.0
    for s_row, t_row in zip(student, teacher):
        p_s = softmax_rows(s_row[None] / temperature)[0]
        p_t = softmax_rows(t_row[None] / temperature)[0]
        total += sum(pt * (math.log(pt) - math.log(ps)) for pt, ps in zip(p_t, p_s) if pt > 0)
    return temperature**2 * total / len(student)


def ref_ce(logits: np.ndarray, labels: list[int]) -> float:
    rows = [(row, y) for row, y in zip(logits, labels) if y >= 0]
    return sum(-math.log(softmax_rows(row[None])[0][y]) for row, y in rows) / len(rows)


def ref_cos(a: np.ndarray, b: np.ndarray) -> float:
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


def ref_error_select(scores: np.ndarray, targets: list[int], ratio: float) -> list[int]:
    """SSKD student.py:249-283 re-written with python sorts: rank of the target in the descending row."""
    ranks = []
    for row, target in zip(scores, targets):
        order = sorted(range(len(row)), key=lambda j: -row[j])
        ranks.append(order.index(target))
    correct = [i for i, r in enumerate(ranks) if r == 0]
    wrong = sorted((i for i, r in enumerate(ranks) if r > 0), key=lambda i: (ranks[i], i))
    return sorted(correct + wrong[: int(len(wrong) * ratio)])


def ref_layer_norm_tokens(tokens: np.ndarray) -> np.ndarray:
    """(N, C) -> per-token (x - mean) / sqrt(var + 1e-5), population variance."""
    mean = tokens.mean(axis=1, keepdims=True)
    var = ((tokens - mean) ** 2).mean(axis=1, keepdims=True)
    return (tokens - mean) / np.sqrt(var + 1e-5)


def ref_smooth_l1(a: np.ndarray, b: np.ndarray, beta: float = 1.0) -> float:
    d = np.abs(a - b)
    return float(np.where(d < beta, 0.5 * d**2 / beta, d - 0.5 * beta).mean())


def _step(teacher: list[Features], student: list[Features], labels=None) -> StepInputs:
    return StepInputs(teacher_views=teacher, student_views=student, labels=labels, progress=0.0)


# ----------------------------------------------------------------------------- registry


def test_the_new_strategies_are_registered_with_summaries():
    for name, cls in [("feature", Feature), ("logits", Logits), ("kdss", Kdss), ("hidden", Hidden)]:
        assert STRATEGIES.get(name) is cls
        assert cls.summary


# ----------------------------------------------------------------------------- feature

T_EMB = [[1.0, -0.5, 0.25], [0.2, 0.8, -1.0]]  # teacher embedding, (B=2, D_t=3)
S_EMB = [[0.5, 1.0], [-1.5, 0.3]]  # student embedding, (B=2, D_s=2)
W = [[1.0, 0.0], [0.5, -1.0], [0.0, 2.0]]  # projection weight (3, 2)
BIAS = [0.1, 0.0, -0.2]


def _feature(**config) -> Feature:
    strategy = Feature(
        FeatureConfig(**config), Features(embedding=torch.zeros(2, 3)), Features(embedding=torch.zeros(2, 2))
    )
    with torch.no_grad():
        strategy.projection.weight.copy_(torch.tensor(W))
        strategy.projection.bias.copy_(torch.tensor(BIAS))
    return strategy


def _projected() -> np.ndarray:
    return np64(S_EMB) @ np64(W).T + np64(BIAS)


def test_feature_cosine_loss_by_hand():
    loss = _feature(target_norm="none")(
        _step([Features(embedding=torch.tensor(T_EMB))], [Features(embedding=torch.tensor(S_EMB))])
    )
    p = _projected()
    want = np.mean([1 - ref_cos(p[b], np64(T_EMB)[b]) for b in range(2)])
    assert set(loss) == {"feature"}
    assert loss["feature"].item() == pytest.approx(want, abs=1e-6)


def test_feature_mse_loss_by_hand():
    loss = _feature(loss="mse", target_norm="none")(
        _step([Features(embedding=torch.tensor(T_EMB))], [Features(embedding=torch.tensor(S_EMB))])
    )
    assert loss["feature"].item() == pytest.approx(float(((_projected() - np64(T_EMB)) ** 2).mean()), abs=1e-6)


def _standardised(t: np.ndarray, mean: np.ndarray, var: np.ndarray) -> np.ndarray:
    return (t - mean) / np.sqrt(var + 1e-6)


def test_feature_uses_the_raw_first_target_before_any_moments():
    loss = _feature()(_step([Features(embedding=torch.tensor(T_EMB))], [Features(embedding=torch.tensor(S_EMB))]))
    want = np.mean([1 - ref_cos(_projected()[b], np64(T_EMB)[b]) for b in range(2)])
    assert loss["feature"].item() == pytest.approx(want, abs=1e-6)


def test_feature_running_moments_by_hand_then_center_and_standardize():
    batches = [np.array([[1.0, 2.0, 0.0], [3.0, 0.0, 1.0]]), np.array([[0.0, 1.0, 5.0], [2.0, 2.0, 1.0]])]
    a = 0.9
    for mode in ("center", "standardize"):
        strategy = _feature(target_norm=mode, target_momentum=a)
        for batch in batches:
            step = _step(
                [Features(embedding=torch.tensor(batch, dtype=torch.float32))],
                [Features(embedding=torch.tensor(S_EMB))],
            )
            strategy.after_step(step, lambda x: x)
        # m_2 = a (1 - a) mean(b1) + (1 - a) mean(b2), bias-corrected by 1 - a^2; likewise for the squares
        first = (a * (1 - a) * batches[0].mean(0) + (1 - a) * batches[1].mean(0)) / (1 - a**2)
        second = (a * (1 - a) * (batches[0] ** 2).mean(0) + (1 - a) * (batches[1] ** 2).mean(0)) / (1 - a**2)
        mean, var = strategy.target_moments.moments()
        np.testing.assert_allclose(mean.double().numpy(), first, rtol=1e-6)
        np.testing.assert_allclose(var.double().numpy(), second - first**2, rtol=1e-5)
        t = np64(T_EMB)
        target = t - first if mode == "center" else _standardised(t, first, second - first**2)
        loss = strategy(_step([Features(embedding=torch.tensor(T_EMB))], [Features(embedding=torch.tensor(S_EMB))]))
        want = np.mean([1 - ref_cos(_projected()[b], target[b]) for b in range(2)])
        assert loss["feature"].item() == pytest.approx(want, abs=1e-5)


def test_feature_moments_stay_put_without_target_norm_and_bad_momentum_is_refused():
    strategy = _feature(target_norm="none")
    strategy.after_step(
        _step([Features(embedding=torch.tensor(T_EMB))], [Features(embedding=torch.tensor(S_EMB))]), lambda x: x
    )
    assert int(strategy.target_moments.updates) == 0
    with pytest.raises(UsageError, match="target_momentum"):
        FeatureConfig(target_momentum=1.0)


def test_feature_targets_the_projection_when_the_teacher_has_one():
    strategy = Feature(
        FeatureConfig(),
        Features(embedding=torch.zeros(2, 5), projection=torch.zeros(2, 3)),
        Features(embedding=torch.zeros(2, 2)),
    )
    assert strategy.projection.out_features == 3
    with_proj = SimpleNamespace(has_projection=True, name="p")
    plain = SimpleNamespace(has_projection=False, name="plain")
    assert teacher_request(Feature, FeatureConfig(), with_proj) == FeatureRequest(projection=True)
    assert teacher_request(Feature, FeatureConfig(), plain) == FeatureRequest(embedding=True)
    with pytest.raises(UsageError, match="plain"):
        Feature.check_teachers(FeatureConfig(teacher_embed="projection"), {"teacher": plain})


# ----------------------------------------------------------------------------- logits

T_LOGITS = [[2.0, 0.5, -1.0, 0.0], [0.1, 3.0, 0.2, -2.0], [-1.0, 0.0, 1.0, 4.0]]  # (B=3, K=4)
S_FEAT = [[0.3, -0.2], [1.0, 0.5], [-0.7, 0.9]]  # (B=3, D_s=2)
CLS_W = [[1.0, 0.2], [-0.5, 1.0], [0.3, -0.4], [0.0, 0.8]]  # classifier (4, 2)


def _logits_strategy(**config) -> Logits:
    strategy = Logits(LogitsConfig(**config), Features(logits=torch.zeros(2, 4)), Features(embedding=torch.zeros(2, 2)))
    with torch.no_grad():
        strategy.classifier.weight.copy_(torch.tensor(CLS_W))
        strategy.classifier.bias.zero_()
    return strategy


@pytest.mark.parametrize("temperature", [4.0, 1.0])
def test_logits_kd_is_t2_kl_by_hand(temperature):
    strategy = _logits_strategy(temperature=temperature)
    out = strategy(_step([Features(logits=torch.tensor(T_LOGITS))], [Features(embedding=torch.tensor(S_FEAT))]))
    s = np64(S_FEAT) @ np64(CLS_W).T
    assert set(out) == {"kd"}  # ce weight 0 by default: not computed
    assert out["kd"].item() == pytest.approx(ref_kd(s, np64(T_LOGITS), temperature), abs=1e-6)
    assert strategy.term_weights() == {"kd": 1.0, "ce": 0.0}


def test_logits_ce_skips_unlabelled_images():
    strategy = _logits_strategy(ce_weight=0.5)
    labels = torch.tensor([2, -1, 0])
    out = strategy(_step([Features(logits=torch.tensor(T_LOGITS))], [Features(embedding=torch.tensor(S_FEAT))], labels))
    s = np64(S_FEAT) @ np64(CLS_W).T
    assert out["ce"].item() == pytest.approx(ref_ce(s, [2, -1, 0]), abs=1e-6)
    none_labelled = strategy(
        _step(
            [Features(logits=torch.tensor(T_LOGITS))], [Features(embedding=torch.tensor(S_FEAT))], torch.full((3,), -1)
        )
    )
    assert none_labelled["ce"].item() == 0.0 and none_labelled["ce"].requires_grad


def test_logits_ce_with_a_separate_head_and_a_clear_error_for_foreign_labels():
    strategy = _logits_strategy(ce_weight=1.0, ce_classes=3)
    assert strategy.ce_head.out_features == 3
    step = _step(
        [Features(logits=torch.tensor(T_LOGITS))], [Features(embedding=torch.tensor(S_FEAT))], torch.tensor([0, 1, 2])
    )
    with torch.no_grad():
        want = ref_ce(np64(strategy.ce_head(torch.tensor(S_FEAT))), [0, 1, 2])
    assert strategy(step)["ce"].item() == pytest.approx(want, abs=1e-6)
    shared = _logits_strategy(ce_weight=1.0)
    with pytest.raises(UsageError, match="ce_classes"):
        shared(
            _step(
                [Features(logits=torch.tensor(T_LOGITS))],
                [Features(embedding=torch.tensor(S_FEAT))],
                torch.tensor([0, 9, 1]),
            )
        )


def test_logits_needs_a_teacher_with_logits():
    with pytest.raises(UsageError, match="'logits'.*class logits.*ssl-vit"):
        Logits.check_teachers(LogitsConfig(), {"teacher": SimpleNamespace(has_logits=False, name="ssl-vit")})
    Logits.check_teachers(LogitsConfig(), {"teacher": SimpleNamespace(has_logits=True, name="sup")})


# ----------------------------------------------------------------------------- kdss: views and selection


def test_rotate_views_appends_the_three_quarter_turns_of_the_upright_view():
    view = torch.arange(2 * 3 * 2 * 3, dtype=torch.float32).reshape(2, 3, 2, 3)
    other = torch.zeros(2, 3, 2, 3)
    views = rotate_views([view, other])
    assert len(views) == 5 and views[0] is view and views[1] is other
    for k, rotated in enumerate(views[2:], start=1):
        want = np.rot90(view.numpy(), k, axes=(2, 3))  # numpy's own rotation
        assert torch.equal(rotated, torch.from_numpy(want.copy()))
    strategy = _kdss()
    assert len(strategy.expand_views([view])) == 4 and strategy._rotation_start == 1
    assert len(strategy.expand_views([view, other])) == 5 and strategy._rotation_start == 2


def test_error_select_matches_sskd_by_hand():
    # row targets 0, 1, 2, 0, 1; ranks: 0, 2, 0, 1, 3 (by hand)
    scores = torch.tensor([[0.9, 0.1, 0.0], [0.5, 0.1, 0.4], [0.2, 0.3, 0.8], [0.4, 0.6, 0.1], [0.1, 0.0, 0.9]])
    target = torch.tensor([0, 1, 2, 0, 1])
    # 2 correct rows (0, 2); 3 wrong rows of ranks 2, 1, 3 -> keep int(0.75 * 3) = 2: rows 3 (rank 1), 1 (rank 2)
    assert error_select(scores, target, 0.75).tolist() == [0, 1, 2, 3]
    assert error_select(scores, target, 0.0).tolist() == [0, 2]
    assert error_select(scores, target, 1.0).tolist() == [0, 1, 2, 3, 4]
    assert (
        error_select(scores, target, 0.5).tolist()
        == ref_error_select(scores.numpy(), target.tolist(), 0.5)
        == [0, 2, 3]
    )
    keep = torch.tensor([False, False, False, False, True])
    assert error_select(scores, target, 0.0, always_keep=keep).tolist() == [0, 2, 4]


# ----------------------------------------------------------------------------- kdss: the terms

B, DS, DT, K = 3, 4, 5, 6
GEN = torch.Generator().manual_seed(0)


def _rand(*shape) -> torch.Tensor:
    return torch.randn(*shape, generator=GEN)


def _kdss(teacher_logits: bool = True, teacher_map=(2, 7, 2, 2), student_map=(2, 3, 4, 4), **config) -> Kdss:
    config = {"w_feat": 1.0, **config}
    teacher_probe = Features(
        embedding=torch.zeros(2, DT),
        logits=torch.zeros(2, K) if teacher_logits else None,
        layers={4: torch.zeros(*teacher_map)} if config["w_feat"] else {},
    )
    student_probe = Features(
        embedding=torch.zeros(2, DS), layers={6: torch.zeros(*student_map)} if config["w_feat"] else {}
    )
    return Kdss(KdssConfig(**config), teacher_probe, student_probe)


def _kdss_views(labels=None, teacher_map=(B, 7, 2, 2), student_map=(B, 3, 4, 4)):
    teacher = [
        Features(embedding=_rand(B, DT), logits=_rand(B, K) * 3, layers={4: _rand(*teacher_map)}) for _ in range(4)
    ]
    student = [Features(embedding=_rand(B, DS), layers={6: _rand(*student_map)}) for _ in range(4)]
    return _step(teacher, student, labels)


def test_kdss_defaults_and_term_weights():
    strategy = _kdss()
    assert strategy.term_weights() == {"kd": 0.9, "tf": 2.7, "ss": 10.0, "feat": 1.0, "ce": 0.1}
    c = strategy.config
    assert (c.temperature, c.tau, c.keep_ratio_ss, c.keep_ratio_tf, c.w_rot) == (4.0, 0.5, 0.75, 1.0, 0.0)
    assert strategy.rot_head is None and strategy.ce_head is None
    assert strategy.classifier.out_features == K
    assert [m.out_features for m in strategy.ss_head if isinstance(m, nn.Linear)] == [DS, DT]
    assert isinstance(strategy.feat_proj, nn.Conv2d) and strategy.feat_proj.kernel_size == (1, 1)
    assert (strategy.feat_proj.in_channels, strategy.feat_proj.out_channels) == (3, 7)


def test_kdss_kd_tf_and_ce_terms_by_hand():
    strategy = _kdss()
    labels = torch.tensor([1, -1, 4])
    step = _kdss_views(labels)
    out = strategy(step)
    with torch.no_grad():
        s = [np64(strategy.classifier(f.embedding)) for f in step.student_views]
    t = [np64(f.logits) for f in step.teacher_views]
    assert out["kd"].item() == pytest.approx(ref_kd(s[0], t[0], 4.0), abs=1e-5)
    # L_tf: every rotated image (keep_ratio_tf = 1), rows per image; the row order does not change a batch mean
    s_rot = np.concatenate([s[r][b : b + 1] for b in range(B) for r in (1, 2, 3)])
    t_rot = np.concatenate([t[r][b : b + 1] for b in range(B) for r in (1, 2, 3)])
    assert out["tf"].item() == pytest.approx(ref_kd(s_rot, t_rot, 4.0), abs=1e-5)
    assert out["ce"].item() == pytest.approx(ref_ce(s[0], [1, -1, 4]), abs=1e-5)


def test_kdss_tf_error_selection_with_labels():
    strategy = _kdss(keep_ratio_tf=0.0)
    labels = torch.tensor([0, 2, 5])
    step = _kdss_views(labels)
    out = strategy(step)
    with torch.no_grad():
        s = [np64(strategy.classifier(f.embedding)) for f in step.student_views]
    t = [np64(f.logits) for f in step.teacher_views]
    s_rot = np.concatenate([s[r][b : b + 1] for b in range(B) for r in (1, 2, 3)])
    t_rot = np.concatenate([t[r][b : b + 1] for b in range(B) for r in (1, 2, 3)])
    kept = ref_error_select(t_rot, [int(labels[i // 3]) for i in range(3 * B)], 0.0)
    assert kept, "the hand-made data should have a row the teacher gets right"
    assert out["tf"].item() == pytest.approx(ref_kd(s_rot[kept], t_rot[kept], 4.0), abs=1e-5)


def test_kdss_ss_term_by_hand():
    strategy = _kdss()
    step = _kdss_views()
    out = strategy(step)
    with torch.no_grad():
        z_s = [np64(strategy.ss_head(f.embedding)) for f in step.student_views]
    z_t = [np64(f.embedding) for f in step.teacher_views]

    def similarities(z):  # row (i, r) = rotated image i vs every upright image j
        return np.array([[ref_cos(z[r][i], z[0][j]) for j in range(B)] for i in range(B) for r in (1, 2, 3)])

    c_s, c_t = similarities(z_s), similarities(z_t)
    kept = ref_error_select(c_t, [i // 3 for i in range(3 * B)], 0.75)
    want = 0.5**2 * np.mean(
        [
            sum(
                pt * (math.log(pt) - math.log(ps))
                for pt, ps in zip(softmax_rows(c_t[i : i + 1] / 0.5)[0], softmax_rows(c_s[i : i + 1] / 0.5)[0])
            )
            for i in kept
        ]
    )
    assert out["ss"].item() == pytest.approx(want, abs=1e-5)


def test_kdss_ss_uses_the_teacher_projection_when_there_is_one():
    strategy = Kdss(
        KdssConfig(w_feat=0.0),
        Features(embedding=torch.zeros(2, DT), projection=torch.zeros(2, 3), logits=torch.zeros(2, K)),
        Features(embedding=torch.zeros(2, DS)),
    )
    assert [m.out_features for m in strategy.ss_head if isinstance(m, nn.Linear)][-1] == 3
    teacher = [
        Features(embedding=torch.full((B, DT), float("nan")), projection=_rand(B, 3), logits=_rand(B, K))
        for _ in range(4)
    ]
    student = [Features(embedding=_rand(B, DS)) for _ in range(4)]
    assert torch.isfinite(strategy(_step(teacher, student))["ss"])  # the NaN embedding is not used


def test_kdss_feature_map_cosine_by_hand():
    strategy = _kdss()
    step = _kdss_views()
    out = strategy(step)
    student_map = np64(step.student_views[0].layers[6])  # (B, 3, 4, 4) -> pooled 2x2 -> 1x1 conv
    teacher_map = np64(step.teacher_views[0].layers[4])  # (B, 7, 2, 2)
    weight = np64(strategy.feat_proj.weight)[:, :, 0, 0]
    bias = np64(strategy.feat_proj.bias)
    total = []
    for b in range(B):
        for h in range(2):
            for w in range(2):
                pooled = student_map[b, :, 2 * h : 2 * h + 2, 2 * w : 2 * w + 2].mean(axis=(1, 2))
                total.append(1 - ref_cos(weight @ pooled + bias, teacher_map[b, :, h, w]))
    assert out["feat"].item() == pytest.approx(float(np.mean(total)), abs=1e-5)
    # only the upright view counts
    rotated_changed = _step(
        step.teacher_views[:1]
        + [Features(embedding=f.embedding, logits=f.logits, layers={4: -f.layers[4]}) for f in step.teacher_views[1:]],
        step.student_views,
    )
    assert strategy(rotated_changed)["feat"].item() == pytest.approx(out["feat"].item(), abs=1e-6)


def test_kdss_feature_term_for_vit_tokens_uses_a_linear():
    strategy = _kdss(teacher_map=(2, 7, 2, 2), student_map=(2, 16, 3))  # ViT student: 4x4 tokens of width 3
    assert isinstance(strategy.feat_proj, nn.Linear)
    step = _kdss_views(student_map=(B, 16, 3))
    out = strategy(step)
    tokens = np64(step.student_views[0].layers[6])  # (B, 16, 3), row-major 4x4 grid
    teacher_map = np64(step.teacher_views[0].layers[4])
    weight, bias = np64(strategy.feat_proj.weight), np64(strategy.feat_proj.bias)
    total = []
    for b in range(B):
        projected = tokens[b] @ weight.T + bias  # (16, 7)
        grid = projected.reshape(4, 4, 7)
        for h in range(2):
            for w in range(2):
                pooled = grid[2 * h : 2 * h + 2, 2 * w : 2 * w + 2].mean(axis=(0, 1))
                total.append(1 - ref_cos(pooled, teacher_map[b, :, h, w]))
    assert out["feat"].item() == pytest.approx(float(np.mean(total)), abs=1e-5)


def test_kdss_rotation_prediction_term_by_hand():
    strategy = _kdss(w_rot=0.5)
    assert strategy.term_weights()["rot"] == 0.5
    step = _kdss_views()
    out = strategy(step)
    with torch.no_grad():
        logits = [np64(strategy.rot_head(f.embedding)) for f in step.student_views]
    rows = np.concatenate(logits)
    labels = [r for r in range(4) for _ in range(B)]
    assert out["rot"].item() == pytest.approx(ref_ce(rows, labels), abs=1e-5)


def test_kdss_without_teacher_logits_warns_once_and_drops_the_kl_terms(caplog):
    with caplog.at_level(logging.WARNING, logger="distillkit"):
        strategy = _kdss(teacher_logits=False)
    messages = [r.getMessage() for r in caplog.records if r.name == "distillkit"]
    assert len(messages) == 1 and "L_kd and L_tf" in messages[0]
    assert strategy.classifier is None
    assert strategy.term_weights() == {"ss": 10.0, "feat": 1.0}  # ce needs the teacher's classes or ce_classes
    teacher = [Features(embedding=_rand(B, DT), layers={4: _rand(B, 7, 2, 2)}) for _ in range(4)]
    student = [Features(embedding=_rand(B, DS), layers={6: _rand(B, 3, 4, 4)}) for _ in range(4)]
    assert set(strategy(_step(teacher, student, torch.tensor([0, 1, 2])))) == {"ss", "feat"}
    with_ce = _kdss(teacher_logits=False, ce_classes=3)
    assert "ce" in with_ce.term_weights() and with_ce.ce_head.out_features == 3


def test_kdss_requests_follow_the_weights():
    supervised = SimpleNamespace(has_logits=True, has_projection=False, name="sup")
    ssl = SimpleNamespace(has_logits=False, has_projection=True, name="ssl")
    assert teacher_request(Kdss, KdssConfig(), supervised) == FeatureRequest(embedding=True, layers=(-1,), logits=True)
    assert teacher_request(Kdss, KdssConfig(), ssl) == FeatureRequest(projection=True, layers=(-1,))
    assert teacher_request(Kdss, KdssConfig(w_feat=0, w_ss=0), supervised) == FeatureRequest(logits=True)
    assert Kdss.student_request(KdssConfig(feat_student_layer=0.5)) == FeatureRequest(embedding=True, layers=(0.5,))
    with pytest.raises(UsageError, match="keep_ratio_ss"):
        KdssConfig(keep_ratio_ss=1.5)
    with pytest.raises(UsageError, match="no active term"):
        _kdss(teacher_logits=False, w_ss=0.0, w_feat=0.0)


def test_kdss_objective_weighs_every_term():
    strategy = _kdss(w_rot=0.2)
    step = _kdss_views(torch.tensor([0, 1, 2]))
    total, terms = Objective({"kdss": strategy}, {"kdss": 2.0})(step)
    raw = strategy(step)
    want = 2.0 * sum(w * raw[t].item() for t, w in strategy.term_weights().items())
    assert set(terms) == {"kdss.kd", "kdss.tf", "kdss.ss", "kdss.feat", "kdss.rot", "kdss.ce"}
    assert total.item() == pytest.approx(want, rel=1e-5)


# ----------------------------------------------------------------------------- hidden


def test_hidden_targets_are_per_token_layer_norms_concatenated():
    gen = torch.Generator().manual_seed(1)
    tokens_a = torch.randn(2, 4, 3, generator=gen) * 5 + 2  # ViT tokens of a 2x2 grid
    tokens_b = torch.randn(2, 4, 6, generator=gen)
    y = normalised_targets([tokens_a, tokens_b], (2, 2))
    assert y.shape == (2, 4, 9)
    for b in range(2):
        want = np.concatenate(
            [ref_layer_norm_tokens(np64(tokens_a[b])), ref_layer_norm_tokens(np64(tokens_b[b]))], axis=1
        )
        assert np.allclose(np64(y[b]), want, atol=1e-5)


def test_hidden_targets_pool_cnn_maps_to_the_grid_before_normalising():
    gen = torch.Generator().manual_seed(2)
    fine = torch.randn(1, 3, 4, 4, generator=gen)
    coarse = torch.randn(1, 5, 2, 2, generator=gen)
    y = normalised_targets([fine, coarse], (2, 2))
    f = np64(fine)[0]
    pooled = np.stack(
        [f[:, 2 * h : 2 * h + 2, 2 * w : 2 * w + 2].mean(axis=(1, 2)) for h in range(2) for w in range(2)]
    )
    c = np64(coarse)[0].reshape(5, 4).T
    want = np.concatenate([ref_layer_norm_tokens(pooled), ref_layer_norm_tokens(c)], axis=1)
    assert np.allclose(np64(y[0]), want, atol=1e-5)


def _hidden_cnn(**config) -> Hidden:
    teacher_probe = Features(layers={1: torch.zeros(2, 3, 4, 4), 3: torch.zeros(2, 5, 2, 2)})
    return Hidden(
        HiddenConfig(**config),
        teacher_probe,
        Features(layers={4: torch.zeros(2, 6, 4, 4)}, embedding=torch.zeros(2, 7)),
    )


@pytest.mark.parametrize("loss", ["smooth_l1", "mse"])
def test_hidden_cnn_regression_by_hand(loss):
    strategy = _hidden_cnn(loss=loss, beta=0.5)
    assert strategy.grid == (2, 2) and strategy.target_dim == 8 and not strategy.masked
    gen = torch.Generator().manual_seed(3)
    teacher = Features(
        layers={
            1: torch.randn(2, 3, 4, 4, generator=gen),
            3: torch.randn(2, 5, 2, 2, generator=gen),
            7: torch.randn(2, 9, 1, 1, generator=gen),
        }
    )  # another strategy's layer: ignored
    student = Features(layers={4: torch.randn(2, 6, 4, 4, generator=gen)}, embedding=torch.randn(2, 7, generator=gen))
    out = strategy(_step([teacher], [student]))
    y = np64(normalised_targets([teacher.layers[1], teacher.layers[3]], (2, 2)))
    weight, bias = np64(strategy.proj.weight)[:, :, 0, 0], np64(strategy.proj.bias)
    s = np64(student.layers[4])
    pred = np.zeros((2, 4, 8))
    for b in range(2):
        for h in range(2):
            for w in range(2):
                pooled = s[b, :, 2 * h : 2 * h + 2, 2 * w : 2 * w + 2].mean(axis=(1, 2))
                pred[b, h * 2 + w] = weight @ pooled + bias
    want = ref_smooth_l1(pred, y, 0.5) if loss == "smooth_l1" else float(((pred - y) ** 2).mean())
    assert out["hidden"].item() == pytest.approx(want, abs=1e-5)
    # the pooled term: a Linear head on the student's embedding regresses the token mean of the same target
    pooled = np64(student.embedding) @ np64(strategy.pooled_head.weight).T + np64(strategy.pooled_head.bias)
    y_mean = y.mean(axis=1)
    want = ref_smooth_l1(pooled, y_mean, 0.5) if loss == "smooth_l1" else float(((pooled - y_mean) ** 2).mean())
    assert out["pooled"].item() == pytest.approx(want, abs=1e-5)
    assert strategy.term_weights() == {"hidden": 1.0, "pooled": 1.0}


def test_hidden_cnn_pooled_term_trains_the_layers_after_the_last_map():
    """MobileNetV3's conv_head acts after pooling the last map: only the pooled term reaches it."""
    import timm

    from distillkit.features import extract_features

    student = timm.create_model("mobilenetv3_small_100", num_classes=0)
    request = Hidden.student_request(HiddenConfig())
    probe = extract_features(student, torch.zeros(2, 3, 32, 32), request)
    teacher_probe = Features(layers={1: torch.zeros(2, 3, 4, 4), 3: torch.zeros(2, 5, 2, 2)})
    gen = torch.Generator().manual_seed(0)
    teacher = Features(layers={1: torch.randn(2, 3, 4, 4, generator=gen), 3: torch.randn(2, 5, 2, 2, generator=gen)})
    for pooled_weight, reaches in ((1.0, True), (0.0, False)):
        strategy = Hidden(HiddenConfig(pooled_weight=pooled_weight), teacher_probe, probe)
        student.zero_grad()
        features = extract_features(student, torch.randn(2, 3, 32, 32, generator=gen), request)
        out = strategy(_step([teacher], [features]))
        total = sum(w * out[t] for t, w in strategy.term_weights().items())
        total.backward()
        grad = student.conv_head.weight.grad
        assert (grad is not None and grad.abs().sum() > 0) == reaches


def _hidden_vit(**config) -> Hidden:
    config = {"predictor_depth": 1, "predictor_width": 16, "predictor_heads": 2, "mask_min_keep": 4, **config}
    teacher_probe = Features(layers={2: torch.zeros(2, 16, 3), 5: torch.zeros(2, 16, 5)})
    return Hidden(HiddenConfig(**config), teacher_probe, Features(layers={1: torch.zeros(2, 16, 8)}))


def test_hidden_vit_loss_is_the_mean_over_target_blocks_of_smooth_l1_on_gathered_targets():
    strategy = _hidden_vit()
    assert strategy.masked and strategy.grid == (4, 4)
    gen = torch.Generator().manual_seed(4)
    teacher = Features(layers={2: torch.randn(2, 16, 3, generator=gen), 5: torch.randn(2, 16, 5, generator=gen)})
    context_index = torch.tensor([[0, 1, 2, 4, 5, 6], [9, 10, 11, 13, 14, 15]])
    target_index = torch.tensor([[[3, 7], [0, 4]], [[12, 13], [2, 3]]])  # (T=2, B=2, 2)
    student = MaskedFeatures(
        context_tokens=torch.randn(2, 6, 8, generator=gen), context_index=context_index, target_index=target_index
    )
    out = strategy(_step([teacher], [student]))
    with torch.no_grad():
        pred = np64(strategy.predictor(student.context_tokens, context_index, target_index))
    y = np64(normalised_targets([teacher.layers[2], teacher.layers[5]], (4, 4)))
    per_block = [
        ref_smooth_l1(pred[k], np.stack([y[b][target_index[k, b].numpy()] for b in range(2)])) for k in range(2)
    ]
    assert out["hidden"].item() == pytest.approx(float(np.mean(per_block)), abs=1e-5)


def test_predictor_blocks_do_not_see_each_other_and_use_target_positions():
    strategy = _hidden_vit()
    gen = torch.Generator().manual_seed(5)
    context = torch.randn(2, 6, 8, generator=gen)
    context_index = torch.tensor([[0, 1, 2, 4, 5, 6], [9, 10, 11, 13, 14, 15]])
    targets = torch.tensor([[[3, 7], [0, 4]], [[12, 13], [2, 3]]])
    moved = targets.clone()
    moved[1] = torch.tensor([[8, 9], [5, 6]])
    with torch.no_grad():
        a = strategy.predictor(context, context_index, targets)
        b = strategy.predictor(context, context_index, moved)
    assert a.shape == (2, 2, 2, 8)
    assert torch.allclose(a[0], b[0], atol=1e-6)  # block 0 unaffected by block 1's positions
    assert not torch.allclose(a[1], b[1])


def test_sincos_position_embedding_by_hand():
    pos = sincos_2d((2, 3), 8)  # half the channels encode the row, half the column
    assert pos.shape == (6, 8)
    omega = [1.0, 0.01]  # 1 / 10000 ** (i / 2), i = 0, 1
    row, col = 1, 2  # flat index 5
    want = (
        [math.sin(row * o) for o in omega]
        + [math.cos(row * o) for o in omega]
        + [math.sin(col * o) for o in omega]
        + [math.cos(col * o) for o in omega]
    )
    assert pos[5].tolist() == pytest.approx(want, abs=1e-6)


def test_hidden_config_checks():
    with pytest.raises(UsageError, match="predictor_width"):
        HiddenConfig(predictor_width=100, predictor_heads=6)
    with pytest.raises(UsageError, match="layers"):
        HiddenConfig(layers=[])
    assert teacher_request(Hidden, HiddenConfig(), None) == FeatureRequest(layers=(0.25, 0.5, 0.75, 1.0))
    assert Hidden.student_request(HiddenConfig()) == FeatureRequest(layers=(-1,), embedding=True)
    with pytest.raises(UsageError, match="pooled_weight"):
        HiddenConfig(pooled_weight=-1.0)


def test_logits_builds_no_head_it_does_not_use():
    strategy = Logits(
        LogitsConfig(kd_weight=0.0, ce_weight=1.0, ce_classes=3),
        Features(logits=torch.zeros(2, 4)),
        Features(embedding=torch.zeros(2, 2)),
    )
    assert strategy.classifier is None and strategy.ce_head.out_features == 3
    out = strategy(
        _step(
            [Features(logits=torch.tensor(T_LOGITS))],
            [Features(embedding=torch.tensor(S_FEAT))],
            torch.tensor([0, 1, 2]),
        )
    )
    assert set(out) == {"ce"}
