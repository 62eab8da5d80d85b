"""Entity-level precision / recall / F1 for token classification (CoNLL / seqeval semantics).

The chunking in :func:`extract_entities` reproduces ``seqeval.metrics.sequence_labeling.get_entities``
(its default, conlleval-compatible, non-strict mode) rule for rule, without importing seqeval. Scores are
accumulated as per-type integer counts, so :class:`EntityF1` is exact under DDP: every rank sums its own
counts and ``compute()`` reduces them with ``sum``.

Sentences are chunked independently. seqeval's ``f1_score`` instead chunks all sentences joined by ``"O"``
separators; for labels whose prefix is one of ``B``, ``I``, ``E``, ``S``, ``O`` the two are identical. They
can only differ for malformed labels without such a prefix (e.g. a bare ``"X"`` or ``".-PER"``), where
seqeval may even produce chunks spanning two sentences.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor
from torchmetrics import Metric

__all__ = ["EntityF1", "count_entities", "entity_types", "extract_entities"]

_OUTSIDE = "O"
# seqeval's "no type" marker: "O", "B", "I-", ... all have the type "_".
_NO_TYPE = "_"


def _split_tag(tag: str) -> tuple[str, str]:
    """Split a tag into (prefix, type) exactly like seqeval (non-suffix mode).

    The prefix is the first character; the type is what follows the first ``-`` after it, or ``"_"``.

    >>> _split_tag("B-PER"), _split_tag("O"), _split_tag("I-")
    (('B', 'PER'), ('O', '_'), ('I', '_'))
    """
    if not isinstance(tag, str) or not tag:
        raise ValueError(f"tags must be non-empty strings, got {tag!r}")
    return tag[0], tag[1:].split("-", maxsplit=1)[-1] or _NO_TYPE


def _ends_chunk(prev_prefix: str, prefix: str, prev_type: str, type_: str) -> bool:
    """True if a chunk ends between the previous and the current token (seqeval's ``end_of_chunk``).

    >>> _ends_chunk("B", "O", "PER", "_"), _ends_chunk("B", "I", "PER", "PER")
    (True, False)
    """
    if prev_prefix in ("E", "S"):
        return True
    if prev_prefix in ("B", "I") and prefix in ("B", "S", "O"):
        return True
    return prev_prefix not in ("O", ".") and prev_type != type_


def _starts_chunk(prev_prefix: str, prefix: str, prev_type: str, type_: str) -> bool:
    """True if a chunk starts at the current token (seqeval's ``start_of_chunk``).

    An ``I-`` or ``E-`` tag after ``O`` (or after an ``E-``/``S-`` tag, or after another type) starts a chunk.

    >>> _starts_chunk("O", "I", "_", "PER"), _starts_chunk("B", "I", "PER", "PER")
    (True, False)
    """
    if prefix in ("B", "S"):
        return True
    if prev_prefix in ("E", "S", "O") and prefix in ("E", "I"):
        return True
    return prefix not in ("O", ".") and prev_type != type_


def extract_entities(tags: Sequence[str]) -> list[tuple[str, int, int]]:
    """Entity chunks ``(type, start, end_inclusive)`` of one tag sequence, in order of their end.

    Identical to seqeval's default (conlleval-compatible, non-strict) ``get_entities``: IOB1, IOB2 and
    IOBES (``E-``/``S-``) tags are accepted, and an ``I-`` tag after ``O`` or after a tag of another type
    leniently starts a new chunk.

    >>> extract_entities(["B-PER", "I-PER", "O", "I-LOC", "B-LOC", "S-ORG"])
    [('PER', 0, 1), ('LOC', 3, 3), ('LOC', 4, 4), ('ORG', 5, 5)]
    """
    chunks: list[tuple[str, int, int]] = []
    # seqeval starts from prefix "O" with the empty type "" (not "_", which an actual "O" tag has).
    prev_prefix, prev_type, begin = _OUTSIDE, "", 0
    for i, tag in enumerate([*tags, _OUTSIDE]):
        prefix, type_ = _split_tag(tag)
        if _ends_chunk(prev_prefix, prefix, prev_type, type_):
            chunks.append((prev_type, begin, i - 1))
        if _starts_chunk(prev_prefix, prefix, prev_type, type_):
            begin = i
        prev_prefix, prev_type = prefix, type_
    return chunks


def entity_types(labels: Sequence[str]) -> list[str]:
    """Sorted, de-duplicated entity types of a label list (labels with the ``O`` prefix are skipped).

    >>> entity_types(["O", "B-PER", "I-PER", "B-LOC", "I-LOC", "B-MISC"])
    ['LOC', 'MISC', 'PER']
    """
    types = {type_ for prefix, type_ in map(_split_tag, labels) if prefix != _OUTSIDE}
    return sorted(types)


def _sentence_counts(
    pred: Sequence[str], gold: Sequence[str], index: dict[str, int]
) -> tuple[list[int], list[int], list[int]]:
    """Per-type (correct, predicted, gold) counts of one sentence; ``index`` maps a type to its slot.

    >>> _sentence_counts(["B-PER", "O"], ["B-PER", "B-LOC"], {"LOC": 0, "PER": 1})
    ([0, 1], [0, 1], [1, 1])
    """
    pred_set, gold_set = set(extract_entities(pred)), set(extract_entities(gold))
    correct, predicted, gold_n = ([0] * len(index) for _ in range(3))
    for counts, entities in ((predicted, pred_set), (gold_n, gold_set), (correct, pred_set & gold_set)):
        for type_, _, _ in entities:
            if type_ not in index:
                raise ValueError(f"entity type {type_!r} is not one of the known types {sorted(index)}")
            counts[index[type_]] += 1
    return correct, predicted, gold_n


def count_entities(
    pred_tags: Sequence[Sequence[str]], gold_tags: Sequence[Sequence[str]], types: Sequence[str]
) -> tuple[list[int], list[int], list[int]]:
    """Per-type ``(correct, predicted, gold)`` entity counts summed over sentences, ordered like ``types``.

    A predicted entity is correct when a gold entity of the same sentence has the same type, start and end.

    >>> count_entities([["B-PER", "I-PER", "O"]], [["B-PER", "O", "B-LOC"]], ["LOC", "PER"])
    ([0, 0], [0, 1], [1, 1])
    """
    if len(pred_tags) != len(gold_tags):
        raise ValueError(f"got {len(pred_tags)} predicted sentences but {len(gold_tags)} gold sentences")
    index = {type_: i for i, type_ in enumerate(types)}
    totals = ([0] * len(index), [0] * len(index), [0] * len(index))
    for i, (pred, gold) in enumerate(zip(pred_tags, gold_tags, strict=True)):
        if len(pred) != len(gold):
            raise ValueError(f"sentence {i}: {len(pred)} predicted tags but {len(gold)} gold tags")
        for total, counts in zip(totals, _sentence_counts(pred, gold, index), strict=True):
            for slot, count in enumerate(counts):
                total[slot] += count
    return totals


def _safe_div(numerator: int, denominator: int) -> float:
    """``numerator / denominator``, or 0.0 when the denominator is 0 (seqeval's ``zero_division=0``).

    >>> _safe_div(1, 4), _safe_div(0, 0)
    (0.25, 0.0)
    """
    return numerator / denominator if denominator else 0.0


def micro_f1(pred_tags: Sequence[Sequence[str]], gold_tags: Sequence[Sequence[str]]) -> float:
    """Micro entity-level F1 over sentences of IOB2 tags, from string tags (``EntityF1``'s ``f1``, seqeval's number).

    >>> micro_f1([["B-PER", "O", "B-LOC"]], [["B-PER", "O", "B-ORG"]])
    0.5
    """
    types = entity_types([tag for sentence in [*pred_tags, *gold_tags] for tag in sentence])
    correct, predicted, gold = count_entities(pred_tags, gold_tags, types)
    return _safe_div(2 * sum(correct), sum(predicted) + sum(gold))


def _validate_labels(labels: Sequence[str]) -> tuple[str, ...]:
    """Check that ``labels`` is a non-empty list of unique, non-empty strings and return it as a tuple.

    >>> _validate_labels(["O", "B-PER"])
    ('O', 'B-PER')
    """
    labels = tuple(labels)
    if not labels:
        raise ValueError("labels must be a non-empty sequence of tag strings")
    for label in labels:
        _split_tag(label)
    duplicates = sorted({label for label in labels if labels.count(label) > 1})
    if duplicates:
        raise ValueError(f"labels must be unique, duplicated: {duplicates}")
    return labels


def _label_ids(preds: Tensor, target: Tensor, num_labels: int) -> Tensor:
    """Return ``preds`` as integer label ids shaped like ``target`` (logits are reduced with argmax).

    >>> _label_ids(torch.tensor([[[0.1, 0.9], [0.8, 0.2]]]), torch.tensor([[1, 0]]), 2)
    tensor([[1, 0]])
    """
    shapes = f"preds shape {tuple(preds.shape)}, target shape {tuple(target.shape)}"
    if target.ndim != 2 or target.is_floating_point():
        raise ValueError(f"target must be integer label ids [batch, seq_len]; got {shapes}")
    logits = preds.ndim == 3 and preds.shape[-1] == num_labels
    ids = preds.argmax(dim=-1) if logits else preds
    if ids.shape != target.shape:
        raise ValueError(f"preds must be [batch, seq_len] or [batch, seq_len, {num_labels}] logits; got {shapes}")
    if ids.is_floating_point():
        raise ValueError(f"preds must be integer label ids or logits with a last dim of {num_labels}; got {shapes}")
    return ids


def _check_ids(ids: Tensor, num_labels: int, name: str) -> None:
    """Raise ``ValueError`` if any (kept) id lies outside ``[0, num_labels)``.

    >>> _check_ids(torch.tensor([0, 2]), 3, "preds")
    """
    if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= num_labels):
        raise ValueError(f"{name} contains label ids outside [0, {num_labels}): {ids.unique().tolist()}")


class EntityF1(Metric):
    """Entity-level micro precision / recall / F1 plus per-type F1 (CoNLL / seqeval semantics), DDP-safe.

    Each row of ``preds`` / ``target`` is one sentence. Positions where ``target == ignore_index`` (or where
    ``mask`` is False) are dropped; the remaining positions, in order, are the sentence's word-level tags.
    Entities are chunked with :func:`extract_entities`; the states are integer per-type counts summed across
    processes, so the result equals seqeval's ``precision_score`` / ``recall_score`` / ``f1_score`` (and the
    per-type ``f1-score`` of ``classification_report``) on all sentences, with ``zero_division=0``.

    >>> labels = ["O", "B-PER", "I-PER", "B-LOC", "I-LOC"]
    >>> metric = EntityF1(labels)
    >>> target = torch.tensor([[1, 2, 0, 3], [3, 4, -100, -100]])
    >>> preds = torch.tensor([[1, 2, 0, 0], [3, 4, 0, 0]])
    >>> metric.update(preds, target)
    >>> {name: round(value.item(), 4) for name, value in metric.compute().items()}
    {'precision': 1.0, 'recall': 0.6667, 'f1': 0.8, 'f1_LOC': 0.6667, 'f1_PER': 1.0}
    """

    is_differentiable = False
    higher_is_better = True
    full_state_update = False

    correct: Tensor
    predicted: Tensor
    gold: Tensor

    def __init__(self, labels: Sequence[str], ignore_index: int = -100, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.labels: tuple[str, ...] = _validate_labels(labels)
        self.types: tuple[str, ...] = tuple(entity_types(self.labels))
        self.ignore_index = ignore_index
        for name in ("correct", "predicted", "gold"):
            self.add_state(name, default=torch.zeros(len(self.types), dtype=torch.long), dist_reduce_fx="sum")

    def _tags(self, ids: Tensor, keep: Tensor) -> list[list[str]]:
        """Word-level tag lists, one per row, of the kept positions of an id tensor [batch, seq_len]."""
        return [[self.labels[i] for i in row[row_keep].tolist()] for row, row_keep in zip(ids, keep, strict=True)]

    def update(self, preds: Tensor, target: Tensor, mask: Tensor | None = None) -> None:
        """Accumulate entity counts of a batch of sentences.

        Args:
            preds: label ids ``[batch, seq_len]`` or logits ``[batch, seq_len, num_labels]``.
            target: gold label ids ``[batch, seq_len]``; ``ignore_index`` marks padding / sub-word positions.
            mask: optional ``[batch, seq_len]`` tensor; positions where it is False are dropped as well.
        """
        ids = _label_ids(preds, target, len(self.labels)).detach().cpu()
        target = target.detach().cpu()
        keep = target != self.ignore_index
        if mask is not None:
            if mask.shape != target.shape:
                raise ValueError(f"mask shape {tuple(mask.shape)} does not match target shape {tuple(target.shape)}")
            keep &= mask.detach().cpu().bool()
        _check_ids(ids[keep], len(self.labels), "preds")
        _check_ids(target[keep], len(self.labels), "target")
        counts = count_entities(self._tags(ids, keep), self._tags(target, keep), self.types)
        for name, count in zip(("correct", "predicted", "gold"), counts, strict=True):
            state = getattr(self, name)
            # Not in place: states reset under a test's inference mode must stay usable in a later fit.
            setattr(self, name, state + torch.tensor(count, dtype=torch.long, device=state.device))

    def compute(self) -> dict[str, Tensor]:
        """Return ``precision``, ``recall``, ``f1`` (micro over all types) and ``f1_<TYPE>`` per type."""
        correct, predicted, gold = self.correct.tolist(), self.predicted.tolist(), self.gold.tolist()
        n_correct, n_predicted, n_gold = sum(correct), sum(predicted), sum(gold)
        scores = {
            "precision": _safe_div(n_correct, n_predicted),
            "recall": _safe_div(n_correct, n_gold),
            "f1": _safe_div(2 * n_correct, n_predicted + n_gold),
        }
        for type_, c, p, g in zip(self.types, correct, predicted, gold, strict=True):
            scores[f"f1_{type_}"] = _safe_div(2 * c, p + g)
        device = self.correct.device
        return {name: torch.tensor(v, dtype=torch.float32, device=device) for name, v in scores.items()}
