"""Physically removing feed-forward neurons: same outputs as zeroing them, and plain transformers loads it."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import AutoModelForTokenClassification, BertConfig, BertForTokenClassification

from lightning_memopt.pruning.structured import ffn_neuron_scores, find_feed_forwards, shrink_ffn


def tiny_model() -> BertForTokenClassification:
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, num_labels=3
    )
    return BertForTokenClassification(config).eval()


def test_shrunk_model_equals_the_neuron_masked_model(tmp_path: Path) -> None:
    model = tiny_model()
    inputs = {"input_ids": torch.randint(0, 100, (2, 7)), "attention_mask": torch.ones(2, 7, dtype=torch.long)}
    scores = ffn_neuron_scores(model)
    # Reference: zero the 50 % lowest-scoring neurons' rows in `up` (so their GELU output is 0) in a copy.
    masked = tiny_model()
    with torch.no_grad():
        for ffn in find_feed_forwards(masked):
            drop = torch.argsort(scores[ffn.block], descending=True, stable=True)[32:]
            ffn.up.weight[drop] = 0
            ffn.up.bias[drop] = -1e4  # GELU(-1e4) == 0
        expected = masked(**inputs).logits
    shrunk = shrink_ffn(model, scores, keep=0.5)
    assert shrunk.config.intermediate_size == 32
    assert all(ffn.up.out_features == 32 and ffn.down.in_features == 32 for ffn in find_feed_forwards(shrunk))
    with torch.no_grad():
        assert torch.allclose(shrunk(**inputs).logits, expected, atol=1e-5)
    shrunk.save_pretrained(tmp_path / "small")
    tiny_model().save_pretrained(tmp_path / "dense")
    reloaded = AutoModelForTokenClassification.from_pretrained(tmp_path / "small").eval()
    with torch.no_grad():
        assert torch.allclose(reloaded(**inputs).logits, expected, atol=1e-5)
    size = (tmp_path / "small" / "model.safetensors").stat().st_size
    assert size < (tmp_path / "dense" / "model.safetensors").stat().st_size


def test_bad_input() -> None:
    with pytest.raises(ValueError, match=r"keep must be in \(0, 1\]"):
        shrink_ffn(tiny_model(), {}, keep=0.0)
    with pytest.raises(ValueError, match="No feed-forward blocks"):
        find_feed_forwards(torch.nn.Sequential(torch.nn.Linear(2, 2)))
