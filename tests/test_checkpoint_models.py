"""The transformers model inside any LightningModule's checkpoint: found by the documented rule, or a clear error."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from helpers import quiet_trainer
from lightning.pytorch import LightningModule
from transformers import AutoModelForSequenceClassification, BertForSequenceClassification

from lightning_memopt.core.models import candidate_prefixes, model_from_checkpoint
from lightning_memopt.distillation.teacher import load_teacher


class GLUETransformer(LightningModule):
    """Shaped like the Lightning tutorial's module: the transformers model on ``self.model``, hparams saved."""

    def __init__(self, model_name_or_path: str, num_labels: int, learning_rate: float = 2e-5) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.model = AutoModelForSequenceClassification.from_pretrained(model_name_or_path, num_labels=num_labels)

    def forward(self, **inputs: torch.Tensor) -> torch.Tensor:
        return self.model(**inputs).logits


def tutorial_checkpoint(tiny_bert_dir: Path, folder: Path) -> tuple[Path, GLUETransformer]:
    torch.manual_seed(1)
    module = GLUETransformer(str(tiny_bert_dir), num_labels=3)
    trainer = quiet_trainer(max_steps=0, default_root_dir=folder)
    trainer.strategy.connect(module)
    path = folder / "glue.ckpt"
    trainer.save_checkpoint(path)
    return path, module


def test_the_model_of_a_tutorial_module_checkpoint_is_found(tiny_bert_dir: Path, tmp_path: Path) -> None:
    path, module = tutorial_checkpoint(tiny_bert_dir, tmp_path)
    found = model_from_checkpoint(path)
    assert isinstance(found.model, BertForSequenceClassification)
    assert found.prefix == "model." and found.model.config.num_labels == 3
    for name, tensor in module.model.state_dict().items():
        assert torch.equal(found.model.state_dict()[name], tensor), name
    teacher = load_teacher(str(path))  # the KD teacher option takes it too
    assert isinstance(teacher.model, BertForSequenceClassification) and teacher.tokenizer_source == str(tiny_bert_dir)


def test_a_checkpoint_that_does_not_name_its_model_asks_for_the_option(tiny_bert_dir: Path, tmp_path: Path) -> None:
    weights = {
        f"net.{k}": v for k, v in BertForSequenceClassification.from_pretrained(tiny_bert_dir).state_dict().items()
    }
    torch.save({"state_dict": weights}, tmp_path / "plain.ckpt")
    with pytest.raises(ValueError, match="does not say which transformers model it holds"):
        model_from_checkpoint(tmp_path / "plain.ckpt")
    found = model_from_checkpoint(tmp_path / "plain.ckpt", source=str(tiny_bert_dir))
    assert found.prefix == "net." and isinstance(found.model, BertForSequenceClassification)
    torch.save({"state_dict": {"net.other.weight": torch.ones(2)}}, tmp_path / "other.ckpt")
    with pytest.raises(ValueError, match=r"No transformers model of .* matches the weights"):
        model_from_checkpoint(tmp_path / "other.ckpt", source=str(tiny_bert_dir))


def test_candidate_prefixes_try_attributes_before_the_bare_names() -> None:
    assert candidate_prefixes(["student.bert.x", "model.bert.x", "scale"]) == ["model.", "student.", ""]
