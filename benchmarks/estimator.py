"""``memopt estimate`` against measurement: predicted and measured per-device peak training memory.

Each configuration (architecture, model width and depth, batch, sequence length, strategy, devices, optimizer,
activation checkpointing) trains a randomly initialised model for a few steps on fixed-shape batches, in a child
process: a BERT token classifier with ``TokenClassificationModule``, or a decoder LM (Llama with grouped-query
attention and SwiGLU, or GPT-2 with its Conv1D layers and tied head) with ``CausalLMModule``, and ``MemoryMonitor``
records each step's peak resident memory. Measured = the largest step peak after the first step
(when the optimizer state exists) minus the process's resident memory just before the model was
built (interpreter, libraries, data). Predicted = ``lightning_memopt.estimate`` for the same
configuration, which never builds real weights.

The children run with ``MALLOC_MMAP_THRESHOLD_=65536``: glibc then returns large freed blocks to
the system at once, so resident memory follows the live tensors, as CUDA's ``max_memory_allocated``
does. With glibc's default adaptive threshold, freed blocks up to 32 MiB stay cached in the heap
and resident memory overstates live tensors by a varying amount (we saw +45 % on a MiniLM-sized step).

    python benchmarks/estimator.py                       # all configurations, about 10 min on 2 cores
    python benchmarks/estimator.py --accelerator cuda    # one CUDA device: bert-base and bert-large shapes

Results: ``benchmarks/results/estimator-<steps>.json`` and ``docs/results/estimator-<steps>.md``.
"""

from __future__ import annotations

import json
import os
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (
    cpu_flags,
    payload_header,
    report_header,
    results_file,
    run_child,
    save_results,
    today,
    write_child_result,
)

MIB = 2**20
VOCAB = {"bert": 30522, "llama": 32000, "gpt2": 50257}


@dataclass(frozen=True)
class Config:
    """One measured configuration."""

    hidden: int
    layers: int
    batch: int
    sequence: int
    strategy: str = "single"
    devices: int = 1
    optimizer: str = "adamw"
    checkpointing: bool = False
    accelerator: str = "cpu"
    precision: str = "32-true"
    architecture: str = "bert"  # bert (token classifier), llama (GQA, SwiGLU) or gpt2 (causal LMs)

    @property
    def name(self) -> str:
        ckpt = "-ckpt" if self.checkpointing else ""
        precision = "" if self.precision == "32-true" else f"-{self.precision}"
        architecture = "" if self.architecture == "bert" else f"{self.architecture}-"
        return (
            f"{architecture}h{self.hidden}-l{self.layers}-b{self.batch}-s{self.sequence}-{self.strategy}{self.devices}"
            f"-{self.optimizer}{ckpt}{precision}"
        )

    @property
    def task(self) -> str:
        return "token-classification" if self.architecture == "bert" else "causal-lm"

    @property
    def heads(self) -> int:
        return max(1, self.hidden // 64)


CONFIGS = [
    Config(256, 4, 8, 128),
    Config(384, 6, 8, 128),
    Config(384, 6, 16, 256),
    Config(768, 4, 8, 128),
    Config(384, 6, 8, 128, optimizer="adamw8bit"),
    Config(512, 4, 8, 128, strategy="ddp", devices=2),
    Config(384, 6, 8, 128, strategy="fsdp2", devices=2),
    Config(384, 6, 8, 256, strategy="fsdp2", devices=2, checkpointing=True),
    Config(384, 6, 8, 128, strategy="zero2", devices=2),
    Config(384, 6, 8, 128, strategy="zero3", devices=2),
    Config(512, 4, 4, 256, architecture="llama"),
    Config(512, 4, 4, 256, strategy="fsdp2", devices=2, architecture="llama"),
    Config(384, 4, 4, 256, architecture="gpt2"),
]
# One CUDA device (the distributed strategies then run on NCCL with one rank): bert-base and bert-large shapes.
CUDA_CONFIGS = [
    Config(384, 6, 32, 128, accelerator="cuda"),
    Config(768, 12, 32, 128, accelerator="cuda"),
    Config(768, 12, 16, 512, accelerator="cuda"),
    Config(768, 12, 16, 512, strategy="fsdp2", checkpointing=True, accelerator="cuda"),
    Config(768, 12, 32, 128, optimizer="adamw8bit", accelerator="cuda"),
    Config(1024, 24, 16, 128, accelerator="cuda"),
    Config(768, 12, 32, 128, strategy="zero2", accelerator="cuda"),
    Config(768, 12, 32, 128, strategy="zero3", accelerator="cuda"),
    Config(768, 12, 32, 128, accelerator="cuda", precision="bf16-mixed"),
    Config(1024, 8, 8, 1024, accelerator="cuda", architecture="llama"),
    Config(1024, 8, 8, 1024, strategy="fsdp2", checkpointing=True, accelerator="cuda", architecture="llama"),
    Config(768, 12, 8, 1024, accelerator="cuda", architecture="gpt2"),
]
LABELS = ["O", "B-PER", "I-PER", "B-ORG", "I-ORG", "B-LOC", "I-LOC", "B-MISC", "I-MISC"]


def model_config(config: Config) -> Any:
    """The ``transformers`` config of the configuration's model."""
    from transformers import BertConfig, GPT2Config, LlamaConfig

    vocab = VOCAB[config.architecture]
    if config.architecture == "llama":  # two query heads per KV head; SwiGLU of 8/3 the width, as Llama sizes it
        return LlamaConfig(vocab_size=vocab, hidden_size=config.hidden, intermediate_size=8 * config.hidden // 3,
                           num_hidden_layers=config.layers, num_attention_heads=config.heads,
                           num_key_value_heads=max(1, config.heads // 2), max_position_embeddings=config.sequence)  # fmt: skip
    if config.architecture == "gpt2":
        return GPT2Config(vocab_size=vocab, n_embd=config.hidden, n_layer=config.layers, n_head=config.heads,
                          n_positions=max(1024, config.sequence))  # fmt: skip
    return BertConfig(
        vocab_size=vocab,
        hidden_size=config.hidden,
        num_hidden_layers=config.layers,
        num_attention_heads=config.heads,
        intermediate_size=4 * config.hidden,
        num_labels=len(LABELS),
    )


def model_folder(config: Config, workdir: Path) -> Path:
    """A randomly initialised model of the configuration's shape, saved where the module loads it."""
    from transformers import AutoModelForCausalLM, BertForTokenClassification

    name = "" if config.architecture == "bert" else f"{config.architecture}-"
    folder = workdir / "models" / f"{name}h{config.hidden}-l{config.layers}"
    if not (folder / "config.json").exists():
        if config.architecture == "bert":
            BertForTokenClassification(model_config(config)).save_pretrained(folder)
        else:
            AutoModelForCausalLM.from_config(model_config(config)).save_pretrained(folder)
    return folder


def measure(config: Config, workdir: Path, steps: int) -> dict:
    """Train ``steps`` steps and return the measured peak above the pre-model baseline (child process)."""
    import torch
    from lightning.pytorch import LightningDataModule, Trainer
    from torch.utils.data import DataLoader

    from lightning_memopt import (
        CausalLMModule,
        FSDP2Strategy,
        MemoryMonitor,
        TokenClassificationModule,
        ZeROStrategy,
    )
    from lightning_memopt.distributed.memory_monitor import cpu_peak_bytes, reset_cpu_peak

    class FixedBatches(LightningDataModule):
        def train_dataloader(self) -> DataLoader:
            generator = torch.Generator().manual_seed(0)
            count = steps * config.batch * config.devices
            shape = (config.sequence,)
            rows = []
            for _ in range(count):
                ids = torch.randint(1000, VOCAB[config.architecture], shape, generator=generator)
                labels = (
                    torch.randint(0, len(LABELS), shape, generator=generator) if config.task != "causal-lm" else ids
                )
                rows.append({"input_ids": ids, "attention_mask": torch.ones(shape, dtype=torch.long), "labels": labels})
            return DataLoader(rows, batch_size=config.batch)

    data = FixedBatches()
    if config.accelerator == "cuda":
        baseline = torch.cuda.memory_allocated()
    else:
        reset_cpu_peak()
        baseline = cpu_peak_bytes()
    folder = str(model_folder(config, workdir))
    if config.task == "causal-lm":
        module = CausalLMModule(folder, optimizer=config.optimizer)
    else:
        module = TokenClassificationModule(folder, labels=LABELS, optimizer=config.optimizer)
    if config.strategy.startswith("zero"):
        strategy = ZeROStrategy(stage=int(config.strategy[-1]), activation_checkpointing=config.checkpointing)
    else:
        strategy = {
            "single": "auto",
            "ddp": "ddp",
            "fsdp2": FSDP2Strategy(activation_checkpointing=config.checkpointing),
        }[config.strategy]
    monitor = MemoryMonitor()
    trainer = Trainer(
        accelerator=config.accelerator,
        devices=config.devices,
        precision=config.precision,
        strategy=strategy,
        max_steps=steps,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        callbacks=[monitor],
    )
    trainer.fit(module, datamodule=data)
    peaks = [peak - baseline for peak in monitor.step_peaks[1:]]
    return {"config": asdict(config), "measured_bytes": max(peaks), "step_peaks_mib": [round(p / MIB) for p in peaks]}


def predict(config: Config) -> dict:
    """What ``lightning_memopt.estimate`` predicts for the configuration."""
    from lightning_memopt.distributed.zero import DEFAULT_BUCKET
    from lightning_memopt.estimate.simulation import simulate_step
    from lightning_memopt.estimate.strategies import device_peak

    model = model_config(config)
    # The fused kernel runs on CUDA, and on the CPU where attention has no dropout (Llama; GPT-2 and BERT have some).
    no_dropout = getattr(model, "attention_dropout", None) == 0.0
    step = simulate_step(
        model,
        config.task,  # type: ignore[arg-type]
        config.batch,
        config.sequence,
        activation_checkpointing=config.checkpointing,
        fused_attention=config.accelerator == "cuda" or no_dropout,
    )
    return device_peak(step, config.strategy, config.devices, config.optimizer, config.accelerator, DEFAULT_BUCKET)  # type: ignore[arg-type]


CPU_NOTES = (
    "Measured: largest per-step peak resident memory after the first step, minus the resident memory "
    "before the model was built, on rank 0 (MALLOC_MMAP_THRESHOLD_=65536, see the script).",
    "The estimate counts tensors. On CPU the process also grows by a few tens of MiB that are not tensors "
    "during training (thread pools, the oneDNN/MKL workspaces, the autograd engine), which is most of the "
    "remaining gap and weighs most on the smallest models. bitsandbytes' CPU 8-bit step is modelled as "
    "five float32 copies of the largest tensor (measured on one tensor); on CUDA its fused kernels need none.",
)
CUDA_NOTES = (
    "Measured: largest per-step `torch.cuda.max_memory_allocated` after the first step, minus the memory "
    "allocated before the model was built; one CUDA device, the distributed strategies on NCCL with one rank.",
    "Mixed precision (`bf16-mixed`) is estimated as 32-true, an upper bound: autocast keeps lower-precision "
    "copies of activations and weights, and its error is not counted in the ±15 % tally.",
)


def add_prediction(row: dict, predicted: dict) -> None:
    """Put a prediction and its error against the row's measurement into ``row``."""
    row["predicted_bytes"] = predicted["peak"]
    row["predicted_parts_mib"] = {k: round(v / MIB, 1) for k, v in predicted.items()}
    row["error"] = predicted["peak"] / row["measured_bytes"] - 1


def report_name(accelerator: str) -> str:
    return "estimator" if accelerator == "cpu" else f"estimator-{accelerator}"


def keep_saved_rows(payload: dict, steps: int, accelerator: str, configs: dict[str, Config]) -> None:
    """Rows of the saved results this run did not measure (``--only``), predicted again, noted with their origin."""
    saved = results_file(report_name(accelerator), steps)
    if not saved.exists():
        return
    previous = json.loads(saved.read_text())
    measured = {row["name"] for row in payload["rows"]}
    where = {field: previous[field] for field in ("command", "date", "machine")}
    origins = payload.setdefault("carried_over", {})
    for row in previous["rows"]:
        if row["name"] not in measured and row["name"] in configs:
            add_prediction(row, predict(configs[row["name"]]))
            payload["rows"].append(row)
            origins[row["name"]] = previous.get("carried_over", {}).get(row["name"], where)
    order = list(configs)
    payload["rows"].sort(key=lambda row: order.index(row["name"]))
    if not origins:
        del payload["carried_over"]


def write_report(payload: dict, steps: int, accelerator: str) -> Path:
    measured_how, notes = CUDA_NOTES if accelerator == "cuda" else CPU_NOTES
    predicted_again = [f"Predictions made {payload['predicted']}"] if "predicted" in payload else []
    lines = report_header(
        f"Memory estimator against measurement ({accelerator.upper()})",
        payload,
        measured_how,
        *predicted_again,
        f"CPU flags: {', '.join(payload.get('cpu_flags', [])) or 'not recorded'} (memory, not speed, is measured).",
        "Predicted (every row, by this run): `lightning_memopt.estimate` (meta-device simulation of one step, then "
        "the strategy's sharding).",
        "Model: random BERT token classifier, vocabulary 30,522, FFN 4 x width, heads = width / 64; `llama-`: random "
        "Llama causal LM, vocabulary 32,000, SwiGLU of 8/3 x width, heads = width / 64 with half as many KV heads; "
        "`gpt2-`: random GPT-2 (Conv1D layers, head tied to the embedding), vocabulary 50,257.",
    )
    lines += [
        "| configuration | predicted MiB | measured MiB | error |",
        "|---|---:|---:|---:|",
    ]
    for row in payload["rows"]:
        lines.append(
            f"| {row['name']} | {row['predicted_bytes'] / MIB:.0f} | {row['measured_bytes'] / MIB:.0f} | "
            f"{100 * row['error']:+.1f} % |"
        )
    exact = [row for row in payload["rows"] if "mixed" not in row["name"]]
    within = sum(abs(row["error"]) <= 0.15 for row in exact)
    residual = sorted(round((row["measured_bytes"] - row["predicted_bytes"]) / MIB) for row in exact)
    lines += [
        "",
        f"{within} of {len(exact)} full-precision configurations within ±15 %. Measured minus predicted: "
        f"{', '.join(str(r) for r in residual)} MiB.",
        "",
        notes,
        "",
    ]
    return save_results(report_name(accelerator), steps, payload, lines)


def main() -> None:
    import argparse

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=4, help="training steps per configuration")
    parser.add_argument("--workdir", default="/tmp/memopt-estimator")
    parser.add_argument("--skip_done", action="store_true")
    parser.add_argument(
        "--only", nargs="*", default=None, help="configuration names to run (the saved figures of the others are kept)"
    )
    parser.add_argument("--accelerator", choices=["cpu", "cuda"], default="cpu", help="which configuration list")
    parser.add_argument("--measured", default=None, help="an earlier run's JSON: predict again, measure nothing")
    parser.add_argument("--_child", nargs="+", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    workdir = Path(args.workdir)
    configs = {config.name: config for config in (CUDA_CONFIGS if args.accelerator == "cuda" else CONFIGS)}
    if args._child:
        _, name = args._child
        result = measure(configs[name], workdir, args.steps)
        if int(os.environ.get("LOCAL_RANK", "0")) == 0:
            write_child_result(workdir, "estimator", name, result)
        return
    if args.measured:  # predict again against an earlier run's measurements (e.g. from a lent GPU)
        payload = json.loads(Path(args.measured).read_text())
        payload["predicted"] = f"again on {today()} from its measurements: python benchmarks/estimator.py " + " ".join(
            sys.argv[1:]
        )
        for row in payload["rows"]:
            add_prediction(row, predict(configs[row["name"]]))
        print(f"Report: {write_report(payload, args.steps, args.accelerator)}")
        return
    os.environ["MALLOC_MMAP_THRESHOLD_"] = "65536"  # inherited by the children, see the module docstring
    payload = payload_header("estimator.py") | {"cpu_flags": cpu_flags(), "rows": []}
    for name, config in configs.items():
        if args.only and name not in args.only:
            continue
        model_folder(config, workdir)
        accelerator = ("--accelerator", args.accelerator)
        measured = run_child(
            "estimator.py", workdir, args.steps, "estimator", name, *accelerator, skip_done=args.skip_done
        )
        row = {"name": name, "measured_bytes": measured["measured_bytes"], "step_peaks_mib": measured["step_peaks_mib"]}
        add_prediction(row, predict(config))
        print(row, flush=True)
        payload["rows"].append(row)
    if args.only:
        keep_saved_rows(payload, args.steps, args.accelerator, configs)
    print(f"Report: {write_report(payload, args.steps, args.accelerator)}")


if __name__ == "__main__":
    main()
