"""MemoryMonitor: per-step peaks that reset between steps, and an exact parameter/optimizer breakdown."""

from __future__ import annotations

import torch
from helpers import quiet_trainer
from lightning.pytorch import LightningModule
from torch import nn

from lightning_memopt import MemoryMonitor
from lightning_memopt.distributed.memory_monitor import model_state_bytes, optimizer_state_bytes

SPIKE_MIB = 256


class SpikyModule(LightningModule):
    """A small model that allocates and touches a large temporary on its third step only."""

    def __init__(self) -> None:
        super().__init__()
        self.layer = nn.Linear(256, 256)

    def training_step(self, batch, batch_idx: int):
        if batch_idx == 2:
            spike = torch.ones(SPIKE_MIB * 2**20 // 4)  # float32, written so the pages are resident
            del spike
        return self.layer(batch[0]).pow(2).mean()

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=1e-3)

    def train_dataloader(self):
        return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.randn(40, 256)), batch_size=8)


def test_per_step_peaks_and_breakdown() -> None:
    monitor = MemoryMonitor()
    module = SpikyModule()
    trainer = quiet_trainer(max_steps=5, enable_checkpointing=False, callbacks=[monitor])
    trainer.fit(module)
    peaks = [p / 2**20 for p in monitor.step_peaks]
    assert len(peaks) == 5
    others = peaks[:2] + peaks[3:]
    assert peaks[2] - max(others) > 0.8 * SPIKE_MIB, peaks  # the spike shows in its own step only
    assert max(others) - min(others) < 0.5 * SPIKE_MIB, peaks  # the peak was reset after it
    breakdown = monitor.breakdown
    parameters = (256 * 256 + 256) * 4
    assert breakdown["parameters"] == parameters
    assert breakdown["gradients"] == parameters
    assert breakdown["optimizer state (float32)"] == 2 * parameters + 2 * 4  # exp_avg, exp_avg_sq, two step counters
    assert breakdown["peak"] == monitor.step_peaks[2]
    assert "peak_memory_mib" in trainer.callback_metrics


def test_optimizer_state_bytes_by_dtype() -> None:
    weight = nn.Parameter(torch.zeros(10, dtype=torch.bfloat16))
    optimizer = torch.optim.SGD([weight], lr=0.1, momentum=0.9)
    weight.grad = torch.ones_like(weight)
    optimizer.step()
    assert optimizer_state_bytes(optimizer) == {"bfloat16": 20}


def test_breakdown_counts_only_the_measured_device() -> None:
    model = nn.Linear(10, 10)  # 440 bytes of float32 parameters, on the CPU
    assert model_state_bytes(model, "cpu") == {"parameters": 440, "gradients": 0}
    # Measuring CUDA memory, parameters offloaded to the CPU are not part of the device's peak.
    assert model_state_bytes(model, "cuda") == {"parameters": 0, "gradients": 0}
    optimizer = torch.optim.AdamW(model.parameters())
    model(torch.ones(1, 10)).sum().backward()
    optimizer.step()
    assert optimizer_state_bytes(optimizer, "cuda") == {}
    assert optimizer_state_bytes(optimizer, "cpu")["float32"] == 2 * 440 + 2 * 4  # two moments, a step per tensor
