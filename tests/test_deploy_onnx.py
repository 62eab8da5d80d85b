"""``memopt export --format onnx``: dynamic axes, a parity check that fails the export, int8, shrunk models."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import CONLL_LABELS, quiet_trainer

from lightning_memopt import SequenceClassificationModule, TokenClassificationModule
from lightning_memopt.cli import main

pytest.importorskip("onnxruntime", reason="the deploy extra (onnx, onnxscript, onnxruntime) is not installed")
pytest.importorskip("onnxscript", reason="the deploy extra (onnx, onnxscript, onnxruntime) is not installed")


def save_checkpoint(module: torch.nn.Module, path: Path) -> Path:
    trainer = quiet_trainer(max_steps=0)
    trainer.strategy.connect(module)
    trainer.save_checkpoint(path)
    return path


@pytest.fixture(scope="module")
def ner_checkpoint(tiny_bert_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(0)
    module = TokenClassificationModule(str(tiny_bert_dir), labels=CONLL_LABELS)
    return save_checkpoint(module, tmp_path_factory.mktemp("onnx") / "ner.ckpt")


def onnx_logits(folder: Path, inputs: dict[str, torch.Tensor]) -> np.ndarray:
    import onnxruntime as ort

    session = ort.InferenceSession(str(folder / "model.onnx"), providers=["CPUExecutionProvider"])
    return session.run(["logits"], {i.name: inputs[i.name].numpy() for i in session.get_inputs()})[0]


def test_float_export_runs_any_batch_and_length_and_records_its_parity(ner_checkpoint: Path, tmp_path: Path) -> None:
    from transformers import AutoTokenizer

    from lightning_memopt import load_task_checkpoint

    main(["export", f"--ckpt_path={ner_checkpoint}", f"--output_dir={tmp_path / 'onnx'}", "--format=onnx"])
    folder = tmp_path / "onnx"
    manifest = json.loads((folder / "manifest.json").read_text())
    assert (
        manifest["format"] == "onnx"
        and manifest["parity"]["max_abs_diff"] <= 1e-4
        and manifest["parity"]["positions"] > 50
    )
    assert list(json.loads((folder / "config.json").read_text())["id2label"].values()) == CONLL_LABELS
    tokenizer = AutoTokenizer.from_pretrained(folder)
    text = "a much longer sentence than any in the parity batch , about Lisbon , Porto and the Douro valley"
    batch = tokenizer([text] * 3, return_tensors="pt")  # another batch size and length than the export's
    with torch.no_grad():
        expected = load_task_checkpoint(ner_checkpoint).model.eval()(**batch).logits.numpy()
    assert np.abs(onnx_logits(folder, batch) - expected).max() <= 1e-4


def test_int8_export_keeps_the_labels_and_is_smaller(tiny_bert_dir: Path, tmp_path: Path) -> None:
    torch.manual_seed(0)
    checkpoint = save_checkpoint(
        SequenceClassificationModule(str(tiny_bert_dir), labels=["0", "1"]), tmp_path / "sst2.ckpt"
    )
    main(["export", f"--ckpt_path={checkpoint}", f"--output_dir={tmp_path / 'fp32'}", "--format=onnx"])
    main(["export", f"--ckpt_path={checkpoint}", f"--output_dir={tmp_path / 'int8'}", "--format=onnx", "--int8=true"])
    manifest = json.loads((tmp_path / "int8" / "manifest.json").read_text())
    assert manifest["format"] == "onnx-int8" and manifest["parity"]["argmax_agreement"] >= 0.995
    assert (tmp_path / "int8" / "model.onnx").stat().st_size < (tmp_path / "fp32" / "model.onnx").stat().st_size
    assert not list((tmp_path / "int8").glob("model.fp32*"))


def test_int8_export_with_calibration_sentences_is_ort_static_qdq(
    tiny_bert_dir: Path, conll_small: dict[str, Path], tmp_path: Path
) -> None:
    import onnx

    torch.manual_seed(0)
    checkpoint = save_checkpoint(
        SequenceClassificationModule(str(tiny_bert_dir), labels=["0", "1"]), tmp_path / "sst2.ckpt"
    )
    main(["export", f"--ckpt_path={checkpoint}", f"--output_dir={tmp_path / 'fp32'}", "--format=onnx"])
    main(["export", f"--ckpt_path={checkpoint}", f"--output_dir={tmp_path / 'static'}", "--format=onnx",
          "--int8=true", f"--calibration_file={conll_small['train']}"])  # fmt: skip
    graph = onnx.load(str(tmp_path / "static" / "model.onnx")).graph
    ops = [node.op_type for node in graph.node]
    # Activations quantized with ranges fixed at export (QDQ pairs), not measured per call.
    assert "DynamicQuantizeLinear" not in ops and ops.count("QuantizeLinear") >= 4 and "DequantizeLinear" in ops
    manifest = json.loads((tmp_path / "static" / "manifest.json").read_text())
    assert manifest["format"] == "onnx-int8" and manifest["parity"]["argmax_agreement"] >= 0.995
    assert (tmp_path / "static" / "model.onnx").stat().st_size < (tmp_path / "fp32" / "model.onnx").stat().st_size


def test_a_structurally_pruned_model_exports_shrunk(tiny_bert_dir: Path, tmp_path: Path) -> None:
    import onnx

    torch.manual_seed(0)
    module = TokenClassificationModule(str(tiny_bert_dir), labels=CONLL_LABELS)
    with torch.no_grad():
        for layer in module.model.bert.encoder.layer:  # half of every block's feed-forward neurons pruned
            layer.intermediate.dense.weight[32:] = 0
            layer.intermediate.dense.bias[32:] = 0
            layer.output.dense.weight[:, 32:] = 0
    checkpoint = save_checkpoint(module, tmp_path / "pruned.ckpt")
    main(["export", f"--ckpt_path={checkpoint}", f"--output_dir={tmp_path / 'onnx'}", "--format=onnx", "--shrink=true"])
    graph = onnx.load(str(tmp_path / "onnx" / "model.onnx")).graph
    shapes = [list(init.dims) for init in graph.initializer]
    assert [32, 32] in shapes or [32, 32][::-1] in shapes  # the 64-wide FFN is 32 wide now
    assert not any(64 in shape for shape in shapes)
    assert json.loads((tmp_path / "onnx" / "config.json").read_text())["intermediate_size"] == 32
    assert json.loads((tmp_path / "onnx" / "manifest.json").read_text())["parity"]["max_abs_diff"] <= 1e-4


def test_a_parity_failure_fails_the_export_and_writes_nothing(
    ner_checkpoint: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from lightning_memopt.deploy import onnx as module

    real = module.run_onnx
    monkeypatch.setattr(module, "run_onnx", lambda path, batch: real(path, batch) + 1e-3)
    with pytest.raises(SystemExit) as exited:
        main(["export", f"--ckpt_path={ner_checkpoint}", f"--output_dir={tmp_path / 'onnx'}", "--format=onnx"])
    assert exited.value.code == 2
    assert "differ from torch's by up to 1.00e-03" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("vnni", [True, False])
def test_an_int8_parity_failure_names_the_saturation_of_cpus_without_vnni(
    vnni: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    from lightning_memopt.deploy import onnx as module

    monkeypatch.setattr(module, "cpu_has_int8_dot_product", lambda: vnni)
    with pytest.raises(ValueError, match=r"label for only 99\.0% of 99") as error:
        module.check_parity(module.Parity(0.3, 0.99, 99), int8=True)
    assert ("no VNNI or AMX" in str(error.value)) is not vnni
    module.check_parity(module.Parity(0.3, 0.99, 99), int8=True, min_agreement=0.98)  # lowered: accepted


def test_a_missing_runtime_names_the_extra(
    ner_checkpoint: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "onnxruntime" else real(name, *a))
    with pytest.raises(SystemExit):
        main(["export", f"--ckpt_path={ner_checkpoint}", f"--output_dir={tmp_path / 'onnx'}", "--format=onnx"])
    assert "needs onnxruntime: pip install 'lightning-memopt[deploy]'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(
            [
                "export",
                f"--ckpt_path={ner_checkpoint}",
                f"--output_dir={tmp_path / 'x'}",
                "--format=onnx",
                "--sparse=true",
            ]
        )
    assert "an ONNX graph holds dense weights" in capsys.readouterr().err


def test_openvino_float_and_int8_exports_predict_like_torch(
    ner_checkpoint: Path, conll_small: dict[str, Path], tmp_path: Path
) -> None:
    pytest.importorskip("openvino", reason="the deploy extra (openvino) is not installed")
    pytest.importorskip("nncf", reason="the deploy extra (nncf) is not installed")
    main(["export", f"--ckpt_path={ner_checkpoint}", f"--output_dir={tmp_path / 'torch'}"])
    main(["export", f"--ckpt_path={ner_checkpoint}", f"--output_dir={tmp_path / 'ov'}", "--format=openvino"])
    assert json.loads((tmp_path / "ov" / "manifest.json").read_text())["parity"]["max_abs_diff"] <= 1e-4
    main(["export", f"--ckpt_path={ner_checkpoint}", f"--output_dir={tmp_path / 'ov8'}", "--format=openvino",
          "--int8=true", "--min_agreement=0", f"--calibration_file={conll_small['train']}"])  # fmt: skip
    manifest = json.loads((tmp_path / "ov8" / "manifest.json").read_text())
    assert manifest["format"] == "openvino-int8"
    assert (tmp_path / "ov8" / "openvino_model.bin").stat().st_size < (
        tmp_path / "ov" / "openvino_model.bin"
    ).stat().st_size
    text = tmp_path / "text.txt"
    text.write_text("EU rejects German call to boycott British lamb .\nPeter Blackburn\n")
    for folder in ("torch", "ov"):
        main(["predict", f"--model={tmp_path / folder}", f"--input={text}", f"--output={tmp_path / f'{folder}.conll'}"])
    f32 = ["predict", f"--model={tmp_path / 'ov'}", f"--input={text}", f"--output={tmp_path / 'ov-f32.conll'}"]
    main([*f32, "--runtime=openvino", "--precision=f32"])

    def rows(name: str) -> list[list[str]]:
        return [line.split("\t")[:2] for line in (tmp_path / name).read_text().splitlines() if line]

    assert rows("torch.conll") == rows("ov-f32.conll")  # float32 on both sides: the same labels
    assert [row[0] for row in rows("ov.conll")] == [row[0] for row in rows("torch.conll")]  # (bf16 labels may differ)
