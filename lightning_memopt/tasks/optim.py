"""AdamW with the usual transformer parameter groups, and a linear warm-up / linear decay schedule.

Example:
    >>> import torch
    >>> model = torch.nn.Linear(4, 2)
    >>> optimizer = build_adamw(model, learning_rate=1e-3, weight_decay=0.01)
    >>> scheduler = linear_warmup_decay(optimizer, warmup_steps=10, total_steps=100)
    >>> [round(warmup_decay_factor(step, 10, 100), 2) for step in (0, 5, 10, 55, 100)]
    [0.0, 0.5, 1.0, 0.5, 0.0]
"""

from __future__ import annotations

from functools import partial
from typing import Any

import torch
from torch import nn

from lightning_memopt.core.strategies import unsupported_strategy

NO_DECAY_MARKERS = ("bias", "LayerNorm.weight", "layer_norm.weight", "norm.weight")


def parameter_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Trainable parameters split into a decayed group and one without decay (biases, norms)."""
    decay, no_decay = [], []
    for name, parameter in model.named_parameters():
        if not parameter.requires_grad:
            continue
        (no_decay if name.endswith(NO_DECAY_MARKERS) or parameter.ndim < 2 else decay).append(parameter)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


OPTIMIZERS = ("adamw", "adamw8bit", "paged_adamw8bit")


def check_optimizer(kind: str) -> str:
    """``kind`` if it names one of :data:`OPTIMIZERS`, else a ValueError naming ``--model.optimizer``."""
    if kind not in OPTIMIZERS:
        raise ValueError(f"--model.optimizer={kind!r} is not one of {OPTIMIZERS}.")
    return kind


# Sharded strategies whose parameters bitsandbytes' kernels cannot take (DTensor shards, flat parameters).
SHARDS_FOR_8BIT = ("FSDPStrategy", "ModelParallelStrategy")


def offloads_optimizer(trainer: Any) -> bool:
    """Whether the trainer's strategy runs the optimizer step off the device: DeepSpeed's ``offload_optimizer``,
    as ``ZeROStrategy(offload=True)`` (or Lightning's ``DeepSpeedStrategy(offload_optimizer=True)``) configures it."""
    config = getattr(trainer.strategy, "config", None)
    zero = (config.get("zero_optimization") or {}) if isinstance(config, dict) else {}
    return bool(zero.get("offload_optimizer"))


def check_optimizer_strategy(kind: str, trainer: Any) -> None:
    """Refuse, before training, an 8-bit optimizer under a strategy where it fails at the first step.

    >>> from types import SimpleNamespace
    >>> from lightning.pytorch.strategies import DDPStrategy
    >>> check_optimizer_strategy("adamw8bit", SimpleNamespace(strategy=DDPStrategy()))  # fine
    """
    if kind != "adamw" and (name := unsupported_strategy(trainer, SHARDS_FOR_8BIT)):
        raise ValueError(
            f"--model.optimizer={kind} cannot run under {name}: bitsandbytes' 8-bit kernels take whole tensors, "
            "and FSDP hands the optimizer shards. Use --model.optimizer adamw with FSDP, or keep adamw8bit with "
            "DDP or ZeROStrategy (DeepSpeed runs it at stages 1-3)."
        )
    if kind != "adamw" and offloads_optimizer(trainer):
        raise ValueError(
            f"--model.optimizer={kind} cannot run with ZeROStrategy(offload=True) (DeepSpeed's offload_optimizer): "
            "the offloaded step runs on the CPU in DeepSpeed's own CPU Adam. Use --model.optimizer adamw (DeepSpeedCPUAdam is then chosen for you), "
            "or offload=false to keep the 8-bit optimizer on the GPU."
        )


def build_adamw(
    model: nn.Module,
    learning_rate: float,
    weight_decay: float = 0.01,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
    kind: str = "adamw",
    offloaded: bool = False,
) -> torch.optim.Optimizer:
    """AdamW over :func:`parameter_groups`: ``torch.optim.AdamW``, or bitsandbytes' 8-bit (optionally paged) AdamW.

    The 8-bit variants keep both moments as 8-bit codes with block-wise scales (about a quarter of the
    float32 state bytes) for tensors of 4096+ entries; smaller ones stay 32-bit. ``offloaded=True`` (DeepSpeed
    ZeRO offload) gives DeepSpeed's vectorised ``DeepSpeedCPUAdam`` in AdamW mode, which DeepSpeed expects there.
    """
    groups = parameter_groups(model, weight_decay)
    if check_optimizer(kind) == "adamw" and offloaded:
        from deepspeed.ops.adam import DeepSpeedCPUAdam

        return DeepSpeedCPUAdam(groups, lr=learning_rate, betas=betas, eps=eps, adamw_mode=True)
    if kind == "adamw":
        return torch.optim.AdamW(groups, lr=learning_rate, betas=betas, eps=eps)
    try:
        import bitsandbytes as bnb
    except ImportError:
        raise ImportError(f"--model.optimizer={kind} needs bitsandbytes: pip install bitsandbytes") from None
    optimizer_class = bnb.optim.AdamW8bit if kind == "adamw8bit" else bnb.optim.PagedAdamW8bit
    return optimizer_class(groups, lr=learning_rate, betas=betas, eps=eps)


def warmup_decay_factor(step: int, warmup_steps: int, total_steps: int) -> float:
    """Learning-rate multiplier: 0 → 1 linearly over ``warmup_steps``, then 1 → 0 at ``total_steps``."""
    if step < warmup_steps:
        return step / max(1, warmup_steps)
    return max(0.0, (total_steps - step) / max(1, total_steps - warmup_steps))


def linear_warmup_decay(
    optimizer: torch.optim.Optimizer, warmup_steps: int, total_steps: int
) -> torch.optim.lr_scheduler.LambdaLR:
    """A ``LambdaLR`` following :func:`warmup_decay_factor` (resumable: it holds no closures over state)."""
    if total_steps < 1:
        raise ValueError(f"The run has {total_steps} optimizer steps; set --trainer.max_steps or max_epochs.")
    if warmup_steps > total_steps:
        raise ValueError(f"--model.warmup_steps={warmup_steps} is longer than the run ({total_steps} steps); lower it.")
    factor = partial(warmup_decay_factor, warmup_steps=warmup_steps, total_steps=total_steps)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
