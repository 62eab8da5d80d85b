"""Session fixtures: the real data folder, small slices of it, and a tiny random BERT with a real tokenizer.

Builders and constants live in ``tests/helpers``; this file holds only fixtures.
"""

from __future__ import annotations

import gzip
from collections.abc import Iterator
from pathlib import Path

import pytest
from helpers import SHARED_DATA, head_of_conll, save_tiny_bert


@pytest.fixture(scope="session", autouse=True)
def one_torch_thread() -> Iterator[None]:
    """Run torch on one thread in the tests' own process, as child processes do (``subprocess_env``).

    Tiny models gain nothing from a second thread, and on a 2-core machine where another process holds a core
    the waiting OpenMP worker of a 2-thread pool spins against it: a 16-step tiny-BERT fit measured 18 s on two
    threads and 1.3 s on one.
    """
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not (SHARED_DATA / "conll2003" / "valid.txt.gz").is_file():
        pytest.skip(f"the shared data folder {SHARED_DATA} is missing")
    return SHARED_DATA


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
    return save_tiny_bert(tmp_path_factory.mktemp("tiny-bert"))
