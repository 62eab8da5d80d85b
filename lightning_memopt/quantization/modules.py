"""The layers of QAT: linear layers that fake-quantize while training and run real int8 once exported, and
word embeddings (opt-in) stored as int8 rows with one scale per row.

``FakeQuantLinear`` is an ``nn.Linear`` whose class is swapped in place (:func:`prepare`), so the
parameters, their names, the optimizer's references and the checkpoint keys stay exactly those of
the plain model: a QAT checkpoint loads into the unmodified module, and the QAT state (on/off, frozen
weight scales) lives in the callback's checkpoint state instead.

``Int8DynamicLinear`` holds int8 weights, per-channel scales and a float bias as plain tensors (so
it saves to safetensors and loads without pickled code) and runs PyTorch's dynamic int8 kernel.

``FakeQuantEmbedding`` rounds the looked-up rows to the int8 grid of their row's scale (``max|row| / 127.5``),
and ``Int8Embedding`` stores the table that way: a quarter of the float32 bytes, each value within half a
step (``scale / 2``) of the float one. A lookup needs no int8 arithmetic, so this saves size, not time.

Example:
    >>> import torch
    >>> layer = torch.nn.Linear(4, 3)
    >>> prepare(torch.nn.Sequential(layer), lambda module, name: True)
    ['0']
    >>> type(layer).__name__, layer.fake_quant
    ('FakeQuantLinear', True)
    >>> int8 = Int8DynamicLinear.from_linear(layer)
    >>> x = torch.randn(2, 4)
    >>> torch.allclose(int8(x), layer(x), atol=1e-4)
    True
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers.pytorch_utils import Conv1D

from lightning_memopt.core.compat import int8_linear_dynamic, legacy_int8_kernel, pack_int8_linear
from lightning_memopt.core.filters import linear_shape, linear_weight
from lightning_memopt.quantization.fake_quant import (
    WEIGHT_QMAX,
    WEIGHT_QMIN,
    fake_quant_activation,
    fake_quant_weight,
    reduce_range,
    weight_scales,
)

log = logging.getLogger(__name__)
LEGACY = "PyTorch's legacy dynamic int8 kernel"
REFERENCE = "reference int8 (int8 rounding computed in float: no speed-up)"
_backend: str | None = None


def int8_backend() -> str:
    """Which kernel ``Int8DynamicLinear`` runs on; said once in the log when the legacy kernel is gone."""
    global _backend
    if _backend is None:
        _backend = LEGACY if legacy_int8_kernel() else REFERENCE
        if _backend == REFERENCE:
            log.warning(
                "PyTorch's legacy int8 kernel (torch.ops.quantized) is not available: int8 layers run the %s. For "
                "int8 speed, export with memopt export --format openvino (or onnx) --int8.",
                REFERENCE,
            )
    return _backend


class FakeQuantLinear(nn.Linear):
    """``nn.Linear`` that, while ``fake_quant`` is on, computes with int8-rounded weights and activations."""

    fake_quant: bool
    frozen_scales: Tensor | None

    def scales(self) -> Tensor:
        """The weight scales in use: frozen ones, or measured from the current weights."""
        return self.frozen_scales if self.frozen_scales is not None else weight_scales(self.weight)

    def forward(self, x: Tensor) -> Tensor:
        if not self.fake_quant:
            return F.linear(x, self.weight, self.bias)
        weight = fake_quant_weight(self.weight, self.scales())
        return F.linear(fake_quant_activation(x), weight, self.bias)


class FakeQuantConv1D(Conv1D):
    """GPT-2's ``Conv1D`` (weight stored ``(in, out)``) fake-quantized like :class:`FakeQuantLinear`: scales per output."""

    fake_quant: bool
    frozen_scales: Tensor | None

    def scales(self) -> Tensor:
        return self.frozen_scales if self.frozen_scales is not None else weight_scales(self.weight.t())

    def forward(self, x: Tensor) -> Tensor:
        if not self.fake_quant:
            return super().forward(x)
        weight = fake_quant_weight(self.weight.t(), self.scales())
        return F.linear(fake_quant_activation(x), weight, self.bias)


class FakeQuantEmbedding(nn.Embedding):
    """``nn.Embedding`` whose looked-up rows, while ``fake_quant`` is on, are rounded to int8 with one scale per row
    (the scales of the whole table are measured, the rounding touches only the rows looked up)."""

    fake_quant: bool
    frozen_scales: Tensor | None

    def scales(self) -> Tensor:
        return self.frozen_scales if self.frozen_scales is not None else weight_scales(self.weight)

    def forward(self, ids: Tensor) -> Tensor:
        rows = super().forward(ids)
        if not self.fake_quant:
            return rows
        flat = rows.reshape(-1, self.embedding_dim)
        rounded = fake_quant_weight(flat, self.scales()[ids.reshape(-1)])
        return rounded.reshape(rows.shape)


FAKE_QUANT = {nn.Linear: FakeQuantLinear, Conv1D: FakeQuantConv1D, nn.Embedding: FakeQuantEmbedding}


def prepare(model: nn.Module, module_filter: Callable[[nn.Module, str], bool]) -> list[str]:
    """Turn the selected layers (``nn.Linear``, ``Conv1D``, ``nn.Embedding``) into fake-quantized ones in place;
    return their names."""
    names = []
    for name, module in model.named_modules():
        if type(module) in FAKE_QUANT and module_filter(module, name):
            module.__class__ = FAKE_QUANT[type(module)]
            module.fake_quant = True
            module.frozen_scales = None
            names.append(name)
        elif isinstance(module, tuple(FAKE_QUANT.values())) and module_filter(module, name):
            names.append(name)  # prepared before (a second fit on the same module)
    return names


class Int8DynamicLinear(nn.Module):
    """A Linear with int8 weights (per-channel symmetric) and dynamically quantized int8 activations."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.register_buffer("weight", torch.zeros(out_features, in_features, dtype=torch.int8))
        self.register_buffer("weight_scale", torch.ones(out_features))
        self.register_buffer("bias", torch.zeros(out_features) if bias else None)
        self._packed: object | None = None  # the kernel's packed weights, made on first use

    @classmethod
    def from_linear(cls, linear: nn.Module, scales: Tensor | None = None) -> Int8DynamicLinear:
        """Quantize a linear layer's (``nn.Linear`` or ``Conv1D``) weights with ``scales`` (default: its QAT
        scales, or measured ones)."""
        weight = linear_weight(linear).detach().float().cpu()
        if scales is None:
            scales = linear.scales() if hasattr(linear, "scales") else weight_scales(weight)
        new = cls(*linear_shape(linear), linear.bias is not None)
        scales = scales.detach().float().cpu()
        # The same rounding as training's fake quantization, then the grid index.
        rounded = fake_quant_weight(weight, scales)
        new.weight.copy_(torch.round(rounded / scales[:, None]).clamp(WEIGHT_QMIN, WEIGHT_QMAX).to(torch.int8))
        new.weight_scale.copy_(scales)
        if linear.bias is not None:
            new.bias.copy_(linear.bias.detach().float().cpu())
        return new

    def dequantized_weight(self) -> Tensor:
        return self.weight.float() * self.weight_scale[:, None]

    def _load_from_state_dict(self, *args: Any, **kwargs: Any) -> None:
        self._packed = None  # new weights: pack again
        super()._load_from_state_dict(*args, **kwargs)

    def _packed_params(self) -> object:
        if self._packed is None:
            self._packed = pack_int8_linear(self.weight, self.weight_scale, self.bias)
        return self._packed

    def forward(self, x: Tensor) -> Tensor:
        shape = x.shape
        flat = x.reshape(-1, shape[-1]).float()
        if int8_backend() == LEGACY:
            out = int8_linear_dynamic(flat, self._packed_params(), reduce_range())
        else:  # the same int8 rounding of weights and activations, computed in float
            out = F.linear(fake_quant_activation(flat), self.dequantized_weight(), self.bias)
        return out.reshape(*shape[:-1], self.out_features).to(x.dtype)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int8 dynamic"


class Int8Embedding(nn.Module):
    """A word-embedding table stored as int8 rows, one float scale per row; looked-up rows come back in float."""

    def __init__(self, num_embeddings: int, embedding_dim: int) -> None:
        super().__init__()
        self.num_embeddings, self.embedding_dim = num_embeddings, embedding_dim
        self.register_buffer("weight", torch.zeros(num_embeddings, embedding_dim, dtype=torch.int8))
        self.register_buffer("weight_scale", torch.ones(num_embeddings))

    @classmethod
    def from_embedding(cls, embedding: nn.Embedding, scales: Tensor | None = None) -> Int8Embedding:
        """Quantize an embedding table with ``scales`` (default: its QAT scales, or measured per row)."""
        weight = embedding.weight.detach().float().cpu()
        if scales is None:
            scales = embedding.scales() if hasattr(embedding, "scales") else weight_scales(weight)
        scales = scales.detach().float().cpu()
        new = cls(*weight.shape)
        rounded = fake_quant_weight(weight, scales)  # the rounding training saw, then the grid index
        new.weight.copy_(torch.round(rounded / scales[:, None]).clamp(WEIGHT_QMIN, WEIGHT_QMAX).to(torch.int8))
        new.weight_scale.copy_(scales)
        return new

    def forward(self, ids: Tensor) -> Tensor:
        return F.embedding(ids, self.weight).float() * self.weight_scale[ids].unsqueeze(-1)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, int8 rows"
