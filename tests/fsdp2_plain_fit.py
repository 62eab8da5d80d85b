"""FSDP2Strategy on 2 CPU processes with a plain module whose training_step calls ``self.model(...)`` (tiny Llama, GQA).

Launched by test_fsdp2_callbacks as ``python fsdp2_plain_fit.py OUT_DIR``; each rank writes what it sees.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from lightning.pytorch import LightningModule, Trainer
from param_digest import tensor_digest
from torch.utils.data import DataLoader
from transformers import LlamaConfig, LlamaForCausalLM

from lightning_memopt import FSDP2Strategy
from lightning_memopt.pruning.placement import full

LLAMA = {"vocab_size": 64, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
         "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 64}  # fmt: skip


class CausalLM(LightningModule):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.model = LlamaForCausalLM(LlamaConfig(**LLAMA))

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        return self.model(**batch).loss  # the LightningModule's own forward never runs

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.parameters(), lr=1e-3)


def main() -> None:
    out = Path(sys.argv[1])
    ids = torch.randint(0, 64, (16, 12), generator=torch.Generator().manual_seed(0))
    data = DataLoader([{"input_ids": row, "labels": row} for row in ids], batch_size=4)
    module = CausalLM()
    trainer = Trainer(accelerator="cpu", devices=2, strategy=FSDP2Strategy(), max_steps=3, logger=False,
                      enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False)  # fmt: skip
    trainer.fit(module, data)
    params = {name: full(param.detach()) for name, param in module.named_parameters()}
    record = {
        "step": trainer.global_step,
        "sharded": all(type(p).__name__ == "DTensor" for p in module.parameters()),
        "params": tensor_digest(params),
        "sharded_blocks": trainer.strategy.sharded_blocks,
    }
    out.mkdir(parents=True, exist_ok=True)
    (out / f"rank{trainer.global_rank}.json").write_text(json.dumps(record))


if __name__ == "__main__":
    sys.exit(main())
