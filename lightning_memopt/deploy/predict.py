"""Run an exported model on text: NER labels per word, or a label per sentence, with scores.

The folder decides the runtime (``--runtime auto``): ``openvino_model.xml`` runs on OpenVINO (at the
precision its CPU plugin picks: bf16 where the CPU has it), ``model.onnx`` on ONNX Runtime, an int8 folder
(``quantization.json``) on our torch int8 layers, anything else on torch fp32 (shrunk folders included,
through :func:`~lightning_memopt.deploy.load.load_pretrained`). The task comes from ``config.json``
(``...ForTokenClassification`` or ``...ForSequenceClassification``).

Inputs: for NER, CoNLL columns (``.conll``/``.bio``/``.iob``: the first column) or plain text, one
sentence per line, words split on whitespace; for classification, a ``.tsv``/``.csv``/``.jsonl`` column
or plain text, one text per line. Empty lines are skipped with a warning. A sentence longer than the model
takes is split into pieces that fit (NER) or truncated (classification), with a warning. Examples are
batched by length; a progress bar shows the batches. NER is labelled as the task modules train it: the
first sub-token of each word carries the word's label.

Example:
    >>> predict_file("exported/ner", "news.txt", "news.conll")  # doctest: +SKIP
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from lightning_memopt.tasks.readers import read_conll_words, read_table, text_lines

log = logging.getLogger(__name__)
Runtime = Literal["auto", "torch", "onnxruntime", "openvino"]
CONLL_SUFFIXES = (".conll", ".bio", ".iob")
TABLE_SUFFIXES = (".tsv", ".csv", ".jsonl")
Logits = Callable[[dict[str, np.ndarray]], np.ndarray]


@dataclass(frozen=True)
class Prediction:
    """One input's words (NER) or text (classification), its labels and their probabilities."""

    text: str | tuple[str, ...]
    labels: tuple[str, ...]
    scores: tuple[float, ...]


def task_of(config: Any) -> Literal["ner", "classification"]:
    architecture = (getattr(config, "architectures", None) or [""])[0]
    if architecture.endswith("ForTokenClassification"):
        return "ner"
    if architecture.endswith("ForSequenceClassification"):
        return "classification"
    raise ValueError(
        f"memopt predict runs token or sequence classifiers; this folder holds a {architecture or 'model without architectures'}."
    )


def runtime_of(folder: Path, runtime: Runtime) -> str:
    if runtime != "auto":
        return runtime
    if (folder / "openvino_model.xml").exists():
        return "openvino"
    return "onnxruntime" if (folder / "model.onnx").exists() else "torch"


def load_logits(
    folder: Path, runtime: str, threads: int | None = None, precision: str = "auto"
) -> tuple[Logits, list[str]]:
    """A function from a padded batch to logits, and the input names it takes."""
    if runtime == "onnxruntime":
        from lightning_memopt.deploy.onnx import require_deploy_extra

        require_deploy_extra("onnxruntime")
        import onnxruntime as ort

        if not (folder / "model.onnx").exists():
            raise FileNotFoundError(f"--runtime onnxruntime: {folder} has no model.onnx (memopt export --format onnx).")
        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
        session = ort.InferenceSession(str(folder / "model.onnx"), options, providers=["CPUExecutionProvider"])
        names = [i.name for i in session.get_inputs()]
        return (lambda batch: session.run(["logits"], {name: batch[name] for name in names})[0]), names
    if runtime == "openvino":
        from lightning_memopt.deploy.onnx import require_deploy_extra
        from lightning_memopt.deploy.openvino import OPENVINO_FILE, compile_openvino, run_openvino

        require_deploy_extra("openvino")
        if not (folder / OPENVINO_FILE).exists():
            raise FileNotFoundError(
                f"--runtime openvino: {folder} has no {OPENVINO_FILE} (memopt export --format openvino)."
            )
        compiled = compile_openvino(folder / OPENVINO_FILE, "f32" if precision == "f32" else None, threads)
        return (lambda batch: run_openvino(compiled, batch)), [port.any_name for port in compiled.inputs]
    if runtime != "torch":
        raise ValueError(f"--runtime {runtime!r} is not one of auto, torch, onnxruntime, openvino.")
    from lightning_memopt.deploy.load import load_pretrained
    from lightning_memopt.deploy.onnx import model_input_names

    model = load_pretrained(folder)
    names = model_input_names(model)

    def logits(batch: dict[str, np.ndarray]) -> np.ndarray:
        with torch.inference_mode():
            return model(**{name: torch.from_numpy(batch[name]) for name in names}).logits.float().numpy()

    return logits, names


def read_inputs(path: Path, task: str, column: str, input_format: str) -> list[Any]:
    """Words per sentence (NER) or texts (classification), empty lines dropped with a warning."""
    kind = input_format
    if kind == "auto":
        suffix = "".join(s for s in path.suffixes if s != ".gz")
        kind = "conll" if suffix.endswith(CONLL_SUFFIXES) else "table" if suffix.endswith(TABLE_SUFFIXES) else "text"
    if kind == "conll":
        return read_conll_words(path)
    if kind == "table":
        return [example.text for example in read_table(path, text_column=column, label_column=column)]
    lines = list(text_lines(path))
    kept = [line.strip() for line in lines if line.strip()]
    if len(kept) < len(lines):
        log.warning("%s: %d empty lines skipped.", path, len(lines) - len(kept))
    return [tuple(line.split()) for line in kept] if task == "ner" else kept


def read_texts(path: str | Path) -> list[str]:
    """Sentences of a CoNLL, table or text file as plain strings (for calibration)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"--calibration_file {path}: no such file.")
    suffix = "".join(s for s in path.suffixes if s != ".gz")
    if suffix.endswith(CONLL_SUFFIXES):
        return [" ".join(words) for words in read_conll_words(path)]
    return [str(text) for text in read_inputs(path, "classification", "sentence", "auto")]


def softmax(logits: np.ndarray) -> np.ndarray:
    shifted = np.exp(logits - logits.max(-1, keepdims=True))
    return shifted / shifted.sum(-1, keepdims=True)


def fit_words(tokenizer: Any, words: Sequence[str], limit: int) -> list[tuple[str, ...]]:
    """Split a sentence into consecutive pieces whose sub-tokens (plus special tokens) fit in ``limit``."""
    room = limit - tokenizer.num_special_tokens_to_add()
    pieces: list[tuple[str, ...]] = []
    current: list[str] = []
    used = 0
    for word in words:
        size = max(1, len(tokenizer.tokenize(word)))
        if current and used + size > room:
            pieces.append(tuple(current))
            current, used = [], 0
        current.append(word)
        used += size
    if current:
        pieces.append(tuple(current))
    return pieces


def batches(lengths: Sequence[int], size: int) -> Iterator[list[int]]:
    """Indices grouped into batches of similar length (longest first), so little padding is run."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    for start in range(0, len(order), size):
        yield order[start : start + size]


def predict(
    folder: str | Path,
    inputs: Sequence[Any],
    runtime: Runtime = "auto",
    batch_size: int = 32,
    max_length: int = 512,
    threads: int | None = None,
    progress: bool = True,
    precision: str = "auto",
) -> list[Prediction]:
    """Labels and scores for ``inputs`` (tuples of words for NER, strings for classification)."""
    from tqdm.auto import tqdm
    from transformers import AutoConfig, AutoTokenizer

    folder = Path(folder)
    config = AutoConfig.from_pretrained(folder, trust_remote_code=False)
    task = task_of(config)
    tokenizer = AutoTokenizer.from_pretrained(folder, **({"add_prefix_space": True} if task == "ner" else {}))
    limit = min(max_length, getattr(config, "max_position_embeddings", max_length), tokenizer.model_max_length)
    logits_of, names = load_logits(folder, runtime_of(folder, runtime), threads, precision)
    id2label = {int(k): v for k, v in config.id2label.items()}
    units: list[tuple[int, Any]] = []  # (input index, piece): long NER sentences become several pieces
    for index, item in enumerate(inputs):
        pieces = fit_words(tokenizer, item, limit) if task == "ner" else [item]
        if len(pieces) > 1:
            log.warning(
                "Sentence %d has more sub-tokens than the model's %d positions: labelled in %d pieces.",
                index,
                limit,
                len(pieces),
            )
        units += [(index, piece) for piece in pieces]
    if task == "ner":  # pieces fit already (fit_words)
        encoded = [
            tokenizer(list(piece), is_split_into_words=True, truncation=True, max_length=limit) for _, piece in units
        ]
        truncated = 0
    else:  # tokenized once; only texts that are too long again, truncated
        encoded = [tokenizer(piece) for _, piece in units]
        long = [i for i, e in enumerate(encoded) if len(e["input_ids"]) > limit]
        for i in long:
            encoded[i] = tokenizer(units[i][1], truncation=True, max_length=limit)
        truncated = len(long)
    if truncated:
        log.warning("%d texts were longer than %d tokens and were truncated.", truncated, limit)
    results: list[tuple[list[str], list[float]]] = [([], []) for _ in units]
    groups = list(batches([len(e["input_ids"]) for e in encoded], batch_size))
    for group in tqdm(groups, desc="predict", unit="batch", disable=not progress):
        padded = tokenizer.pad(
            [{k: encoded[i][k] for k in names if k in encoded[i]} for i in group], return_tensors="np"
        )
        feed = {
            name: padded[name].astype(np.int64)
            if name in padded
            else np.zeros_like(padded["input_ids"], dtype=np.int64)
            for name in names
        }
        probabilities = softmax(logits_of(feed))
        for row, unit in enumerate(group):
            if task == "ner":
                firsts = first_subtokens(encoded[unit].word_ids())
                ids = probabilities[row, firsts].argmax(-1)
                results[unit] = (
                    [id2label[int(i)] for i in ids],
                    [float(probabilities[row, p, i]) for p, i in zip(firsts, ids, strict=True)],
                )
            else:
                best = int(probabilities[row].argmax())
                results[unit] = ([id2label[best]], [float(probabilities[row, best])])
    merged: dict[int, tuple[list[str], list[float]]] = {}
    for (index, _), (labels, scores) in zip(units, results, strict=True):
        kept = merged.setdefault(index, ([], []))
        kept[0].extend(labels)
        kept[1].extend(scores)
    return [Prediction(inputs[i], tuple(merged[i][0]), tuple(merged[i][1])) for i in range(len(inputs))]


def first_subtokens(word_ids: Sequence[int | None]) -> list[int]:
    """The position of each word's first sub-token.

    >>> first_subtokens([None, 0, 0, 1, 2, 2, None])
    [1, 3, 4]
    """
    positions, previous = [], None
    for position, word in enumerate(word_ids):
        if word is not None and word != previous:
            positions.append(position)
        previous = word
    return positions


def write_predictions(predictions: Sequence[Prediction], stream: Any, task: str) -> None:
    """CoNLL (word, label, score; a blank line between sentences) for NER, JSON lines for classification."""
    for prediction in predictions:
        if task == "ner":
            for word, label, score in zip(prediction.text, prediction.labels, prediction.scores, strict=True):
                stream.write(f"{word}\t{label}\t{score:.4f}\n")
            stream.write("\n")
        else:
            stream.write(
                json.dumps(
                    {"text": prediction.text, "label": prediction.labels[0], "score": round(prediction.scores[0], 6)}
                )
                + "\n"
            )


def predict_file(
    model: str | Path,
    input_path: str | Path,
    output_path: str | Path | None = None,
    runtime: Runtime = "auto",
    column: str = "sentence",
    input_format: str = "auto",
    batch_size: int = 32,
    threads: int | None = None,
    precision: str = "auto",
) -> tuple[list[Prediction], str]:
    """Read ``input_path``, predict, write ``output_path`` (or stdout); return the predictions and the task."""
    import sys

    from transformers import AutoConfig

    folder = Path(model)
    if not (folder / "config.json").exists():
        raise FileNotFoundError(f"--model {folder}: no config.json; give a folder written by memopt export.")
    if not any((folder / name).exists() for name in ("tokenizer.json", "vocab.txt", "tokenizer_config.json")):
        raise FileNotFoundError(f"--model {folder}: no tokenizer files beside the model; export it with memopt export.")
    task = task_of(AutoConfig.from_pretrained(folder, trust_remote_code=False))
    inputs = read_inputs(Path(input_path), task, column, input_format)
    if not inputs:
        raise ValueError(f"--input {input_path}: nothing to predict (no non-empty line).")
    predictions = predict(folder, inputs, runtime, batch_size, threads=threads, precision=precision)
    if output_path is None:
        write_predictions(predictions, sys.stdout, task)
    else:
        with open(output_path, "w", encoding="utf-8") as stream:
            write_predictions(predictions, stream, task)
    return predictions, task
