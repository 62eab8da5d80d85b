"""Tiny random BERTs with the real MiniLM tokenizer: what most tests train, cut, shard or distil."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import torch
from transformers import BertConfig, BertModel

from helpers.paths import minilm_dir

TOKENIZER_FILES = ("vocab.txt", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")
TINY = {
    "vocab_size": 30522,
    "hidden_size": 32,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "intermediate_size": 64,
}


def tiny_bert_config(**overrides: Any) -> BertConfig:
    """A BertConfig of the tiny test model (2 layers, hidden 32, the MiniLM vocabulary), with ``overrides``."""
    return BertConfig(**{**TINY, "max_position_embeddings": 512, **overrides})


def copy_tokenizer(folder: Path) -> None:
    """Put the real uncased MiniLM tokenizer files beside a model saved in ``folder``."""
    source = minilm_dir()
    for name in TOKENIZER_FILES:
        if (source / name).exists():
            shutil.copy(source / name, folder / name)


def save_tiny_bert(folder: Path, model_class: type = BertModel, seed: int = 0, **overrides: Any) -> Path:
    """Save a seeded random tiny ``model_class`` (BertModel, BertForTokenClassification...) with the tokenizer."""
    torch.manual_seed(seed)
    model_class(tiny_bert_config(**overrides)).save_pretrained(folder)
    copy_tokenizer(folder)
    return folder
