"""Distributed wiring and memory accounting: the FSDP1, FSDP2 and DeepSpeed ZeRO presets and the memory monitor."""

from lightning_memopt.core.blocks import transformer_blocks
from lightning_memopt.distributed.fsdp1 import FSDP1Strategy
from lightning_memopt.distributed.fsdp2 import FSDP2Strategy, shard_transformer
from lightning_memopt.distributed.memory_monitor import MemoryMonitor, model_state_bytes, optimizer_state_bytes
from lightning_memopt.distributed.zero import DEFAULT_BUCKET as ZERO_DEFAULT_BUCKET
from lightning_memopt.distributed.zero import ZeROStrategy

__all__ = [
    "ZERO_DEFAULT_BUCKET",
    "FSDP1Strategy",
    "FSDP2Strategy",
    "MemoryMonitor",
    "ZeROStrategy",
    "model_state_bytes",
    "optimizer_state_bytes",
    "shard_transformer",
    "transformer_blocks",
]
