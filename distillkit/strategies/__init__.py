"""The strategies and their registry. `distillkit.list_strategies()` lists what is registered here."""

from . import feature, hidden, hybrid, kdss, logits, sdssl, seed, simclr  # noqa: F401  (each registers itself)
from .base import StepInputs, Strategy
from .objective import Objective, check_composable, fit_to_data
from .registry import STRATEGIES, register_strategy

__all__ = ["STRATEGIES", "Objective", "StepInputs", "Strategy", "check_composable", "fit_to_data", "register_strategy"]
