"""Knowledge distillation (issue #4): the loss functions come first; the teacher hook builds on them."""

from lightning_memopt.distillation.losses import (
    attention_kl,
    distillation_loss,
    hidden_state_mse,
    soft_target_kl,
)

__all__ = ["attention_kl", "distillation_loss", "hidden_state_mse", "soft_target_kl"]
