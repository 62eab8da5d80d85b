"""Lightning data modules for token classification (NER) and sequence classification.

Both read local files (see :mod:`lightning_memopt.tasks.readers`) or a Hugging Face ``datasets`` name,
tokenise once in ``setup``, pad each batch only to its longest example, sort evaluation batches by
length, and log how many examples were truncated. The tokenizer and the label list follow the model
by default: a module attached to the same Trainer that exposes ``model_name_or_path`` and ``labels``
(as our task modules do) supplies them, so a recipe names each only once.

Example:
    >>> dm = TokenClassificationDataModule(  # doctest: +SKIP
    ...     train_file="conll2003/train.txt.gz", val_file="conll2003/valid.txt.gz",
    ...     tokenizer="bert-base-cased", labels=["O", "B-PER", "I-PER"])
"""

from __future__ import annotations

import logging
import sys
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch import LightningDataModule
from lightning.pytorch.overrides.distributed import UnrepeatedDistributedSampler
from torch.utils.data import DataLoader, Dataset

from lightning_memopt.core.sources import resolve_pretrained
from lightning_memopt.tasks.readers import (
    DataFormatError,
    LabelledText,
    PromptCompletion,
    TaggedSentence,
    iob_to_iob2,
    load_conll,
    read_prompts,
    read_table,
)
from lightning_memopt.tasks.resumable import ResumableShuffleSampler, batches_done_this_epoch

log = logging.getLogger("lightning_memopt")

IGNORE_INDEX = -100
Example = dict[str, list[int]]
TOKENIZER_FIELDS = ("input_ids", "attention_mask", "token_type_ids")
TOKENIZER_FILES = (
    "tokenizer.json",
    "vocab.txt",
    "vocab.json",
    "spiece.model",
    "sentencepiece.bpe.model",
    "tokenizer.model",
)


def load_hub_split(name: str, config: str | None, split: str, revision: str | None = None) -> Any:
    """Load one split of a Hugging Face hub dataset (needs ``pip install datasets`` and network access)."""
    try:
        import datasets
    except ImportError:
        raise ImportError(
            "Reading --data.dataset_name needs the `datasets` package: pip install 'lightning-memopt[hub]'."
        ) from None
    return datasets.load_dataset(name, config, split=split, revision=revision)


def pack_examples(
    input_ids_list: Sequence[Sequence[int]], labels_list: Sequence[Sequence[int]], length: int
) -> tuple[list[list[int]], list[list[int]]]:
    """Concatenate tokenised examples in order and cut them into rows of exactly ``length`` tokens.

    Each label stays with its token, so a masked prompt stays -100. The last, partial row is dropped, so no
    row needs padding; fewer than ``length`` tokens in all make no row. Example boundaries are not marked: a
    row may end one example and start the next, and attention crosses between them (the plain packing of
    Hugging Face's ``run_clm`` ``group_texts`` and TRL's ``ConstantLengthDataset``).

    >>> pack_examples([[1, 2, 3], [4, 5], [6, 7, 8]], [[-100, 2, 3], [-100, 5], [6, 7, 8]], length=3)
    ([[1, 2, 3], [4, 5, 6]], [[-100, 2, 3], [-100, 5, 6]])
    """
    if length < 1:
        raise ValueError(f"Packed rows need at least one token, got length={length}.")
    ids: list[int] = []
    labels: list[int] = []
    for example_ids, example_labels in zip(input_ids_list, labels_list, strict=True):
        if len(example_ids) != len(example_labels):
            raise ValueError(f"An example has {len(example_ids)} tokens but {len(example_labels)} labels.")
        ids += example_ids
        labels += example_labels
    starts = range(0, len(ids) - length + 1, length)
    return [ids[start : start + length] for start in starts], [labels[start : start + length] for start in starts]


def model_fields(encodings: Any, index: int) -> Example:
    """The model-input fields of example ``index`` of a batched tokenizer output."""
    return {key: list(encodings[key][index]) for key in TOKENIZER_FIELDS if key in encodings}


class EncodedDataset(Dataset):
    """A list of already tokenised examples (dicts of int lists)."""

    def __init__(self, examples: list[Example]) -> None:
        self.examples = examples

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, index: int) -> Example:
        return self.examples[index]


@dataclass(frozen=True)
class PaddingCollator:
    """Pad a list of examples to the longest one in the batch (dynamic padding).

    Example:
        >>> collate = PaddingCollator(pad_token_id=0)
        >>> batch = collate([{"input_ids": [5, 6, 7], "labels": [1, 2, 3]}, {"input_ids": [5], "labels": [1]}])
        >>> batch["input_ids"].tolist(), batch["labels"].tolist()
        ([[5, 6, 7], [5, 0, 0]], [[1, 2, 3], [1, -100, -100]])
    """

    pad_token_id: int
    pad_to_multiple_of: int | None = None

    def pad_value(self, key: str) -> int:
        return {"input_ids": self.pad_token_id, "labels": IGNORE_INDEX}.get(key, 0)

    def __call__(self, examples: Sequence[Example]) -> dict[str, torch.Tensor]:
        longest = max(len(example["input_ids"]) for example in examples)
        if self.pad_to_multiple_of:
            longest = -(-longest // self.pad_to_multiple_of) * self.pad_to_multiple_of
        batch: dict[str, torch.Tensor] = {}
        for key, first in examples[0].items():
            if isinstance(first, int):
                batch[key] = torch.tensor([example[key] for example in examples])
                continue
            pad = self.pad_value(key)
            rows = [list(example[key]) + [pad] * (longest - len(example[key])) for example in examples]
            batch[key] = torch.tensor(rows, dtype=torch.bool if key == "word_starts" else torch.long)
        return batch


AUTO_LABELS = "auto"


def label_order(observed: Sequence[str]) -> list[str]:
    """A stable order for labels found in data: ``O`` first, then by entity type (``B-`` before ``I-``); numbers
    numerically.

    >>> label_order(["I-PER", "B-LOC", "O", "B-PER"]), label_order(["10", "2", "1"]), label_order(["NUM", "HUM"])
    (['O', 'B-LOC', 'B-PER', 'I-PER'], ['1', '2', '10'], ['HUM', 'NUM'])
    """
    unique = set(observed)
    if unique and all(label.lstrip("-").isdigit() for label in unique):
        return sorted(unique, key=int)
    if all(tag == "O" or tag[1:2] == "-" for tag in unique):  # IOB tags
        return sorted(unique, key=lambda tag: (tag != "O", tag[2:], tag))
    return sorted(unique)


class TransformerDataModule(LightningDataModule):
    """Shared plumbing: tokenizer and label resolution, loaders, seeding, truncation report.

    Args:
        train_file: training data (CoNLL for token tasks; .tsv/.csv/.jsonl for sentence tasks; optionally .gz).
        val_file: validation data, scored during fit and by memopt validate.
        dataset_name: a Hugging Face hub dataset instead of files.
        dataset_config: the hub dataset's configuration name.
        dataset_revision: the hub dataset's revision.
        train_split: the hub split to train on.
        val_split: the hub split to validate on.
        tokenizer: the tokenizer (hub name or folder); the model's own if not given.
        labels: the label list; the model's if not given (they must agree).
        max_length: training examples are truncated to this many tokens.
        eval_max_length: validation and test examples are truncated to this many tokens (max_length if not given).
        batch_size: training examples per batch (per device).
        eval_batch_size: evaluation examples per batch (batch_size if not given).
        num_workers: DataLoader worker processes.
        pad_to_multiple_of: pad each batch to a multiple of this length (tensor-core friendly lengths).
        seed: seeds the training order (resumable: an interrupted epoch continues where it stopped).
        max_train_examples: use only the first N training examples.
        max_val_examples: use only the first N validation (and test) examples.
        test_file: held-out test data, scored by memopt test.
        test_split: the hub split memopt test scores.
        encoding: the text encoding of the data files (utf-8, latin-1, ...).
    """

    def __init__(
        self,
        train_file: str | None = None,
        val_file: str | None = None,
        dataset_name: str | None = None,
        dataset_config: str | None = None,
        dataset_revision: str | None = None,
        train_split: str = "train",
        val_split: str = "validation",
        tokenizer: str | None = None,
        labels: list[str] | None = None,
        max_length: int = 128,
        eval_max_length: int | None = None,
        batch_size: int = 32,
        eval_batch_size: int | None = None,
        num_workers: int = 0,
        pad_to_multiple_of: int | None = None,
        seed: int = 42,
        max_train_examples: int | None = None,
        max_val_examples: int | None = None,
        test_file: str | None = None,
        test_split: str = "test",
        encoding: str = "utf-8",
    ) -> None:
        super().__init__()
        if dataset_name is None and train_file is None and val_file is None and test_file is None:
            raise ValueError(
                "Give data files (--data.train_file/--data.val_file/--data.test_file) or a hub --data.dataset_name."
            )
        for option, value in {"max_length": max_length, "batch_size": batch_size}.items():
            if value < 1:
                raise ValueError(f"--data.{option} must be at least 1, got {value}.")
        self.train_file, self.val_file = train_file, val_file
        self.dataset_name, self.dataset_config, self.dataset_revision = dataset_name, dataset_config, dataset_revision
        self.train_split, self.val_split = train_split, val_split
        self.test_file, self.test_split = test_file, test_split
        self.encoding = encoding
        self.tokenizer_name = tokenizer
        self.labels = labels
        self.max_length = max_length
        self.eval_max_length = eval_max_length or max_length
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size or batch_size
        self.num_workers = num_workers
        self.pad_to_multiple_of = pad_to_multiple_of
        self.seed = seed
        self.max_train_examples, self.max_val_examples = max_train_examples, max_val_examples
        self.tokenizer: Any = None
        self.datasets: dict[str, EncodedDataset] = {}
        self.truncated: dict[str, int] = {}
        self._raw_cache: dict[str, list[Any]] = {}  # a split already read to infer the labels

    # -- what follows the model -------------------------------------------------------------
    def _attached_module(self) -> Any:
        trainer = self.trainer
        return trainer.lightning_module if trainer is not None else None

    def resolve_tokenizer_name(self) -> str:
        if self.tokenizer_name is not None:
            return self.tokenizer_name
        name = getattr(self._attached_module(), "model_name_or_path", None)
        if name is None:
            raise ValueError("No tokenizer: set --data.tokenizer (a hub name or a local folder).")
        return name

    def resolve_labels(self, observed: Sequence[str]) -> list[str]:
        module_labels = getattr(self._attached_module(), "labels", None)
        if self.labels is not None and module_labels is not None and list(self.labels) != list(module_labels):
            raise ValueError(
                f"--data.labels {list(self.labels)} disagree with the model's labels {list(module_labels)}; "
                "drop --data.labels (the data module follows the model) or make them equal."
            )
        labels = self.labels or module_labels
        if labels is None or labels == AUTO_LABELS:
            labels = label_order(observed)
        return list(labels)

    def infer_labels(self) -> list[str]:
        """The label list of the training data (or of the first split given), in :func:`label_order`."""
        split = "train" if self.train_file or self.dataset_name else "validation" if self.val_file else "test"
        raw = self.read_split(split)
        self._raw_cache[split] = raw
        return label_order(self.observed_labels(raw))

    def load_tokenizer(self) -> Any:
        from transformers import AutoTokenizer

        name = self.resolve_tokenizer_name()
        source = resolve_pretrained(name)
        hint = (
            "Point --data.tokenizer (or the model) at a folder with tokenizer files "
            f"({', '.join(TOKENIZER_FILES)}) or at a hub name."
        )
        if Path(source).is_dir() and not any((Path(source) / file).exists() for file in TOKENIZER_FILES):
            raise ValueError(f"The folder {name!r} has no tokenizer files. {hint}")
        options = self.tokenizer_options()
        try:
            tokenizer = AutoTokenizer.from_pretrained(source, **options)
        except (OSError, ValueError, TypeError) as error:
            raise ValueError(f"Could not load a tokenizer from {name!r}: {error}. {hint}") from error
        if len(tokenizer) < 100:
            raise ValueError(f"The tokenizer loaded from {name!r} has only {len(tokenizer)} tokens. {hint}")
        if not getattr(tokenizer, "is_fast", False):
            raise ValueError(f"The tokenizer of {name!r} is not a fast tokenizer; word alignment needs one.")
        return tokenizer

    def tokenizer_options(self) -> dict[str, Any]:
        """Keyword arguments for ``AutoTokenizer.from_pretrained``: the model's revision when following it."""
        module = self._attached_module()
        if self.tokenizer_name is None and getattr(module, "hparams", {}).get("revision"):
            return {"revision": module.hparams["revision"]}
        return {}

    # -- raw data ---------------------------------------------------------------------------
    def read_split(self, split: str) -> list[Any]:
        """Raw examples of ``"train"``, ``"validation"`` or ``"test"``, from a file or from the hub."""
        file = {"train": self.train_file, "validation": self.val_file, "test": self.test_file}[split]
        limit = self.max_train_examples if split == "train" else self.max_val_examples
        option = {"train": "train", "validation": "val", "test": "test"}[split]
        if file is not None:
            examples = self.read_file(file)
        elif self.dataset_name is not None:
            hub_split = {"train": self.train_split, "validation": self.val_split, "test": self.test_split}[split]
            examples = self.from_hub(
                load_hub_split(self.dataset_name, self.dataset_config, hub_split, self.dataset_revision)
            )
        else:
            raise ValueError(f"No {split} data: set --data.{option}_file.")
        return examples[:limit] if limit else examples

    def split_texts(self, split: str = "train") -> list[str]:
        """The plain texts of a split: sentences as their words joined by spaces, text pairs as two texts."""
        texts: list[str] = []
        for example in self.read_split(split):
            if isinstance(example, TaggedSentence):
                texts.append(" ".join(example.tokens))
            else:
                texts += [example.text] + ([example.text_pair] if example.text_pair else [])
        return texts

    def read_file(self, path: str) -> list[Any]:
        raise NotImplementedError

    def from_hub(self, dataset: Any) -> list[Any]:
        raise NotImplementedError

    def encode(self, examples: list[Any], label_ids: dict[str, int], max_length: int) -> tuple[list[Example], int]:
        raise NotImplementedError

    def encode_split(self, split: str, examples: list[Any], label_ids: dict[str, int]) -> tuple[list[Example], int]:
        """The examples of ``split`` tokenised, and how many were truncated (to ``max_length`` for training, to
        ``eval_max_length`` otherwise)."""
        return self.encode(examples, label_ids, self.max_length if split == "train" else self.eval_max_length)

    def observed_labels(self, examples: list[Any]) -> list[str]:
        raise NotImplementedError

    # -- Lightning hooks --------------------------------------------------------------------
    def position_limit(self) -> int | None:
        """The most tokens the model takes: its position embeddings, or the tokenizer's own limit if lower."""
        config = getattr(getattr(self._attached_module(), "model", None), "config", None)
        limits = [getattr(config, "max_position_embeddings", None), getattr(self.tokenizer, "model_max_length", None)]
        known = [int(limit) for limit in limits if isinstance(limit, int) and 0 < limit < 1_000_000]
        return min(known) if known else None

    def check_lengths(self) -> None:
        """``max_length`` or ``eval_max_length`` beyond the model's positions is an error now, not at its batch."""
        limit = self.position_limit()
        for option, value in (("max_length", self.max_length), ("eval_max_length", self.eval_max_length)):
            if limit is not None and value > limit:
                raise ValueError(
                    f"--data.{option}={value} is more tokens than the model takes ({limit} positions); set it to at "
                    f"most {limit}. Longer texts are truncated to it."
                )

    def setup(self, stage: str) -> None:
        self.tokenizer = self.load_tokenizer()
        self.check_lengths()
        splits = {"validate": ["validation"], "predict": ["validation"], "test": ["test"]}.get(
            stage, ["train", "validation"]
        )
        if stage == "fit" and self.val_file is None and self.dataset_name is None:
            splits = ["train"]
        if stage == "test" and self.test_file is None and self.dataset_name is None:
            raise ValueError(
                "memopt test scores held-out test data: set --data.test_file (validation data is scored by memopt "
                "validate)."
            )
        raw = {
            split: self._raw_cache.pop(split, None) or self.read_split(split)
            for split in splits
            if split not in self.datasets
        }
        observed = sorted({label for examples in raw.values() for label in self.observed_labels(examples)})
        self.labels = self.resolve_labels(observed)
        label_ids = {label: index for index, label in enumerate(self.labels)}
        for split, examples in raw.items():
            max_length = self.max_length if split == "train" else self.eval_max_length
            encoded, truncated = self.encode_split(split, examples, label_ids)
            self.datasets[split] = EncodedDataset(encoded)
            self.truncated[split] = truncated
            log.info("%s split: %d examples, %d truncated to %d tokens", split, len(encoded), truncated, max_length)
            if truncated:
                log.warning(
                    "%d of %d %s examples were longer than %d tokens and were truncated (raise --data.%s).",
                    truncated,
                    len(encoded),
                    split,
                    max_length,
                    "max_length" if split == "train" else "eval_max_length",
                )

    def collator(self) -> Callable[[Sequence[Example]], dict[str, torch.Tensor]]:
        return PaddingCollator(self.tokenizer.pad_token_id or 0, self.pad_to_multiple_of)

    def train_dataloader(self) -> DataLoader:
        """Seeded shuffled batches; after ``--ckpt_path`` resume, the interrupted epoch continues where it stopped."""
        trainer = self.trainer
        world, rank = (trainer.world_size, trainer.global_rank) if trainer is not None else (1, 0)
        sampler = ResumableShuffleSampler(self.datasets["train"], num_replicas=world, rank=rank, seed=self.seed)
        if trainer is not None:
            sampler.resume_when_iterated(
                lambda: (trainer.current_epoch, batches_done_this_epoch(trainer) * self.batch_size)
            )
            warnings.filterwarnings("ignore", message="You're resuming from a checkpoint that ended before the epoch")
        return DataLoader(
            self.datasets["train"],
            batch_size=self.batch_size,
            sampler=sampler,
            # A private generator: creating the iterator draws no numbers from the global RNG (dropout's).
            generator=torch.Generator().manual_seed(self.seed),
            collate_fn=self.collator(),
            num_workers=self.num_workers,
        )

    def _eval_loader(self, split: str) -> DataLoader:
        dataset = self.datasets[split]
        by_length = sorted(range(len(dataset)), key=lambda i: -len(dataset[i]["input_ids"]))
        ordered = EncodedDataset([dataset[i] for i in by_length])
        trainer = self.trainer
        sampler = None
        if trainer is not None and trainer.world_size > 1:
            # Every example is seen exactly once across ranks, so corpus metrics are exact under DDP.
            sampler = UnrepeatedDistributedSampler(
                ordered, num_replicas=trainer.world_size, rank=trainer.global_rank, shuffle=False
            )
        return DataLoader(
            ordered,
            batch_size=self.eval_batch_size,
            sampler=sampler,
            collate_fn=self.collator(),
            num_workers=self.num_workers,
        )

    def val_dataloader(self) -> DataLoader | list:
        """Length-sorted validation batches, or none when no validation data was given."""
        return self._eval_loader("validation") if "validation" in self.datasets else []

    def test_dataloader(self) -> DataLoader:
        """Length-sorted batches of the test data (``--data.test_file``, or the hub's ``--data.test_split``)."""
        return self._eval_loader("test")


class TokenClassificationDataModule(TransformerDataModule):
    """CoNLL-style token classification data (NER, POS, chunking).

    Tags are normalised to IOB2. The first sub-token of each word carries the word's label and the
    other sub-tokens are ignored by the loss; with ``label_all_subtokens=True`` they carry the label
    too (``B-X`` becomes ``I-X`` after the first piece) and metrics still read first sub-tokens only.

    Args:
        token_column: the column of the words in CoNLL files (negative counts from the end).
        tag_column: the column of the tags in CoNLL files (-1: the last).
        token_field: the column of the words in hub datasets.
        tag_field: the column of the tags in hub datasets.
        label_all_subtokens: label every sub-token of a word, not only the first (metrics read first ones).
    """

    def __init__(
        self,
        *args: Any,
        token_column: int = 0,
        tag_column: int = -1,
        token_field: str = "tokens",
        tag_field: str = "ner_tags",
        label_all_subtokens: bool = False,
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)
        self.token_column, self.tag_column = token_column, tag_column
        self.token_field, self.tag_field = token_field, tag_field
        self.label_all_subtokens = label_all_subtokens
        self.save_hyperparameters(ignore=["labels"])  # the model's hyper-parameters own the labels

    def load_tokenizer(self) -> Any:
        tokenizer = super().load_tokenizer()
        if getattr(tokenizer, "add_prefix_space", None) is False:
            # Byte-level BPE (RoBERTa, GPT-2) must see pre-split words as if preceded by a space.
            from transformers import AutoTokenizer

            tokenizer = AutoTokenizer.from_pretrained(
                tokenizer.name_or_path, add_prefix_space=True, **self.tokenizer_options()
            )
        return tokenizer

    def read_file(self, path: str) -> list[TaggedSentence]:
        sentences, scheme = load_conll(path, self.token_column, self.tag_column, self.encoding)
        log.info("%s: %d sentences, tagging scheme %s (normalised to IOB2)", path, len(sentences), scheme)
        return sentences

    def from_hub(self, dataset: Any) -> list[TaggedSentence]:
        """Sentences from a hub dataset; integer tags are named by the dataset's ClassLabel, else by the label list."""
        feature = dataset.features[self.tag_field]
        names = getattr(getattr(feature, "feature", None), "names", None)
        if names is None and len(dataset) and isinstance(dataset[0][self.tag_field][0], int):
            names = self.labels or getattr(self._attached_module(), "labels", None)
            if names is None:
                raise ValueError(
                    f"{self.dataset_name}: tags in {self.tag_field!r} are integers without names; set --model.labels "
                    "in the dataset's id order."
                )
        sentences = []
        for row in dataset:
            tags = [names[t] if names is not None else str(t) for t in row[self.tag_field]]
            sentences.append(TaggedSentence(tuple(row[self.token_field]), tuple(iob_to_iob2(tags))))
        return sentences

    def observed_labels(self, examples: list[TaggedSentence]) -> list[str]:
        return sorted({tag for sentence in examples for tag in sentence.tags})

    def encode(
        self, examples: list[TaggedSentence], label_ids: dict[str, int], max_length: int
    ) -> tuple[list[Example], int]:
        unknown = sorted({tag for s in examples for tag in s.tags} - set(label_ids))
        if unknown:
            raise DataFormatError(
                f"Tags {unknown} are in the data but not in the label list {list(label_ids)}; "
                "add them to --model.labels (the recipe's label list)."
            )
        encodings = self.tokenizer(
            [list(s.tokens) for s in examples],
            is_split_into_words=True,
            truncation=True,
            max_length=max_length,
        )
        full_lengths = self.tokenizer(
            [list(s.tokens) for s in examples], is_split_into_words=True, add_special_tokens=True
        )["input_ids"]
        truncated = sum(len(ids) > max_length for ids in full_lengths)
        encoded = []
        for index, sentence in enumerate(examples):
            word_ids = encodings.word_ids(index)
            labels, starts = [], []
            previous = None
            for word in word_ids:
                first = word is not None and word != previous
                starts.append(first)
                if word is None or (not first and not self.label_all_subtokens):
                    labels.append(IGNORE_INDEX)
                else:
                    tag = sentence.tags[word]
                    if not first and tag.startswith("B-"):
                        tag = "I-" + tag[2:]
                        if tag not in label_ids:
                            raise DataFormatError(
                                f"--data.label_all_subtokens labels inner pieces of {sentence.tags[word]} words as "
                                f"{tag}, which is not in the label list; add it to --model.labels."
                            )
                    labels.append(label_ids[tag])
                previous = word
            example = model_fields(encodings, index)
            example["labels"] = labels
            if self.label_all_subtokens:
                example["word_starts"] = starts
            encoded.append(example)
        return encoded, truncated


class SequenceClassificationDataModule(TransformerDataModule):
    """Labelled sentences (or sentence pairs) from TSV/CSV/JSONL files or the hub (e.g. SST-2).

    Args:
        text_column: the column of the text in files and hub datasets.
        text_pair_column: the column of the second text of sentence-pair tasks.
        label_column: the column of the label.
    """

    def __init__(
        self,
        *args: Any,
        text_column: str = "sentence",
        text_pair_column: str | None = None,
        label_column: str = "label",
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)
        self.text_column, self.text_pair_column, self.label_column = (
            text_column,
            text_pair_column,
            label_column,
        )
        self.save_hyperparameters(ignore=["labels"])

    def read_file(self, path: str) -> list[LabelledText]:
        return read_table(path, self.text_column, self.label_column, self.text_pair_column, self.encoding)

    def from_hub(self, dataset: Any) -> list[LabelledText]:
        return [
            LabelledText(
                text=row[self.text_column],
                label=str(row[self.label_column]),
                text_pair=row[self.text_pair_column] if self.text_pair_column else None,
            )
            for row in dataset
        ]

    def observed_labels(self, examples: list[LabelledText]) -> list[str]:
        return sorted({example.label for example in examples})

    def encode(
        self, examples: list[LabelledText], label_ids: dict[str, int], max_length: int
    ) -> tuple[list[Example], int]:
        unknown = sorted({e.label for e in examples} - set(label_ids))
        if unknown:
            raise DataFormatError(
                f"Labels {unknown} are in the data but not in the label list {list(label_ids)}; "
                "add them to --model.labels (the recipe's label list)."
            )
        texts = [e.text for e in examples]
        pairs = [e.text_pair or "" for e in examples] if self.text_pair_column else None
        encodings = self.tokenizer(texts, pairs, truncation=True, max_length=max_length)
        full = self.tokenizer(texts, pairs)["input_ids"]
        truncated = sum(len(ids) > max_length for ids in full)
        encoded = []
        for index, example in enumerate(examples):
            row = model_fields(encodings, index)
            row["labels"] = label_ids[example.label]
            encoded.append(row)
        return encoded, truncated


class CausalLMDataModule(TransformerDataModule):
    """Texts, or prompt/completion pairs, for causal-LM fine-tuning, from JSONL/TSV/CSV files or the hub.

    Each example is the prompt's tokens followed by the completion's (and the end-of-sequence token); with
    ``mask_prompt`` the prompt's positions get the label -100, so the loss (and distillation) counts only the
    completion. Examples are padded per batch, unless packed. A tokenizer without a padding token pads with its
    end-of-sequence token (padded positions are masked out of attention and loss).

    With ``pack``, the training examples (whole: none is truncated) are concatenated in the order of the data and
    cut into rows of exactly ``max_length`` tokens (:func:`pack_examples`), so every batch is full and no padding
    is computed; the prompt masking goes with the tokens. A row may end one example and start the next, and
    attention is not blocked between them (plain packing, as ``run_clm``'s ``group_texts``; the end-of-sequence
    token of ``add_eos`` marks where each text ends). The last, partial row is dropped. The rows are fixed by the
    data and shuffled per epoch like examples, so training stays seeded and resumable. Validation and test
    data are not packed: each example is scored alone, with no context from its neighbours, so ``val_token_loss``
    and perplexity compare between packed and unpacked runs.

    Args:
        text_column: the column of plain texts (all trained on), used when a row has no prompt/completion.
        prompt_column: the column of prompts.
        completion_column: the column of completions.
        mask_prompt: leave the prompt's tokens out of the loss.
        add_eos: end every example with the tokenizer's end-of-sequence token.
        pack: train on rows of exactly ``max_length`` tokens cut from the concatenated training examples.
    """

    def __init__(
        self,
        *args: Any,
        text_column: str = "text",
        prompt_column: str = "prompt",
        completion_column: str = "completion",
        mask_prompt: bool = True,
        add_eos: bool = True,
        pack: bool = False,
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)
        self.text_column, self.prompt_column, self.completion_column = text_column, prompt_column, completion_column
        self.mask_prompt, self.add_eos, self.pack = mask_prompt, add_eos, pack
        self.save_hyperparameters(ignore=["labels"])

    def load_tokenizer(self) -> Any:
        tokenizer = super().load_tokenizer()
        if tokenizer.pad_token is None:
            if tokenizer.eos_token is None:
                raise ValueError("The tokenizer has neither a padding nor an end-of-sequence token; set one.")
            tokenizer.pad_token = tokenizer.eos_token
        return tokenizer

    def read_file(self, path: str) -> list[PromptCompletion]:
        return read_prompts(path, self.text_column, self.prompt_column, self.completion_column, self.encoding)

    def from_hub(self, dataset: Any) -> list[PromptCompletion]:
        columns = set(dataset.column_names)
        if {self.prompt_column, self.completion_column} <= columns:
            return [PromptCompletion(row[self.prompt_column], row[self.completion_column]) for row in dataset]
        if self.text_column in columns:
            return [PromptCompletion("", row[self.text_column]) for row in dataset]
        raise DataFormatError(
            f"The hub dataset has columns {sorted(columns)}: set --data.text_column, or --data.prompt_column and "
            "--data.completion_column."
        )

    def observed_labels(self, examples: list[PromptCompletion]) -> list[str]:
        return []

    def encode_split(
        self, split: str, examples: list[PromptCompletion], label_ids: dict[str, int]
    ) -> tuple[list[Example], int]:
        """With ``pack``, the training examples tokenised whole and packed into rows of ``max_length`` tokens."""
        if split != "train" or not self.pack:
            return super().encode_split(split, examples, label_ids)
        encoded, _ = self.encode(examples, label_ids, sys.maxsize)  # a long text continues in the next row
        ids, labels = pack_examples([e["input_ids"] for e in encoded], [e["labels"] for e in encoded], self.max_length)
        tokens = sum(len(example["input_ids"]) for example in encoded)
        if not ids:
            raise ValueError(
                f"--data.pack: the {len(encoded)} training examples hold {tokens} tokens, less than one row of "
                f"--data.max_length={self.max_length}; lower --data.max_length or give more training data."
            )
        log.info(
            "Packed %d training examples (%d tokens) into %d rows of %d tokens; the last %d tokens were dropped.",
            len(encoded),
            tokens,
            len(ids),
            self.max_length,
            tokens - len(ids) * self.max_length,
        )
        rows = [
            {"input_ids": row, "attention_mask": [1] * len(row), "labels": row_labels}
            for row, row_labels in zip(ids, labels, strict=True)
        ]
        return rows, 0

    def encode(
        self, examples: list[PromptCompletion], label_ids: dict[str, int], max_length: int
    ) -> tuple[list[Example], int]:
        tokenizer = self.tokenizer
        prompts = tokenizer([e.prompt for e in examples])["input_ids"]  # with the model's start token, if any
        completions = tokenizer([e.completion for e in examples], add_special_tokens=False)["input_ids"]
        eos = [tokenizer.eos_token_id] if self.add_eos and tokenizer.eos_token_id is not None else []
        encoded, truncated = [], 0
        for prompt, completion in zip(prompts, completions, strict=True):
            ids = prompt + completion + eos
            labels = ([IGNORE_INDEX] * len(prompt) if self.mask_prompt else list(prompt)) + completion + eos
            truncated += len(ids) > max_length
            encoded.append(
                {
                    "input_ids": ids[:max_length],
                    "attention_mask": [1] * min(len(ids), max_length),
                    "labels": labels[:max_length],
                }
            )
        return encoded, truncated
