"""The README's "your own data" path: a new CoNLL or TSV dataset with only the data options, end to end."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from helpers import RECIPES

from lightning_memopt.cli import main


def own_conll(folder: Path) -> dict[str, str]:
    """A tiny WNUT-like CoNLL corpus with tags the CoNLL-2003 recipe does not know."""
    sentences = [
        [("@paul", "B-person"), ("loves", "O"), ("Seattle", "B-location")],
        [("new", "B-product"), ("iPhone", "I-product"), ("out", "O")],
        [("the", "O"), ("Space", "B-location"), ("Needle", "I-location")],
        [("ask", "O"), ("Anna", "B-person"), ("Smith", "I-person")],
    ] * 4
    text = "\n\n".join("\n".join(f"{word}\t{tag}" for word, tag in sentence) for sentence in sentences) + "\n"
    folder.mkdir(parents=True)
    for split in ("train", "dev", "test"):
        (folder / f"{split}.conll").write_text(text, encoding="utf-8")
    return {split: str(folder / f"{split}.conll") for split in ("train", "dev", "test")}


def own_tsv(folder: Path) -> dict[str, str]:
    """A tiny TREC-like question-type table with three string labels."""
    rows = [
        ("what is the capital of peru", "LOC"),
        ("who wrote hamlet", "HUM"),
        ("how many legs has a spider", "NUM"),
    ] * 6
    text = "sentence\tlabel\n" + "".join(f"{sentence}\t{label}\n" for sentence, label in rows)
    folder.mkdir(parents=True)
    for split in ("train", "dev", "test"):
        (folder / f"{split}.tsv").write_text(text, encoding="utf-8")
    return {split: str(folder / f"{split}.tsv") for split in ("train", "dev", "test")}


@pytest.mark.parametrize("task", ["ner", "classification"])
def test_a_new_dataset_with_only_the_data_options(
    task: str, tiny_bert_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    os.chdir(tmp_path)
    base = "ner/conll2003.yaml" if task == "ner" else "classification/sst2.yaml"
    files = own_conll(tmp_path / "wnut") if task == "ner" else own_tsv(tmp_path / "trec")
    recipe = ["--config", str(RECIPES / base), "--config", str(RECIPES / task / "own-data.yaml")]
    data = [
        f"--data.train_file={files['train']}",
        f"--data.val_file={files['dev']}",
        f"--data.test_file={files['test']}",
    ]
    fast = [
        f"--model.model_name_or_path={tiny_bert_dir}",
        "--trainer.max_steps=2",
        "--trainer.max_epochs=20",  # one batch an epoch: the recipe's 3 epochs would end the resumed run at once
        "--trainer.enable_progress_bar=false",
    ]
    main(["fit", *recipe, *data, *fast, "--ckpt_path=auto"])  # auto: nothing to resume yet, so a fresh run
    captured = capsys.readouterr()
    fitted = captured.out
    assert "train split: 16 examples" in captured.err or "train split: 18 examples" in captured.err  # INFO log lines
    expected = (
        ["O", "B-location", "I-location", "B-person", "I-person", "B-product", "I-product"]
        if task == "ner"
        else ["HUM", "LOC", "NUM"]
    )
    assert f"Labels inferred from the data ({len(expected)}): {expected}" in fitted
    run = tmp_path / "runs" / ("wnut" if task == "ner" else "trec")  # the run folder follows the data
    last = run / "checkpoints" / "last.ckpt"
    assert last.is_file()
    main(["fit", *recipe, *data, *fast, "--trainer.max_steps=3", "--ckpt_path=auto", "--quiet"])  # auto resumes
    resumed = capsys.readouterr()
    assert "Final validation metrics (step 3):" in resumed.out and "split:" not in resumed.err  # --quiet

    main(["test", *recipe, *data, *fast, f"--ckpt_path={last}"])
    tested = capsys.readouterr().out
    assert "Test metrics (step 3):" in tested and ("test_f1" in tested or "test_accuracy" in tested)

    main(["export", f"--ckpt_path={last}", f"--output_dir={tmp_path / 'exported'}"])
    config = json.loads((tmp_path / "exported" / "config.json").read_text())
    assert list(config["id2label"].values()) == expected
