"""Shrunk exports reload from their folder alone (heads and neurons), and never silently at full size."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from helpers import CONLL_LABELS, quiet_trainer
from transformers import AutoModelForTokenClassification

from lightning_memopt import TokenClassificationModule, load_pretrained
from lightning_memopt.cli import main


def pruned_checkpoint(tiny_bert_dir: Path, path: Path) -> tuple[Path, TokenClassificationModule]:
    """A tiny NER module whose layer 0 lost head 1 and both layers half their neurons, as structured pruning leaves it."""
    torch.manual_seed(0)
    module = TokenClassificationModule(str(tiny_bert_dir), labels=CONLL_LABELS).eval()
    with torch.no_grad():
        attention = module.model.bert.encoder.layer[0].attention
        for linear in (attention.self.query, attention.self.key, attention.self.value):
            linear.weight[16:] = 0
            linear.bias[16:] = 0
        attention.output.dense.weight[:, 16:] = 0
        for layer in module.model.bert.encoder.layer:
            layer.intermediate.dense.weight[32:] = 0
            layer.intermediate.dense.bias[32:] = 0
            layer.output.dense.weight[:, 32:] = 0
    trainer = quiet_trainer(max_steps=0)
    trainer.strategy.connect(module)
    trainer.save_checkpoint(path)
    return path, module


def test_a_shrunk_export_reloads_with_its_cut_shapes(tiny_bert_dir: Path, tmp_path: Path) -> None:
    checkpoint, module = pruned_checkpoint(tiny_bert_dir, tmp_path / "pruned.ckpt")
    main(["export", f"--ckpt_path={checkpoint}", f"--output_dir={tmp_path / 'small'}", "--shrink=true"])
    config = json.loads((tmp_path / "small" / "config.json").read_text())
    assert config["memopt_shrunk"] == {"heads": {"bert.encoder.layer.0.attention": 1}}
    assert config["intermediate_size"] == 32
    model = load_pretrained(tmp_path / "small")
    assert model.bert.encoder.layer[0].attention.self.query.out_features == 16  # one head of 16 features
    assert model.bert.encoder.layer[1].attention.self.query.out_features == 32
    assert sum(p.numel() for p in model.parameters()) < sum(p.numel() for p in module.model.parameters())
    batch = {"input_ids": torch.randint(1000, 2000, (2, 9)), "attention_mask": torch.ones(2, 9, dtype=torch.long)}
    with torch.no_grad():
        assert torch.allclose(model(**batch).logits, module.model(**batch).logits, atol=1e-5)
    with pytest.raises((RuntimeError, ValueError)):  # plain transformers cannot fit the cut heads into the config
        AutoModelForTokenClassification.from_pretrained(tmp_path / "small")


def test_dense_and_int8_folders_load_too(tiny_bert_dir: Path, tmp_path: Path) -> None:
    checkpoint, _ = pruned_checkpoint(tiny_bert_dir, tmp_path / "pruned.ckpt")
    main(["export", f"--ckpt_path={checkpoint}", f"--output_dir={tmp_path / 'dense'}"])
    main(["export", f"--ckpt_path={checkpoint}", f"--output_dir={tmp_path / 'int8'}", "--int8=true"])
    assert type(load_pretrained(tmp_path / "dense")).__name__ == "BertForTokenClassification"
    assert any(type(m).__name__ == "Int8DynamicLinear" for m in load_pretrained(tmp_path / "int8").modules())


def test_a_damaged_record_is_a_clear_error(tiny_bert_dir: Path, tmp_path: Path) -> None:
    checkpoint, _ = pruned_checkpoint(tiny_bert_dir, tmp_path / "pruned.ckpt")
    main(["export", f"--ckpt_path={checkpoint}", f"--output_dir={tmp_path / 'small'}", "--shrink=true"])
    config_path = tmp_path / "small" / "config.json"
    config = json.loads(config_path.read_text())
    config["memopt_shrunk"]["heads"] = {"bert.encoder.layer.7.attention": 1}
    config_path.write_text(json.dumps(config))
    with pytest.raises(ValueError, match="names heads groups this model does not have"):
        load_pretrained(tmp_path / "small")
