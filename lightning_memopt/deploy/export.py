"""Export the model of any LightningModule's checkpoint as a folder: float, shrunk, sparse or int8.

The folder is written whole or not at all (:func:`~lightning_memopt.core.atomic_io.atomic_folder`):
an existing export is never mixed with a new one, and a ``manifest.json`` records what was exported,
from which checkpoint (with its SHA-256), by which command and package version.

Example:
    >>> export_checkpoint("runs/ner/checkpoints/last.ckpt", "exported/ner", int8=True)  # doctest: +SKIP
"""

from __future__ import annotations

import hashlib
import json
import sys
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from torch import nn

from lightning_memopt.core.atomic_io import atomic_folder
from lightning_memopt.core.checkpoints import read_checkpoint
from lightning_memopt.core.models import model_from_checkpoint
from lightning_memopt.core.sources import resolve_pretrained
from lightning_memopt.core.sparse_format import save_sparse
from lightning_memopt.deploy.onnx import CALIBRATION_SIZE, Parity
from lightning_memopt.pruning.structured import shrink_pruned
from lightning_memopt.quantization.export import checkpoint_qat_state, convert_with_qat_state, save_int8
from lightning_memopt.quantization.openvino_qat import checkpoint_openvino_qat_state, quantizer_count
from lightning_memopt.tasks.modules import TASK_CLASSES, TASK_KEY, load_task_checkpoint

MANIFEST = "manifest.json"


@dataclass
class ExportResult:
    """Where an export went and what it says about itself (the manifest's content)."""

    folder: Path
    manifest: dict[str, Any] = field(default_factory=dict)
    lines: list[str] = field(default_factory=list)  # what the export did, for people


def checkpoint_sha256(path: Path) -> str:
    """SHA-256 of a checkpoint file, or of a sharded folder's files (names and contents, in name order)."""
    digest = hashlib.sha256()
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    for file in files:
        if path.is_dir():
            digest.update(str(file.relative_to(path)).encode())
        with open(file, "rb") as stream:
            for block in iter(lambda: stream.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


FORMATS = ("transformers", "onnx", "openvino")
NAMES = {"onnx": "ONNX", "openvino": "OpenVINO"}


def format_name(format: str, int8: bool) -> str:
    """What the manifest calls an export.

    >>> format_name("transformers", True), format_name("onnx", True), format_name("openvino", False)
    ('int8', 'onnx-int8', 'openvino')
    """
    if not int8:
        return format
    return "int8" if format == "transformers" else f"{format}-int8"


def check_flags(int8: bool, sparse: bool, shrink: bool, format: str = "transformers", embedding_bits: int = 8) -> None:
    """Refuse export options that cannot be honoured together."""
    if format not in FORMATS:
        raise ValueError(f"--format {format!r} is not one of {', '.join(FORMATS)}.")
    if embedding_bits not in (8, 4):
        raise ValueError(f"--embedding_bits is 8 or 4, got {embedding_bits!r}.")
    if embedding_bits != 8 and not (format == "openvino" and int8):
        raise ValueError(
            f"--embedding_bits {embedding_bits} compresses the embedding tables of an OpenVINO int8 export; add "
            "--format openvino --int8 true, or leave --embedding_bits at 8."
        )
    if format in ("onnx", "openvino"):
        if sparse:
            raise ValueError(
                f"--sparse writes a packed safetensors copy beside a transformers folder; an {NAMES[format]} graph holds "
                "dense weights. Drop --sparse, or export with --format transformers."
            )
        return
    if int8 and shrink:
        raise ValueError(
            "--int8 cannot be combined with --shrink: the int8 export keeps the model's shape. Export the shrunk "
            "folder first (--shrink true), then its int8 form with --format openvino or onnx (memopt compress does)."
        )


def model_of(
    ckpt_path: Path, meta: dict[str, Any], model_source: str | None, prefix: str | None
) -> tuple[nn.Module, str, str]:
    """(model, tokenizer source, prefix of the model in the module) of a checkpoint of any LightningModule."""
    if (trained := checkpoint_openvino_qat_state(meta)) is not None:
        from lightning_memopt.deploy.openvino import openvino_qat_model

        return openvino_qat_model(ckpt_path, trained, model_source, prefix)
    if meta.get(TASK_KEY) in TASK_CLASSES and model_source is None and prefix is None:
        module = load_task_checkpoint(ckpt_path)
        return module.model, resolve_pretrained(module.model_name_or_path), "model."
    found = model_from_checkpoint(ckpt_path, source=model_source, prefix=prefix)
    return found.model, found.source, found.prefix


def export_checkpoint(
    ckpt_path: str | Path,
    output_dir: str | Path,
    *,
    int8: bool = False,
    sparse: bool = False,
    shrink: bool = False,
    overwrite: bool = False,
    model_source: str | None = None,
    prefix: str | None = None,
    format: str = "transformers",
    min_agreement: float = 0.995,
    calibration: list[str] | None = None,
    embedding_bits: int = 8,
) -> ExportResult:
    """Write the model in ``ckpt_path`` (any LightningModule's checkpoint) to ``output_dir``.

    Args:
        int8: int8 Linear weights (a QuantizationAwareTraining run's layers and scales, else post-training).
        sparse: also write ``model.sparse.safetensors``, pruned weights packed.
        shrink: cut structurally pruned neurons (and heads) out of the model.
        overwrite: replace an existing ``output_dir`` whole.
        model_source, prefix: for checkpoints that do not say which ``transformers`` model they hold
            (see :func:`~lightning_memopt.core.models.model_from_checkpoint`).
        format: ``"transformers"`` (a folder ``from_pretrained`` loads), ``"onnx"`` (``model.onnx``, checked
            against the torch model; with ``int8``, ONNX Runtime's dynamic int8, or its static int8 given
            ``calibration``) or ``"openvino"`` (with ``int8``,
            NNCF post-training int8, or the trained quantizers of an ``OpenVINOQuantizationAwareTraining`` run).
        min_agreement: the share of parity positions where an int8 ONNX model must pick torch's label.
        calibration: sentences a post-training int8 graph calibrates on (your training data): NNCF's for
            ``format="openvino"``, ONNX Runtime's static quantization for ``format="onnx"``.
        embedding_bits: 4 stores the embedding tables of an OpenVINO int8 export in int4
            (:func:`~lightning_memopt.deploy.openvino.compress_embeddings`); 8 keeps NNCF's int8 rows.
    """
    ckpt_path = Path(ckpt_path)
    check_flags(int8, sparse, shrink, format, embedding_bits)
    if not ckpt_path.exists():
        raise FileNotFoundError(f"--ckpt_path {ckpt_path}: no such file or folder.")
    meta = read_checkpoint(ckpt_path, tensors=False)  # everything but the weights: task, QAT state
    if checkpoint_openvino_qat_state(meta) is not None and (format == "transformers" or not int8 or shrink):
        raise ValueError(
            f"{ckpt_path} was trained with OpenVINOQuantizationAwareTraining: its model is a static int8 one with "
            "trained scales. Export it with --format openvino --int8 true (or --format onnx --int8 true for a QDQ "
            "graph), without --shrink."
        )
    model, tokenizer_source, model_prefix = model_of(ckpt_path, meta, model_source, prefix)
    source = {"checkpoint": str(ckpt_path.resolve()), "sha256": checkpoint_sha256(ckpt_path)}
    options = ExportOptions(format, int8, sparse, shrink, min_agreement, calibration, embedding_bits)
    return write_export(
        model, tokenizer_source, model_prefix, checkpoint_qat_state(meta), source, output_dir, options, overwrite
    )


def export_folder(
    model_folder: str | Path,
    output_dir: str | Path,
    *,
    int8: bool = False,
    sparse: bool = False,
    overwrite: bool = False,
    format: str = "transformers",
    min_agreement: float = 0.995,
    calibration: list[str] | None = None,
    embedding_bits: int = 8,
) -> ExportResult:
    """Write the model of an exported folder (shrunk or vocabulary-trimmed included) in ``format``.

    The options are :func:`export_checkpoint`'s; a folder holds no QAT state, so ``int8`` is post-training.
    """
    from lightning_memopt.deploy.load import load_pretrained

    check_flags(int8, sparse, False, format, embedding_bits)
    model = load_pretrained(model_folder)
    source = {"folder": str(Path(model_folder).resolve())}
    options = ExportOptions(format, int8, sparse, False, min_agreement, calibration, embedding_bits)
    return write_export(model, str(model_folder), "", None, source, output_dir, options, overwrite)


@dataclass(frozen=True)
class ExportOptions:
    """What an export writes (see :func:`export_checkpoint`)."""

    format: str = "transformers"
    int8: bool = False
    sparse: bool = False
    shrink: bool = False
    min_agreement: float = 0.995
    calibration: list[str] | None = None
    embedding_bits: int = 8


def write_export(
    model: nn.Module,
    tokenizer_source: str,
    model_prefix: str,
    qat_state: dict[str, Any] | None,
    source: dict[str, str],
    output_dir: str | Path,
    options: ExportOptions,
    overwrite: bool,
) -> ExportResult:
    """Write ``model`` to ``output_dir`` whole, as ``options`` say, with a manifest naming ``source``."""
    format, int8, sparse, shrink = options.format, options.int8, options.sparse, options.shrink
    lines: list[str] = []
    with atomic_folder(output_dir, overwrite) as folder:
        extra: dict[str, Any] = {}
        if format in ("onnx", "openvino"):
            extra["parity"] = _write_graph_folder(model, tokenizer_source, folder, options, lines)
        elif int8:
            names = convert_with_qat_state(model, qat_state, prefix=model_prefix)
            if qat_state is None:
                how = "post-training dynamic quantization (no QAT state in the checkpoint)"
            else:
                how = f"QAT layers{' with frozen weight scales' if qat_state['frozen_scales'] else ''}"
            report = save_int8(model, folder, tokenizer_source, sparse=sparse)
            lines.append(
                f"int8 {type(model).__name__}: {len(names)} Linear layers from {how}; their weights take "
                f"{report.int8_weight_bytes / 2**20:.1f} MiB for {report.fp32_weight_bytes / 2**20:.1f} MiB in float32 "
                f"({report.ratio:.1%}). Load with lightning_memopt.quantization.load_int8."
            )
            if sparse:
                lines.append(
                    f"Sparse: pruned int8 weights packed as non-zero values and a 1-bit mask; the weight file is "
                    f"{report.file_bytes / 2**20:.1f} MiB."
                )
        else:
            if shrink:
                shrunk = shrink_pruned(model, heads=True)
                lines.append(
                    f"Shrunk: {shrunk.neurons_kept} feed-forward neurons per block kept; parameters "
                    f"{shrunk.params_before:,} -> {shrunk.params_after:,} ({shrunk.params_after / shrunk.params_before:.1%})."
                )
            model.save_pretrained(folder)
            _save_tokenizer(tokenizer_source, folder, lines)
            labels = list(getattr(model.config, "id2label", {}).values())
            lines.append(f"{type(model).__name__} with labels {labels}")
            if sparse:  # float: a packed copy beside the folder plain transformers loads
                packed = save_sparse(model.state_dict(), folder / "model.sparse.safetensors")
                lines.append(
                    f"Sparse copy: {packed.file_bytes / 2**20:.1f} MiB for {packed.dense_bytes / 2**20:.1f} MiB of dense "
                    f"tensors ({packed.ratio:.1%}); {len(packed.packed)} pruned tensors packed "
                    "(lightning_memopt.pruning.load_sparse)."
                )
        manifest = {
            "format": format_name(format, int8),
            "sparse": sparse,
            "shrink": shrink,
            **({"embedding_bits": options.embedding_bits} if options.embedding_bits != 8 else {}),
            "source": source,
            "model": {"class": type(model).__name__, "from": tokenizer_source, "prefix": model_prefix},
            **provenance(),
            **extra,
        }
        (folder / MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n", encoding="utf-8")
    return ExportResult(Path(output_dir), manifest, lines)


def _write_graph_folder(model: nn.Module, source: str, folder: Path, options: ExportOptions, lines: list[str]) -> dict:
    """An ONNX or OpenVINO folder: the graph (checked against torch), config with the label map, tokenizer."""
    from transformers import AutoTokenizer

    format, int8, calibration = options.format, options.int8, options.calibration
    if options.shrink:
        shrunk = shrink_pruned(model, heads=True)
        lines.append(f"Shrunk: parameters {shrunk.params_before:,} -> {shrunk.params_after:,}.")
    try:
        tokenizer = AutoTokenizer.from_pretrained(source)
    except (OSError, ValueError) as error:
        raise ValueError(
            f"--format {format} needs the model's tokenizer (for the parity check and beside the model): {error}"
        ) from None
    parity = write_graph(model, tokenizer, folder, options)
    if not int8:
        kind = "float32"
    elif quantizer_count(model):
        kind = "int8 (the scales NNCF's quantizers learned in OpenVINOQuantizationAwareTraining"
        kind += ", as QuantizeLinear/DequantizeLinear pairs)" if format == "onnx" else ")"
    else:
        sentences = (
            f"{min(len(calibration), CALIBRATION_SIZE)} calibration sentences"
            if calibration
            else "the parity sentences"
        )
        if format == "openvino":
            embeddings = ", int4 embeddings" if options.embedding_bits == 4 else ""
            kind = f"int8 (NNCF post-training quantization on {sentences}{embeddings})"
        elif calibration:
            kind = f"int8 (ONNX Runtime static quantization, QDQ, per-channel MatMul weights, on {sentences})"
        else:
            kind = "int8 (ONNX Runtime dynamic quantization, per-channel MatMul weights)"
    model.config.architectures = [type(model).__name__]  # what the folder holds, for memopt predict
    model.config.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    lines.append(
        f"{format} {kind}, dynamic batch and sequence: parity on {parity.positions} positions of real sentences: "
        f"max |logit difference| {parity.max_abs_diff:.2e}, argmax agreement {parity.argmax_agreement:.1%}."
    )
    return asdict(parity)


def write_graph(model: nn.Module, tokenizer: Any, folder: Path, options: ExportOptions) -> Parity:
    """The ONNX or OpenVINO graph of ``model`` in ``folder``, checked against it."""
    if options.format == "onnx":
        from lightning_memopt.deploy.onnx import write_onnx

        return write_onnx(model, tokenizer, folder, options.int8, options.min_agreement, options.calibration)
    from lightning_memopt.deploy.openvino import write_openvino

    return write_openvino(
        model, tokenizer, folder, options.int8, options.calibration, options.min_agreement, options.embedding_bits
    )


def export_model(
    model: nn.Module,
    output_dir: str | Path,
    tokenizer: Any,
    *,
    format: str = "onnx",
    int8: bool = False,
    overwrite: bool = False,
    labels: list[str] | None = None,
    min_agreement: float = 0.995,
    calibration: list[str] | None = None,
) -> ExportResult:
    """Export any model whose ``forward`` takes ``input_ids`` / ``attention_mask`` (/ ``token_type_ids``) and returns
    logits (a tensor, or an output with ``.logits``): a LightningModule with its own head included.

    ``format`` is ``"onnx"`` or ``"openvino"`` (``int8``: the runtime's own post-training int8), checked
    against the model as :func:`export_checkpoint` does; the tokenizer and a manifest (with ``labels``) go beside it.
    """
    if format not in NAMES:
        raise ValueError(f"export_model writes {' or '.join(NAMES)}; for a transformers folder use export_checkpoint.")
    options = ExportOptions(format, int8, min_agreement=min_agreement, calibration=calibration)
    with atomic_folder(output_dir, overwrite) as folder:
        parity = write_graph(model, tokenizer, folder, options)
        tokenizer.save_pretrained(folder)
        manifest = {
            "format": format_name(format, int8),
            "model": {"class": type(model).__name__},
            "labels": labels,
            "parity": asdict(parity),
            **provenance(),
        }
        (folder / MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n", encoding="utf-8")
    lines = [f"{NAMES[format]} {'int8' if int8 else 'float32'}: parity max |logit difference| {parity.max_abs_diff:.2e}, "
             f"argmax agreement {parity.argmax_agreement:.1%}."]  # fmt: skip
    return ExportResult(Path(output_dir), manifest, lines)


def _save_tokenizer(source: str, folder: Path, lines: list[str]) -> None:
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(source)
    except (OSError, ValueError) as error:
        lines.append(f"No tokenizer written: {source!r} has none ({error}).")
        return
    tokenizer.save_pretrained(folder)


def provenance() -> dict[str, Any]:
    """The command, package version and time every manifest records."""
    return {
        "command": sys.argv,
        "lightning_memopt": _version(),
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("lightning-memopt")
    except PackageNotFoundError:
        return "unknown"
