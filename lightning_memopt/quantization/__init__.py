"""Quantization-aware training: for PyTorch's dynamic int8 kernel (our fake quantization, int8 export) and for
OpenVINO's static int8 (NNCF's quantizers, trained in place)."""

from lightning_memopt.quantization.callback import QuantizationAwareTraining
from lightning_memopt.quantization.export import Int8Report, convert_to_int8, load_int8, save_int8
from lightning_memopt.quantization.modules import (
    FakeQuantConv1D,
    FakeQuantEmbedding,
    FakeQuantLinear,
    Int8DynamicLinear,
    Int8Embedding,
)
from lightning_memopt.quantization.openvino_qat import OpenVINOQuantizationAwareTraining

__all__ = [
    "FakeQuantConv1D",
    "FakeQuantEmbedding",
    "FakeQuantLinear",
    "Int8DynamicLinear",
    "Int8Embedding",
    "Int8Report",
    "OpenVINOQuantizationAwareTraining",
    "QuantizationAwareTraining",
    "convert_to_int8",
    "load_int8",
    "save_int8",
]
