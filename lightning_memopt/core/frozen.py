"""Frozen weights in 8 or 4 bits with bitsandbytes, for parts that never train (a distillation teacher).

:func:`quantize_frozen` replaces a frozen model's ``nn.Linear`` layers with bitsandbytes layers:
``int8`` is LLM.int8 without outlier columns (``Linear8bitLt`` with threshold 0: int8 weights with a
float scale per output row, about a quarter of the float32 bytes); ``nf4`` is ``Linear4bit`` with the
NormalFloat-4 code (two weights per byte plus a scale per 64, about an eighth). The weights are
quantized when the model is moved to its device (bitsandbytes quantizes in ``.to()``), on CUDA or CPU.
Layers named by ``keep`` (by default the task head, whose outputs are the logits) stay in full precision.

Example:
    >>> import torch
    >>> model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.ReLU(), torch.nn.Linear(64, 2))
    >>> quantize_frozen(model.requires_grad_(False), "int8", keep=("2",))
    ['0']
    >>> _ = model.to("cpu")
    >>> model[0].weight.dtype
    torch.int8
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
from torch import nn

FrozenBits = Literal["int8", "nf4"]
KEEP = ("classifier", "qa_outputs", "lm_head")


def quantize_frozen(model: nn.Module, bits: FrozenBits, keep: Sequence[str] = KEEP) -> list[str]:
    """Replace the ``nn.Linear`` layers of a frozen ``model`` (except those whose name has a ``keep`` part) in place.

    Returns the names of the replaced layers. The model must not require gradients.
    """
    if bits not in ("int8", "nf4"):
        raise ValueError(f"Frozen weights are 'int8' or 'nf4', got {bits!r}.")
    if any(p.requires_grad for p in model.parameters()):
        raise ValueError("quantize_frozen is for frozen models: call model.requires_grad_(False) first.")
    import bitsandbytes as bnb

    replaced = []
    for name, layer in list(model.named_modules()):
        if type(layer) is not nn.Linear or any(part in keep for part in name.split(".")):
            continue
        weight = layer.weight.data.float()
        if bits == "int8":
            new: nn.Module = bnb.nn.Linear8bitLt(
                layer.in_features, layer.out_features, bias=layer.bias is not None, has_fp16_weights=False, threshold=0
            )
            new.weight = bnb.nn.Int8Params(weight, requires_grad=False, has_fp16_weights=False)
        else:
            new = bnb.nn.Linear4bit(
                layer.in_features, layer.out_features, bias=layer.bias is not None, compute_dtype=torch.float32,
                quant_type="nf4",
            )  # fmt: skip
            new.weight = bnb.nn.Params4bit(weight, requires_grad=False, quant_type="nf4")
        if layer.bias is not None:
            new.bias = nn.Parameter(layer.bias.data.float(), requires_grad=False)
        model.set_submodule(name, new)
        replaced.append(name)
    if not replaced:
        raise ValueError(f"quantize_frozen found no nn.Linear layer outside {list(keep)} in {type(model).__name__}.")
    return replaced
