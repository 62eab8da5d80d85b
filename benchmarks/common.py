"""Helpers shared by the benchmark scripts: machine description, peak memory, a step timer callback."""

from __future__ import annotations

import datetime as dt
import os
import platform
import resource
import time
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch import Callback, LightningModule, Trainer

PROJECT_ROOT = Path(__file__).resolve().parents[1]


def machine() -> str:
    """One line naming CPU model, cores, memory and library versions."""
    cpu = platform.processor() or platform.machine()
    if Path("/proc/cpuinfo").exists():
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    import lightning
    import transformers

    return (
        f"{cpu}, {os.cpu_count()} cores, {memory:.0f} GiB RAM; torch {torch.__version__}, "
        f"lightning {lightning.__version__}, transformers {transformers.__version__}, {torch.get_num_threads()} threads"
    )


def today() -> str:
    return dt.date.today().isoformat()


def peak_rss_mib() -> float:
    """Peak resident set size of this process so far (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


class StepTimer(Callback):
    """Times training batches (forward, backward, optimizer) apart from validation, and counts samples."""

    def __init__(self) -> None:
        self.train_seconds = 0.0
        self.validation_seconds = 0.0
        self.samples = 0
        self.steps = 0
        self._started = 0.0

    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int) -> None:
        self._started = time.perf_counter()

    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        self.train_seconds += time.perf_counter() - self._started
        first = batch["input_ids"] if isinstance(batch, dict) else batch[0]
        self.samples += int(first.shape[0])
        self.steps += 1

    def on_validation_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._validation_started = time.perf_counter()

    def on_validation_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self.validation_seconds += time.perf_counter() - self._validation_started

    def summary(self) -> dict[str, float]:
        return {
            "train_seconds": round(self.train_seconds, 1),
            "validation_seconds": round(self.validation_seconds, 1),
            "train_steps": self.steps,
            "train_samples_per_second": round(self.samples / max(self.train_seconds, 1e-9), 2),
        }
