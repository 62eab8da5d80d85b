"""Fit with FSDP2Strategy (FSDP2 preset) on 2 CPU processes with our callbacks; each rank writes what it sees.

Launched by the FSDP2 tests as ``python fsdp2_fit.py OUT_DIR TRAIN_FILE MODEL_DIR STRUCTURE [--teacher DIR]
[--interrupt STEP] [--ckpt_path PATH]`` (STRUCTURE ``none`` for no pruning); Lightning starts the second rank by
re-running this script.
"""

from __future__ import annotations

import json
import sys
from argparse import ArgumentParser
from pathlib import Path

import torch
from helpers import CONLL_LABELS, Interrupt
from lightning.pytorch import Trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from param_digest import tensor_digest

from lightning_memopt import (
    FSDP2Strategy,
    KnowledgeDistillation,
    PruningScheduler,
    TokenClassificationDataModule,
    TokenClassificationModule,
)
from lightning_memopt.pruning.placement import full


def main() -> None:
    parser = ArgumentParser()
    for name in ("out_dir", "train_file", "model_dir", "structure"):
        parser.add_argument(name)
    parser.add_argument("--interrupt", type=int, default=None)
    parser.add_argument("--ckpt_path", default=None)
    parser.add_argument("--teacher", default=None)
    args = parser.parse_args()
    torch.manual_seed(0)
    module = TokenClassificationModule(args.model_dir, labels=CONLL_LABELS, learning_rate=1e-3)
    data = TokenClassificationDataModule(train_file=args.train_file, batch_size=8)
    criterion = "magnitude" if args.structure in ("unstructured", "none") else "gradient"
    structure = "unstructured" if args.structure == "none" else args.structure
    pruning = PruningScheduler(final_sparsity=0.5, start=1, end=6, every=1, structure=structure, criterion=criterion)
    callbacks = [ModelCheckpoint(dirpath=args.out_dir, save_top_k=0, save_last=True, every_n_train_steps=4)]
    if args.structure != "none":
        callbacks.append(pruning)
    distillation = KnowledgeDistillation(args.teacher) if args.teacher else None
    if distillation is not None:
        callbacks.append(distillation)
    if args.interrupt is not None:
        callbacks.append(Interrupt(step=args.interrupt))
    trainer = Trainer(
        accelerator="cpu",
        devices=2,
        strategy=FSDP2Strategy(),  # shards each BertLayer, then the module
        max_steps=8,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=callbacks,
    )
    trainer.fit(module, datamodule=data, ckpt_path=args.ckpt_path)
    weights = {name: full(weight.detach()) for name, weight in pruning.weights.items()}
    params = {name: full(param.detach()) for name, param in module.named_parameters()}
    record = {
        "rank": trainer.global_rank,
        "sharded": all(type(p).__name__ == "DTensor" for p in module.parameters()),
        "sparsity": pruning.sparsity,
        "zeros": {name: float((w == 0).float().mean()) for name, w in weights.items()},
        "masks": tensor_digest(pruning.masks),
        "kept_units": {name: keep.tolist() for name, keep in pruning.kept_units.items()},
        "params": tensor_digest(params),
        "sharded_blocks": trainer.strategy.sharded_blocks,
    }
    if distillation is not None:
        teacher = distillation.teacher
        record["teacher"] = {
            "sharded": any(type(p).__name__ == "DTensor" for p in teacher.parameters()),
            "inside_module": any(m is teacher for m in module.modules()),
            "digest": tensor_digest(dict(teacher.named_parameters())),
            "train_kd": float(trainer.callback_metrics["train_kd"]),
        }
    Path(args.out_dir, f"rank{trainer.global_rank}.json").write_text(json.dumps(record))


if __name__ == "__main__":
    sys.exit(main())
