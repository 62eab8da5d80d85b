"""Data modules: sub-token labelling, dynamic padding, sorted evaluation, truncation, seeding, hub path."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import pytest
import torch
from helpers import CONLL_LABELS

from lightning_memopt.tasks import data as data_module
from lightning_memopt.tasks.data import SequenceClassificationDataModule, TokenClassificationDataModule
from lightning_memopt.tasks.readers import DataFormatError, load_conll


def make_ner(conll_small: dict[str, Path], tokenizer: Path, **kwargs) -> TokenClassificationDataModule:
    options = {"tokenizer": str(tokenizer), "labels": CONLL_LABELS, "batch_size": 8, **kwargs}
    dm = TokenClassificationDataModule(
        train_file=str(conll_small["train"]), val_file=str(conll_small["val"]), **options
    )
    dm.setup("fit")
    return dm


def test_first_subtoken_labelled_rest_ignored(conll_small: dict[str, Path], tiny_bert_dir: Path) -> None:
    dm = make_ner(conll_small, tiny_bert_dir)
    sentences, _ = load_conll(conll_small["train"])
    split_words = 0
    for sentence, example in zip(sentences, dm.datasets["train"].examples, strict=True):
        labelled = [label for label in example["labels"] if label != -100]
        assert [CONLL_LABELS[i] for i in labelled] == list(sentence.tags)
        split_words += len(example["input_ids"]) - 2 - len(sentence.tokens)
    assert split_words > 0, "the slice should contain words split into several sub-tokens"
    assert "word_starts" not in dm.datasets["train"].examples[0]


def test_label_all_subtokens(conll_small: dict[str, Path], tiny_bert_dir: Path) -> None:
    dm = make_ner(conll_small, tiny_bert_dir, label_all_subtokens=True)
    sentences, _ = load_conll(conll_small["train"])
    for sentence, example in zip(sentences, dm.datasets["train"].examples, strict=True):
        starts = example["word_starts"]
        assert sum(starts) == len(sentence.tokens)
        first_labels = [CONLL_LABELS[label] for label, start in zip(example["labels"], starts, strict=True) if start]
        assert first_labels == list(sentence.tags)
        inner = [
            CONLL_LABELS[label]
            for label, start in zip(example["labels"], starts, strict=True)
            if not start and label != -100
        ]
        assert not any(tag.startswith("B-") for tag in inner)
        assert example["labels"][0] == -100 and example["labels"][-1] == -100  # [CLS], [SEP]


def test_dynamic_padding_and_seeded_shuffle(conll_small: dict[str, Path], tiny_bert_dir: Path) -> None:
    dm = make_ner(conll_small, tiny_bert_dir)
    batch = next(iter(dm.train_dataloader()))
    lengths = batch["attention_mask"].sum(1)
    assert batch["input_ids"].shape[1] == int(lengths.max())
    assert (batch["labels"][batch["attention_mask"] == 0] == -100).all()
    again = next(iter(make_ner(conll_small, tiny_bert_dir).train_dataloader()))
    assert torch.equal(batch["input_ids"], again["input_ids"])
    other_seed = next(iter(make_ner(conll_small, tiny_bert_dir, seed=7).train_dataloader()))
    assert not torch.equal(batch["input_ids"][:, :5], other_seed["input_ids"][:, :5])


def test_eval_batches_sorted_by_length(conll_small: dict[str, Path], tiny_bert_dir: Path) -> None:
    dm = make_ner(conll_small, tiny_bert_dir)
    lengths = [int(n) for batch in dm.val_dataloader() for n in batch["attention_mask"].sum(1)]
    assert lengths == sorted(lengths, reverse=True)
    assert len(lengths) == 65


def test_truncation_is_counted_and_logged(
    conll_small: dict[str, Path], tiny_bert_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.INFO, logger="lightning_memopt"):
        dm = make_ner(conll_small, tiny_bert_dir, max_length=12, eval_max_length=512)
    expected = sum(
        len(e["input_ids"]) > 12
        for e in make_ner(conll_small, tiny_bert_dir, max_length=512).datasets["train"].examples
    )
    assert dm.truncated == {"train": expected, "validation": 0}
    assert expected > 0
    assert all(len(e["input_ids"]) <= 12 for e in dm.datasets["train"].examples)
    assert f"{expected} of 160 train examples were longer than 12 tokens" in caplog.text


def test_tag_outside_label_set(conll_small: dict[str, Path], tiny_bert_dir: Path) -> None:
    with pytest.raises(DataFormatError, match=r"not in the label list.*--model.labels"):
        make_ner(conll_small, tiny_bert_dir, labels=["O", "B-PER", "I-PER"])


def test_labels_inferred_when_not_given(conll_small: dict[str, Path], tiny_bert_dir: Path) -> None:
    dm = make_ner(conll_small, tiny_bert_dir, labels=None)
    assert dm.labels[0] == "O"
    assert set(dm.labels) <= set(CONLL_LABELS)


def test_folder_without_tokenizer(conll_small: dict[str, Path], tiny_bert_dir: Path, tmp_path: Path) -> None:
    shutil.copy(tiny_bert_dir / "config.json", tmp_path / "config.json")
    with pytest.raises(ValueError, match=r"--data.tokenizer"):
        make_ner(conll_small, tmp_path)


def test_hub_dataset_path(monkeypatch: pytest.MonkeyPatch, tiny_bert_dir: Path) -> None:
    datasets = pytest.importorskip("datasets")
    features = datasets.Features(
        {
            "tokens": datasets.Sequence(datasets.Value("string")),
            "ner_tags": datasets.Sequence(datasets.ClassLabel(names=CONLL_LABELS)),
        }
    )
    rows = {
        "tokens": [["Peter", "Blackburn", "visits", "Bonn"], ["EU", "rejects"]],
        "ner_tags": [[1, 2, 0, 5], [4, 0]],
    }
    calls = []

    def fake_load(name: str, config: str | None, split: str, revision: str | None) -> object:
        calls.append((name, config, split))
        return datasets.Dataset.from_dict(rows, features=features)

    monkeypatch.setattr(data_module, "load_hub_split", fake_load)
    dm = TokenClassificationDataModule(
        dataset_name="eriktks/conll2003", tokenizer=str(tiny_bert_dir), labels=CONLL_LABELS
    )
    dm.setup("fit")
    assert calls == [("eriktks/conll2003", None, "train"), ("eriktks/conll2003", None, "validation")]
    labelled = [CONLL_LABELS[i] for i in dm.datasets["train"].examples[1]["labels"] if i != -100]
    assert labelled == ["B-ORG", "O"]  # IOB1-style I-ORG at the start is normalised to B-ORG

    # Integer tags without ClassLabel names (e.g. lhoestq/conll2003) are named by the label list.
    plain = datasets.Dataset.from_dict(rows)
    monkeypatch.setattr(data_module, "load_hub_split", lambda name, config, split, revision: plain)
    dm = TokenClassificationDataModule(
        dataset_name="lhoestq/conll2003", tokenizer=str(tiny_bert_dir), labels=CONLL_LABELS
    )
    dm.setup("fit")
    labelled = [CONLL_LABELS[i] for i in dm.datasets["train"].examples[0]["labels"] if i != -100]
    assert labelled == ["B-PER", "I-PER", "O", "B-LOC"]
    with pytest.raises(ValueError, match="integers without names"):
        TokenClassificationDataModule(dataset_name="lhoestq/conll2003", tokenizer=str(tiny_bert_dir)).setup("fit")


def test_sequence_classification(sst2_small: dict[str, Path], tiny_bert_dir: Path) -> None:
    dm = SequenceClassificationDataModule(
        train_file=str(sst2_small["train"]),
        val_file=str(sst2_small["val"]),
        tokenizer=str(tiny_bert_dir),
        labels=["0", "1"],
        batch_size=16,
    )
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    assert batch["labels"].shape == (16,)
    assert set(batch["labels"].tolist()) <= {0, 1}
    assert batch["input_ids"].shape[1] == int(batch["attention_mask"].sum(1).max())
    with pytest.raises(DataFormatError, match=r"--model\.labels"):
        SequenceClassificationDataModule(
            train_file=str(sst2_small["train"]), tokenizer=str(tiny_bert_dir), labels=["0"]
        ).setup("fit")


def test_sentence_pairs_from_hub(monkeypatch: pytest.MonkeyPatch, tiny_bert_dir: Path) -> None:
    datasets = pytest.importorskip("datasets")
    table = datasets.Dataset.from_dict(
        {
            "premise": ["a man sleeps", "a dog runs"],
            "hypothesis": ["a person rests", "a cat sits"],
            "label": [0, 2],
        }
    )
    monkeypatch.setattr(data_module, "load_hub_split", lambda name, config, split, revision: table)
    dm = SequenceClassificationDataModule(
        dataset_name="nyu-mll/glue",
        dataset_config="mnli",
        val_split="validation_matched",
        tokenizer=str(tiny_bert_dir),
        labels=["0", "1", "2"],
        text_column="premise",
        text_pair_column="hypothesis",
    )
    dm.setup("fit")
    example = dm.datasets["train"].examples[1]
    assert example["labels"] == 2
    assert 1 in example["token_type_ids"]  # the second segment is marked
