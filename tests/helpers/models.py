"""Tiny random BERTs with the real MiniLM tokenizer: what most tests train, cut, shard or distil."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch import LightningModule
from transformers import BertConfig, BertModel, LlamaConfig, LlamaForCausalLM

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


TINY_LLAMA = {"vocab_size": 96, "hidden_size": 32, "intermediate_size": 48, "num_hidden_layers": 2,
              "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 32}  # fmt: skip
# GPT-2: fused q|k|v Conv1D attention; no dropout (as TINY_LLAMA), so a resumed run matches a straight one exactly
TINY_GPT2 = {"vocab_size": 96, "n_embd": 32, "n_layer": 2, "n_head": 4, "n_positions": 32,
             "embd_pdrop": 0.0, "attn_pdrop": 0.0, "resid_pdrop": 0.0}  # fmt: skip


class PlainCausalLM(LightningModule):
    """A plain module whose training step calls ``self.model(...)``: a seeded tiny Llama (4 query / 2 key-value
    heads, SwiGLU), or ``model``; AdamW over the trainable parameters."""

    def __init__(self, model: torch.nn.Module | None = None, learning_rate: float = 1e-3) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.model = model if model is not None else LlamaForCausalLM(LlamaConfig(**TINY_LLAMA))
        self.learning_rate = learning_rate

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        return self.model(**batch).loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW([p for p in self.parameters() if p.requires_grad], lr=self.learning_rate)
