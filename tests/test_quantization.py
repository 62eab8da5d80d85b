"""QuantizationAwareTraining: schedule and resume, int8 export matching fake quant, composition, clear errors."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from helpers import Interrupt, fit_tiny_ner, load_example, quiet_trainer
from lightning.pytorch import Callback

from lightning_memopt import (
    PruningScheduler,
    QuantizationAwareTraining,
    TokenClassificationDataModule,
    TokenClassificationModule,
)
from lightning_memopt.cli import main as memopt_main
from lightning_memopt.quantization import FakeQuantLinear, Int8DynamicLinear, load_int8
from lightning_memopt.quantization.export import WEIGHTS_FILE, checkpoint_qat_state


class Probe(Callback):
    """Records, per optimizer step, whether fake quantization is on and whether the weight scales are frozen."""

    def __init__(self) -> None:
        self.seen: dict[int, tuple[bool, bool]] = {}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        layer = next(m for m in pl_module.modules() if isinstance(m, FakeQuantLinear))
        self.seen[trainer.global_step - 1] = (layer.fake_quant, layer.frozen_scales is not None)


def qat() -> QuantizationAwareTraining:
    return QuantizationAwareTraining(start=3, freeze_ranges=6)


def batch(tiny_bert_dir: Path) -> dict[str, torch.Tensor]:
    from transformers import AutoTokenizer

    sentences = ["EU rejects German call to boycott British lamb .", "Peter Blackburn", "BRUSSELS 1996-08-22"]
    encoded = AutoTokenizer.from_pretrained(tiny_bert_dir)(sentences, padding=True, return_tensors="pt")
    return {k: encoded[k] for k in ("input_ids", "attention_mask")}


def test_schedule_then_int8_export_matches_fake_quant_at_a_quarter_of_the_bytes(
    tiny_bert_dir: Path, conll_small: dict[str, Path], tmp_path: Path
) -> None:
    probe = Probe()
    module, _trainer = fit_tiny_ner(tiny_bert_dir, conll_small["train"], tmp_path, [qat(), probe], 10, 5)
    assert [probe.seen[s] for s in (0, 2, 3, 5, 6, 9)] == [
        (False, False),
        (False, False),
        (True, False),
        (True, False),
        (True, True),
        (True, True),
    ]
    assert type(module.model.classifier) is torch.nn.Linear  # the default filter leaves the head in float
    inputs = batch(tiny_bert_dir)
    with torch.no_grad():
        fake = module.model.eval()(**inputs).logits
    memopt_main(["export", f"--ckpt_path={tmp_path / 'last.ckpt'}", f"--output_dir={tmp_path / 'int8'}", "--int8=true"])
    int8 = load_int8(tmp_path / "int8")
    assert sum(isinstance(m, Int8DynamicLinear) for m in int8.modules()) == 12
    with torch.no_grad():
        real = int8(**inputs).logits
    # Stated tolerance: 1e-3 of the logits' scale, and the same predicted tag at every position.
    assert (real - fake).abs().max() <= 1e-3 * fake.abs().max()
    assert torch.equal(real.argmax(-1), fake.argmax(-1))
    frozen = checkpoint_qat_state(torch.load(tmp_path / "last.ckpt", weights_only=True))["frozen_scales"]
    layer = "model.bert.encoder.layer.0.intermediate.dense"
    assert torch.equal(int8.bert.encoder.layer[0].intermediate.dense.weight_scale, frozen[layer])
    float_bytes = sum(
        4 * m.weight.numel() for m in module.model.bert.encoder.modules() if isinstance(m, torch.nn.Linear)
    )
    int8_bytes = sum(
        m.weight.numel() + 4 * m.weight_scale.numel() for m in int8.modules() if isinstance(m, Int8DynamicLinear)
    )
    assert int8_bytes <= 0.3 * float_bytes


def test_resume_mid_qat_continues_exactly_and_checkpoints_load_into_the_plain_module(
    tiny_bert_dir: Path, conll_small: dict[str, Path], tmp_path: Path
) -> None:
    straight, _ = fit_tiny_ner(tiny_bert_dir, conll_small["train"], tmp_path / "straight", [qat()], 10, 5)
    with pytest.raises(SystemExit):
        fit_tiny_ner(tiny_bert_dir, conll_small["train"], tmp_path / "resumed", [qat(), Interrupt(7)], 10, 5)
    resumed_qat = qat()
    resumed, _ = fit_tiny_ner(
        tiny_bert_dir,
        conll_small["train"],
        tmp_path / "resumed",
        [resumed_qat],
        10,
        5,
        str(tmp_path / "resumed/last.ckpt"),
    )
    for (name, a), (_, b) in zip(straight.state_dict().items(), resumed.state_dict().items(), strict=True):
        assert torch.equal(a, b), name
    assert resumed_qat.enabled and resumed_qat.frozen_scales

    # The checkpoint is the plain module's: it loads without the callback, and test/fit run again on it.
    plain = TokenClassificationModule.load_from_checkpoint(tmp_path / "straight" / "last.ckpt", weights_only=True)
    assert not any(isinstance(m, FakeQuantLinear) for m in plain.modules())
    data = TokenClassificationDataModule(
        train_file=str(conll_small["train"]), val_file=str(conll_small["val"]), test_file=str(conll_small["val"])
    )
    again = QuantizationAwareTraining()
    trainer = quiet_trainer(max_steps=2, enable_checkpointing=False, callbacks=[again])
    trainer.test(straight, datamodule=data, ckpt_path=str(tmp_path / "straight" / "last.ckpt"))
    assert "test_f1" in trainer.callback_metrics and again.enabled  # evaluation runs the quantized model
    # ... with the weight scales frozen in the checkpoint, as training and the int8 export use them
    frozen = checkpoint_qat_state(torch.load(tmp_path / "straight" / "last.ckpt", weights_only=True))["frozen_scales"]
    assert frozen.keys() == again.layers.keys()
    for name, layer in again.layers.items():
        assert torch.equal(layer.frozen_scales, frozen[name]), name
    trainer = quiet_trainer(max_steps=2, enable_checkpointing=False, callbacks=[QuantizationAwareTraining()])
    trainer.fit(straight, datamodule=data)
    assert trainer.global_step == 2


def test_pruned_weights_stay_zero_through_fake_quant_and_int8_export(
    tiny_bert_dir: Path, conll_small: dict[str, Path], tmp_path: Path
) -> None:
    pruning = PruningScheduler(final_sparsity=0.7, start=0, end=4, every=2)
    _module, _ = fit_tiny_ner(
        tiny_bert_dir, conll_small["train"], tmp_path, [pruning, QuantizationAwareTraining()], 8, 4
    )
    memopt_main(["export", f"--ckpt_path={tmp_path / 'last.ckpt'}", f"--output_dir={tmp_path / 'int8'}", "--int8=true"])
    int8 = dict(load_int8(tmp_path / "int8").named_modules())
    for name, mask in pruning.masks.items():
        layer = int8[name.removeprefix("model.").removesuffix(".weight")]
        assert (layer.weight[~mask] == 0).all(), name
        assert float((layer.weight == 0).float().mean()) >= 0.7, name

    # --sparse packs the pruned int8 weights (non-zero values and a 1-bit mask): the same model from fewer bytes
    memopt_main(["export", f"--ckpt_path={tmp_path / 'last.ckpt'}", f"--output_dir={tmp_path / 'sparse'}", "--int8=true",
                 "--sparse=true"])  # fmt: skip
    sparse = load_int8(tmp_path / "sparse")
    dense_state, sparse_state = load_int8(tmp_path / "int8").state_dict(), sparse.state_dict()
    assert all(torch.equal(sparse_state[key], value) for key, value in dense_state.items())
    pruned = sum(int8[n.removeprefix("model.").removesuffix(".weight")].weight.numel() for n in pruning.masks)
    saved = (tmp_path / "int8" / WEIGHTS_FILE).stat().st_size - (tmp_path / "sparse" / WEIGHTS_FILE).stat().st_size
    assert saved >= pruned * (0.7 - 1 / 8) - 4096  # an int8 value a weight, against 30 % of them and a bit each
    assert json.loads((tmp_path / "sparse" / "quantization.json").read_text())["sparse"] is True


def test_post_training_quantization_without_qat_and_the_plain_example(shared_data: Path, tmp_path: Path) -> None:
    sentiment = load_example()
    model = sentiment.TinySentimentModel(hidden_size=32, num_layers=2, num_heads=2)
    data = sentiment.SST2Tuples(train_file=str(shared_data / "sst2/train.tsv.gz"), max_train_rows=64, batch_size=16)
    qat_callback = QuantizationAwareTraining(start=0.5)
    quiet_trainer(max_steps=4, enable_checkpointing=False, callbacks=[qat_callback]).fit(model, datamodule=data)
    assert len(qat_callback.layers) == 12 and all(name.startswith("encoder.") for name in qat_callback.layers)

    from lightning_memopt.quantization import convert_to_int8

    inputs = torch.randint(1000, 2000, (2, 9)), torch.ones(2, 9, dtype=torch.long)
    with torch.no_grad():
        fake = model.eval()(*inputs)
        convert_to_int8(model.encoder)
        assert sum(isinstance(m, Int8DynamicLinear) for m in model.modules()) == 12
        assert torch.allclose(model(*inputs), fake, atol=1e-3 * float(fake.abs().max()))


def test_bad_options_fail_before_training(tiny_bert_dir: Path, conll_small: dict[str, Path], tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"freeze_ranges=2 comes before start=5"):
        QuantizationAwareTraining(start=5, freeze_ranges=2)
    with pytest.raises(ValueError, match=r"start=1.5: a float is a fraction of the run and must be in \[0, 1\]"):
        QuantizationAwareTraining(start=1.5)

    def fails(match: str, **options: Any) -> None:
        with pytest.raises(ValueError, match=match):
            fit_tiny_ner(tiny_bert_dir, conll_small["train"], tmp_path, [QuantizationAwareTraining(**options)], 4, 10)

    fails(r"selects no Linear layer", modules=["decoder"])
    fails(r"cannot quantize: \[.model.bert.embeddings.LayerNorm \(LayerNorm\).", modules=["LayerNorm"])
    fails(r"start resolves to step 50, but the run has only 4", start=50)


def test_recipe_overlay_on_ddp_then_int8_export(
    tiny_bert_dir: Path, conll_small: dict[str, Path], tmp_path: Path
) -> None:
    from helpers import fit_overlay_on_ddp, memopt

    log, records = fit_overlay_on_ddp("quantization/int8-qat.yaml", tiny_bert_dir, conll_small, 10, tmp_path)
    assert "QuantizationAwareTraining: 12 layers, int8 fake quantization from step 1" in log
    assert len(records) == 2 and records[0] == {**records[1], "global_rank": 0}
    checkpoint = tmp_path / "runs/ner-conll2003/checkpoints/last.ckpt"
    result = memopt(["export", f"--ckpt_path={checkpoint}", "--output_dir=int8", "--int8=true"], cwd=tmp_path)
    assert "12 Linear layers from QAT layers with frozen weight scales" in result.stdout
    assert isinstance(load_int8(tmp_path / "int8").bert.encoder.layer[1].output.dense, Int8DynamicLinear)


def test_int8_linear_under_inference_mode_and_after_reloading_weights() -> None:
    torch.manual_seed(0)
    source, other = torch.nn.Linear(8, 4), torch.nn.Linear(8, 4)
    x = torch.randn(3, 8)
    with torch.inference_mode():  # as in Lightning's validate/test: converted and run there
        layer = Int8DynamicLinear.from_linear(source)
        first = layer(x)
    assert torch.allclose(first, source(x), atol=0.05)
    layer = Int8DynamicLinear.from_linear(source)
    assert torch.allclose(layer(x), first)
    layer.load_state_dict(Int8DynamicLinear.from_linear(other).state_dict())
    assert torch.allclose(layer(x), other(x), atol=0.05)  # the packed weights follow the new state


def test_prune_distill_and_quantize_in_one_fit(
    tiny_bert_dir: Path, conll_small: dict[str, Path], tmp_path: Path
) -> None:
    """The three compression callbacks together: each result is what it promises, in one exported model."""
    from test_distillation_callback import make_teacher

    from lightning_memopt import KnowledgeDistillation

    pruning = PruningScheduler(final_sparsity=0.5, start=0, end=4, every=2)
    kd = KnowledgeDistillation(str(make_teacher(tiny_bert_dir, tmp_path / "teacher")), alpha=0.5)
    qat_callback = QuantizationAwareTraining(start=2)
    _, trainer = fit_tiny_ner(tiny_bert_dir, conll_small["train"], tmp_path, [pruning, kd, qat_callback], 8, 4)
    assert float(trainer.callback_metrics["train_kd"]) > 0 and qat_callback.enabled
    assert not any(isinstance(m, FakeQuantLinear) for m in kd.teacher.modules())  # the teacher stays float
    memopt_main(["export", f"--ckpt_path={tmp_path / 'last.ckpt'}", f"--output_dir={tmp_path / 'int8'}", "--int8=true"])
    int8 = dict(load_int8(tmp_path / "int8").named_modules())
    for name, mask in pruning.masks.items():
        layer = int8[name.removeprefix("model.").removesuffix(".weight")]
        assert isinstance(layer, Int8DynamicLinear) and (layer.weight[~mask] == 0).all(), name


def test_int8_layers_still_run_when_the_legacy_kernel_is_gone(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    from lightning_memopt.quantization import modules

    torch.manual_seed(0)
    linear = torch.nn.Linear(16, 8)
    x = torch.randn(5, 16)
    legacy = modules.Int8DynamicLinear.from_linear(linear)(x)
    monkeypatch.setattr(modules, "legacy_int8_kernel", lambda: False)
    monkeypatch.setattr(modules, "_backend", None)
    with caplog.at_level("WARNING", logger="lightning_memopt"):
        reference = modules.Int8DynamicLinear.from_linear(linear)(x)
    assert "legacy int8 kernel (torch.ops.quantized) is not available" in caplog.text and "--int8" in caplog.text
    assert torch.allclose(reference, legacy, atol=1e-5)  # the same int8 numerics, computed in float
    monkeypatch.setattr(modules, "_backend", None)
