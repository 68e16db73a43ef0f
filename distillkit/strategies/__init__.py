"""The strategies and their registry. `distillkit.list_strategies()` lists what is registered here.

base.py holds the contract a strategy implements, toolbox.py the helpers strategies share, objective.py
the weighted sum the training step calls; summaries.py the shipped strategies' one-line descriptions; every
other module is one strategy (masks.py: hidden's masks). Names load on first use, and asking for one imports
every shipped strategy, so the registry is complete: `distillkit.strategies.summaries` alone loads no torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from .summaries import SUMMARIES

# public name -> the module of this package that defines it
_EXPORTS = {
    "STRATEGIES": "registry",
    "register_strategy": "registry",
    "Objective": "objective",
    "check_composable": "objective",
    "fit_to_data": "objective",
    "StepInputs": "base",
    "Strategy": "base",
}

__all__ = [
    "Objective",
    "STRATEGIES",
    "StepInputs",
    "Strategy",
    "check_composable",
    "fit_to_data",
    "list_strategies",
    "register_strategy",
]

if TYPE_CHECKING:
    from .base import StepInputs, Strategy
    from .objective import Objective, check_composable, fit_to_data
    from .registry import STRATEGIES, register_strategy


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    for module in SUMMARIES:  # each shipped strategy registers itself when imported
        importlib.import_module(f"{__name__}.{module}")
    value = getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
    globals()[name] = value
    return value


def list_strategies() -> list[str]:
    """The names of the registered strategies: every shipped one, and any registered since."""
    return __getattr__("STRATEGIES").names()
