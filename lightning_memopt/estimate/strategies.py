"""Per-device peak memory of a simulated step under each strategy: pure arithmetic on its parts.

A :class:`~lightning_memopt.estimate.simulation.StepSimulation` says what one device holds when it
trains alone. The strategies change who holds what:

- ``single``: everything on one device.
- ``ddp``: everything, plus DDP's gradient buckets (a second copy of the gradients, Lightning's default
  ``gradient_as_bucket_view=False``).
- ``zero1`` / ``zero2`` / ``zero3`` (DeepSpeed ZeRO stages): optimizer state, then also gradients, then
  also parameters, split over the N devices (Rajbhandari et al., 2020). DeepSpeed also keeps a float32
  copy of each device's parameter slice for the optimizer (even when training in float32) and gradient
  buckets waiting to be reduced (``zero_bucket_bytes``).
- ``fsdp2``: parameters, gradients and optimizer state split over N devices (like ZeRO-3); each device
  gathers what lies outside the blocks (embeddings, head) for the whole step and up to two blocks at a
  time (the one computing and the one prefetched), and holds one block's unsharded gradients while they
  are reduced.

Activations and temporaries do not shard: every device runs its own batch. The peak is the larger of
the three phases: forward (with the previous step's gradients), backward and optimizer step.

Example:
    >>> from lightning_memopt.estimate.simulation import PhasePeak, StepSimulation
    >>> step = StepSimulation(forward=PhasePeak(100, 100, 200, 400), backward=PhasePeak(100, 50, 200, 300, 10),
    ...                       optimizer_step=PhasePeak(100, 100, 250), parameters=100, gradients=100, optimizer=200,
    ...                       largest_block=10, outside_blocks=40, blocks=6)
    >>> per_device_peak(step, "ddp", devices=2)["peak"]
    900
    >>> per_device_peak(step, "zero2", devices=2)["optimizer"]
    100
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Literal

from lightning_memopt.estimate.simulation import StepSimulation

Strategy = Literal["single", "ddp", "zero1", "zero2", "zero3", "fsdp2"]
# Cheapest first: less communication and no recomputation.
STRATEGIES: tuple[Strategy, ...] = ("single", "ddp", "zero1", "zero2", "fsdp2", "zero3")
OPTIMIZERS = ("adamw", "adamw8bit", "paged_adamw8bit", "sgd")
BNB_BLOCK, BNB_MIN_8BIT_SIZE, BNB_QMAP_BYTES, BNB_CPU_STEP_COPIES = 256, 4096, 256 * 4, 5


def optimizer_state_bytes(numels: Sequence[int], optimizer: str, element_size: int = 4) -> int:
    """Bytes of optimizer state for parameters of the given sizes.

    AdamW keeps two moments in the parameters' dtype. bitsandbytes' 8-bit AdamW keeps each moment as
    one byte per element plus a float32 scale per block of 256 and a 256-entry code book, except for
    tensors under 4,096 elements, which keep float32 moments. Plain SGD keeps nothing.

    >>> optimizer_state_bytes([1_000_000, 100], "adamw"), optimizer_state_bytes([1_000_000, 100], "adamw8bit")
    (8000800, 2034104)
    """
    if optimizer not in OPTIMIZERS:
        raise ValueError(f"Unknown optimizer {optimizer!r}; choose one of {', '.join(OPTIMIZERS)}.")
    if optimizer == "sgd":
        return 0
    if optimizer == "adamw":
        return sum(2 * n * element_size for n in numels)
    total = 0
    for n in numels:
        if n < BNB_MIN_8BIT_SIZE:
            total += 2 * n * 4
        else:
            total += 2 * (n + 4 * math.ceil(n / BNB_BLOCK) + BNB_QMAP_BYTES)
    return total


def optimizer_step_temporaries(numels: Sequence[int], optimizer: str, device: str) -> int:
    """Bytes a bitsandbytes 8-bit step allocates for a moment: on CPU it dequantizes and updates one tensor
    at a time in float32, with about five float32 copies of it (measured with bitsandbytes 0.50);
    on CUDA its fused kernels need none.

    >>> optimizer_step_temporaries([1000, 10], "adamw8bit", "cpu"), optimizer_step_temporaries([1000], "adamw8bit", "cuda")
    (20000, 0)
    """
    if "8bit" not in optimizer or device != "cpu":
        return 0
    return BNB_CPU_STEP_COPIES * 4 * max(numels, default=0)


def zero_bucket_bytes(step: StepSimulation, bucket_elements: int, device: str) -> int:
    """Memory of DeepSpeed's two gradient buckets (``reduce_bucket_size`` elements each, overlapping
    communication): on CUDA the whole allocation counts; on CPU only the pages written, at most the
    gradients themselves.

    >>> from lightning_memopt.estimate.simulation import PhasePeak, StepSimulation
    >>> step = StepSimulation(PhasePeak(), PhasePeak(), PhasePeak(), 4000, 4000, 8000, 100, 400, 3)
    >>> zero_bucket_bytes(step, 10_000, "cuda"), zero_bucket_bytes(step, 10_000, "cpu")
    (80000, 4000)
    """
    allocated = 2 * bucket_elements * step.element_size
    return allocated if device != "cpu" else min(allocated, step.gradients)


def per_device_peak(
    step: StepSimulation,
    strategy: Strategy,
    devices: int,
    optimizer_state: int | None = None,
    step_temporaries: int = 0,
    zero_bucket_bytes: int = 0,
) -> dict[str, int]:
    """The peak bytes one of ``devices`` data-parallel devices holds under ``strategy``, by kind.

    ``optimizer_state`` and ``step_temporaries`` replace the simulated optimizer's state and step
    temporaries (for optimizers that cannot run on the meta device, such as bitsandbytes' 8-bit AdamW;
    see :func:`optimizer_state_bytes` and :func:`optimizer_step_temporaries`). ``zero_bucket_bytes`` is
    the memory DeepSpeed's gradient buckets occupy (see :func:`zero_bucket_bytes`).
    """
    if strategy not in STRATEGIES:
        raise ValueError(f"Unknown strategy {strategy!r}; choose one of {', '.join(STRATEGIES)}.")
    if devices < 1 or (strategy == "single" and devices != 1):
        raise ValueError(f"strategy {strategy!r} cannot run on {devices} devices.")
    n = devices if devices > 1 else 1
    simulated_state = step.optimizer
    state = simulated_state if optimizer_state is None else optimizer_state
    if optimizer_state is None:  # the step's own temporaries (e.g. Adam's denominators)
        step_temporaries = step.optimizer_step.optimizer - simulated_state
    shards_state = strategy in ("zero1", "zero2", "zero3", "fsdp2") and n > 1
    shards_grads = strategy in ("zero2", "zero3", "fsdp2") and n > 1
    shards_params = strategy in ("zero3", "fsdp2") and n > 1
    gathered = step.outside_blocks + min(2, step.blocks) * step.largest_block
    params = step.parameters // n + gathered if shards_params else step.parameters
    sharded_state = state // n if shards_state else state
    grads = step.gradients // n if shards_grads else step.gradients
    backward_grads = step.backward.gradients
    if shards_grads:  # reduced to shards as they come, but one block's are whole until reduced
        backward_grads = backward_grads // n + min(backward_grads, step.largest_block)
    buffers = step.gradients if strategy == "ddp" else 0
    if strategy.startswith("zero"):
        buffers = step.parameters // n * 4 // step.element_size + zero_bucket_bytes
    phases = [
        (params, grads, sharded_state, step.forward),  # the previous step's gradients are still there
        (params, backward_grads, sharded_state, step.backward),
        (
            step.parameters // n if shards_params else step.parameters,
            grads,
            (state + step_temporaries) // n if shards_state else state + step_temporaries,
            step.optimizer_step,
        ),
    ]
    peak = max(
        (
            {
                "parameters": p,
                "gradients": g,
                "optimizer": o,
                "activations": phase.activations,
                "temporaries": phase.temporaries,
                "strategy buffers": buffers,
            }
            for p, g, o, phase in phases
        ),
        key=lambda parts: sum(parts.values()),
    )
    return {**peak, "peak": sum(peak.values())}


def device_peak(
    step: StepSimulation,
    strategy: Strategy,
    devices: int,
    optimizer: str = "adamw",
    device: str = "cpu",
    bucket_elements: int = 0,
) -> dict[str, int]:
    """:func:`per_device_peak` for a named optimizer on a device type, with DeepSpeed buckets of ``bucket_elements``.

    AdamW is the simulated optimizer; bitsandbytes' 8-bit AdamW gets its state and step temporaries
    from :func:`optimizer_state_bytes` and :func:`optimizer_step_temporaries`.
    """
    buckets = zero_bucket_bytes(step, bucket_elements, device)
    if optimizer == "adamw":
        return per_device_peak(step, strategy, devices, zero_bucket_bytes=buckets)
    state = optimizer_state_bytes(step.trainable_numels, optimizer, step.element_size)
    temporaries = optimizer_step_temporaries(step.trainable_numels, optimizer, device)
    return per_device_peak(step, strategy, devices, state, temporaries, buckets)
