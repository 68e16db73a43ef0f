"""The objective: the recipe's strategies, each with its weight, built and checked together.

`Objective.build` instantiates them from the recipe's strategy section, sized by dry forwards of the
teachers and the student; the training step calls the objective for the weighted sum of every term.
"""

from __future__ import annotations

from typing import Any, Mapping

import torch
from torch import Tensor, nn

from ..errors import UsageError
from ..features import FeatureRequest, Features, probe_features
from ..roles import PRIMARY_TEACHER
from .base import Gather, StepInputs, Strategy
from .registry import STRATEGIES


class Objective(nn.Module):
    """Several strategies, each with a recipe weight; sums their weighted terms."""

    def __init__(self, strategies: dict[str, Strategy], weights: dict[str, float]):
        super().__init__()
        check_composable({name: type(s) for name, s in strategies.items()})
        self.strategies = nn.ModuleDict(strategies)
        self.weights = dict(weights)
        self.num_views = max(s.num_views for s in strategies.values())
        for name, strategy in strategies.items():
            if type(strategy).runs_student():
                peers = FeatureRequest()
                for other_name, other in strategies.items():
                    if other_name != name:
                        peers = peers.merge(type(other).student_request(other.config))
                strategy.peer_request = peers

    @classmethod
    def build(
        cls, strategy_configs: Mapping[str, Any], teachers: Mapping[str, Any], student: nn.Module, student_size: int
    ) -> "Objective":
        """Instantiate the strategies (`strategy_configs`: name -> its Config), sized by dry forwards of the
        teachers and the student.

        `teachers`: role -> frozen teacher (a lone teacher is the primary role). Each config is first bound to
        the recipe's roles (`Strategy.bind_roles`); then every strategy checks that the roles it reads exist and
        that its teachers and the student can give what it needs; every extra teacher must be read by some
        strategy, and the composition is checked, all before any forward pass."""
        if not isinstance(teachers, Mapping):
            teachers = {PRIMARY_TEACHER: teachers}
        classes = {name: STRATEGIES.get(name) for name in strategy_configs}
        roles = tuple(teachers)
        strategy_configs = {name: classes[name].bind_roles(config, roles) for name, config in strategy_configs.items()}
        check_roles({name: classes[name].teacher_roles(config) for name, config in strategy_configs.items()}, teachers)
        for name, config in strategy_configs.items():
            classes[name].check_teachers(config, teachers)
            classes[name].check_student(config, student)
        check_composable(classes)
        strategies = {}
        for name, config in strategy_configs.items():
            strategy_cls = classes[name]
            probes = {
                role: teachers[role](torch.zeros(2, 3, *teachers[role].input_config.size), request)
                for role, request in strategy_cls.teacher_requests(config, teachers, student).items()
            }
            student_probe = probe_features(student, strategy_cls.student_request(config), (student_size, student_size))
            strategies[name] = strategy_cls.build(config, teachers, probes, student, student_probe)
        return cls(strategies, {name: config.weight for name, config in strategy_configs.items()})

    @property
    def runs_student(self) -> bool:
        """Whether one of the strategies runs the student itself on each view (`Strategy.runs_student`)."""
        return any(type(s).runs_student() for s in self.strategies.values())

    def student_request(self) -> FeatureRequest:
        """What the strategies need from the student, merged."""
        request = FeatureRequest()
        for strategy in self.strategies.values():
            request = request.merge(type(strategy).student_request(strategy.config))
        return request

    def forward(self, step: StepInputs) -> tuple[Tensor, dict[str, Tensor]]:
        total: Tensor | None = None
        terms: dict[str, Tensor] = {}
        for name, strategy in self.strategies.items():
            values = strategy(step)
            for term, weight in strategy.term_weights().items():
                if term not in values or self.weights[name] * weight == 0:
                    continue
                terms[term if term.startswith(name) else f"{name}.{term}"] = values[term].detach()
                contribution = self.weights[name] * weight * values[term]
                total = contribution if total is None else total + contribution
            for term in type(strategy).diagnostics:  # logged, not trained on
                if term in values:
                    terms[f"{name}.{term}"] = values[term].detach()
        if total is None:
            raise UsageError("every loss term has weight 0: nothing to train")
        return total, terms

    def after_step(self, step: StepInputs, gather: Gather) -> None:
        for strategy in self.strategies.values():
            strategy.after_step(step, gather)

    def health(self, logged: Mapping[str, float]) -> list[str]:
        """The strategies' warnings about the values a logging step read back."""
        return [w for w in (s.health(logged) for s in self.strategies.values()) if w]

    def expand_views(self, views: list[Tensor]) -> list[Tensor]:
        for strategy in self.strategies.values():
            views = strategy.expand_views(views)
        return views

    def teacher_requests(self, teachers: Mapping[str, Any], student: nn.Module) -> dict[str, FeatureRequest]:
        """What the strategies need from each teacher role, merged per role."""
        merged: dict[str, FeatureRequest] = {}
        for strategy in self.strategies.values():
            for role, request in type(strategy).teacher_requests(strategy.config, teachers, student).items():
                merged[role] = merged.get(role, FeatureRequest()).merge(request)
        return merged

    def student_features(
        self, student: nn.Module, x: Tensor, teachers: Mapping[str, Features], request: FeatureRequest, progress: float
    ) -> Features | None:
        """The one strategy that runs the student itself, if any (checked when composing)."""
        for strategy in self.strategies.values():
            features = strategy.student_features(student, x, teachers, request, progress)
            if features is not None:
                return features
        return None


def check_roles(roles: Mapping[str, tuple[str, ...]], teachers: Mapping[str, Any]) -> None:
    """Every role a strategy reads (`roles`: strategy -> its roles) has a teacher, and every teacher but the
    primary one is read by some strategy."""
    for name, read in roles.items():
        for role in read:
            if role not in teachers and role == PRIMARY_TEACHER:
                raise UsageError(
                    f"strategy {name} distils from a teacher, but the recipe has none (teacher: null); "
                    "name one with --teacher NAME, or use a strategy that needs none (simclr, bootleg)"
                )
            if role not in teachers:
                raise UsageError(
                    f"strategy {name} reads a teacher in the role {role!r}, but the recipe has no "
                    f"teachers.{role} section; add one (e.g. --set teachers.{role}.name=mae-vitb) "
                    "or point the strategy at another role"
                )
    read_roles = {role for read in roles.values() for role in read}
    unread = [role for role in teachers if role not in read_roles and role != PRIMARY_TEACHER]
    if unread:
        raise UsageError(
            f"teachers.{unread[0]} is read by no strategy of this recipe "
            f"({', '.join(roles)}); remove it or configure a strategy to use it"
        )


def check_composable(strategies: dict[str, type[Strategy]]) -> None:
    """Reject compositions the training step cannot serve: two strategies that both run the student."""
    owners = [name for name, cls in strategies.items() if cls.runs_student()]
    if len(owners) > 1:
        raise UsageError(
            f"strategies {' and '.join(repr(n) for n in owners)} both run the student themselves (their own "
            "masked forward), so they cannot be combined in one recipe; keep one of them"
        )


def fit_to_data(configs: dict[str, Any], num_images: int, batch_size: int) -> list[str]:
    """Shrink the strategies' data-dependent sizes (a queue longer than the data) to `num_images` training
    images, in `configs` (the recipe's strategy section, so recipe.yaml and a resume see what ran); returns
    what changed."""
    notes = []
    for name, config in configs.items():
        configs[name], note = STRATEGIES.get(name).fit_to_data(config, num_images, batch_size)
        if note:
            notes.append(note)
    return notes
