"""OpenVINOQuantizationAwareTraining: NNCF's quantizers trained in place, resumed exactly, exported with their scales."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import CONLL_LABELS, Interrupt, fit_tiny_ner, quiet_trainer
from lightning.pytorch import Callback

from lightning_memopt import OpenVINOQuantizationAwareTraining, PruningScheduler, TokenClassificationModule
from lightning_memopt.cli import main
from lightning_memopt.core.models import pretrained_child
from lightning_memopt.quantization.openvino_qat import HOOKS, model_inputs, quantizer_count

pytest.importorskip("nncf", reason="the deploy extra (nncf) is not installed")
pytest.importorskip("openvino", reason="the deploy extra (openvino) is not installed")


def qat() -> OpenVINOQuantizationAwareTraining:
    return OpenVINOQuantizationAwareTraining(calibration_batches=2)


class InitialScales(Callback):
    """The quantizers' scales as calibrated, before the first optimizer step."""

    def on_train_start(self, trainer, pl_module) -> None:
        self.scales = {n: p.detach().clone() for n, p in pl_module.named_parameters() if n.endswith("_scale_value")}


def test_resume_continues_exactly_and_the_openvino_export_carries_the_trained_scales(
    tiny_bert_dir: Path, conll_small: dict[str, Path], tmp_path: Path
) -> None:
    initial = InitialScales()
    straight, _ = fit_tiny_ner(tiny_bert_dir, conll_small["train"], tmp_path / "straight", [qat(), initial], 10, 5)
    trained = {n: p for n, p in straight.named_parameters() if n.endswith("_scale_value")}
    assert trained and trained.keys() == initial.scales.keys()
    assert any(not torch.equal(trained[n], initial.scales[n]) for n in trained)  # the scales learned
    assert all(n.startswith(f"model.{HOOKS}.") for n in trained)

    with pytest.raises(SystemExit):
        fit_tiny_ner(tiny_bert_dir, conll_small["train"], tmp_path / "resumed", [qat(), Interrupt(7)], 10, 5)
    resumed, _ = fit_tiny_ner(
        tiny_bert_dir, conll_small["train"], tmp_path / "resumed", [qat()], 10, 5, str(tmp_path / "resumed/last.ckpt")
    )
    for (name, a), (_, b) in zip(straight.state_dict().items(), resumed.state_dict().items(), strict=True):
        assert torch.equal(a, b), name

    ckpt = tmp_path / "straight" / "last.ckpt"
    with pytest.raises(SystemExit):  # a float export of the quantized model is refused with the fix
        main(["export", f"--ckpt_path={ckpt}", f"--output_dir={tmp_path / 'float'}", "--format=openvino"])
    assert not (tmp_path / "float").exists()
    folder = tmp_path / "ov8"
    main(["export", f"--ckpt_path={ckpt}", f"--output_dir={folder}", "--format=openvino", "--int8=true",
          "--min_agreement=0.85"])  # fmt: skip
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["format"] == "openvino-int8" and manifest["parity"]["argmax_agreement"] >= 0.85
    assert list(json.loads((folder / "config.json").read_text())["id2label"].values()) == CONLL_LABELS

    import openvino as ov
    from transformers import AutoTokenizer

    graph = ov.Core().read_model(folder / "openvino_model.xml")
    assert sum(op.get_type_name() == "FakeQuantize" for op in graph.get_ops()) >= len(trained)
    # The IR computes the trained model: on a new batch it is far closer to it than to its float weights.
    tokenizer = AutoTokenizer.from_pretrained(folder)
    batch = dict(tokenizer(["Lisbon and Porto beat Benfica in Madrid on Sunday ."] * 2, return_tensors="pt"))
    compiled = ov.Core().compile_model(graph, "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
    exported = compiled({k: v.numpy() for k, v in batch.items()})[compiled.output(0)]
    with torch.no_grad():
        quantized = straight.model.eval()(**batch).logits.numpy()
    assert np.abs(exported - quantized).max() < 0.5 * np.abs(quantized).max()

    # The same scales as an ONNX QDQ graph, which ONNX Runtime runs.
    import onnx
    import onnxruntime as ort

    main(["export", f"--ckpt_path={ckpt}", f"--output_dir={tmp_path / 'onnx8'}", "--format=onnx", "--int8=true",
          "--min_agreement=0.85"])  # fmt: skip
    assert json.loads((tmp_path / "onnx8" / "manifest.json").read_text())["format"] == "onnx-int8"
    graph = onnx.load(tmp_path / "onnx8" / "model.onnx").graph
    ops = [node.op_type for node in graph.node]
    assert ops.count("DequantizeLinear") >= quantizer_count(straight.model) > 0 and "QuantizeLinear" in ops
    # the weights are stored as int8 (only activations are quantized at run time): a third of the float bytes, where
    # float weights behind QuantizeLinear made it as large as the float model
    assert not [t.name for t in graph.initializer if t.data_type == onnx.TensorProto.FLOAT and len(t.dims) == 2]
    float_bytes = 4 * sum(p.numel() for name, p in straight.model.named_parameters() if HOOKS not in name)
    assert (tmp_path / "onnx8" / "model.onnx").stat().st_size < 0.35 * float_bytes
    session = ort.InferenceSession(str(tmp_path / "onnx8" / "model.onnx"), providers=["CPUExecutionProvider"])
    feed = {i.name: batch[i.name].numpy() for i in session.get_inputs()}
    assert np.abs(session.run(["logits"], feed)[0] - quantized).max() < 0.5 * np.abs(quantized).max()


def test_distillation_from_the_float_model_trains_the_quantized_student(
    tiny_bert_dir: Path, conll_small: dict[str, Path], tmp_path: Path
) -> None:
    """QAT with KD from the float model (NNCF quantizes the student at setup, then KD loads its teacher): the KD
    term is the quantized student's, and its trained scales export."""
    from lightning_memopt import KnowledgeDistillation

    torch.manual_seed(0)
    teacher = TokenClassificationModule(str(tiny_bert_dir), labels=CONLL_LABELS).model  # the student's start
    kd = KnowledgeDistillation(teacher=teacher, alpha=0.5, temperature=2.0)
    module, trainer = fit_tiny_ner(tiny_bert_dir, conll_small["train"], tmp_path, [qat(), kd], 6, 6)
    assert quantizer_count(module.model) > 0 and getattr(module.model, HOOKS, None) is not None
    metrics = trainer.callback_metrics
    # The student starts as the teacher, so only quantization noise and 6 steps separate them: a small, live KD term.
    assert 0.0 < float(metrics["train_kd"]) < 1.0 and "train_total" in metrics
    folder = tmp_path / "ov8"
    main(["export", f"--ckpt_path={tmp_path / 'last.ckpt'}", f"--output_dir={folder}", "--format=openvino",
          "--int8=true", "--min_agreement=0.85"])  # fmt: skip
    assert json.loads((folder / "manifest.json").read_text())["format"] == "openvino-int8"


def test_pruned_weights_stay_zero_under_the_quantizers(
    tiny_bert_dir: Path, conll_small: dict[str, Path], tmp_path: Path
) -> None:
    pruning = PruningScheduler(final_sparsity=0.5, start=0, end=2, every=2)
    module, _ = fit_tiny_ner(tiny_bert_dir, conll_small["train"], tmp_path, [qat(), pruning], 4, 4)
    weights = dict(module.named_parameters())
    assert pruning.masks
    for name, mask in pruning.masks.items():
        assert (weights[name].detach()[~mask.bool()] == 0).all(), name


def test_evaluation_quantizes_the_model_as_training_did(
    tiny_bert_dir: Path, conll_small: dict[str, Path], tmp_path: Path
) -> None:
    from lightning_memopt import TokenClassificationDataModule

    trained, _ = fit_tiny_ner(tiny_bert_dir, conll_small["train"], tmp_path, [qat()], 3, 3)
    fresh = TokenClassificationModule(str(tiny_bert_dir), labels=CONLL_LABELS)
    data = TokenClassificationDataModule(train_file=str(conll_small["train"]), test_file=str(conll_small["val"]))
    trainer = quiet_trainer(enable_checkpointing=False, callbacks=[qat()])
    trainer.test(fresh, datamodule=data, ckpt_path=str(tmp_path / "last.ckpt"))
    for (name, a), (_, b) in zip(trained.state_dict().items(), fresh.state_dict().items(), strict=True):
        assert torch.equal(a, b), name


def test_batches_without_the_model_inputs_and_ambiguous_modules_are_refused() -> None:
    with pytest.raises(ValueError, match="Pass inputs="):
        model_inputs((torch.ones(2, 3), torch.ones(2)), ("input_ids",))
    with pytest.raises(ValueError, match=r"keys \['features'\]"):
        model_inputs({"features": torch.ones(2, 3)}, ("input_ids",))
    with pytest.raises(ValueError, match="calibration_batches=0"):
        OpenVINOQuantizationAwareTraining(calibration_batches=0)


def test_the_transformers_model_of_a_module_is_found_or_must_be_named(tiny_bert_dir: Path) -> None:
    module = TokenClassificationModule(str(tiny_bert_dir), labels=CONLL_LABELS)
    assert pretrained_child(module) == ("model", module.model)
    module.teacher_copy = TokenClassificationModule(str(tiny_bert_dir), labels=CONLL_LABELS).model
    with pytest.raises(ValueError, match=r"holds 2 transformers models .* name the one to use with attribute="):
        pretrained_child(module)
    assert pretrained_child(module, "model")[1] is module.model
    with pytest.raises(ValueError, match="attribute='encoder'"):
        pretrained_child(module, "encoder")


def test_recipe_overlay_on_ddp_gives_identical_quantized_models_then_exports(
    tiny_bert_dir: Path, conll_small: dict[str, Path], tmp_path: Path
) -> None:
    from helpers import fit_overlay_on_ddp, memopt

    short = ["--trainer.max_steps=6", "--trainer.val_check_interval=6", "--trainer.callbacks.calibration_batches=2"]
    overlay = "quantization/openvino-qat.yaml"  # its 200 steps made 6 again by `short`
    log, records = fit_overlay_on_ddp(overlay, tiny_bert_dir, conll_small, 6, tmp_path, *short)
    assert "quantized by NNCF" in log
    # weights and scales equal on both ranks (DDP syncs them at start)
    assert len(records) == 2 and records[0] == {**records[1], "global_rank": 0}
    checkpoint = tmp_path / "runs/openvino-qat/checkpoints/last.ckpt"
    export = ["export", f"--ckpt_path={checkpoint}", "--output_dir=ov8", "--format=openvino", "--int8=true"]
    result = memopt([*export, "--min_agreement=0.85"], cwd=tmp_path)
    assert "learned in OpenVINOQuantizationAwareTraining" in result.stdout
