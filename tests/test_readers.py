"""CoNLL and table readers: formats, IOB normalisation, and errors that name the file and line."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pytest

from lightning_memopt.tasks.readers import (
    DataFormatError,
    iob_to_iob2,
    load_conll,
    read_conll,
    read_table,
)

IOB1_FILE = """-DOCSTART- -X- -X- O

EU NNP B-NP I-ORG
rejects VBZ B-VP O
German JJ B-NP I-MISC
call NN I-NP O
. . O O

Peter NNP B-NP I-PER
Blackburn NNP I-NP I-PER
Smith NNP I-NP B-PER
"""


def test_reads_real_conll_validation(shared_data: Path) -> None:
    sentences, scheme = load_conll(shared_data / "conll2003" / "valid.txt.gz")
    assert scheme == "IOB2"
    assert len(sentences) == 3250
    assert sum(len(s.tokens) for s in sentences) == 51362
    counts = {t: sum(tag == f"B-{t}" for s in sentences for tag in s.tags) for t in ("PER", "LOC", "ORG", "MISC")}
    assert counts == {"PER": 1842, "LOC": 1837, "ORG": 1341, "MISC": 922}
    assert all(not s.tokens[0].startswith("-DOCSTART-") for s in sentences)


def test_iob1_is_normalised_to_iob2(tmp_path: Path) -> None:
    path = tmp_path / "iob1.txt.gz"
    with gzip.open(path, "wt", encoding="utf-8") as handle:
        handle.write(IOB1_FILE)
    sentences, scheme = load_conll(path)
    assert scheme == "IOB1"
    assert sentences[0].tags == ("B-ORG", "O", "B-MISC", "O", "O")
    assert sentences[1].tags == ("B-PER", "I-PER", "B-PER")


@pytest.mark.parametrize(
    ("tags", "expected"),
    [
        (["I-PER", "I-PER", "O", "I-LOC", "B-LOC"], ["B-PER", "I-PER", "O", "B-LOC", "B-LOC"]),
        (["I-PER", "I-ORG"], ["B-PER", "B-ORG"]),
        (["S-PER", "B-LOC", "E-LOC", "I-LOC"], ["B-PER", "B-LOC", "I-LOC", "B-LOC"]),
        (["O", "B-X", "I-X"], ["O", "B-X", "I-X"]),
    ],
)
def test_iob_to_iob2(tags: list[str], expected: list[str]) -> None:
    assert iob_to_iob2(tags) == expected


def test_configurable_columns(tmp_path: Path) -> None:
    path = tmp_path / "tab.txt"
    path.write_text("B-PER\tJohn\nO\tsleeps\n\n", encoding="utf-8")
    sentences = read_conll(path, token_column=1, tag_column=0)
    assert sentences[0].tokens == ("John", "sleeps")
    assert sentences[0].tags == ("B-PER", "O")


def test_malformed_conll_line_names_file_and_line(tmp_path: Path) -> None:
    path = tmp_path / "bad.txt"
    path.write_text("EU NNP B-NP B-ORG\nrejects\n", encoding="utf-8")
    with pytest.raises(DataFormatError, match=r"bad\.txt:2: expected at least"):
        read_conll(path, token_column=0, tag_column=3)


def test_bad_tag_names_file_and_line(tmp_path: Path) -> None:
    path = tmp_path / "bad.txt"
    path.write_text("EU B-ORG\nrejects VBZ\n", encoding="utf-8")
    with pytest.raises(DataFormatError, match=r"bad\.txt:2: tag 'VBZ'"):
        read_conll(path)


def test_missing_file_is_clear(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="does not exist"):
        read_conll(tmp_path / "nope.txt")


def test_reads_real_sst2_dev(shared_data: Path) -> None:
    examples = read_table(shared_data / "sst2" / "dev.tsv.gz")
    assert len(examples) == 872
    assert sum(e.label == "1" for e in examples) == 444


def test_tsv_csv_jsonl_agree(tmp_path: Path) -> None:
    rows = [('a "quoted" film', "1"), ("dull, slow", "0")]
    (tmp_path / "d.tsv").write_text("text\ty\n" + "".join(f"{t}\t{y}\n" for t, y in rows), encoding="utf-8")
    (tmp_path / "d.csv").write_text('text,y\n"a ""quoted"" film",1\n"dull, slow",0\n', encoding="utf-8")
    (tmp_path / "d.jsonl").write_text("".join(json.dumps({"text": t, "y": int(y)}) + "\n" for t, y in rows))
    results = [
        read_table(tmp_path / f"d.{kind}", text_column="text", label_column="y") for kind in ("tsv", "csv", "jsonl")
    ]
    assert results[0] == results[1] == results[2]
    assert results[0][0].text == 'a "quoted" film'


def test_table_errors(tmp_path: Path) -> None:
    (tmp_path / "short.tsv").write_text("sentence\tlabel\nfine film\t1\nbroken row\n", encoding="utf-8")
    with pytest.raises(DataFormatError, match=r"short\.tsv:3: expected 2 fields"):
        read_table(tmp_path / "short.tsv")
    (tmp_path / "cols.tsv").write_text("text\tlabel\nfine\t1\n", encoding="utf-8")
    with pytest.raises(DataFormatError, match=r"no column 'sentence' \(from --data.text_column\)"):
        read_table(tmp_path / "cols.tsv")
    (tmp_path / "bad.jsonl").write_text('{"sentence": "ok", "label": 1}\n{oops\n', encoding="utf-8")
    with pytest.raises(DataFormatError, match=r"bad\.jsonl:2: not valid JSON"):
        read_table(tmp_path / "bad.jsonl")
    (tmp_path / "data.parquet").write_text("x")
    with pytest.raises(DataFormatError, match="unknown table format"):
        read_table(tmp_path / "data.parquet")
