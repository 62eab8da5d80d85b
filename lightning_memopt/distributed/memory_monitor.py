"""``MemoryMonitor``: per-step peak memory and, at the end of fit, where the memory went.

On CUDA the peak is ``torch.cuda.max_memory_allocated`` (reset before each step); on CPU it is the
process's peak resident set size, ``VmHWM`` in ``/proc/self/status``, reset before each step by writing
``5`` to ``/proc/self/clear_refs`` (Linux). The end-of-fit table splits the largest step peak into
parameters, gradients, optimizer state (by dtype) and the rest (activations, temporaries, and on CPU
the interpreter and libraries).

Example:
    >>> import torch
    >>> model = torch.nn.Linear(10, 10)
    >>> model_state_bytes(model)
    {'parameters': 440, 'gradients': 0}
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.utilities.rank_zero import rank_zero_info
from torch import nn
from typing_extensions import override

MIB = 2**20
STATUS, CLEAR_REFS = Path("/proc/self/status"), Path("/proc/self/clear_refs")


def cpu_peak_bytes() -> int:
    """This process's peak resident set size since start or the last :func:`reset_cpu_peak`."""
    match = re.search(r"VmHWM:\s+(\d+) kB", STATUS.read_text())
    if match is None:
        raise RuntimeError(f"{STATUS} has no VmHWM line; CPU peak memory needs Linux.")
    return int(match.group(1)) * 1024


def reset_cpu_peak() -> None:
    """Reset the peak resident set size to the current one (Linux ``clear_refs``)."""
    CLEAR_REFS.write_text("5")


def held_bytes(tensor: torch.Tensor, device_type: str | None = None) -> int:
    """Bytes this process holds for ``tensor``: its local shard for a DTensor, and 0 when it lives on
    another kind of device than ``device_type`` (e.g. state offloaded to the CPU while CUDA is measured)."""
    local = tensor.to_local() if hasattr(tensor, "to_local") else tensor
    if device_type is not None and local.device.type != device_type:
        return 0
    return local.numel() * local.element_size()


def model_state_bytes(model: nn.Module, device_type: str | None = None) -> dict[str, int]:
    """Bytes held by the parameters and by their gradients (on ``device_type`` only, if given)."""
    parameters = list(model.parameters())
    return {
        "parameters": sum(held_bytes(p, device_type) for p in parameters),
        "gradients": sum(held_bytes(p.grad, device_type) for p in parameters if p.grad is not None),
    }


def optimizer_state_bytes(optimizer: torch.optim.Optimizer, device_type: str | None = None) -> dict[str, int]:
    """Bytes of optimizer state tensors (e.g. Adam's moments), keyed by dtype (on ``device_type`` only, if given)."""
    totals: dict[str, int] = {}
    for state in optimizer.state.values():
        for value in state.values():
            if isinstance(value, torch.Tensor) and (size := held_bytes(value, device_type)):
                key = str(value.dtype).removeprefix("torch.")
                totals[key] = totals.get(key, 0) + size
    return totals


class MemoryMonitor(Callback):
    """Log each training step's peak memory (``peak_memory_mib``) and print a breakdown when fit ends.

    Works with any LightningModule. The breakdown is kept in :attr:`breakdown` (bytes) after fit. Other
    callbacks that hold memory outside the module add their own lines through a ``memory_report(device_type)``
    method returning ``{line: bytes}``: ``KnowledgeDistillation`` reports its frozen teacher's weights and the
    teacher logits of the step (the rest of the KD loss's temporaries stay under "other").
    """

    def __init__(self) -> None:
        self.step_peaks: list[int] = []
        self.breakdown: dict[str, int] = {}
        self._measured_on = "CPU resident"

    @override
    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int) -> None:
        if pl_module.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(pl_module.device)
        else:
            reset_cpu_peak()

    @override
    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        device = pl_module.device
        peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else cpu_peak_bytes()
        self.step_peaks.append(peak)
        pl_module.log("peak_memory_mib", peak / MIB, on_step=True, on_epoch=False, prog_bar=True)
        if len(self.step_peaks) == 1 or peak >= max(self.step_peaks[:-1]):
            self._record_breakdown(trainer, pl_module, peak)

    def _record_breakdown(self, trainer: Trainer, pl_module: LightningModule, peak: int) -> None:
        device_type = pl_module.device.type
        self._measured_on = "CUDA allocated" if device_type == "cuda" else "CPU resident"
        states = model_state_bytes(pl_module, device_type)
        # Gradients are freed by zero_grad(set_to_none=True) after the step; count them at parameter size.
        trainable = sum(held_bytes(p, device_type) for p in pl_module.parameters() if p.requires_grad)
        states["gradients"] = max(states["gradients"], trainable)
        for optimizer in trainer.optimizers:
            for dtype, size in optimizer_state_bytes(optimizer, device_type).items():
                key = f"optimizer state ({dtype})"
                states[key] = states.get(key, 0) + size
        for callback in trainer.callbacks:  # what other callbacks hold (a distillation teacher, say)
            report = getattr(callback, "memory_report", None)
            if callable(report):
                states.update(report(device_type))
        states["other (activations, temporaries, runtime)"] = max(0, peak - sum(states.values()))
        states["peak"] = peak
        self.breakdown = states

    @override
    def on_fit_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self.breakdown:  # the module may be back on the CPU by now (Lightning tears down before on_fit_end)
            title = f"Memory at the largest step peak (rank 0, {self._measured_on}):"
            rank_zero_info(format_breakdown(self.breakdown, title))


def format_breakdown(breakdown: dict[str, int], title: str) -> str:
    """A table of MiB and shares of the peak.

    Example:
        >>> print(format_breakdown({"parameters": 2**20, "peak": 2**22}, "Memory:"))
        Memory:
          parameters      1.0 MiB   25.0 %
          peak            4.0 MiB  100.0 %
    """
    width = max(len(name) for name in breakdown)
    peak = breakdown.get("peak") or 1
    rows = [f"  {name:<{width}}  {size / MIB:7.1f} MiB  {100 * size / peak:5.1f} %" for name, size in breakdown.items()]
    return "\n".join([title, *rows])
