"""Distributed wiring and memory accounting (issue #6): the memory monitor comes first."""

from lightning_memopt.distributed.memory_monitor import MemoryMonitor, model_state_bytes, optimizer_state_bytes

__all__ = ["MemoryMonitor", "model_state_bytes", "optimizer_state_bytes"]
