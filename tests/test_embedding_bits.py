"""``--embedding_bits 4``: an OpenVINO int8 export whose embedding tables are int4, smaller, with the same labels."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import CONLL_LABELS, quiet_trainer, save_tiny_bert, tiny_bert_config

from lightning_memopt import TokenClassificationModule
from lightning_memopt.cli import main
from lightning_memopt.deploy.export import check_flags

pytest.importorskip("openvino", reason="the deploy extra (openvino) is not installed")
pytest.importorskip("nncf", reason="the deploy extra (nncf) is not installed")

WIDTH, VOCABULARY = 128, 30522  # one int4 group of 128 a row; the real uncased MiniLM vocabulary


def ner_checkpoint(folder: Path, width: int) -> Path:
    """A random 2-layer BERT ``width`` wide as a token-classification checkpoint beside ``folder``."""
    save_tiny_bert(folder, hidden_size=width, intermediate_size=2 * width)
    torch.manual_seed(0)
    module = TokenClassificationModule(str(folder), labels=CONLL_LABELS)
    trainer = quiet_trainer(max_steps=0)
    trainer.strategy.connect(module)
    trainer.save_checkpoint(folder.parent / f"ner-{width}.ckpt")
    return folder.parent / f"ner-{width}.ckpt"


def export_int8(checkpoint: Path, output_dir: Path, calibration: Path, *options: str) -> None:
    main(["export", f"--ckpt_path={checkpoint}", f"--output_dir={output_dir}", "--format=openvino", "--int8=true",
          f"--calibration_file={calibration}", "--min_agreement=0.9", *options])  # fmt: skip


def word_embedding_table(xml: Path) -> tuple[str, list[int]]:
    """Element type and shape of the constant the word-embedding Gather reads, through its decompression ops."""
    import openvino as ov

    for op in ov.Core().read_model(str(xml)).get_ordered_ops():
        if op.get_type_name() == "Gather" and "word_embeddings" in op.get_friendly_name():
            node = op.input_value(0).get_node()
            while node.get_type_name() != "Constant":
                node = node.input_value(0).get_node()
            return node.get_element_type().get_type_name(), list(node.get_output_shape(0))
    raise AssertionError(f"{xml} has no word-embedding Gather")


def test_int4_embeddings_are_grouped_int4_about_half_the_bytes_and_pick_the_same_labels(
    conll_small: dict[str, Path], tmp_path: Path
) -> None:
    wide_ner_checkpoint = ner_checkpoint(tmp_path / "model", WIDTH)
    calibration = tmp_path / "calibration.txt"  # a few real sentences: enough for NNCF's ranges, and quick
    sentences = conll_small["train"].read_text().split("\n\n")[1:17]
    calibration.write_text(
        "\n".join(" ".join(row.split()[0] for row in block.splitlines()) for block in sentences) + "\n"
    )
    export_int8(wide_ner_checkpoint, tmp_path / "int8", calibration)
    export_int8(wide_ner_checkpoint, tmp_path / "int4", calibration, "--embedding_bits=4")

    assert word_embedding_table(tmp_path / "int8" / "openvino_model.xml") == ("i8", [VOCABULARY, WIDTH])
    kind, shape = word_embedding_table(tmp_path / "int4" / "openvino_model.xml")
    assert kind == "u4" and shape in ([VOCABULARY, 1, WIDTH], [VOCABULARY, WIDTH])
    saved = (tmp_path / "int8" / "openvino_model.bin").stat().st_size - (
        tmp_path / "int4" / "openvino_model.bin"
    ).stat().st_size
    # word, position (512) and segment (2) tables: an int8 value and a float32 scale per row, against half a byte
    # and an fp16 scale with a 4-bit zero point per 128 values
    values = (VOCABULARY + 512 + 2) * WIDTH
    assert saved == pytest.approx(values * ((1 + 4 / WIDTH) - (0.5 + 2.5 / 128)), rel=0.01)
    manifest = json.loads((tmp_path / "int4" / "manifest.json").read_text())
    assert manifest["embedding_bits"] == 4 and manifest["parity"]["argmax_agreement"] >= 0.9

    text = tmp_path / "text.txt"
    text.write_text("EU rejects German call to boycott British lamb .\nPeter Blackburn reported from Brussels .\n")
    for name in ("int8", "int4"):
        main(["predict", f"--model={tmp_path / name}", f"--input={text}", f"--output={tmp_path / f'{name}.conll'}"])
    labels = {
        name: [line.split("\t")[1] for line in (tmp_path / f"{name}.conll").read_text().splitlines() if line]
        for name in ("int8", "int4")
    }
    assert len(labels["int4"]) == 15  # one label per word
    assert np.mean([a == b for a, b in zip(labels["int8"], labels["int4"], strict=True)]) >= 0.9


@pytest.mark.parametrize(
    ("width", "table"), [(256, [VOCABULARY, 2, 128]), (96, [VOCABULARY, 96])], ids=["two groups a row", "one a row"]
)
def test_compress_embeddings_makes_every_table_int4_and_leaves_the_matmuls(
    width: int, table: list[int], tmp_path: Path
) -> None:
    import openvino as ov
    from transformers import BertForTokenClassification

    from lightning_memopt.deploy.openvino import compress_embeddings

    torch.manual_seed(0)
    model = BertForTokenClassification(tiny_bert_config(hidden_size=width, intermediate_size=2 * width)).eval()
    example = {
        "input_ids": torch.tensor([[101, 7592, 2088, 102]]),
        "attention_mask": torch.ones(1, 4, dtype=torch.long),
    }
    converted = ov.convert_model(model, example_input=example)
    assert compress_embeddings(converted, 8) is converted
    ov.save_model(compress_embeddings(converted, 4), str(tmp_path / "model.xml"), compress_to_fp16=False)
    kind, shape = word_embedding_table(tmp_path / "model.xml")
    assert kind == "u4" and shape == table  # 96 wide, not a multiple of a group: one scale a row
    compressed = ov.Core().read_model(str(tmp_path / "model.xml"))
    matmul_weights = [
        op.input_value(1).get_node().get_element_type().get_type_name()
        for op in compressed.get_ordered_ops()
        if op.get_type_name() == "MatMul" and op.input_value(1).get_node().get_type_name() == "Constant"
    ]
    assert matmul_weights and set(matmul_weights) == {"f32"}  # left for the int8 quantization
    feed = {name: value.numpy() for name, value in example.items()}
    logits = [
        ov.Core().compile_model(m, "CPU", {"INFERENCE_PRECISION_HINT": "f32"})(feed)[0] for m in (converted, compressed)
    ]
    assert np.abs(logits[0] - logits[1]).max() < 0.1 * np.abs(logits[0]).max()


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"format": "onnx", "int8": True}, "--embedding_bits 4 compresses the embedding tables of an OpenVINO int8"),
        ({"format": "openvino", "int8": False}, "add --format openvino --int8 true"),
        ({"format": "transformers", "int8": True}, "--embedding_bits 4 compresses"),
    ],
)
def test_int4_embeddings_outside_an_openvino_int8_export_are_refused(options: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        check_flags(sparse=False, shrink=False, embedding_bits=4, **options)


def test_an_unknown_embedding_width_is_refused_on_the_command_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit):
        main(["export", f"--ckpt_path={tmp_path / 'x.ckpt'}", f"--output_dir={tmp_path}", "--embedding_bits=2"])
    assert "--embedding_bits" in capsys.readouterr().err
