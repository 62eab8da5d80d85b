"""Per-rank training state under DDP, FSDP2, FSDP1 and ZeRO-1/2/3, against the ZeRO paper's formula.

A bert-base-sized token classifier (hidden 768, 12 layers, vocabulary 30,522: 109 M parameters, random
weights) trains two steps on 2 CPU processes under each strategy. Just before the second optimizer
step (so Adam's state exists) every live tensor of rank 0 is counted once (by storage) and put in one
of: parameters (the rank's own, local shards included), gradients, optimizer state (Adam's moments,
DeepSpeed's float32 master slice), and the rest. The formula is the ZeRO paper's for Adam: 16 bytes
per parameter (4 parameter + 4 gradient + 8 moments in float32 training; 2 + 2 + 12 in mixed
precision), with the optimizer state split over N ranks from stage 1, gradients from stage 2 and
parameters from stage 3 (FSDP's full sharding).

Also: activation bytes of one bert-base training step with and without activation checkpointing at
sequence 128 and 512 (batch 8; meta-device simulation, see ``lightning_memopt.estimate``), and the
optimizer state bytes of bitsandbytes' 8-bit AdamW against torch's AdamW on the same model (measured).

    python benchmarks/sharding.py        # about 10 min on 2 CPU cores

Results: ``benchmarks/results/sharding.json`` and ``docs/results/sharding.md``.
"""

from __future__ import annotations

import gc
import json
import os
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import PAGES, PROJECT_ROOT, RESULTS, payload_header, report_header

MIB = 2**20
STRATEGIES = ["ddp", "zero1", "zero2", "zero3", "fsdp1", "fsdp2"]
BERT_BASE = {"vocab_size": 30522, "hidden_size": 768, "num_hidden_layers": 12, "num_attention_heads": 12}
LABELS = 9


def storages(tensors: Any) -> dict[int, int]:
    """``{storage address: bytes}`` of the tensors in a tensor, list, tuple or dict (nested), DTensors as local."""
    found: dict[int, int] = {}
    stack = [tensors]
    while stack:
        item = stack.pop()
        if item is None:
            continue
        if hasattr(item, "_local_tensor"):
            item = item._local_tensor
        if hasattr(item, "untyped_storage"):
            storage = item.untyped_storage()
            if storage.nbytes():
                found[storage.data_ptr()] = storage.nbytes()
            if getattr(item, "ds_tensor", None) is not None:  # a ZeRO-3 parameter: its partition
                stack.append(item.ds_tensor)
        elif isinstance(item, (list, tuple)):
            stack.extend(item)
        elif isinstance(item, dict):
            stack.extend(item.values())
    return found


def census(module: Any, optimizer: Any) -> dict[str, int]:
    """Rank-local bytes by kind, each storage counted once (in the order of the kinds below)."""
    import torch

    live = storages([o for o in gc.get_objects() if isinstance(o, torch.Tensor)])
    outer = getattr(optimizer, "_optimizer", optimizer)  # inside a LightningOptimizer
    wrapped = getattr(outer, "optimizer", None)  # DeepSpeed's ZeRO optimizer wraps torch's
    torch_optimizer = wrapped if isinstance(wrapped, torch.optim.Optimizer) else outer
    params = list(module.parameters())
    deepspeed_grads = [getattr(outer, name, None) for name in ("averaged_gradients", "grad_partitions_flat_buffer")]
    masters = [
        getattr(outer, name, None) for name in ("single_partition_of_fp32_groups", "fp32_partitioned_groups_flat")
    ]
    kinds = {
        "parameters": storages(params),
        "gradients": storages([[p.grad for p in params if p.grad is not None], deepspeed_grads]),
        "optimizer state": storages(list(torch_optimizer.state.values())),
        "float32 slice (DeepSpeed)": storages(masters),
    }
    counted: set[int] = set()
    result = {}
    for kind, found in kinds.items():
        result[kind] = sum(size for address, size in found.items() if address not in counted)
        counted.update(found)
    result["everything else"] = sum(size for address, size in live.items() if address not in counted)
    return result


def measure(strategy_name: str, workdir: Path) -> None:
    """Two steps under the strategy; rank 0 writes the census taken before the second optimizer step."""
    import torch
    from lightning.pytorch import Callback, LightningDataModule, Trainer
    from torch.utils.data import DataLoader

    from lightning_memopt import FSDP1Strategy, FSDP2Strategy, TokenClassificationModule, ZeROStrategy

    folder = workdir / "bert-base-random"
    strategy: Any = {
        "ddp": "ddp",
        "zero1": ZeROStrategy(stage=1),
        "zero2": ZeROStrategy(stage=2),
        "zero3": ZeROStrategy(stage=3),
        "fsdp1": FSDP1Strategy(),
        "fsdp2": FSDP2Strategy(),
    }[strategy_name]

    class Census(Callback):
        def on_before_optimizer_step(self, trainer: Trainer, pl_module: Any, optimizer: Any) -> None:
            if trainer.global_step == 1 and trainer.global_rank == 0:
                result = census(pl_module, optimizer) | {"parameter_count": count}
                (workdir / f"{strategy_name}.json").write_text(json.dumps(result))

    class Batches(LightningDataModule):
        def train_dataloader(self) -> DataLoader:
            rows = [
                {"input_ids": torch.randint(1000, 30000, (64,)), "labels": torch.randint(0, LABELS, (64,))}
                for _ in range(8)
            ]
            return DataLoader(rows, batch_size=2)

    module = TokenClassificationModule(str(folder), labels=[f"L{i}" for i in range(LABELS)], warmup_steps=0)
    count = sum(p.numel() for p in module.parameters())  # before any sharding
    trainer = Trainer(
        accelerator="cpu",
        devices=2,
        strategy=strategy,
        max_steps=2,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        callbacks=[Census()],
    )
    trainer.fit(module, datamodule=Batches())


def formula(strategy: str, parameters: int, devices: int = 2) -> dict[str, float]:
    """ZeRO paper bytes per rank for float32 Adam: 4 parameter + 4 gradient + 8 optimizer bytes per parameter."""
    stage = {"ddp": 0, "zero1": 1, "zero2": 2, "zero3": 3, "fsdp1": 3, "fsdp2": 3}[strategy]
    return {
        "parameters": 4 * parameters / (devices if stage >= 3 else 1),
        "gradients": 4 * parameters / (devices if stage >= 2 else 1),
        "optimizer state": 8 * parameters / (devices if stage >= 1 else 1),
    }


def activation_checkpointing_savings() -> list[dict[str, Any]]:
    from transformers import BertConfig

    from lightning_memopt.estimate import simulate_step

    config = BertConfig(**BERT_BASE, num_labels=LABELS)
    rows = []
    for sequence in (128, 512):
        plain = simulate_step(config, "token-classification", 8, sequence).forward.activations
        checkpointed = simulate_step(config, "token-classification", 8, sequence, activation_checkpointing=True)
        rows.append({"sequence": sequence, "plain": plain, "checkpointed": checkpointed.forward.activations})
    return rows


def eight_bit_state() -> dict[str, int]:
    import bitsandbytes as bnb
    import torch
    from transformers import BertConfig, BertForTokenClassification

    from lightning_memopt.distributed.memory_monitor import optimizer_state_bytes

    model = BertForTokenClassification(BertConfig(**BERT_BASE, num_labels=LABELS))
    result = {}
    for name, make in (("adamw (float32)", torch.optim.AdamW), ("adamw8bit", bnb.optim.AdamW8bit)):
        optimizer = make(model.parameters(), lr=1e-5)
        for p in model.parameters():
            p.grad = torch.zeros_like(p)
        optimizer.step()
        result[name] = sum(optimizer_state_bytes(optimizer).values())
    return result


def write_report(payload: dict) -> Path:
    count = payload["parameter_count"]
    lines = report_header(
        "Per-rank training state under DDP, FSDP and ZeRO (2 CPU processes)",
        payload,
        f"Model: bert-base-sized BertForTokenClassification, {count:,} parameters, float32, torch AdamW.",
        "Measured: rank 0's live tensors before the second optimizer step, each storage counted once. Buffers "
        "held in C++ only (DDP's gradient buckets, FSDP's communication buffers) are not Python tensors and are "
        "not counted; DeepSpeed's are.",
        "Formula: ZeRO paper, 16 bytes per parameter (4 + 4 + 8 in float32), split over 2 ranks by stage.",
    )
    lines += [
        "| strategy | parameters MiB (formula) | gradients MiB (formula) | Adam moments MiB (formula) "
        "| DeepSpeed float32 slice MiB | else MiB |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for name, row in payload["strategies"].items():
        expected = formula(name, count)
        cells = [
            f"{row[kind] / MIB:,.0f} ({expected[kind] / MIB:,.0f})"
            for kind in ("parameters", "gradients", "optimizer state")
        ]
        extra = f"{row['float32 slice (DeepSpeed)'] / MIB:,.0f} | {row['everything else'] / MIB:,.0f}"
        lines.append(f"| {name} | {' | '.join(cells)} | {extra} |")
    lines += [
        "",
        "Measured matches the formula everywhere but ZeRO-1's gradients: DeepSpeed reduces the full gradients "
        "through buckets during backward and keeps only the rank's own partition, as stage 2 does. Beyond the "
        "formula, DeepSpeed keeps a float32 copy of each rank's parameter slice for its optimizer even in float32 "
        "training, plus bucket and gathering buffers (else).",
        "",
        "## Activation checkpointing (batch 8, simulated)",
        "",
        "Tensors saved for backward at the end of the forward pass; with checkpointing, only each block's input "
        "(one block's activations are recomputed at a time during backward; `memopt estimate` adds that in).",
        "",
    ]
    lines += ["| sequence | activations MiB | with checkpointing MiB | ratio |", "|---:|---:|---:|---:|"]
    for row in payload["activation_checkpointing"]:
        ratio = row["checkpointed"] / row["plain"]
        lines.append(
            f"| {row['sequence']} | {row['plain'] / MIB:,.0f} | {row['checkpointed'] / MIB:,.0f} | {ratio:.3f} |"
        )
    state = payload["optimizer_state"]
    lines += [
        "",
        "## 8-bit optimizer state (measured)",
        "",
        *(f"- {name}: {size / MIB:,.1f} MiB" for name, size in state.items()),
        f"- ratio: {state['adamw8bit'] / state['adamw (float32)']:.3f}",
        "",
    ]
    page = PAGES / "sharding.md"
    page.write_text("\n".join(lines))
    (RESULTS / "sharding.json").write_text(json.dumps(payload, indent=2) + "\n")
    return page


def main() -> None:
    import argparse
    import subprocess

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", default="/tmp/memopt-sharding")
    parser.add_argument("--strategies", nargs="+", default=STRATEGIES, choices=STRATEGIES)
    parser.add_argument("--_child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    workdir = Path(args.workdir)
    if args._child:
        measure(args._child, workdir)
        return
    workdir.mkdir(parents=True, exist_ok=True)
    from transformers import BertConfig, BertForTokenClassification

    if not (workdir / "bert-base-random" / "config.json").exists():
        BertForTokenClassification(BertConfig(**BERT_BASE, num_labels=LABELS)).save_pretrained(
            workdir / "bert-base-random"
        )
    payload = payload_header("sharding.py") | {"strategies": {}}
    for name in args.strategies:
        print(f"== {name}", flush=True)
        env = dict(os.environ, OMP_NUM_THREADS="1")
        command = [sys.executable, __file__, "--_child", name, "--workdir", str(workdir)]
        subprocess.run(command, check=True, cwd=PROJECT_ROOT, env=env)
        payload["strategies"][name] = json.loads((workdir / f"{name}.json").read_text())
        print(payload["strategies"][name], flush=True)
    payload["parameter_count"] = next(iter(payload["strategies"].values()))["parameter_count"]
    payload["activation_checkpointing"] = activation_checkpointing_savings()
    payload["optimizer_state"] = eight_bit_state()
    print(f"Report: {write_report(payload)}")


if __name__ == "__main__":
    main()
