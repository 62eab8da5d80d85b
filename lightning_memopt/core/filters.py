"""Which weights a compression callback acts on: a module filter ``(module, name) -> bool``.

The default suits BERT-style encoders: every ``nn.Linear`` except those in embeddings, the pooler and
task heads. Name patterns (regular expressions searched in the module's qualified name) or any
callable work too. A filter that selects nothing is an error, not a silent no-op.

Example:
    >>> from torch import nn
    >>> model = nn.ModuleDict({"encoder": nn.Linear(4, 4), "classifier": nn.Linear(4, 2)})
    >>> sorted(select_weights(model, default_filter))
    ['encoder.weight']
    >>> sorted(select_weights(model, pattern_filter(["classifier"])))
    ['classifier.weight']
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence

from torch import nn

ModuleFilter = Callable[[nn.Module, str], bool]
EXCLUDED_PARTS = ("embeddings", "pooler", "classifier", "qa_outputs", "lm_head", "predictions", "head")


def default_filter(module: nn.Module, name: str) -> bool:
    """Linear layers of the encoder: not embeddings, pooler, classifier or other heads."""
    return isinstance(module, nn.Linear) and not any(part in EXCLUDED_PARTS for part in name.split("."))


def pattern_filter(patterns: Sequence[str]) -> ModuleFilter:
    """Linear layers whose qualified name matches any of the regular expressions."""
    compiled = [re.compile(pattern) for pattern in patterns]

    def matches(module: nn.Module, name: str) -> bool:
        return isinstance(module, nn.Linear) and any(p.search(name) for p in compiled)

    return matches


def as_filter(modules: Sequence[str] | ModuleFilter | None) -> ModuleFilter:
    """``None`` → :func:`default_filter`; a list of patterns → :func:`pattern_filter`; a callable as is."""
    if modules is None:
        return default_filter
    if callable(modules):
        return modules
    if isinstance(modules, str):
        modules = [modules]
    return pattern_filter(list(modules))


def select_weights(model: nn.Module, module_filter: ModuleFilter, option: str = "modules") -> dict[str, nn.Parameter]:
    """``{"<module>.weight": parameter}`` for every module the filter selects; an error if none is."""
    selected = {
        f"{name}.weight" if name else "weight": module.weight
        for name, module in model.named_modules()
        if isinstance(getattr(module, "weight", None), nn.Parameter) and module_filter(module, name)
    }
    if not selected:
        linear = [name for name, module in model.named_modules() if isinstance(module, nn.Linear)][:8]
        raise ValueError(
            f"The {option} filter selects no layer of {type(model).__name__}. Linear layers it has include {linear}; "
            f"pass name patterns that match some of them (e.g. {option}=['encoder'])."
        )
    return selected
