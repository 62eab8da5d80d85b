"""Task modules, data modules and metrics for token and sequence classification."""

from lightning_memopt.tasks.data import SequenceClassificationDataModule, TokenClassificationDataModule
from lightning_memopt.tasks.entity_f1 import EntityF1
from lightning_memopt.tasks.modules import (
    SequenceClassificationModule,
    TokenClassificationModule,
    load_task_checkpoint,
)

__all__ = [
    "EntityF1",
    "SequenceClassificationDataModule",
    "SequenceClassificationModule",
    "TokenClassificationDataModule",
    "TokenClassificationModule",
    "load_task_checkpoint",
]
