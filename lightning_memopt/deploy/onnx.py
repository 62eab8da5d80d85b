"""ONNX export of a ``transformers`` encoder, checked against the torch model before it is kept.

``torch.onnx.export(dynamo=True)`` at opset 18 writes ``model.onnx`` with dynamic batch and sequence axes
(Optimum's exporter pins an older ``transformers``). Every export ends with a parity check on a fixed
batch of real English sentences, run by ONNX Runtime: float32 logits within ``1e-4`` (max abs) of the
torch model, and for int8 exports (ONNX Runtime's own post-training quantization: dynamic, or static QDQ when
calibration sentences are given; per-channel weights) the same argmax for at least 99.5 % of the positions. A failed check fails the export; nothing is written.
A model trained with ``OpenVINOQuantizationAwareTraining`` is written as QuantizeLinear/DequantizeLinear pairs
carrying its trained scales (:func:`export_qdq_graph`), its weights stored as int8 (:func:`fold_quantized_weights`),
and checked against the quantized torch model.

Needs the ``deploy`` extra: ``pip install 'lightning-memopt[deploy]'`` (onnx, onnxscript, onnxruntime).

Example:
    >>> write_onnx(model, tokenizer, "exported/ner-onnx")  # doctest: +SKIP
"""

from __future__ import annotations

import importlib.util
import inspect
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from lightning_memopt.quantization.openvino_qat import holds_trained_quantizers, onnx_qdq_export

ONNX_FILE = "model.onnx"
OPSET = 18
FP32_TOLERANCE = 1e-4
INT8_AGREEMENT = 0.995
EXTRA = "deploy"
INPUTS = ("input_ids", "attention_mask", "token_type_ids")
CALIBRATION_SIZE = 300  # sentences a post-training int8 export calibrates on, at most
# A fixed batch of real sentences of different lengths (newswire, reviews, questions) for the parity check.
PARITY_SENTENCES = (
    "EU rejects German call to boycott British lamb .",
    "Peter Blackburn reported from Brussels on Thursday .",
    "the film is a charming and often affecting journey .",
    "unflinchingly bleak and desperate",
    "What is the capital city of Peru ?",
    "Japan began the defence of their Asian Cup title with a lucky 2-1 win against Syria .",
    "it 's a cookie-cutter movie , a cut-and-paste job .",
    "Nadim Ladki",
)


@dataclass(frozen=True)
class Parity:
    """How closely the exported model follows the torch model on the parity batch."""

    max_abs_diff: float
    argmax_agreement: float
    positions: int


def require_deploy_extra(*modules: str) -> None:
    """Import the runtimes a format needs, or say which extra installs them."""
    missing = [name for name in modules if importlib.util.find_spec(name) is None]
    if missing:
        raise ModuleNotFoundError(
            f"This export format needs {', '.join(missing)}: pip install 'lightning-memopt[{EXTRA}]'."
        )


def model_input_names(model: nn.Module) -> list[str]:
    """The encoder inputs the model's ``forward`` takes, among ``input_ids``, ``attention_mask``, ``token_type_ids``."""
    accepted = inspect.signature(model.forward).parameters
    names = [name for name in INPUTS if name in accepted]
    if getattr(getattr(model, "config", None), "type_vocab_size", 0) in (0, 1) and "token_type_ids" in names:
        names.remove("token_type_ids")  # RoBERTa-style models have one segment: nothing to feed
    return names


class LogitsOnly(nn.Module):
    """The model with positional inputs and the logits as its one output: what the ONNX graph computes."""

    def __init__(self, model: nn.Module, names: list[str]) -> None:
        super().__init__()
        self.model, self.names = model, names

    def forward(self, *inputs: torch.Tensor) -> torch.Tensor:
        return logits_of(self.model(**dict(zip(self.names, inputs, strict=True))))


def logits_of(output: Any) -> torch.Tensor:
    """A model's logits: ``output.logits`` (transformers), or the tensor a plain module returns."""
    return output if isinstance(output, torch.Tensor) else output.logits


def parity_batch(tokenizer: Any, names: list[str]) -> dict[str, torch.Tensor]:
    """The parity sentences, tokenized and padded, as the model's named inputs."""
    encoded = tokenizer(list(PARITY_SENTENCES), padding=True, return_tensors="pt")
    zeros = torch.zeros_like(encoded["input_ids"])
    return {name: encoded.get(name, zeros) for name in names}


def export_graph(model: nn.Module, names: list[str], example: dict[str, torch.Tensor], path: Path) -> None:
    """Write the ONNX graph of ``model`` with dynamic batch and sequence axes."""
    batch = torch.export.Dim("batch", min=1, max=4096)
    sequence = torch.export.Dim("sequence", min=2, max=8192)
    program = torch.onnx.export(
        LogitsOnly(model, names).eval(),
        tuple(example[name] for name in names),
        dynamo=True,
        opset_version=OPSET,
        input_names=names,
        output_names=["logits"],
        dynamic_shapes=(tuple({0: batch, 1: sequence} for _ in names),),  # one entry: the *inputs tuple
        verbose=False,
    )
    program.save(str(path))


def export_qdq_graph(model: nn.Module, names: list[str], example: dict[str, torch.Tensor], path: Path) -> None:
    """Write an NNCF-quantized model as ONNX QuantizeLinear/DequantizeLinear pairs carrying its trained scales.

    ``torch.export`` cannot trace NNCF's quantizers (they read their levels as Python numbers), so this graph
    comes from the TorchScript exporter (``dynamo=False``), NNCF's own export path.
    """
    with onnx_qdq_export(model), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the tracer's notes on NNCF's constant levels and the exporter's deprecation
        torch.onnx.export(
            LogitsOnly(model, names).eval(),
            tuple(example[name] for name in names),
            str(path),
            dynamo=False,
            opset_version=OPSET,
            input_names=names,
            output_names=["logits"],
            dynamic_axes={name: {0: "batch", 1: "sequence"} for name in names},
        )


def fold_quantized_weights(path: Path) -> None:
    """Store a QDQ graph's quantized constants (its weights) as int8 initializers, in place: ONNX Runtime's
    constant folding at its basic, hardware-independent level (standard ONNX operations only) turns each
    QuantizeLinear of a float weight into the int8 tensor it computes, and keeps the DequantizeLinear after it, so
    the graph computes the same logits from a quarter of the weight bytes."""
    import onnxruntime as ort

    folded = path.with_name(f"{path.stem}.folded.onnx")
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    options.optimized_model_filepath = str(folded)
    ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    folded.replace(path)


def run_onnx(path: Path, batch: dict[str, torch.Tensor], threads: int | None = None) -> np.ndarray:
    """The logits ONNX Runtime computes for ``batch``."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    if threads:
        options.intra_op_num_threads = threads
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    feed = {inp.name: batch[inp.name].numpy() for inp in session.get_inputs()}
    return session.run(["logits"], feed)[0]


def measure_parity(reference: np.ndarray, exported: np.ndarray, mask: np.ndarray) -> Parity:
    """Max abs logit difference and argmax agreement over the unpadded positions (or rows).

    >>> logits = np.array([[[1.0, 0.0], [0.0, 1.0]]])
    >>> measure_parity(logits, logits + 1e-6, np.array([[1, 1]]))
    Parity(max_abs_diff=1e-06, argmax_agreement=1.0, positions=2)
    """
    if reference.ndim == 3:  # token classification: compare real tokens only
        keep = mask.astype(bool)
        reference, exported = reference[keep], exported[keep]
    difference = float(np.abs(reference - exported).max())
    agreement = float((reference.argmax(-1) == exported.argmax(-1)).mean())
    return Parity(round(difference, 9), agreement, int(reference.shape[0]))


def cpu_has_int8_dot_product() -> bool | None:
    """Whether this CPU has an int8 dot-product instruction (AVX-512 VNNI, AVX-VNNI or AMX); ``None`` where
    ``/proc/cpuinfo`` cannot tell. Without one, x86 int8 kernels multiply-add through 16-bit intermediates that
    can saturate, so the same int8 model can be less accurate there than on a VNNI CPU."""
    info = Path("/proc/cpuinfo")
    if not info.exists():
        return None
    return bool({"avx512_vnni", "avx_vnni", "amx_int8"} & set(info.read_text().split()))


def check_parity(parity: Parity, int8: bool, min_agreement: float = INT8_AGREEMENT) -> None:
    if int8 and parity.argmax_agreement < min_agreement:
        saturation = (
            " This CPU has no VNNI or AMX: its int8 kernels can saturate where a VNNI CPU's do not, so the model may "
            "agree better where you deploy; check its accuracy there and lower --min_agreement if it holds."
            if cpu_has_int8_dot_product() is False
            else ""
        )
        raise ValueError(
            f"The int8 model picks the torch model's label for only {parity.argmax_agreement:.1%} of "
            f"{parity.positions} parity positions (needs {min_agreement:.1%}, --min_agreement); the export was not "
            f"written. Train with QuantizationAwareTraining, or export float32.{saturation}"
        )
    if not int8 and parity.max_abs_diff > FP32_TOLERANCE:
        raise ValueError(
            f"The exported model's logits differ from torch's by up to {parity.max_abs_diff:.2e} (limit "
            f"{FP32_TOLERANCE:.0e}) on the parity batch; the export was not written. Please report this model."
        )


def quantize_dynamic_int8(source: Path, target: Path) -> None:
    """ONNX Runtime's own post-training dynamic int8: per-channel int8 weights of MatMul, activations at run time."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    quantize_dynamic(
        str(source), str(target), per_channel=True, weight_type=QuantType.QInt8, op_types_to_quantize=["MatMul"]
    )


def calibration_batches(tokenizer: Any, names: list[str], texts: Sequence[str]) -> list[dict[str, np.ndarray]]:
    """One-example batches of the first :data:`CALIBRATION_SIZE` ``texts`` as the model's inputs (numpy int64)."""
    items = []
    for text in list(texts)[:CALIBRATION_SIZE]:
        encoded = tokenizer(text, return_tensors="np", truncation=True, max_length=128)
        zeros = np.zeros_like(encoded["input_ids"])
        items.append({name: encoded.get(name, zeros).astype(np.int64) for name in names})
    return items


def quantize_static_int8(source: Path, target: Path, batches: Sequence[dict[str, np.ndarray]]) -> None:
    """ONNX Runtime's own post-training static int8 as a QDQ graph: per-channel int8 MatMul weights, per-tensor
    uint8 activations whose ranges (min/max) are measured on ``batches``."""
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.items = iter(batches)

        def get_next(self) -> dict[str, np.ndarray] | None:
            return next(self.items, None)

    quantize_static(
        str(source),
        str(target),
        Reader(),
        quant_format=QuantFormat.QDQ,
        per_channel=True,
        weight_type=QuantType.QInt8,
        activation_type=QuantType.QUInt8,
        op_types_to_quantize=["MatMul"],
    )


def reference_logits(model: nn.Module, tokenizer: Any) -> tuple[list[str], dict[str, torch.Tensor], np.ndarray]:
    """The model's input names, the parity batch and the model's own logits on it (float32, eval mode)."""
    model.eval().float()
    names = model_input_names(model)
    batch = parity_batch(tokenizer, names)
    with torch.no_grad():
        return names, batch, logits_of(model(**batch)).numpy()


def checked_parity(
    reference: np.ndarray, exported: np.ndarray, batch: dict[str, torch.Tensor], int8: bool, min_agreement: float
) -> Parity:
    """:func:`measure_parity` on the batch's real tokens, refused by :func:`check_parity` when off."""
    parity = measure_parity(reference, exported, batch["attention_mask"].numpy())
    check_parity(parity, int8, min_agreement)
    return parity


def write_onnx(
    model: nn.Module,
    tokenizer: Any,
    folder: Path,
    int8: bool = False,
    min_agreement: float = INT8_AGREEMENT,
    calibration: Sequence[str] | None = None,
) -> Parity:
    """``folder/model.onnx`` (float32; ONNX Runtime's dynamic int8, or its static int8 calibrated on the
    ``calibration`` sentences; or the QDQ graph of a model holding NNCF's trained quantizers), after the parity
    check passes."""
    require_deploy_extra("onnx", "onnxscript", "onnxruntime")
    trained = holds_trained_quantizers(model, int8)
    names, batch, reference = reference_logits(model, tokenizer)
    target = folder / ONNX_FILE
    if trained:
        export_qdq_graph(model, names, batch, target)
        fold_quantized_weights(target)
    elif int8:
        float_path = folder / "model.fp32.onnx"
        export_graph(model, names, batch, float_path)
        if calibration:
            quantize_static_int8(float_path, target, calibration_batches(tokenizer, names, calibration))
        else:
            quantize_dynamic_int8(float_path, target)
        for leftover in folder.glob("model.fp32.onnx*"):  # the float graph and any external data beside it
            leftover.unlink()
    else:
        export_graph(model, names, batch, target)
    return checked_parity(reference, run_onnx(target, batch), batch, int8, min_agreement)
