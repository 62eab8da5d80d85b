"""Load a frozen teacher, and make a smaller student from it (DistilBERT-style layer selection).

A teacher can be a hub name (``bert-base-cased``), a local folder, ``pypi:DIST``, the checkpoint of
any LightningModule holding a ``transformers`` model (found by :func:`~lightning_memopt.core.models.model_from_checkpoint`'s
rule), or any ``nn.Module``. Folders and hub names are built from the class named in their
``config.json`` (``architectures``), looked up in ``transformers`` only: no remote code, no class
path taken from a file.

Example:
    >>> from transformers import BertConfig, BertForSequenceClassification
    >>> teacher = BertForSequenceClassification(BertConfig(hidden_size=32, num_hidden_layers=6, num_attention_heads=2,
    ...                                                    intermediate_size=64))
    >>> student = student_from_teacher(teacher, layers=[0, 2, 4])
    >>> student.config.num_hidden_layers, torch.equal(student.bert.encoder.layer[1].output.dense.weight,
    ...                                               teacher.bert.encoder.layer[2].output.dense.weight)
    (3, True)
"""

from __future__ import annotations

import copy
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from lightning_memopt.core.models import model_from_checkpoint
from lightning_memopt.core.sources import PYPI_PREFIX, resolve_pretrained, transformers_model_class

LAYER_KEY = re.compile(r"^(.*\.layer\.)(\d+)(\..*)$")


@dataclass
class Teacher:
    """A loaded teacher, where its tokenizer can be read from, and the validation scores its checkpoint recorded."""

    model: nn.Module
    tokenizer_source: str | None
    scores: dict[str, float] = field(default_factory=dict)


def _looks_like_path(source: str) -> bool:
    return source.startswith(("/", "./", "../", "~")) or source.endswith(".ckpt") or Path(source).suffix != ""


def check_teacher_source(source: str | nn.Module) -> None:
    """Fail early, naming the option, when ``source`` looks like a local path that does not exist."""
    is_path = isinstance(source, str) and not source.startswith(PYPI_PREFIX) and _looks_like_path(source)
    if is_path and not Path(source).expanduser().exists():
        raise FileNotFoundError(
            f"teacher {source!r} does not exist. Pass a checkpoint written by `memopt fit`, a folder with "
            "config.json and weights, a hub name such as bert-base-cased, or pypi:DISTRIBUTION."
        )


def load_teacher(source: str | nn.Module) -> Teacher:
    """Load ``source`` (see the module docstring); a path that does not exist is a clear error."""
    check_teacher_source(source)
    if isinstance(source, nn.Module):
        return Teacher(source, None)
    if source.startswith(PYPI_PREFIX):
        folder = resolve_pretrained(source)
        return Teacher(_from_folder(folder), folder)
    path = Path(source).expanduser()
    if path.is_file() or (path / "meta.pt").exists() or (path / "latest").exists():  # a checkpoint file or folder
        found = model_from_checkpoint(path)
        return Teacher(found.model, found.source, found.scores)
    if path.is_dir():
        return Teacher(_from_folder(str(path)), str(path))
    return Teacher(_from_folder(source), source)  # a hub name


def _from_folder(name_or_path: str) -> nn.Module:
    """The model class named in ``config.json``'s ``architectures``, taken from ``transformers`` only."""
    import transformers

    config = transformers.AutoConfig.from_pretrained(name_or_path, trust_remote_code=False)
    architectures = getattr(config, "architectures", None) or []
    model_class = transformers_model_class(architectures[0] if architectures else None)
    if model_class is None:
        raise ValueError(
            f"The teacher at {name_or_path!r} names no transformers model class in config.json (architectures="
            f"{architectures}); load it yourself and pass the nn.Module as teacher=."
        )
    return model_class.from_pretrained(name_or_path, trust_remote_code=False, dtype=torch.float32)


def freeze(model: nn.Module, dtype: torch.dtype | None = None) -> nn.Module:
    """Eval mode, no gradients, optionally cast to ``dtype`` (e.g. bfloat16 to halve its memory)."""
    model.eval()
    model.requires_grad_(False)
    if dtype is not None:
        model.to(dtype=dtype)
    return model


def layer_count(config: object) -> tuple[str, int] | None:
    """``(field, number of transformer layers)`` of a HF config (``num_hidden_layers``, DistilBERT's ``n_layers``)."""
    for name in ("num_hidden_layers", "n_layers"):
        if hasattr(config, name):
            return name, int(getattr(config, name))
    return None


def student_from_teacher(teacher: nn.Module, layers: Sequence[int]) -> nn.Module:
    """A copy of ``teacher`` keeping its embeddings, heads and only the chosen transformer ``layers`` (in order).

    Works for Hugging Face models whose blocks live in a ``...layer.<i>.`` module list (BERT, RoBERTa,
    ELECTRA, DistilBERT). Save the student with ``save_pretrained`` to use it as a recipe's model.
    """
    config = getattr(teacher, "config", None)
    if config is None:
        raise ValueError("student_from_teacher needs a Hugging Face model (with .config).")
    counted = layer_count(config)
    if counted is None:
        raise ValueError(f"{type(config).__name__} has no num_hidden_layers/n_layers; cannot pick layers from it.")
    layers_field, total = counted
    chosen = list(layers)
    if not chosen or sorted(set(chosen)) != chosen or chosen[0] < 0 or chosen[-1] >= total:
        raise ValueError(
            f"layers must be increasing indices of the teacher's {total} layers (0..{total - 1}), got {chosen}."
        )
    student_config = copy.deepcopy(config)
    setattr(student_config, layers_field, len(chosen))
    student = type(teacher)(student_config)
    position = {old: new for new, old in enumerate(chosen)}
    state = {}
    for key, value in teacher.state_dict().items():
        match = LAYER_KEY.match(key)
        if match is None:
            state[key] = value
        elif int(match.group(2)) in position:
            state[f"{match.group(1)}{position[int(match.group(2))]}{match.group(3)}"] = value
    missing, unexpected = student.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ValueError(
            f"Could not map the teacher's weights onto the student: missing {missing}, unexpected {unexpected}."
        )
    return student
