"""Vocabulary trimming: the trimmed model gives the same outputs on every training text, saves and reloads as a
plain folder, keeps the keep-list, and refuses tokenizers it cannot trim safely."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from helpers import save_tiny_bert, tiny_bert_config
from tokenizers import Tokenizer, models
from transformers import AutoTokenizer, BertForMaskedLM, BertForTokenClassification, PreTrainedTokenizerFast

from lightning_memopt.deploy.load import load_pretrained
from lightning_memopt.deploy.vocabulary import trim_vocabulary
from lightning_memopt.tasks.readers import load_conll


@pytest.fixture
def tagger(tmp_path: Path) -> Path:
    return save_tiny_bert(tmp_path / "tagger", BertForTokenClassification, num_labels=3)


def test_a_trimmed_model_gives_the_same_logits_on_training_text_and_reloads(
    tagger: Path, conll_small: dict[str, Path], tmp_path: Path
) -> None:
    sentences, _ = load_conll(conll_small["train"])
    texts = [" ".join(sentence.tokens) for sentence in sentences]
    model = load_pretrained(tagger)
    tokenizer = AutoTokenizer.from_pretrained(tagger)
    probe = texts[:8]
    with torch.no_grad():
        before = model(**tokenizer(probe, padding=True, return_tensors="pt")).logits

    trimmed, report = trim_vocabulary(model, tokenizer, texts, keep_words=["zebra"])
    assert report.before == 30522 and report.texts == len(texts) and report.kept < 0.1 * report.before
    assert model.get_input_embeddings().num_embeddings == report.kept == len(trimmed) == model.config.vocab_size
    assert "zebra" in trimmed.get_vocab() and "zebra" not in " ".join(texts).lower().split()
    with torch.no_grad():
        after = model(**trimmed(probe, padding=True, return_tensors="pt")).logits
    assert torch.equal(before, after)
    assert trimmed.unk_token_id in trimmed("xylophonist quibbles")["input_ids"]  # unseen pieces become [UNK]

    model.save_pretrained(tmp_path / "out")
    trimmed.save_pretrained(tmp_path / "out")
    reloaded, tokenizer_again = load_pretrained(tmp_path / "out"), AutoTokenizer.from_pretrained(tmp_path / "out")
    with torch.no_grad():
        again = reloaded(**tokenizer_again(probe, padding=True, return_tensors="pt")).logits
    assert torch.equal(before, again)


def test_a_tokenizer_that_is_not_wordpiece_or_a_model_tied_to_its_vocabulary_is_refused(tagger: Path) -> None:
    bpe = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.BPE()))
    with pytest.raises(ValueError, match=r"needs a WordPiece .* uses BPE\. Remove `trim_vocabulary`"):
        trim_vocabulary(load_pretrained(tagger), bpe, ["a text"])

    masked = BertForMaskedLM(tiny_bert_config())
    with pytest.raises(ValueError, match="ties its output layer to the vocabulary"):
        trim_vocabulary(masked, AutoTokenizer.from_pretrained(tagger), ["a text"])
    with pytest.raises(ValueError, match="needs the training texts"):
        trim_vocabulary(load_pretrained(tagger), AutoTokenizer.from_pretrained(tagger), [])


def test_keeping_the_first_pieces_keeps_unseen_frequent_words_whole(tagger: Path) -> None:
    from lightning_memopt.compress.plan import PlanError, parse_plan

    texts = ["EU rejects German call to boycott British lamb ."]
    tokenizer = AutoTokenizer.from_pretrained(tagger)
    model = load_pretrained(tagger)
    with torch.no_grad():
        before = model(**tokenizer(texts, return_tensors="pt")).logits
    trimmed, report = trim_vocabulary(model, tokenizer, texts, keep_first=3000)
    assert report.kept >= 3000 and report.kept < 3000 + 20
    assert [trimmed.convert_ids_to_tokens(i) for i in range(3000)] == tokenizer.convert_ids_to_tokens(list(range(3000)))
    with torch.no_grad():
        assert torch.equal(model(**trimmed(texts, return_tensors="pt")).logits, before)
    assert trimmed.unk_token_id not in trimmed("the of and")["input_ids"]  # frequent words never seen in training

    stages = [{"name": "student", "student_layers": [0]}]
    plan = parse_plan({"stages": stages, "final": {"trim_vocabulary": True, "keep_first_pieces": 20000}})
    assert plan.final.keep_first_pieces == 20000
    for final, message in (({"trim_vocabulary": True, "keep_first_pieces": -1}, "a number of word pieces"),
                           ({"keep_first_pieces": 100}, "only matters with `trim_vocabulary: true`")):  # fmt: skip
        with pytest.raises(PlanError, match=message):
            parse_plan({"stages": stages, "final": final})
