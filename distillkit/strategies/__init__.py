"""The strategy registry. `distillkit.list_strategies()` lists what is registered here."""

from ..registry import Registry
from .base import Objective, StepInputs, Strategy

STRATEGIES: Registry[type[Strategy]] = Registry("strategy")


def register_strategy(cls: type[Strategy]) -> type[Strategy]:
    STRATEGIES.register(cls.name, cls)
    return cls


from . import feature, hidden, hybrid, kdss, logits, sdssl, seed, simclr  # noqa: E402,F401  (each registers itself)

__all__ = ["STRATEGIES", "Objective", "StepInputs", "Strategy", "register_strategy"]
