"""Which strategies a callback can run under: one check, one message format, for every technique.

Example:
    >>> from types import SimpleNamespace
    >>> from lightning.pytorch.strategies import FSDPStrategy
    >>> unsupported_strategy(SimpleNamespace(strategy=FSDPStrategy()), ("FSDPStrategy", "DeepSpeedStrategy"))
    'FSDPStrategy'
"""

from __future__ import annotations

from collections.abc import Collection
from typing import Any


def unsupported_strategy(trainer: Any, unsupported: Collection[str]) -> str | None:
    """The trainer's strategy class name when it is, or derives from, one of ``unsupported``; else ``None``."""
    if any(base.__name__ in unsupported for base in type(trainer.strategy).__mro__):
        return type(trainer.strategy).__name__
    return None


def refuse_strategies(trainer: Any, who: str, unsupported: Collection[str], why: str, instead: str) -> None:
    """Stop at setup when the strategy is unsupported: "``who`` does not support ``X``: ``why``. Use ``instead``."""
    if name := unsupported_strategy(trainer, unsupported):
        raise ValueError(f"{who} does not support {name}: {why}. Use {instead}.")
