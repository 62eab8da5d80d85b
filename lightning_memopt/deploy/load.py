"""Load an exported folder for inference without training code: ``load_pretrained(folder)``.

A folder whose heads (or neurons) were cut by ``memopt export --shrink`` records the kept counts in
``config.json`` (``memopt_shrunk``); the model is built full size from the config, cut to those shapes,
and the weights are loaded strictly, so it can never come back silently with the full shape. Other
folders load with ``from_pretrained``; int8 folders (``quantization.json``) with ``load_int8``.

Example:
    >>> model = load_pretrained("exported/ner-small")  # doctest: +SKIP
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from lightning_memopt.core.sources import resolve_pretrained, transformers_model_class
from lightning_memopt.pruning.structured import SHRUNK_KEY, apply_recorded_shrink
from lightning_memopt.quantization.export import META_FILE, load_int8


def load_pretrained(path: str | Path) -> nn.Module:
    """The model in an exported folder (dense, shrunk or int8), task head included, in eval mode."""
    from safetensors.torch import load_file
    from transformers import AutoConfig

    folder = Path(resolve_pretrained(str(path)))
    if (folder / META_FILE).exists():
        return load_int8(folder)
    config = AutoConfig.from_pretrained(folder, trust_remote_code=False)
    architectures = getattr(config, "architectures", None) or []
    model_class = transformers_model_class(architectures[0] if architectures else None)
    if model_class is None:
        raise ValueError(f"{folder}/config.json names no transformers model class (architectures={architectures}).")
    recorded = getattr(config, SHRUNK_KEY, None)
    if not recorded:
        return model_class.from_pretrained(folder, trust_remote_code=False, dtype=torch.float32).eval()
    model = model_class(config)
    apply_recorded_shrink(model, recorded)
    weights = folder / "model.safetensors"
    if not weights.exists():
        raise FileNotFoundError(f"{folder} records a shrunk model but has no model.safetensors.")
    missing, unexpected = model.load_state_dict(load_file(str(weights)), strict=False)
    tied = set(getattr(model, "all_tied_weights_keys", {}) or {}) | set(
        getattr(model, "_tied_weights_keys", None) or []
    )
    if unexpected or set(missing) - tied:
        raise ValueError(
            f"{folder}: weights do not fit the recorded shapes (missing {missing}, unexpected {unexpected})."
        )
    return model.eval()
