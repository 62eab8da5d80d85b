"""Which weights a compression callback acts on: a module filter ``(module, name) -> bool``.

The default suits BERT-style encoders and decoder LMs: every linear layer (``nn.Linear``, and
``transformers``' ``Conv1D`` of GPT-2, whose weight is stored transposed) except those in embeddings,
the pooler and task or LM heads. Name patterns (regular expressions searched in the module's qualified name) or any
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

import torch
from torch import nn

ModuleFilter = Callable[[nn.Module, str], bool]


def conv1d_class() -> type | None:
    """``transformers.pytorch_utils.Conv1D`` (GPT-2's linear layer), if transformers is installed."""
    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:
        return None
    return Conv1D


def is_linear(module: nn.Module) -> bool:
    """``nn.Linear`` or ``transformers``' ``Conv1D``: a layer computing ``x @ W + b``."""
    conv1d = conv1d_class()
    return isinstance(module, nn.Linear) or (conv1d is not None and isinstance(module, conv1d))


def linear_shape(module: nn.Module) -> tuple[int, int]:
    """``(in_features, out_features)`` of a linear layer, whichever way it stores its weight."""
    if isinstance(module, nn.Linear):
        return module.in_features, module.out_features
    rows, columns = module.weight.shape  # Conv1D: (in, out)
    return int(rows), int(columns)


def output_dim(module: nn.Module) -> int:
    """The weight dimension of a linear layer's output features: 0 for ``nn.Linear``, 1 for ``Conv1D`` (``[in, out]``)."""
    return 0 if isinstance(module, nn.Linear) else 1


def linear_weight(module: nn.Module) -> torch.Tensor:
    """The weight as ``(out_features, in_features)``, as ``nn.Linear`` stores it (a view for ``Conv1D``)."""
    return module.weight if isinstance(module, nn.Linear) else module.weight.t()


def linear_layers(model: nn.Module, limit: int = 8) -> list[str]:
    """Names and types of the first linear layers, for error messages."""
    return [f"{name} ({type(m).__name__})" for name, m in model.named_modules() if is_linear(m)][:limit]


EXCLUDED_PARTS = ("embeddings", "pooler", "classifier", "qa_outputs", "lm_head", "predictions", "head")
ADAPTERS = ("lora_A", "lora_B")  # peft's LoRA adapters: small float matrices trained beside a frozen base layer


def default_filter(module: nn.Module, name: str) -> bool:
    """Linear layers of the encoder or decoder: not embeddings, pooler, classifier or other heads, and not LoRA
    adapters (a peft model's frozen base layers are selected, its adapters stay float)."""
    return is_linear(module) and not any(part in EXCLUDED_PARTS or part in ADAPTERS for part in name.split("."))


def pattern_filter(patterns: Sequence[str]) -> ModuleFilter:
    """Linear layers whose qualified name matches any of the regular expressions."""
    compiled = [re.compile(pattern) for pattern in patterns]

    def matches(module: nn.Module, name: str) -> bool:
        return is_linear(module) and any(p.search(name) for p in compiled)

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
        raise ValueError(
            f"The {option} filter selects no layer of {type(model).__name__}. Linear layers it has include "
            f"{linear_layers(model)}; "
            f"pass name patterns that match some of them (e.g. {option}=['encoder'])."
        )
    return selected
