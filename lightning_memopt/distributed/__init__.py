"""Distributed wiring and memory accounting: the FSDP2 preset and the memory monitor."""

from lightning_memopt.distributed.fsdp2 import FSDP2Strategy, shard_transformer, transformer_blocks
from lightning_memopt.distributed.memory_monitor import MemoryMonitor, model_state_bytes, optimizer_state_bytes

__all__ = [
    "FSDP2Strategy",
    "MemoryMonitor",
    "model_state_bytes",
    "optimizer_state_bytes",
    "shard_transformer",
    "transformer_blocks",
]
