"""A plain causal-LM module whose training_step calls ``self.model(...)``, fitted on 2 CPU processes under one of
the sharding presets (FSDP1, FSDP2, ZeRO), optionally killed and resumed; each rank writes what it saw.

Launched by test_causal_sharding as ``python causal_sharded_fit.py OUT_DIR STRATEGY MODEL [--interrupt STEP]
[--ckpt_path PATH]`` (STRATEGY ``fsdp1``, ``fsdp2`` or ``zero3``; MODEL ``llama`` (GQA, SwiGLU) or ``gpt2``
(Conv1D, tied head)); Lightning starts the second rank by re-running this script.
"""

from __future__ import annotations

import json
import sys
from argparse import ArgumentParser
from pathlib import Path

import torch
from helpers import Interrupt
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from torch.utils.data import DataLoader
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

from lightning_memopt import FSDP1Strategy, FSDP2Strategy, ZeROStrategy

VOCAB = 64
MODELS = {
    "llama": lambda: LlamaForCausalLM(LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64,
                                                  num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                                  max_position_embeddings=64)),
    "gpt2": lambda: GPT2LMHeadModel(GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=2, n_positions=64,
                                               resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)),
}  # fmt: skip
STRATEGIES = {"fsdp1": FSDP1Strategy, "fsdp2": FSDP2Strategy, "zero3": lambda: ZeROStrategy(stage=3)}


class CausalLM(LightningModule):
    def __init__(self, model: str) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.model = MODELS[model]()

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        return self.model(**batch).loss  # the LightningModule's own forward never runs

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.parameters(), lr=1e-3)


class Losses(Callback):
    """The training loss of every optimizer step, by step."""

    def __init__(self) -> None:
        self.by_step: dict[int, float] = {}

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs, batch, batch_idx) -> None:
        self.by_step[trainer.global_step] = float(outputs["loss"])


def main() -> None:
    parser = ArgumentParser()
    for name in ("out_dir", "strategy", "model"):
        parser.add_argument(name)
    parser.add_argument("--interrupt", type=int, default=None)
    parser.add_argument("--ckpt_path", default=None)
    args = parser.parse_args()
    ids = torch.randint(0, VOCAB, (16, 12), generator=torch.Generator().manual_seed(0))
    data = DataLoader([{"input_ids": row, "labels": row} for row in ids], batch_size=4)  # 2 steps an epoch per rank
    losses = Losses()
    callbacks = [losses, ModelCheckpoint(dirpath=args.out_dir, save_top_k=0, save_last=True, every_n_train_steps=2)]
    if args.interrupt is not None:
        callbacks.append(Interrupt(step=args.interrupt))
    module = CausalLM(args.model)
    trainer = Trainer(accelerator="cpu", devices=2, strategy=STRATEGIES[args.strategy](), max_steps=4, logger=False,
                      enable_progress_bar=False, enable_model_summary=False, callbacks=callbacks)  # fmt: skip
    trainer.fit(module, data, ckpt_path=args.ckpt_path)
    record = {
        "step": trainer.global_step,
        "strategy": type(trainer.strategy).__name__,
        "losses": losses.by_step,
        "sharded_blocks": getattr(trainer.strategy, "sharded_blocks", None),
    }
    Path(args.out_dir, f"rank{trainer.global_rank}.json").write_text(json.dumps(record))


if __name__ == "__main__":
    sys.exit(main())
