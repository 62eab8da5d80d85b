"""``memopt predict``: the same labels as a transformers pipeline, on torch and ONNX Runtime, and clear errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from helpers import CONLL_LABELS, quiet_trainer

from lightning_memopt import SequenceClassificationModule, TokenClassificationModule
from lightning_memopt.cli import main
from lightning_memopt.tasks.readers import read_conll, read_table


@pytest.fixture(scope="module")
def exported(tiny_bert_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("predict-models")
    paths = {}
    for name, module in (
        ("ner", TokenClassificationModule(str(tiny_bert_dir), labels=CONLL_LABELS)),
        ("sst2", SequenceClassificationModule(str(tiny_bert_dir), labels=["negative", "positive"])),
    ):
        torch.manual_seed(0)
        trainer = quiet_trainer(max_steps=0)
        trainer.strategy.connect(module)
        trainer.save_checkpoint(folder / f"{name}.ckpt")
        main(["export", f"--ckpt_path={folder / f'{name}.ckpt'}", f"--output_dir={folder / name}"])
        paths[name] = folder / name
    return paths


def real_sentences(shared_data: Path) -> list[tuple[str, ...]]:
    """The first 500 real CoNLL-2003 validation sentences."""
    from lightning_memopt.tasks.readers import read_conll_words

    return read_conll_words(shared_data / "conll2003" / "valid.txt.gz")[:500]


def pipeline_word_labels(folder: Path, sentences: list[tuple[str, ...]]) -> list[list[str]]:
    """transformers' token-classification pipeline, read at each word's first sub-token."""
    from transformers import pipeline

    tagger = pipeline("token-classification", model=str(folder), ignore_labels=[], device="cpu")
    labels = []
    for words in sentences:
        text = " ".join(words)
        starts, position = [], 0
        for word in words:
            starts.append(position)
            position += len(word) + 1
        by_start = {}
        for token in tagger(text):
            by_start.setdefault(token["start"], token["entity"])
        labels.append([by_start[start] for start in starts])
    return labels


def test_ner_on_conll_and_plain_text_equals_the_pipeline(
    exported: dict[str, Path], shared_data: Path, tmp_path: Path
) -> None:
    conll = tmp_path / "valid.conll"
    conll.write_text("\n\n".join("\n".join(f"{w} X X O" for w in s) for s in real_sentences(shared_data)) + "\n")
    sentences = [s.tokens for s in read_conll(conll)]
    expected = pipeline_word_labels(exported["ner"], sentences)
    (tmp_path / "plain.txt").write_text("\n".join(" ".join(s) for s in sentences) + "\n\n")  # an empty line too
    main(
        [
            "predict",
            f"--model={exported['ner']}",
            f"--input={conll}",
            f"--output={tmp_path / 'a.conll'}",
            "--input_format=conll",
        ]
    )
    main(
        [
            "predict",
            f"--model={exported['ner']}",
            f"--input={tmp_path / 'plain.txt'}",
            f"--output={tmp_path / 'b.conll'}",
        ]
    )
    for output in ("a.conll", "b.conll"):
        blocks = [b for b in (tmp_path / output).read_text().split("\n\n") if b.strip()]
        got = [[line.split("\t")[1] for line in block.splitlines()] for block in blocks]
        words = [tuple(line.split("\t")[0] for line in block.splitlines()) for block in blocks]
        assert words == sentences and got == expected, output
        assert all(0 < float(line.split("\t")[2]) <= 1 for block in blocks for line in block.splitlines())


def test_classification_equals_the_pipeline_on_torch_and_onnxruntime(
    exported: dict[str, Path], shared_data: Path, tmp_path: Path
) -> None:
    from transformers import pipeline

    dev = shared_data / "sst2" / "dev.tsv.gz"
    texts = [example.text for example in read_table(dev)][:500]
    table = tmp_path / "dev.tsv"
    table.write_text("sentence\tlabel\n" + "".join(f"{text}\t0\n" for text in texts))
    expected = [
        result["label"] for result in pipeline("text-classification", model=str(exported["sst2"]), device="cpu")(texts)
    ]
    main(
        [
            "predict",
            f"--model={exported['sst2']}",
            f"--input={table}",
            f"--output={tmp_path / 'torch.jsonl'}",
        ]
    )
    rows = [json.loads(line) for line in (tmp_path / "torch.jsonl").read_text().splitlines()]
    assert [row["text"] for row in rows] == texts and [row["label"] for row in rows] == expected
    if pytest.importorskip("onnxruntime", reason="the deploy extra is not installed"):
        checkpoint = exported["sst2"].parent / "sst2.ckpt"
        main(["export", f"--ckpt_path={checkpoint}", f"--output_dir={tmp_path / 'onnx'}", "--format=onnx"])
        main(
            [
                "predict",
                f"--model={tmp_path / 'onnx'}",
                f"--input={table}",
                f"--output={tmp_path / 'ort.jsonl'}",
            ]
        )
        onnx_rows = [json.loads(line) for line in (tmp_path / "ort.jsonl").read_text().splitlines()]
        assert [row["label"] for row in onnx_rows] == expected


def test_a_sentence_longer_than_the_model_is_split_not_a_crash(
    exported: dict[str, Path], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    words = ["Lisbon"] * 700  # far more sub-tokens than the 512 positions
    (tmp_path / "long.txt").write_text(" ".join(words) + "\nshort one\n")
    main(
        [
            "predict",
            f"--model={exported['ner']}",
            f"--input={tmp_path / 'long.txt'}",
            f"--output={tmp_path / 'out.conll'}",
        ]
    )
    blocks = [b for b in (tmp_path / "out.conll").read_text().split("\n\n") if b.strip()]
    assert [len(b.splitlines()) for b in blocks] == [700, 2]
    assert "labelled in 2 pieces" in caplog.text


def test_bad_predict_inputs_are_one_line_errors(
    exported: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "empty.txt").write_text("\n\n")
    (tmp_path / "words.txt").write_text("Paris is nice\n")
    no_tokenizer = tmp_path / "bare"
    no_tokenizer.mkdir()
    (no_tokenizer / "config.json").write_text((exported["ner"] / "config.json").read_text())
    cases = {
        "--runtime=tensorrt": (["--input=x.txt", "--runtime=tensorrt"], "--runtime"),
        "missing model": ([f"--input={tmp_path / 'empty.txt'}"], "no config.json"),
        "no tokenizer": ([f"--input={tmp_path / 'empty.txt'}"], "no tokenizer files"),
        "empty input": ([f"--input={tmp_path / 'empty.txt'}"], "nothing to predict"),
        "no onnx model": ([f"--input={tmp_path / 'words.txt'}", "--runtime=onnxruntime"], "has no model.onnx"),
    }
    models = {"missing model": tmp_path / "none", "no tokenizer": no_tokenizer}
    for case, (extra, message) in cases.items():
        with pytest.raises(SystemExit) as exited:
            main(["predict", f"--model={models.get(case, exported['ner'])}", *extra])
        assert exited.value.code == 2, case
        assert message in capsys.readouterr().err, case


def test_a_text_longer_than_the_classifier_takes_is_truncated_with_a_warning(
    exported: dict[str, Path], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    (tmp_path / "long.txt").write_text(" ".join(["wonderful"] * 700) + "\na short one\n")
    main(
        [
            "predict",
            f"--model={exported['sst2']}",
            f"--input={tmp_path / 'long.txt'}",
            f"--output={tmp_path / 'o.jsonl'}",
        ]
    )
    assert len((tmp_path / "o.jsonl").read_text().splitlines()) == 2
    assert "1 texts were longer than 512 tokens and were truncated" in caplog.text
