"""Fake quantization that simulates, bit for bit, the int8 kernel the export runs on CPU.

The exported model uses PyTorch's dynamic int8 Linear kernel (``torch.ops.quantized.linear_dynamic``,
fbgemm/x86): weights are int8, symmetric, one scale per output channel; activations are quantized
per tensor, asymmetric, with a range measured on each call, and on x86 to 7 bits (``reduce_range``)
to avoid overflow in the AVX2 multiply-add. Training with exactly that rounding (straight-through
gradients, from PyTorch's ``fake_quantize_*`` ops) is what makes the exported logits match.

Example:
    >>> import torch
    >>> w = torch.tensor([[0.5, -1.0], [0.02, 0.01]])
    >>> scales = weight_scales(w)
    >>> torch.allclose(scales, torch.tensor([1.0, 0.02]) / 127.5)
    True
    >>> fake_quant_weight(w, scales)[0].tolist()
    [0.501960813999176, -0.9960784912109375]
"""

from __future__ import annotations

import torch
from torch import Tensor

WEIGHT_QMIN, WEIGHT_QMAX = -128, 127
EPS = torch.finfo(torch.float32).eps


def reduce_range() -> bool:
    """Whether the CPU kernel quantizes activations to 7 bits (x86/fbgemm do; ARM's qnnpack does not)."""
    return torch.backends.quantized.engine in ("x86", "fbgemm", "onednn")


def activation_qmax() -> int:
    return 127 if reduce_range() else 255


def weight_scales(weight: Tensor) -> Tensor:
    """One symmetric scale per output channel: ``max|w| / 127.5`` (as PyTorch's per-channel observer)."""
    amax = weight.detach().abs().amax(dim=1).float()
    return (amax / ((WEIGHT_QMAX - WEIGHT_QMIN) / 2)).clamp_min(EPS)


def fake_quant_weight(weight: Tensor, scales: Tensor) -> Tensor:
    """Round ``weight`` to the int8 grid of ``scales`` and back, with a straight-through gradient."""
    zero_points = torch.zeros_like(scales, dtype=torch.int32)
    return torch.fake_quantize_per_channel_affine(
        weight, scales.to(weight.device), zero_points.to(weight.device), 0, WEIGHT_QMIN, WEIGHT_QMAX
    )


def activation_qparams(x: Tensor) -> tuple[float, int]:
    """The kernel's per-tensor scale and zero point for ``x`` (its range always includes 0)."""
    return torch._choose_qparams_per_tensor(x.detach().float(), reduce_range())


def fake_quant_activation(x: Tensor) -> Tensor:
    """Dynamic per-tensor asymmetric fake quantization of an activation, with a straight-through gradient."""
    scale, zero_point = activation_qparams(x)
    return torch.fake_quantize_per_tensor_affine(x, scale, zero_point, 0, activation_qmax())
