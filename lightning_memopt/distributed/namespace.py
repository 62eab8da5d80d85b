"""Our presets are ``lightning.pytorch`` strategies; a ``pytorch_lightning`` Trainer refuses them.

``pytorch_lightning`` (the older package name) has its own class tree, so its Trainer rejects any
``lightning.pytorch`` strategy with "It must be ... an instance of pytorch_lightning.strategies.Strategy".
It prints the strategy's ``repr``, so the presets' ``repr`` says what to change. Our callbacks work with
either Trainer.
"""

from __future__ import annotations

NAMESPACE_HINT = "a lightning.pytorch strategy: build the Trainer with `from lightning.pytorch import Trainer`, not pytorch_lightning"


class PresetRepr:
    """A ``repr`` naming the preset and the Trainer it belongs to."""

    def __repr__(self) -> str:
        return f"lightning_memopt.{type(self).__name__} ({NAMESPACE_HINT})"
