"""What a recipe's ``--config`` files name, read as plain YAML (nothing in them runs)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import yaml


def recipe_classes(argv: Sequence[str]) -> dict[str, str]:
    """The model and data classes the ``--config`` files name (the last one wins), or the NER task's."""
    found = {
        "model": "lightning_memopt.TokenClassificationModule",
        "data": "lightning_memopt.TokenClassificationDataModule",
    }
    configs = [argv[i + 1] for i, arg in enumerate(argv[:-1]) if arg in ("--config", "-c")]
    configs += [arg.split("=", 1)[1] for arg in argv if arg.startswith("--config=")]
    for path in configs:
        try:
            recipe = yaml.safe_load(Path(path).read_text(encoding="utf-8")) or {}
        except (OSError, yaml.YAMLError):
            continue
        for key in found:
            class_path = (recipe.get(key) or {}).get("class_path") if isinstance(recipe.get(key), dict) else None
            found[key] = class_path or found[key]
    return found
