"""The deployable artefact of a compression run, ``D/final/``: the last stage in the plan's final format.

Written whole or not at all (an interrupted run never leaves half a ``final/``), with ``compression.json``
beside the model: the plan, every stage's record, the artefact's size, what the export did and the artefact's own
metric on the recipe's validation split (run on its runtime, after trimming and int8). With
``trim_vocabulary`` the embeddings and tokenizer keep only the word pieces of the training data (read by the
recipe's own data module) and ``keep_words``; OpenVINO's int8 calibrates on training sentences.
"""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path
from typing import Any

import yaml

from lightning_memopt.compress.plan import Plan
from lightning_memopt.core.atomic_io import atomic_folder
from lightning_memopt.tasks.data import TransformerDataModule
from lightning_memopt.tasks.entity_f1 import micro_f1
from lightning_memopt.tasks.readers import LabelledText, TaggedSentence

WEIGHT_SUFFIXES = (".safetensors", ".onnx", ".bin")


def weights_bytes(folder: Path) -> int:
    """Bytes of a model folder's weights (safetensors, OpenVINO .bin, ONNX), what a user ships."""
    return sum(path.stat().st_size for path in folder.iterdir() if path.suffix in WEIGHT_SUFFIXES)


def saved_config(stage_folder: Path) -> dict[str, Any]:
    """The configuration ``memopt fit`` saved for a stage (its latest log version)."""
    saved = sorted(
        (stage_folder / "logs").glob("*/config.yaml"), key=lambda p: int(p.parent.name.rsplit("_", 1)[-1] or 0)
    )
    if not saved:
        raise FileNotFoundError(f"{stage_folder}/logs holds no config.yaml from memopt fit; rerun the stage.")
    return yaml.safe_load(saved[-1].read_text(encoding="utf-8"))


def recipe_data(stage_folder: Path, purpose: str) -> TransformerDataModule:
    """The data module of a stage's recipe, built from the configuration ``memopt fit`` saved (one of ours)."""
    import importlib

    data = saved_config(stage_folder).get("data") or {}
    module_name, _, class_name = str(data.get("class_path", "")).rpartition(".")
    data_class = getattr(importlib.import_module(module_name), class_name, None) if module_name else None
    if not (isinstance(data_class, type) and issubclass(data_class, TransformerDataModule)):
        raise ValueError(
            f"{purpose} reads the data with the recipe's data module, but {data.get('class_path')!r} is not one of "
            "lightning_memopt's."
        )
    return data_class(**(data.get("init_args") or {}))


def training_texts(stage_folder: Path) -> list[str]:
    """The training texts of a stage, read by the data module class its recipe names (one of ours)."""
    purpose = "`trim_vocabulary` (remove it from the plan's `final` for another data module)"
    return recipe_data(stage_folder, purpose).split_texts("train")


def validation_metric(folder: Path, stage_folder: Path) -> dict[str, Any]:
    """A model folder's metric on the recipe's validation split, run on the folder's own runtime (OpenVINO,
    ONNX Runtime or torch): entity F1 for NER, accuracy for classification; ``{}`` for other tasks or without
    validation data."""
    from lightning_memopt.deploy.predict import predict

    data = recipe_data(stage_folder, "Scoring final/")
    if data.val_file is None and data.dataset_name is None:
        return {}
    examples = data.read_split("validation")
    if not examples:
        return {}
    if isinstance(examples[0], TaggedSentence):
        predictions = predict(folder, [example.tokens for example in examples], threads=2, progress=False)
        gold = [list(example.tags) for example in examples]
        value = micro_f1([list(p.labels) for p in predictions], gold)
        return {"name": "val_f1", "value": round(value, 4), "examples": len(examples)}
    if isinstance(examples[0], LabelledText) and all(example.text_pair is None for example in examples):
        predictions = predict(folder, [example.text for example in examples], threads=2, progress=False)
        right = sum(p.labels[0] == example.label for p, example in zip(predictions, examples, strict=True))
        return {"name": "val_accuracy", "value": round(right / len(examples), 4), "examples": len(examples)}
    return {}


def calibration_subset(texts: list[str], count: int) -> list[str]:
    """``count`` training texts picked with a fixed seed (the same each run)."""
    return random.Random(0).sample(texts, min(count, len(texts)))


def trimmed_folder(
    source: Path, target: Path, texts: list[str], keep_words: tuple[str, ...], keep_first: int = 0
) -> dict[str, Any]:
    """Write ``source`` with its vocabulary trimmed to ``texts``, ``keep_words`` and its first ``keep_first``
    pieces into ``target``."""
    from transformers import AutoTokenizer

    from lightning_memopt.deploy.load import load_pretrained
    from lightning_memopt.deploy.vocabulary import trim_vocabulary

    model = load_pretrained(source)
    tokenizer, report = trim_vocabulary(model, AutoTokenizer.from_pretrained(source), texts, keep_words, keep_first)
    with atomic_folder(target, overwrite=True) as work:
        model.save_pretrained(work)
        tokenizer.save_pretrained(work)
    return {"kept": report.kept, "before": report.before, "texts": report.texts}


def write_final(plan: Plan, output_dir: Path, state: dict[str, Any]) -> dict[str, Any]:
    """Export the last stage as ``D/final`` with ``compression.json`` inside; return the record."""
    from lightning_memopt.deploy.export import export_checkpoint, export_folder

    last_stage = plan.stages[-1]
    stage_folder = output_dir / last_stage.name
    final = plan.final
    needs_texts = final.trim_vocabulary or (final.format == "openvino" and final.int8)
    texts = training_texts(stage_folder) if needs_texts else []
    calibration = calibration_subset(texts, final.calibration_sentences) if final.format == "openvino" else None
    record: dict[str, Any] = {"plan": plan.name}
    if not final.trim_vocabulary:  # a trimmed copy from an earlier plan's final would describe another artefact
        shutil.rmtree(stage_folder / "trimmed", ignore_errors=True)
    with atomic_folder(output_dir / "final", overwrite=True) as work:
        if final.trim_vocabulary:
            record["vocabulary"] = trimmed_folder(
                stage_folder / "export", stage_folder / "trimmed", texts, final.keep_words, final.keep_first_pieces
            )
            result = export_folder(
                stage_folder / "trimmed", work, int8=final.int8, sparse=final.sparse, format=final.format,
                calibration=calibration, min_agreement=final.min_agreement, overwrite=True,
                embedding_bits=final.embedding_bits,
            )  # fmt: skip
        else:
            result = export_checkpoint(
                stage_folder / "checkpoints" / "last.ckpt", work, int8=final.int8, sparse=final.sparse,
                shrink=last_stage.shrink, format=final.format, calibration=calibration,
                min_agreement=final.min_agreement, overwrite=True, embedding_bits=final.embedding_bits,
            )  # fmt: skip
        record |= {
            "format": result.manifest.get("format"),
            "weights_bytes": weights_bytes(work),
            "lines": result.lines,
            "stages": {stage.name: state["stages"][stage.name] for stage in plan.stages},
        }
        if metric := validation_metric(work, stage_folder):
            record["metric"] = metric
        (work / "compression.json").write_text(json.dumps(record, indent=1) + "\n", encoding="utf-8")
    return record
