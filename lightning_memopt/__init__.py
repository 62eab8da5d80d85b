"""lightning_memopt: memory optimisation for PyTorch Lightning fine-tuning of BERT-style transformers."""

from lightning_memopt.callbacks import FinalLastCheckpoint, MetricsSummary, ValidateFinalStep
from lightning_memopt.core import AtomicCheckpointIO, UnsafeCheckpointError, read_checkpoint, verify_checkpoint
from lightning_memopt.deploy import export_checkpoint, export_model, load_pretrained
from lightning_memopt.distillation import KnowledgeDistillation
from lightning_memopt.distributed import FSDP1Strategy, FSDP2Strategy, MemoryMonitor, ZeROStrategy
from lightning_memopt.pruning import PruningScheduler
from lightning_memopt.quantization import OpenVINOQuantizationAwareTraining, QuantizationAwareTraining
from lightning_memopt.tasks import (
    CausalLMDataModule,
    CausalLMModule,
    EntityF1,
    SequenceClassificationDataModule,
    SequenceClassificationModule,
    TokenClassificationDataModule,
    TokenClassificationModule,
    load_task_checkpoint,
)

__version__ = "0.1.0"

__all__ = [
    "AtomicCheckpointIO",
    "CausalLMDataModule",
    "CausalLMModule",
    "EntityF1",
    "FSDP1Strategy",
    "FSDP2Strategy",
    "FinalLastCheckpoint",
    "KnowledgeDistillation",
    "MemoryMonitor",
    "MetricsSummary",
    "OpenVINOQuantizationAwareTraining",
    "PruningScheduler",
    "QuantizationAwareTraining",
    "SequenceClassificationDataModule",
    "SequenceClassificationModule",
    "TokenClassificationDataModule",
    "TokenClassificationModule",
    "UnsafeCheckpointError",
    "ValidateFinalStep",
    "ZeROStrategy",
    "export_checkpoint",
    "export_model",
    "load_pretrained",
    "load_task_checkpoint",
    "read_checkpoint",
    "verify_checkpoint",
]
