"""OpenVINO IR export: the torch model converted by OpenVINO, float32 or int8 by NNCF post-training quantization.

``openvino_model.xml`` / ``.bin`` are written by OpenVINO's PyTorch frontend (``ov.convert_model`` on the model
itself, dynamic batch and sequence). It keeps attention as one ScaledDotProductAttention operation, which the CPU
plugin runs fused; the route through our ONNX export spelled it out as two more MatMuls per layer and ran 1.3x
slower at int8 (docs/results/deploy.md). The parity check runs OpenVINO's CPU plugin at float32 precision (it would pick bf16 on CPUs that have it):
logits within ``1e-4`` of torch. With ``int8``, NNCF's post-training quantization for transformers
(``nncf.quantize(..., model_type=TRANSFORMER)``) calibrates on sentences of your data
(``calibration``; the parity sentences if none are given, with a warning), and the int8 model must pick
torch's label on at least ``min_agreement`` of the parity positions. NNCF stores the embedding tables in int8 with
one scale per row; ``embedding_bits=4`` compresses them to int4 first (:func:`compress_embeddings`): for a small
encoder they are most of what is left (MiniLM-L6's 30,522 x 384 word embeddings are 11.7 MB of its 22.9 MB int8 IR).

A model trained with :class:`~lightning_memopt.quantization.OpenVINOQuantizationAwareTraining` already holds
NNCF's quantizers with their trained scales: it is converted from torch directly (``ov.convert_model`` reads the
quantizers as FakeQuantize operations; ``ov.save_model`` stores the weights as int8), with no second calibration,
and checked against the torch model it was trained as.

Needs ``pip install 'lightning-memopt[deploy]'`` (openvino and nncf besides the ONNX tools).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from lightning_memopt.core.models import model_from_checkpoint
from lightning_memopt.deploy.onnx import (
    CALIBRATION_SIZE,
    INT8_AGREEMENT,
    PARITY_SENTENCES,
    Parity,
    calibration_batches,
    checked_parity,
    parity_batch,
    reference_logits,
    require_deploy_extra,
)
from lightning_memopt.quantization.openvino_qat import HOOKS, holds_trained_quantizers, load_quantized

log = logging.getLogger(__name__)
OPENVINO_FILE = "openvino_model.xml"
EMBEDDING_BITS = (8, 4)
EMBEDDING_GROUP = 128  # values of an embedding row sharing one int4 scale and zero point (NNCF's usual group)


def compress_embeddings(converted: Any, bits: int) -> Any:
    """The IR ``converted`` with its embedding tables (the weights its Gather operations read) compressed to
    ``bits`` by NNCF's weight compression, its MatMul weights left for the int8 quantization that follows.

    4 bits: asymmetric int4 with an fp16 scale and a 4-bit zero point for every :data:`EMBEDDING_GROUP` values of a
    row (``nncf.CompressWeightsMode.INT4_ASYM``; one group a row when the width is not a multiple of it), 0.52
    bytes a value for int8's 1.01; the CPU plugin reads the int4 rows as it gathers them. On the 3-layer MiniLM NER
    student of ``recipes/compress/ner-tiny.yaml`` (CoNLL-2003 dev F1, int8 everywhere else): int8 rows 0.8860,
    int4 groups of 128 0.8872, of 64 0.8879 (0.23 MB more), whole rows 0.8808, symmetric groups of 64 0.8834.
    8 bits: ``converted`` unchanged (NNCF's int8 quantization stores the tables as int8, a scale a row).
    """
    if bits not in EMBEDDING_BITS:
        raise ValueError(f"embedding_bits is one of {EMBEDDING_BITS}, got {bits!r}.")
    if bits == 8:
        return converted
    import nncf

    tables = [
        op.input_value(0).get_partial_shape() for op in converted.get_ordered_ops() if op.get_type_name() == "Gather"
    ]
    widths = {shape[1].get_length() for shape in tables if shape.is_static and shape.rank.get_length() == 2}
    group = EMBEDDING_GROUP if all(width % EMBEDDING_GROUP == 0 for width in widths) else -1
    return nncf.compress_weights(
        converted, mode=nncf.CompressWeightsMode.INT4_ASYM, group_size=group, ratio=1.0, all_layers=True,
        ignored_scope=nncf.IgnoredScope(types=["MatMul"]),
    )  # fmt: skip


def compile_openvino(path: Path, precision: str | None = None, threads: int | None = None) -> Any:
    """The IR at ``path`` compiled for the CPU; ``precision`` ``"f32"`` forces float32 (default: the plugin's choice)."""
    import openvino as ov

    config: dict[str, Any] = {}
    if precision:
        config["INFERENCE_PRECISION_HINT"] = precision
    if threads:
        config["INFERENCE_NUM_THREADS"] = threads
    return ov.Core().compile_model(str(path), "CPU", config)


def run_openvino(compiled: Any, batch: dict[str, torch.Tensor | np.ndarray]) -> np.ndarray:
    feed = {port.any_name: np.asarray(batch[port.any_name]) for port in compiled.inputs}
    return np.asarray(compiled(feed)[compiled.output(0)])


def write_openvino(
    model: nn.Module,
    tokenizer: Any,
    folder: Path,
    int8: bool = False,
    calibration: Sequence[str] | None = None,
    min_agreement: float = INT8_AGREEMENT,
    embedding_bits: int = 8,
) -> Parity:
    """``folder/openvino_model.xml`` (float32, or NNCF int8, its embeddings in ``embedding_bits``), after the parity
    check passes."""
    require_deploy_extra("onnx", "onnxscript", "openvino", *(["nncf"] if int8 else []))
    import openvino as ov

    trained = holds_trained_quantizers(model, int8)
    if embedding_bits != 8 and not (int8 and not trained):
        raise ValueError(
            f"--embedding_bits {embedding_bits} compresses the embeddings of NNCF's post-training int8 export; give "
            "--int8 true (a model trained with OpenVINOQuantizationAwareTraining keeps its own int8 embeddings)."
        )
    names, batch, reference = reference_logits(model, tokenizer)
    # A model with trained quantizers: they and their scales become the IR's FakeQuantize operations.
    converted = ov.convert_model(model, example_input=dict(batch))
    if trained:
        return _saved_and_checked(converted, folder, batch, reference, min_agreement)
    if int8:
        import nncf

        if not calibration:
            log.warning(
                "No calibration sentences given: NNCF calibrates on the %d parity sentences.", len(PARITY_SENTENCES)
            )
            calibration = PARITY_SENTENCES
        dataset = nncf.Dataset(calibration_batches(tokenizer, names, calibration))
        converted = nncf.quantize(
            compress_embeddings(converted, embedding_bits),
            dataset,
            model_type=nncf.ModelType.TRANSFORMER,
            subset_size=CALIBRATION_SIZE,
        )
    return _saved_and_checked(converted, folder, batch, reference, min_agreement, int8)


def _saved_and_checked(
    converted: Any,
    folder: Path,
    batch: dict[str, torch.Tensor],
    reference: np.ndarray,
    min_agreement: float,
    int8: bool = True,
) -> Parity:
    import openvino as ov

    target = folder / OPENVINO_FILE
    ov.save_model(converted, str(target), compress_to_fp16=False)
    exported = run_openvino(compile_openvino(target, precision="f32"), {k: v.numpy() for k, v in batch.items()})
    return checked_parity(reference, exported, batch, int8, min_agreement)


def openvino_qat_model(
    ckpt_path: Path, state: dict[str, Any], source: str | None, prefix: str | None
) -> tuple[nn.Module, str, str]:
    """(quantized model, its source, prefix) of a checkpoint of an ``OpenVINOQuantizationAwareTraining`` run.

    The plain model is found as for any checkpoint (the quantizers' keys left out), quantized again on the
    parity sentences with the inputs the run used, and the checkpoint's weights and quantizers loaded over it.
    """
    from transformers import AutoTokenizer

    require_deploy_extra("nncf")
    found = model_from_checkpoint(ckpt_path, source, prefix or f"{state['attribute']}.", ignore=HOOKS)
    own = {**found.model.state_dict(), **found.ignored}  # the checkpoint's weights and quantizers, read once
    example = parity_batch(AutoTokenizer.from_pretrained(found.source), list(state["inputs"]))
    return load_quantized(found.model, own, example), found.source, found.prefix
