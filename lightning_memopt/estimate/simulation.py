"""One training step of a model simulated on the ``meta`` device: every tensor's bytes, none allocated.

The model is built from its config on ``meta`` (no weights are read, nothing is allocated) and runs a
forward pass, a backward pass and an optimizer step under PyTorch's ``MemTracker``, which follows the
life of every tensor and records the largest total as parameters, gradients, optimizer state,
activations and temporaries. It follows Lightning's automatic optimization, which clears the
gradients after the forward pass (so the previous step's gradients live through it). The step is therefore exactly the model's own code: its attention
implementation, its saved tensors, its activation checkpointing. The peak of each phase (forward,
backward, optimizer step) is kept, because the strategies shard different parts of each.

Example:
    >>> from transformers import BertConfig
    >>> config = BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
    ...                     vocab_size=100, num_labels=3)
    >>> step = simulate_step(config, "token-classification", batch_size=4, sequence_length=16)
    >>> step.parameters == sum(p.numel() for p in meta_model(config, "token-classification").parameters()) * 4
    True
    >>> step.forward.activations > step.backward.activations > 0
    True
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from lightning_memopt.core.blocks import transformer_blocks
from lightning_memopt.core.compat import checkpoint_activations, mem_tracker_class

Task = Literal["token-classification", "sequence-classification", "causal-lm"]
AUTO_CLASSES = {
    "token-classification": "AutoModelForTokenClassification",
    "sequence-classification": "AutoModelForSequenceClassification",
    "causal-lm": "AutoModelForCausalLM",
}
CATEGORIES = {
    "Parameter": "parameters",
    "Buffer": "parameters",
    "Gradient": "gradients",
    "Optstate": "optimizer",
    "Activation": "activations",
    "Temp": "temporaries",
    "Other": "temporaries",
}


@dataclass(frozen=True)
class PhasePeak:
    """Bytes live at the largest moment of one phase, by kind."""

    parameters: int = 0
    gradients: int = 0
    optimizer: int = 0
    activations: int = 0
    temporaries: int = 0

    @property
    def total(self) -> int:
        return self.parameters + self.gradients + self.optimizer + self.activations + self.temporaries


@dataclass(frozen=True)
class StepSimulation:
    """A simulated training step: the peak of each phase and the sizes the strategies shard.

    ``parameters``/``gradients``/``optimizer`` are the full (unsharded) sizes; ``largest_block`` and
    ``outside_blocks`` are the parameter bytes of the largest transformer block and of everything
    outside the blocks (embeddings, head), which a sharded strategy gathers whole.
    """

    forward: PhasePeak
    backward: PhasePeak
    optimizer_step: PhasePeak
    parameters: int
    gradients: int
    optimizer: int
    largest_block: int
    outside_blocks: int
    blocks: int
    trainable_numels: tuple[int, ...] = ()
    activation_checkpointing: bool = False
    element_size: int = 4


def meta_model(config: object, task: Task) -> nn.Module:
    """The task model for ``config`` (a ``transformers`` config) on the meta device, in training mode."""
    import transformers

    auto_class = getattr(transformers, AUTO_CLASSES[task])
    with torch.device("meta"):
        model = auto_class.from_config(config)
    return model.train()


def _bytes(tensors: list[torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def _phase(snapshot: dict[str, int]) -> PhasePeak:
    totals: dict[str, int] = {}
    for key, size in snapshot.items():
        if key in CATEGORIES:
            name = CATEGORIES[key]
            totals[name] = totals.get(name, 0) + size
    return PhasePeak(**totals)


@contextlib.contextmanager
def fused_attention_kernel() -> Iterator[None]:
    """Run ``scaled_dot_product_attention`` as CUDA does in training: the memory-efficient kernel, which keeps
    its output and one log-sum-exp per row for the backward pass instead of the sequence x sequence
    probabilities and dropout mask of the math path (the one the CPU and the meta device take).

    Grouped-query attention without a mask (``enable_gqa``, as ``transformers`` calls it) runs the flash
    kernel, as CUDA (and the CPU) do: it reads each key/value head for its group of query heads, so only the
    key/value heads are kept for the backward pass, never copies repeated to every query head.
    """

    def memory_efficient(
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attn_mask: torch.Tensor | None = None,
        dropout_p: float = 0.0,
        is_causal: bool = False,
        scale: float | None = None,
        **_: object,
    ) -> torch.Tensor:
        if key.shape[-3] != query.shape[-3] and attn_mask is None:  # grouped-query attention, natively
            flash = torch.ops.aten._scaled_dot_product_flash_attention
            return flash(query, key, value, dropout_p, is_causal, scale=scale)[0]
        if key.shape[-3] != query.shape[-3]:  # each key/value head serves a group of query heads
            groups = query.shape[-3] // key.shape[-3]
            key, value = key.repeat_interleave(groups, dim=-3), value.repeat_interleave(groups, dim=-3)
        kernel = torch.ops.aten._scaled_dot_product_efficient_attention
        return kernel(query, key, value, attn_mask, True, dropout_p, is_causal, scale=scale)[0]

    original = F.scaled_dot_product_attention
    F.scaled_dot_product_attention = memory_efficient
    try:
        yield
    finally:
        F.scaled_dot_product_attention = original


def simulate_step(
    config: object,
    task: Task,
    batch_size: int,
    sequence_length: int,
    dtype: torch.dtype = torch.float32,
    activation_checkpointing: bool = False,
    optimizer: Literal["adamw", "sgd"] = "adamw",
    fused_attention: bool = False,
) -> StepSimulation:
    """Simulate one training step of the ``task`` model for ``config`` on a ``batch_size`` x ``sequence_length`` batch.

    ``activation_checkpointing`` wraps each transformer block in composable checkpointing, as
    ``FSDP2Strategy(activation_checkpointing=True)`` does. ``optimizer`` is simulated with its real
    PyTorch implementation (for 8-bit optimizers, see :func:`lightning_memopt.estimate.optimizer_state_bytes`).
    ``fused_attention`` simulates the fused attention kernel (:func:`fused_attention_kernel`) that CUDA runs, and
    that the CPU runs too when attention has no dropout (decoder LMs); leave it off for a CPU with attention dropout.
    """
    MemTracker = mem_tracker_class()

    model = meta_model(config, task).to(dtype)
    blocks = [block for _, block in transformer_blocks(model)]
    block_bytes = [_bytes(list(block.parameters())) for block in blocks]
    parameters = _bytes(list(model.parameters()))
    if activation_checkpointing:
        for block in blocks:
            checkpoint_activations(block)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optim = torch.optim.AdamW(trainable, lr=1e-5) if optimizer == "adamw" else torch.optim.SGD(trainable, lr=1e-5)
    ids = torch.zeros(batch_size, sequence_length, dtype=torch.long, device="meta")
    label_shape = (batch_size,) if task == "sequence-classification" else (batch_size, sequence_length)
    labels = torch.zeros(label_shape, dtype=torch.long, device="meta")

    def forward() -> torch.Tensor:
        # No attention mask: a full batch needs none, and the model's mask checks read values meta has not.
        return model(input_ids=ids, labels=labels).loss

    peaks: list[PhasePeak] = []
    kernel = fused_attention_kernel() if fused_attention else contextlib.nullcontext()
    with warnings.catch_warnings(), kernel:
        warnings.simplefilter("ignore")
        forward().backward()  # a first step creates the optimizer state and gradients, as on a real device
        optim.step()
        tracker = MemTracker()
        # Lightning's order: the previous step's gradients live through the forward pass.
        for phase in ("forward", "backward", "step"):
            if phase == "backward":
                optim.zero_grad(set_to_none=True)
            tracker.track_external(model, optim)  # (again: leaving the tracker drops its gradient hooks)
            with tracker:
                if phase == "forward":
                    loss = forward()
                elif phase == "backward":
                    loss.backward()
                    del loss
                else:
                    optim.step()
            peaks.append(_phase(tracker.get_tracker_snapshot("peak")[torch.device("meta")]))
    state = [v for s in optim.state.values() for v in s.values() if isinstance(v, torch.Tensor) and v.dim() > 0]
    return StepSimulation(
        forward=peaks[0],
        backward=peaks[1],
        optimizer_step=peaks[2],
        parameters=parameters,
        gradients=_bytes(trainable),
        optimizer=_bytes(state),
        largest_block=max(block_bytes, default=0),
        outside_blocks=parameters - sum(block_bytes),
        blocks=len(blocks),
        trainable_numels=tuple(p.numel() for p in trainable),
        element_size=torch.finfo(dtype).bits // 8,
        activation_checkpointing=activation_checkpointing,
    )
