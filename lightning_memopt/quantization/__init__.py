"""Quantization-aware training: fake quantization matching the int8 CPU kernel, the callback, int8 export."""

from lightning_memopt.quantization.callback import QuantizationAwareTraining
from lightning_memopt.quantization.export import Int8Report, convert_to_int8, load_int8, save_int8
from lightning_memopt.quantization.modules import FakeQuantConv1D, FakeQuantLinear, Int8DynamicLinear

__all__ = [
    "FakeQuantConv1D",
    "FakeQuantLinear",
    "Int8DynamicLinear",
    "Int8Report",
    "QuantizationAwareTraining",
    "convert_to_int8",
    "load_int8",
    "save_int8",
]
