"""FSDP2 for any LightningModule: ``FSDP2Strategy`` shards each transformer block, no ``configure_model`` needed.

Lightning's ``ModelParallelStrategy`` runs FSDP2 (``fully_shard``), including on CPU with gloo, but
asks every LightningModule to shard itself in ``configure_model``. This preset does it for modules
that do not: it finds the repeated transformer blocks (the members of a ``ModuleList`` that share one
class, such as ``BertLayer``; or the classes you name), optionally wraps each in composable activation
checkpointing (``torch.distributed._composable.checkpoint``, which keeps full-checkpoint resume
working where ``checkpoint_wrapper`` does not), shards each block and then the whole module. A module
that defines its own ``configure_model`` is left to it.

Example (YAML): ``trainer.strategy: {class_path: lightning_memopt.FSDP2Strategy}``
"""

from __future__ import annotations

import types
from collections.abc import Sequence
from typing import Any, Literal

import torch
from lightning.pytorch import LightningModule
from lightning.pytorch.strategies import ModelParallelStrategy
from lightning.pytorch.utilities.model_helpers import is_overridden
from torch import nn
from torchmetrics import Metric
from typing_extensions import override

from lightning_memopt.core.blocks import required_blocks
from lightning_memopt.core.checkpoints import verify_checkpoint
from lightning_memopt.core.compat import checkpoint_activations
from lightning_memopt.distributed.namespace import PresetRepr

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def shard_transformer(
    module: nn.Module,
    mesh: Any,
    block_classes: Sequence[str] | None = None,
    activation_checkpointing: bool = False,
    mixed_precision: Literal["bf16", "fp16"] | None = None,
    cpu_offload: bool = False,
    reshard_after_forward: bool = True,
) -> list[str]:
    """Apply (checkpointing and) ``fully_shard`` to each transformer block, then to ``module``; return the blocks."""
    from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, fully_shard

    options: dict[str, Any] = {"mesh": mesh, "reshard_after_forward": reshard_after_forward}
    if mixed_precision is not None:
        options["mp_policy"] = MixedPrecisionPolicy(param_dtype=DTYPES[mixed_precision], reduce_dtype=torch.float32)
    if cpu_offload:
        options["offload_policy"] = CPUOffloadPolicy()
    blocks = required_blocks(module, block_classes, "FSDP2Strategy (or shard in your own configure_model)")
    for _, block in blocks:
        if activation_checkpointing:
            checkpoint_activations(block)
        fully_shard(block, **options)
    for inner in models_holding(module, [name for name, _ in blocks]):
        fully_shard(inner, **options)  # root-capable where the forward runs: `self.model(...)` in training_step
    fully_shard(module, **options)
    return [name for name, _ in blocks]


def models_holding(module: nn.Module, block_names: list[str]) -> list[nn.Module]:
    """The outermost transformers models below ``module`` that hold transformer blocks.

    A LightningModule whose ``training_step`` calls ``self.model(...)`` never runs its own forward, so FSDP2's
    root on it never gathers the embeddings: sharding the inner model too makes it the root when it runs first.
    """
    from transformers import PreTrainedModel

    found: list[tuple[str, nn.Module]] = []
    for name, child in module.named_modules():
        if (
            not name
            or not isinstance(child, PreTrainedModel)
            or any(name.startswith(f"{outer}.") for outer, _ in found)
        ):
            continue
        if any(block.startswith(f"{name}.") for block in block_names):
            found.append((name, child))
    return [child for _, child in found]


class FSDP2Strategy(PresetRepr, ModelParallelStrategy):
    """``ModelParallelStrategy`` (data-parallel FSDP2) that shards LightningModules without ``configure_model``.

    Args:
        block_classes: class names of the blocks to shard one by one; ``None`` finds them.
        activation_checkpointing: recompute each block's activations in the backward pass.
        mixed_precision: ``"bf16"`` or ``"fp16"`` parameters in forward/backward (reductions in float32).
        cpu_offload: keep parameters, gradients and optimizer state on the CPU (CUDA only).
        reshard_after_forward: free gathered parameters after each block's forward (ZeRO-3 like); ``False``
            keeps them until backward (ZeRO-2 like, more memory, less communication).
        kwargs: the rest of ``ModelParallelStrategy``'s options (``save_distributed_checkpoint``, ``timeout``...).

    Example (YAML): ``trainer.strategy: {class_path: lightning_memopt.FSDP2Strategy, init_args: {activation_checkpointing: true}}``
    """

    def __init__(
        self,
        block_classes: list[str] | None = None,
        activation_checkpointing: bool = False,
        mixed_precision: Literal["bf16", "fp16"] | None = None,
        cpu_offload: bool = False,
        reshard_after_forward: bool = True,
        **kwargs: Any,
    ) -> None:
        if mixed_precision is not None and mixed_precision not in DTYPES:
            raise ValueError(f"mixed_precision must be 'bf16', 'fp16' or None, got {mixed_precision!r}.")
        # LightningCLI passes every option, so "auto" counts as not given.
        self.shard_over_all_devices = all(
            kwargs.get(k, "auto") == "auto" for k in ("data_parallel_size", "tensor_parallel_size")
        )
        super().__init__(**kwargs)
        self.block_classes = block_classes
        self.activation_checkpointing = activation_checkpointing
        self.mixed_precision = mixed_precision
        self.cpu_offload = cpu_offload
        self.reshard_after_forward = reshard_after_forward
        self.sharded_blocks: list[str] = []

    @override
    def load_checkpoint(self, checkpoint_path: Any, weights_only: bool | None = None) -> dict[str, Any]:
        verify_checkpoint(checkpoint_path)  # Lightning and DeepSpeed read sharded folders with plain pickle
        return super().load_checkpoint(checkpoint_path, weights_only)

    @override
    def setup_environment(self) -> None:
        if self.shard_over_all_devices:  # pure data-parallel FSDP over every device of every node
            self._data_parallel_size, self._tensor_parallel_size = self.num_nodes * self.num_processes, 1
        super().setup_environment()

    @override
    def model_to_device(self) -> None:
        if not self.cpu_offload:
            super().model_to_device()
            return
        # Offloaded parameters stay on the CPU (FSDP gathers them onto the device for compute); buffers and
        # metric states move, so that inputs meet them on the device and metrics sync over NCCL.
        assert self.model is not None
        for module in self.model.modules():
            if isinstance(module, Metric):
                module.to(self.root_device)
            for name, buffer in module._buffers.items():
                if buffer is not None:
                    module._buffers[name] = buffer.to(self.root_device)

    @override
    def connect(self, model: LightningModule) -> None:  # type: ignore[override]
        super().connect(model)
        if self.cpu_offload and not any(device.type == "cuda" for device in self.parallel_devices or []):
            raise ValueError("cpu_offload=True needs CUDA devices: on CPU the parameters are there already.")
        if is_overridden("configure_model", model):
            return  # the module shards itself
        strategy = self

        def configure_model(module: LightningModule) -> None:
            if strategy.sharded_blocks:
                return  # already sharded (a second fit on the same module)
            mesh = module.device_mesh["data_parallel"]
            strategy.sharded_blocks = shard_transformer(
                module,
                mesh,
                strategy.block_classes,
                strategy.activation_checkpointing,
                strategy.mixed_precision,
                strategy.cpu_offload,
                strategy.reshard_after_forward,
            )

        model.configure_model = types.MethodType(configure_model, model)  # type: ignore[method-assign]
