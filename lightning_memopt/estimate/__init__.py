"""How much memory a training run needs per device, before launching it (``memopt estimate``).

One training step of the model is simulated on the meta device (:func:`simulate_step`, exact for the
model's own code and allocating nothing), then split the way each strategy splits it
(:func:`per_device_peak`): DDP, DeepSpeed ZeRO stages 1-3, FSDP2, with and without activation
checkpointing, for any number of devices.

Example:
    >>> from transformers import BertConfig
    >>> config = BertConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=2, intermediate_size=128)
    >>> step = simulate_step(config, "sequence-classification", batch_size=8, sequence_length=64)
    >>> per_device_peak(step, "zero2", devices=4)["peak"] < per_device_peak(step, "single", devices=1)["peak"]
    True
"""

from lightning_memopt.estimate.simulation import PhasePeak, StepSimulation, simulate_step
from lightning_memopt.estimate.strategies import (
    STRATEGIES,
    optimizer_state_bytes,
    optimizer_step_temporaries,
    per_device_peak,
)

__all__ = [
    "STRATEGIES",
    "PhasePeak",
    "StepSimulation",
    "optimizer_state_bytes",
    "optimizer_step_temporaries",
    "per_device_peak",
    "simulate_step",
]
