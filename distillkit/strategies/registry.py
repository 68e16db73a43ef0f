"""The strategy registry: each strategy module registers its class here under its name."""

from __future__ import annotations

from ..registry import Registry
from .base import Strategy

STRATEGIES: Registry[type[Strategy]] = Registry("strategy")


def register_strategy(cls: type[Strategy]) -> type[Strategy]:
    STRATEGIES.register(cls.name, cls)
    return cls
