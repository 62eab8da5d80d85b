"""Knowledge distillation: loss functions (pure), teacher loading and student initialisation, and the callback."""

from lightning_memopt.distillation.callback import KnowledgeDistillation
from lightning_memopt.distillation.losses import (
    attention_kl,
    distillation_loss,
    head_chunked_kl,
    hidden_state_mse,
    soft_target_kl,
)
from lightning_memopt.distillation.teacher import load_teacher, student_from_teacher

__all__ = [
    "KnowledgeDistillation",
    "attention_kl",
    "distillation_loss",
    "head_chunked_kl",
    "hidden_state_mse",
    "load_teacher",
    "soft_target_kl",
    "student_from_teacher",
]
