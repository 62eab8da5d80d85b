"""KnowledgeDistillation on decoder LMs: prompt-masked positions shifted like the LM loss, any LM head found."""

from __future__ import annotations

import copy

import pytest
import torch
from helpers import fake_trainer, quiet_trainer
from lightning.pytorch import LightningModule
from torch.utils.data import DataLoader
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

from lightning_memopt import KnowledgeDistillation
from lightning_memopt.distillation.callback import find_student_model
from lightning_memopt.distillation.losses import position_mask, soft_target_kl

LLAMA = {"vocab_size": 64, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
         "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 64}  # fmt: skip


class CausalLM(LightningModule):
    """A plain module whose training step calls ``self.model(...)`` and returns the LM loss."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        return self.model(**batch).loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.0)


def prompt_batch() -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(3, 64, (2, 8), generator=generator)
    labels = ids.clone()
    labels[:, :4] = -100  # a 4-token prompt: only the completion is learned
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}


def test_the_kd_mask_counts_the_positions_the_lm_loss_counts() -> None:
    torch.manual_seed(0)
    student, teacher = LlamaForCausalLM(LlamaConfig(**LLAMA)), LlamaForCausalLM(LlamaConfig(**LLAMA))
    batch = prompt_batch()
    trained_from = copy.deepcopy(student)  # the first fit trains student; the second starts from this copy
    with torch.no_grad():
        student_logits = copy.deepcopy(student)(**batch).logits
        teacher_logits = teacher(**batch).logits
    shifted = position_mask(batch["labels"], causal=True)
    assert shifted[0].tolist() == [False, False, False, True, True, True, True, False]  # logits 3..6 predict 4..7
    expected = soft_target_kl(student_logits, teacher_logits, 1.0, shifted)
    unshifted = soft_target_kl(student_logits, teacher_logits, 1.0, batch["labels"] != -100)
    assert abs(float(expected) - float(unshifted)) > 1e-4  # the off-by-one would be visible

    kd = KnowledgeDistillation(teacher=teacher, alpha=1.0, temperature=1.0)
    trainer = quiet_trainer(max_steps=1, callbacks=[kd], enable_checkpointing=False)
    trainer.fit(CausalLM(student), train_dataloaders=DataLoader([batch], batch_size=None))
    assert torch.isclose(trainer.callback_metrics["train_kd"], expected, atol=1e-5)

    # top-k KD through the callback: the loss function's value on the teacher's 5 likeliest tokens
    top5 = soft_target_kl(student_logits, teacher_logits, 1.0, shifted, top_k=5)
    kd = KnowledgeDistillation(teacher=teacher, alpha=1.0, temperature=1.0, top_k=5)
    trainer = quiet_trainer(max_steps=1, callbacks=[kd], enable_checkpointing=False)
    student = copy.deepcopy(trained_from)
    trainer.fit(CausalLM(student), train_dataloaders=DataLoader([batch], batch_size=None))
    assert torch.isclose(trainer.callback_metrics["train_kd"], top5, atol=1e-5)


def test_lm_heads_are_found_by_what_they_are_not_by_their_names() -> None:
    gpt2 = GPT2LMHeadModel(GPT2Config(vocab_size=64, n_embd=32, n_layer=1, n_head=2, n_positions=32))
    name, found = find_student_model(CausalLM(gpt2))
    assert found is gpt2 and name == "model"


class TrainedCausalLM(CausalLM):
    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.5)


def fit_with_kd(student: torch.nn.Module, teacher: torch.nn.Module, **options: object) -> tuple[object, dict]:
    """Three SGD steps of ``student`` with KD (alpha 0.5, T 2) on the prompt batch: the trainer and the weights."""
    kd = KnowledgeDistillation(teacher=teacher, alpha=0.5, temperature=2.0, **options)
    trainer = quiet_trainer(max_steps=3, callbacks=[kd], enable_checkpointing=False)
    torch.manual_seed(1)  # the same dropout draws in every run (GPT-2 has dropout)
    trainer.fit(TrainedCausalLM(student), train_dataloaders=DataLoader([prompt_batch()] * 3, batch_size=None))
    return trainer, {name: value.detach().clone() for name, value in student.state_dict().items()}


HEAD = {"llama": "lm_head.weight", "gpt2 (tied head)": "transformer.wte.weight"}


@pytest.mark.parametrize("family", list(HEAD))
def test_fused_head_kd_trains_the_student_as_kd_on_the_logits_does(family: str) -> None:
    # fuse_head: the loss from the hidden states entering the heads, the teacher running its body only; the same
    # KD value and the same weights after three steps (a tied head's embedding included) as KD on the logits
    def model() -> torch.nn.Module:
        if family == "llama":
            return LlamaForCausalLM(LlamaConfig(**LLAMA))
        return GPT2LMHeadModel(GPT2Config(vocab_size=64, n_embd=32, n_layer=2, n_head=2, n_positions=32))

    torch.manual_seed(0)
    student, teacher = model(), model()
    runs = [fit_with_kd(copy.deepcopy(student), teacher, chunk_rows=3, fuse_head=fused) for fused in (False, True)]
    (logits_run, logits_weights), (fused_run, fused_weights) = runs
    for metric in ("train_kd", "train_total"):
        torch.testing.assert_close(fused_run.callback_metrics[metric], logits_run.callback_metrics[metric])
    assert not torch.equal(logits_weights[HEAD[family]], student.state_dict()[HEAD[family]])  # the head trained
    for name, value in logits_weights.items():
        torch.testing.assert_close(fused_weights[name], value, rtol=1e-4, atol=1e-5, msg=name)


def test_fused_head_kd_needs_lm_heads_whose_logits_the_model_returns() -> None:
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    encoder = BertForSequenceClassification(BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=1,
                                                       num_attention_heads=2, intermediate_size=32))  # fmt: skip
    with pytest.raises(ValueError, match="fuse_head needs a language model with a linear LM head"):
        fit_with_kd(encoder, copy.deepcopy(encoder), fuse_head=True)

    class Scaled(LlamaForCausalLM):  # logits that are not the head's output: a scaled copy
        def forward(self, *args: object, **kwargs: object) -> object:
            output = super().forward(*args, **kwargs)
            output.logits = output.logits * 0.5
            return output

    student = Scaled(LlamaConfig(**LLAMA))
    with pytest.raises(ValueError, match="the student's LM head applied to the hidden states"):
        fit_with_kd(student, LlamaForCausalLM(LlamaConfig(**LLAMA)), fuse_head=True)

    from lightning.pytorch.strategies import ModelParallelStrategy

    kd = KnowledgeDistillation(teacher=LlamaForCausalLM(LlamaConfig(**LLAMA)), fuse_head=True)
    with pytest.raises(ValueError, match=r"fuse_head=True\) does not support ModelParallelStrategy: .* or DDP"):
        kd.setup(fake_trainer(ModelParallelStrategy()), CausalLM(student), "fit")
