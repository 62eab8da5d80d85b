"""Frozen 8-bit and 4-bit weights (bitsandbytes) for a distillation teacher: smaller, close, and used by the hook."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from helpers import CONLL_LABELS, fit_tiny_ner
from test_distillation_callback import make_teacher
from transformers import AutoModelForTokenClassification

from lightning_memopt import KnowledgeDistillation
from lightning_memopt.core.frozen import quantize_frozen


def linear_weight_bytes(model: torch.nn.Module) -> int:
    return sum(
        t.numel() * t.element_size()
        for name, module in model.named_modules()
        if "classifier" not in name and hasattr(module, "weight") and module.weight is not None and module.weight.dim() == 2
        and type(module).__name__.startswith("Linear")
        for t in [module.weight]
    )  # fmt: skip


@pytest.mark.parametrize(("bits", "max_ratio", "max_error"), [("int8", 0.26, 0.01), ("nf4", 0.13, 0.05)])
def test_frozen_teacher_is_smaller_and_close(
    bits: str, max_ratio: float, max_error: float, tiny_bert_dir: Path, tmp_path: Path
) -> None:
    folder = make_teacher(tiny_bert_dir, tmp_path / "teacher", hidden_size=128)
    reference = AutoModelForTokenClassification.from_pretrained(folder).eval()
    model = AutoModelForTokenClassification.from_pretrained(folder).eval().requires_grad_(False)
    before = linear_weight_bytes(model)
    replaced = quantize_frozen(model, bits)  # type: ignore[arg-type]
    model.to("cpu")
    assert len(replaced) == 2 * 6 and "classifier" not in replaced  # q, k, v, out, up, down per layer
    assert type(model.classifier) is torch.nn.Linear
    assert linear_weight_bytes(model) <= max_ratio * before
    ids = torch.randint(1000, 5000, (4, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected, got = reference(input_ids=ids).logits, model(input_ids=ids).logits
    assert (got - expected).abs().max() <= max_error * expected.abs().max()
    assert (got.argmax(-1) == expected.argmax(-1)).float().mean() > 0.9


def test_quantize_frozen_refuses_what_it_cannot_do(tiny_bert_dir: Path, tmp_path: Path) -> None:
    model = AutoModelForTokenClassification.from_pretrained(make_teacher(tiny_bert_dir, tmp_path / "t"))
    with pytest.raises(ValueError, match="for frozen models"):
        quantize_frozen(model, "int8")
    with pytest.raises(ValueError, match="'int8' or 'nf4', got 'int2'"):
        quantize_frozen(model.requires_grad_(False), "int2")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"no nn\.Linear layer outside"):
        quantize_frozen(torch.nn.Sequential(torch.nn.ReLU()), "int8")


def test_distillation_with_an_int8_teacher(tiny_bert_dir: Path, conll_small: dict[str, Path], tmp_path: Path) -> None:
    kd = KnowledgeDistillation(teacher=str(make_teacher(tiny_bert_dir, tmp_path / "teacher")), teacher_precision="int8")
    _, trainer = fit_tiny_ner(tiny_bert_dir, conll_small["train"], tmp_path / "run", [kd], 3, 3)
    assert kd.teacher is not None
    assert kd.teacher.bert.encoder.layer[0].attention.self.query.weight.dtype == torch.int8
    assert torch.isfinite(trainer.callback_metrics["train_kd"]) and trainer.callback_metrics["train_kd"] > 0
    assert trainer.lightning_module.labels == CONLL_LABELS
    with pytest.raises(ValueError, match="teacher_precision must be one of"):
        KnowledgeDistillation(teacher=str(tmp_path / "teacher"), teacher_precision="int4")  # type: ignore[arg-type]
