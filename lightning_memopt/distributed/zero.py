"""DeepSpeed ZeRO for any LightningModule: ``ZeROStrategy`` picks a stage, sizes the buckets, and runs on CPU too.

ZeRO splits the optimizer state (stage 1), also the gradients (stage 2), and also the parameters
(stage 3) over the data-parallel devices; offload moves the optimizer state (and in stage 3 the
parameters) to CPU memory. This preset is Lightning's ``DeepSpeedStrategy`` with three changes:

- it runs on CPU processes (gloo), where Lightning refuses anything but CUDA, so that recipes and
  tests run on any machine (DeepSpeed's CPU accelerator is selected automatically there);
- its communication buckets default to 50 M elements instead of 200 M (DeepSpeed allocates a stage-2
  gradient bucket of that size up front: 800 MB in float32 for a model of any size);
- ``activation_checkpointing`` wraps each transformer block (found as for ``FSDP2Strategy``) in
  PyTorch's composable checkpointing, with no change to the model's code.

Offload is refused on CPU (the state is there already) with a message, before any process starts.

Example (YAML): ``trainer.strategy: {class_path: lightning_memopt.ZeROStrategy, init_args: {stage: 3}}``
"""

from __future__ import annotations

import argparse
from typing import Any, Literal

from lightning.fabric.utilities.seed import reset_seed
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.accelerators import CPUAccelerator
from lightning.pytorch.strategies import DDPStrategy, DeepSpeedStrategy
from lightning.pytorch.utilities import rank_zero_warn
from torch import nn
from torch.optim import Optimizer
from typing_extensions import override

from lightning_memopt.core.blocks import required_blocks
from lightning_memopt.core.checkpoints import verify_checkpoint
from lightning_memopt.core.compat import checkpoint_activations
from lightning_memopt.distributed.namespace import PresetRepr

DEFAULT_BUCKET = 50_000_000


class ZeROStrategy(PresetRepr, DeepSpeedStrategy):
    """DeepSpeed ZeRO stage 1, 2 or 3, with or without offload, on CUDA or (for testing) CPU.

    Args:
        stage: 1 shards optimizer state, 2 also gradients, 3 also parameters.
        offload: keep optimizer state (and in stage 3 parameters) in CPU memory (CUDA only).
        activation_checkpointing: recompute each transformer block's activations in the backward pass.
        block_classes: class names of the blocks to checkpoint; ``None`` finds them.
        bucket_size: elements per all-gather and reduce bucket (DeepSpeed's ``*_bucket_size``).
        kwargs: the rest of ``DeepSpeedStrategy``'s options.
    """

    def __init__(
        self,
        stage: Literal[1, 2, 3] = 2,
        offload: bool = False,
        activation_checkpointing: bool = False,
        block_classes: list[str] | None = None,
        bucket_size: int = DEFAULT_BUCKET,
        **kwargs: Any,
    ) -> None:
        if stage not in (1, 2, 3):
            raise ValueError(f"ZeROStrategy(stage={stage!r}): the stage is 1, 2 or 3.")
        if offload and stage == 1:
            raise ValueError("ZeROStrategy(offload=True) needs stage 2 or 3 (DeepSpeed offloads from stage 2 on).")
        if bucket_size < 1:
            raise ValueError(f"ZeROStrategy(bucket_size={bucket_size}) must be a positive number of elements.")
        kwargs.setdefault("allgather_bucket_size", bucket_size)
        kwargs.setdefault("reduce_bucket_size", bucket_size)
        super().__init__(stage=stage, offload_optimizer=offload, offload_parameters=offload and stage == 3, **kwargs)
        if offload:  # any module's optimizer runs offloaded (DeepSpeed would refuse all but its CPU Adam)
            self.config.setdefault("zero_force_ds_cpu_optimizer", False)
        self.offload = offload
        self.activation_checkpointing = activation_checkpointing
        self.block_classes = block_classes

    @override
    def load_checkpoint(self, checkpoint_path: Any, weights_only: bool | None = None) -> dict[str, Any]:
        verify_checkpoint(checkpoint_path)  # Lightning and DeepSpeed read sharded folders with plain pickle
        return super().load_checkpoint(checkpoint_path, weights_only)

    @override
    def setup_environment(self) -> None:
        if isinstance(self.accelerator, CPUAccelerator):
            if self.offload:
                raise ValueError("ZeROStrategy(offload=True) needs CUDA devices: on CPU the state is there already.")
            DDPStrategy.setup_environment(self)  # Lightning's DeepSpeed refuses CPU; DeepSpeed itself runs there
            return
        super().setup_environment()

    @override
    def setup_distributed(self) -> None:
        if not isinstance(self.accelerator, CPUAccelerator):
            super().setup_distributed()
            return
        reset_seed()  # as DeepSpeedStrategy does, without its check of CUDA device indices
        self.set_world_ranks()
        self._init_deepspeed_distributed()

    @override
    def _setup_model_and_optimizer(
        self, model: nn.Module, optimizer: Optimizer | None, lr_scheduler: Any = None
    ) -> tuple[Any, Optimizer]:
        if not isinstance(self.accelerator, CPUAccelerator):
            if self.offload and optimizer is not None and "CPUAdam" not in type(optimizer).__name__:
                rank_zero_warn(
                    f"ZeROStrategy(offload=True) steps {type(optimizer).__name__} on the CPU; DeepSpeed's vectorised "
                    "deepspeed.ops.adam.DeepSpeedCPUAdam(adamw_mode=True) is several times faster there. Our task "
                    "modules choose it themselves."
                )
            return super()._setup_model_and_optimizer(model, optimizer, lr_scheduler)
        import deepspeed

        # As DeepSpeedStrategy does, but a CPU device has no index: DeepSpeed takes the local rank.
        engine, deepspeed_optimizer, _, _ = deepspeed.initialize(
            args=argparse.Namespace(device_rank=self.local_rank),
            config=self.config,
            model=model,
            model_parameters=[p for p in model.parameters() if p.requires_grad],
            optimizer=optimizer,
            lr_scheduler=lr_scheduler,
            dist_init_required=False,
        )
        return engine, deepspeed_optimizer

    @override
    def setup(self, trainer: Trainer) -> None:
        if self.activation_checkpointing:
            checkpoint_blocks(self.lightning_module, self.block_classes)
        super().setup(trainer)


def checkpoint_blocks(module: LightningModule | None, block_classes: list[str] | None) -> list[str]:
    """Wrap each transformer block of ``module`` in composable activation checkpointing (once)."""
    assert module is not None
    blocks = required_blocks(module, block_classes, "activation_checkpointing=True")
    for _, block in blocks:
        checkpoint_activations(block)
    return [name for name, _ in blocks]
