"""The strategies and their registry. `distillkit.list_strategies()` lists what is registered here.

base.py holds the contract a strategy implements, toolbox.py the helpers strategies share, objective.py
the weighted sum the training step calls; every other module is one strategy (masks.py: hidden's masks).
"""

from . import feature, hidden, hybrid, kdss, logits, sdssl, seed, simclr  # noqa: F401  (each registers itself)
from .base import StepInputs, Strategy
from .objective import Objective, check_composable, fit_to_data
from .registry import STRATEGIES, register_strategy

__all__ = ["STRATEGIES", "Objective", "StepInputs", "Strategy", "check_composable", "fit_to_data", "register_strategy"]
