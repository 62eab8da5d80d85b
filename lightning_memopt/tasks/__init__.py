"""Task modules, data modules and metrics for token and sequence classification and causal-LM fine-tuning."""

from lightning_memopt.tasks.data import (
    CausalLMDataModule,
    SequenceClassificationDataModule,
    TokenClassificationDataModule,
)
from lightning_memopt.tasks.entity_f1 import EntityF1
from lightning_memopt.tasks.modules import (
    CausalLMModule,
    SequenceClassificationModule,
    TokenClassificationModule,
    load_task_checkpoint,
)

__all__ = [
    "CausalLMDataModule",
    "CausalLMModule",
    "EntityF1",
    "SequenceClassificationDataModule",
    "SequenceClassificationModule",
    "TokenClassificationDataModule",
    "TokenClassificationModule",
    "load_task_checkpoint",
]
