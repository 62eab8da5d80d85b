"""Lightning's ``FSDPStrategy`` (FSDP1, ``FullyShardedDataParallel``) for any transformer, on CUDA or CPU.

``FSDP1Strategy`` wraps each transformer block of the module on its own (the blocks found as for
``FSDP2Strategy``: ``BertLayer`` and its peers), optionally with activation checkpointing on the same
blocks, and saves sharded (default) or full checkpoints. Three accommodations make it run on CPU
processes (gloo), where Lightning refuses FSDP: the strategy is a subclass (Lightning only refuses its
own class), the module is wrapped with ``device_id=cpu``, and full state dicts are gathered without
``offload_to_cpu`` (which crashes the process when the tensors are on the CPU already). On any device,
``gradient_clip_val`` clips by norm through FSDP's own ``clip_grad_norm_`` (Lightning's FSDP precision
plugin refuses norm clipping).
``cpu_offload=True`` is refused on CPU before any process starts.

Prefer ``FSDP2Strategy`` for new work (per-parameter sharding, composable checkpointing); this preset
is for code and checkpoints that rely on ``FSDPStrategy``.

Example (YAML): ``trainer.strategy: {class_path: lightning_memopt.FSDP1Strategy, init_args: {activation_checkpointing: true}}``
"""

from __future__ import annotations

from collections.abc import Generator
from contextlib import contextmanager
from typing import Any, Literal

import torch
from lightning.pytorch.plugins.precision import Precision
from lightning.pytorch.strategies import FSDPStrategy
from torch import nn
from torch.optim import Optimizer
from typing_extensions import override

from lightning_memopt.core.blocks import required_blocks
from lightning_memopt.core.checkpoints import verify_checkpoint
from lightning_memopt.core.compat import fsdp1_apply_checkpointing, fsdp1_checkpointing_options
from lightning_memopt.distributed.namespace import PresetRepr


@contextmanager
def full_state_dict_in_place(module: nn.Module) -> Generator[None, None, None]:
    """FSDP1 full (rank-0) state dicts of model and optimizer, gathered where the tensors are (no CPU copy)."""
    from torch.distributed.fsdp import FullOptimStateDictConfig, FullStateDictConfig, StateDictType
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    with FSDP.state_dict_type(
        module,
        StateDictType.FULL_STATE_DICT,
        FullStateDictConfig(offload_to_cpu=False, rank0_only=True),
        FullOptimStateDictConfig(offload_to_cpu=False, rank0_only=True),
    ):
        yield


def clip_norms_with(precision: Precision, model: nn.Module) -> None:
    """Let ``gradient_clip_val`` clip by norm: Lightning's FSDP precision refuses, FSDP1's root module can."""

    def clip_grad_by_norm(optimizer: Optimizer, clip_val: float) -> None:
        model.clip_grad_norm_(clip_val)  # type: ignore[operator]

    precision.clip_grad_by_norm = clip_grad_by_norm  # type: ignore[method-assign]


class FSDP1Strategy(PresetRepr, FSDPStrategy):
    """``FSDPStrategy`` that wraps (and checkpoints) each transformer block found, on CUDA or CPU.

    Args:
        block_classes: class names of the blocks to wrap one by one; ``None`` finds them.
        activation_checkpointing: recompute each block's activations in the backward pass.
        state_dict_type: ``"sharded"`` (a folder, one file per rank) or ``"full"`` (one file).
        kwargs: the rest of ``FSDPStrategy``'s options (``sharding_strategy``, ``cpu_offload``...).
    """

    def __init__(
        self,
        block_classes: list[str] | None = None,
        activation_checkpointing: bool = False,
        state_dict_type: Literal["sharded", "full"] = "sharded",
        **kwargs: Any,
    ) -> None:
        super().__init__(state_dict_type=state_dict_type, **kwargs)
        self.block_classes = block_classes
        self.activation_checkpointing = activation_checkpointing

    @property
    def on_cpu(self) -> bool:
        return self.root_device.type == "cpu"

    @override
    def load_checkpoint(self, checkpoint_path: Any, weights_only: bool | None = None) -> dict[str, Any]:
        verify_checkpoint(checkpoint_path)  # Lightning and DeepSpeed read sharded folders with plain pickle
        return super().load_checkpoint(checkpoint_path, weights_only)

    @override
    def setup_environment(self) -> None:
        if self.on_cpu and self.cpu_offload is not None and self.cpu_offload.offload_params:
            raise ValueError(
                "FSDP1Strategy(cpu_offload=True) needs CUDA devices: on CPU the parameters are there already."
            )
        super().setup_environment()

    @override
    def _setup_model(self, model: nn.Module) -> nn.Module:
        from torch.distributed.fsdp import FullyShardedDataParallel
        from torch.distributed.fsdp.wrap import ModuleWrapPolicy

        if not any(isinstance(m, FullyShardedDataParallel) for m in model.modules()):
            blocks = required_blocks(model, self.block_classes, "FSDP1Strategy")
            classes = {type(block) for _, block in blocks}
            self.kwargs.setdefault("auto_wrap_policy", ModuleWrapPolicy(classes))
            if self.activation_checkpointing:
                self._activation_checkpointing_kwargs = fsdp1_checkpointing_options(classes)
        if not self.on_cpu:
            model = super()._setup_model(model)
            clip_norms_with(self.precision_plugin, model)
            return model
        model = FullyShardedDataParallel(
            module=model,
            mixed_precision=self.mixed_precision_config,
            sharding_strategy=self.sharding_strategy,
            device_id=torch.device("cpu"),
            **self.kwargs,
        )
        fsdp1_apply_checkpointing(model, self._activation_checkpointing_kwargs)
        clip_norms_with(self.precision_plugin, model)
        return model

    @override
    def lightning_module_state_dict(self) -> dict[str, Any]:
        if not (self.on_cpu and self._state_dict_type == "full"):
            return super().lightning_module_state_dict()
        assert self.model is not None
        with full_state_dict_in_place(self.model):
            return self.model.state_dict()

    @override
    def optimizer_state(self, optimizer: Optimizer) -> dict[str, Any]:
        if not (self.on_cpu and self._state_dict_type == "full"):
            return super().optimizer_state(optimizer)
        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
        from torch.distributed.fsdp import OptimStateKeyType

        optimizer = getattr(optimizer, "_optimizer", optimizer)  # a LightningOptimizer wraps it
        assert self.model is not None
        with full_state_dict_in_place(self.model):
            state = FSDP.optim_state_dict(self.model, optimizer)
            if self.global_rank == 0:
                state = FSDP.rekey_optim_state_dict(state, OptimStateKeyType.PARAM_ID, self.model)
            return state
