"""Tests for ``lightning_memopt.tasks.entity_f1``: chunking and scores must match seqeval exactly."""

from __future__ import annotations

import gzip
import importlib.util
import json
import random
import re
import socket
import warnings
from collections.abc import Iterator, Sequence
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from lightning_memopt.tasks.entity_f1 import EntityF1, count_entities, entity_types, extract_entities

# seqeval (a test dependency) is imported lazily: spawned DDP workers import this module but never use it.
pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("seqeval") is None, reason="seqeval (test dependency) is not installed"
)

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
VALID_FILE = DATA / "conll2003" / "valid.txt.gz"
CONLL_LABELS = ["O", "B-PER", "I-PER", "B-ORG", "I-ORG", "B-LOC", "I-LOC", "B-MISC", "I-MISC"]
CONLL_TYPES = ["LOC", "MISC", "ORG", "PER"]
IGNORE = -100
TOL = 1e-6

needs_conll = pytest.mark.skipif(
    not VALID_FILE.exists(), reason=f"CoNLL-2003 validation file not found at {VALID_FILE}"
)


# --------------------------------------------------------------------------- helpers


def get_entities(tags: Sequence[str]) -> list[tuple[str, int, int]]:
    """seqeval's reference chunker (it warns about tags that are not NE tags; silenced here)."""
    from seqeval.metrics.sequence_labeling import get_entities as seqeval_get_entities

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return seqeval_get_entities(list(tags))


def read_conll_tags(path: Path) -> list[list[str]]:
    """NER tag sequences (last column) of a CoNLL-2003 file; ``-DOCSTART-`` lines are not sentences."""
    sentences: list[list[str]] = []
    current: list[str] = []
    with gzip.open(path, "rt", encoding="utf-8") as handle:
        for line in handle:
            fields = line.split()
            if not fields or fields[0] == "-DOCSTART-":
                if current:
                    sentences.append(current)
                current = []
                continue
            current.append(fields[-1])
    if current:
        sentences.append(current)
    return sentences


def relabel(tags: list[str], start: int, end: int, type_: str, first: str = "B") -> None:
    """Overwrite ``tags[start:end + 1]`` with one ``type_`` chunk (``first`` is the first token's prefix)."""
    tags[start] = f"{first}-{type_}"
    for k in range(start + 1, end + 1):
        tags[k] = f"I-{type_}"


def perturb_sentence(gold: list[str], rng: random.Random) -> list[str]:
    """A plausible-but-wrong prediction: type swaps, boundary shifts, splits, misses and token noise."""
    tags = list(gold)
    for type_, start, end in get_entities(gold):
        r = rng.random()
        if r < 0.05:  # type swap
            relabel(tags, start, end, rng.choice([t for t in CONLL_TYPES if t != type_]))
        elif r < 0.09 and end + 1 < len(tags) and tags[end + 1] == "O":  # extend right
            tags[end + 1] = f"I-{type_}"
        elif r < 0.13 and end > start:  # shrink left, IOB2-style or lenient IOB1-style (I- after O)
            tags[start] = "O"
            relabel(tags, start + 1, end, type_, first=rng.choice("BI"))
        elif r < 0.16 and end > start:  # split in two
            tags[rng.randint(start + 1, end)] = f"B-{type_}"
        elif r < 0.19:  # missed entity
            tags[start : end + 1] = ["O"] * (end + 1 - start)
    return [rng.choice(CONLL_LABELS) if rng.random() < 0.15 else tag for tag in tags]


def encode(tags: Sequence[str]) -> list[int]:
    return [CONLL_LABELS.index(tag) for tag in tags]


def padded_batches(
    gold: list[list[str]], pred: list[list[str]], batch_size: int, seed: int, use_mask: bool = False
) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]]:
    """Padded id batches ``(preds, target, mask)`` with sub-word-like dropped positions inside sentences.

    Dropped positions (padding and ~20 % extra "sub-word" slots) carry a ``B-PER`` prediction, so a metric
    that did not drop them would count spurious entities. Without ``use_mask`` they are marked by
    ``IGNORE`` in ``target``; with ``use_mask`` the target holds a real label there and ``mask`` is False.
    """
    rng = random.Random(seed)
    junk_pred, junk_target = CONLL_LABELS.index("B-PER"), CONLL_LABELS.index("B-ORG")
    drop_target = junk_target if use_mask else IGNORE
    for first in range(0, len(gold), batch_size):
        rows = []
        for gold_tags, pred_tags in zip(
            gold[first : first + batch_size], pred[first : first + batch_size], strict=True
        ):
            row: list[tuple[int, int, bool]] = []  # (target, pred, keep) per position
            for g, p in zip(encode(gold_tags), encode(pred_tags), strict=True):
                row.append((g, p, True))
                if rng.random() < 0.2:
                    row.append((drop_target, junk_pred, False))
            rows.append(row)
        width = max(len(row) for row in rows)
        target = torch.full((len(rows), width), drop_target, dtype=torch.long)
        preds = torch.full((len(rows), width), junk_pred, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.bool)
        for i, row in enumerate(rows):
            t_row, p_row, m_row = zip(*row, strict=True)
            target[i, : len(row)] = torch.tensor(t_row)
            preds[i, : len(row)] = torch.tensor(p_row)
            mask[i, : len(row)] = torch.tensor(m_row)
        yield preds, target, (mask if use_mask else None)


def seqeval_scores(gold: list[list[str]], pred: list[list[str]]) -> dict[str, float]:
    """Reference scores in EntityF1's key format, from seqeval's public metrics (``zero_division=0``)."""
    from seqeval.metrics import classification_report, f1_score, precision_score, recall_score

    report = classification_report(gold, pred, output_dict=True, zero_division=0)
    scores = {
        "precision": precision_score(gold, pred, zero_division=0),
        "recall": recall_score(gold, pred, zero_division=0),
        "f1": f1_score(gold, pred, zero_division=0),
    }
    scores.update({f"f1_{t}": report[t]["f1-score"] if t in report else 0.0 for t in CONLL_TYPES})
    return {name: float(value) for name, value in scores.items()}


def assert_scores_match(result: dict[str, float], expected: dict[str, float]) -> None:
    assert sorted(result) == sorted(expected)
    for name, value in expected.items():
        assert result[name] == pytest.approx(value, abs=TOL), name


def as_floats(result: dict[str, torch.Tensor]) -> dict[str, float]:
    return {name: value.item() for name, value in result.items()}


@pytest.fixture(scope="module")
def conll() -> tuple[list[list[str]], list[list[str]], dict[str, float]]:
    """(gold, perturbed prediction, seqeval reference scores) for the full CoNLL-2003 validation set."""
    gold = read_conll_tags(VALID_FILE)
    rng = random.Random(2003)
    pred = [perturb_sentence(sentence, rng) for sentence in gold]
    return gold, pred, seqeval_scores(gold, pred)


# --------------------------------------------------------------------------- 1. chunking

EDGE_CASES = [
    [],
    ["O", "O"],
    ["B-PER", "I-PER", "O", "B-LOC"],
    ["I-PER", "I-PER", "O", "I-LOC", "B-LOC", "I-LOC"],  # IOB1
    ["O", "I-ORG", "I-ORG", "O", "I-ORG"],  # I- after O starts a chunk
    ["B-PER", "I-PER", "I-LOC", "I-LOC"],  # type switch mid chunk
    ["B-PER", "I-LOC", "B-LOC", "I-MISC"],
    ["O", "O", "B-MISC", "I-MISC"],  # trailing entity
    ["B-PER", "B-PER", "I-PER", "B-LOC"],  # single-token entities
    ["B-PER"],
    ["I-PER"],
    ["B-PER", "E-PER", "S-LOC", "O", "E-ORG", "I-ORG", "S-ORG", "E-ORG"],  # IOBES
    ["B-PER", "I-PER", "E-PER", "I-PER"],  # I- after E- starts a new chunk
    ["E-PER", "E-PER", "S-PER", "I-PER", "S-PER", "E-PER"],
    ["B-PER", "S-PER", "B-LOC", "E-LOC", "E-LOC"],
    # malformed tags, still chunked the way seqeval does
    ["B", "I", "O", "S", "E"],
    ["X", "O", "B-LOC", "O", "X", "B-PER"],
    [".-PER", "I-PER", "O", "B-PER", ".", "I-PER"],
    ["PER", "PER", "O-PER", "I-PER", "I-"],
]


@pytest.mark.parametrize("tags", EDGE_CASES, ids=lambda tags: " ".join(tags) or "empty")
def test_extract_entities_matches_seqeval_edge_cases(tags: list[str]) -> None:
    assert extract_entities(tags) == get_entities(tags)


def test_extract_entities_known_values() -> None:
    assert extract_entities(("I-PER", "I-PER", "O", "I-LOC", "B-LOC")) == [
        ("PER", 0, 1),
        ("LOC", 3, 3),
        ("LOC", 4, 4),
    ]
    assert extract_entities(["B-PER", "I-LOC", "E-LOC", "S-ORG"]) == [
        ("PER", 0, 0),
        ("LOC", 1, 2),
        ("ORG", 3, 3),
    ]
    # seqeval quirk: a bare "X" after "O" starts nothing, and the next type change closes a chunk that
    # reaches back to a stale start offset.
    assert extract_entities(["B-LOC", "O", "X", "B-PER"]) == [("LOC", 0, 0), ("_", 0, 2), ("PER", 3, 3)]


def test_extract_entities_matches_seqeval_random_sequences() -> None:
    rng = random.Random(0)
    alphabet = [f"{p}-{t}" for p in "BIES" for t in ("PER", "LOC")] + ["O"] * 4 + ["B", "I", "X", ".", "I-"]
    for _ in range(3000):
        tags = [rng.choice(alphabet) for _ in range(rng.randint(0, 12))]
        assert extract_entities(tags) == get_entities(tags), tags


def test_entity_types() -> None:
    assert entity_types(CONLL_LABELS) == CONLL_TYPES
    assert entity_types(["O", "S-B", "E-A", "I-A"]) == ["A", "B"]
    assert entity_types(["O"]) == []


def test_count_entities() -> None:
    pred = [["B-PER", "I-PER", "O"], ["B-LOC", "B-LOC"]]
    gold = [["B-PER", "I-PER", "B-LOC"], ["B-LOC", "O"]]
    assert count_entities(pred, gold, ["LOC", "PER"]) == ([1, 1], [2, 1], [2, 1])


# --------------------------------------------------------------------------- 2. real CoNLL-2003 data


@needs_conll
def test_conll_file_parsed(conll: tuple[list[list[str]], list[list[str]], dict[str, float]]) -> None:
    gold, pred, expected = conll
    assert len(gold) == 3250
    assert {tag for sentence in gold for tag in sentence} == set(CONLL_LABELS)
    pairs = [(g, p) for gs, ps in zip(gold, pred, strict=True) for g, p in zip(gs, ps, strict=True)]
    assert 0.1 < sum(g != p for g, p in pairs) / len(pairs) < 0.3
    # the perturbation must be substantial but not destroy everything, so the comparison is meaningful
    assert 0.4 < expected["f1"] < 0.9
    assert expected["precision"] != pytest.approx(expected["recall"], abs=1e-3)


@needs_conll
def test_entity_f1_matches_seqeval_on_conll(
    conll: tuple[list[list[str]], list[list[str]], dict[str, float]],
) -> None:
    gold, pred, expected = conll
    metric = EntityF1(CONLL_LABELS)
    assert metric.types == tuple(CONLL_TYPES)
    for preds, target, mask in padded_batches(gold, pred, batch_size=64, seed=1):
        metric.update(preds, target, mask)
    assert_scores_match(as_floats(metric.compute()), expected)
    assert metric.gold.sum().item() == sum(len(get_entities(sentence)) for sentence in gold)

    metric.reset()
    metric.update(*next(padded_batches(gold, gold, batch_size=32, seed=2))[:2])
    assert as_floats(metric.compute())["f1"] == 1.0


@needs_conll
def test_entity_f1_mask_and_logits_on_conll(
    conll: tuple[list[list[str]], list[list[str]], dict[str, float]],
) -> None:
    gold, pred, expected = conll
    metric = EntityF1(CONLL_LABELS)
    generator = torch.Generator().manual_seed(0)
    for step, (preds, target, mask) in enumerate(padded_batches(gold, pred, 100, seed=3, use_mask=True)):
        assert mask is not None and (target != IGNORE).all()
        if step % 2:  # odd batches as logits [batch, seq_len, num_labels]
            noise = torch.rand(*preds.shape, len(CONLL_LABELS), generator=generator)
            preds = noise + 2.0 * torch.nn.functional.one_hot(preds, len(CONLL_LABELS))
        metric.update(preds, target, mask=mask.int() if step % 3 == 0 else mask)
    assert_scores_match(as_floats(metric.compute()), expected)


# --------------------------------------------------------------------------- 3. DDP


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _ddp_worker(
    rank: int, world_size: int, port: int, shards: list[tuple[list[list[str]], list[list[str]]]], out_dir: str
) -> None:
    """One DDP rank: update with its own shard, compute (synced over gloo), write the result as JSON."""
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=world_size,
        timeout=timedelta(seconds=60),
    )
    try:
        gold, pred = shards[rank]
        metric = EntityF1(CONLL_LABELS)
        for preds, target, mask in padded_batches(gold, pred, batch_size=128, seed=10 + rank):
            metric.update(preds, target, mask)
        result = {
            "synced": as_floats(metric.compute()),
            "local_gold": metric.gold.sum().item(),
            "num_sentences": len(gold),
        }
        Path(out_dir, f"rank{rank}.json").write_text(json.dumps(result))
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
@needs_conll
@pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="needs gloo")
def test_entity_f1_ddp_matches_seqeval_on_whole_set(
    conll: tuple[list[list[str]], list[list[str]], dict[str, float]], tmp_path: Path
) -> None:
    gold, pred, expected = conll
    split = 1700  # uneven halves
    shards = [(gold[:split], pred[:split]), (gold[split:], pred[split:])]
    mp.spawn(_ddp_worker, args=(2, _free_port(), shards, str(tmp_path)), nprocs=2, join=True)

    results = [json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in range(2)]
    assert [r["num_sentences"] for r in results] == [1700, len(gold) - 1700]
    # after compute() the states are back to each rank's own shard ...
    assert sum(r["local_gold"] for r in results) == sum(len(get_entities(s)) for s in gold)
    # ... but compute() itself saw the sum over both ranks
    for result in results:
        assert_scores_match(result["synced"], expected)


# --------------------------------------------------------------------------- 4. bad input


def test_bad_labels() -> None:
    with pytest.raises(ValueError, match="non-empty"):
        EntityF1([])
    with pytest.raises(ValueError, match=r"unique.*B-PER"):
        EntityF1(["O", "B-PER", "I-PER", "B-PER"])
    with pytest.raises(ValueError, match="non-empty strings"):
        EntityF1(["O", ""])


def test_bad_update_input() -> None:
    metric = EntityF1(CONLL_LABELS)
    target = torch.zeros(2, 5, dtype=torch.long)
    with pytest.raises(ValueError, match=re.escape("(2, 4)") + ".*" + re.escape("(2, 5)")):
        metric.update(torch.zeros(2, 4, dtype=torch.long), target)
    with pytest.raises(ValueError, match=re.escape("(2, 5, 3)")):
        metric.update(torch.zeros(2, 5, 3), target)  # logits with the wrong number of labels
    with pytest.raises(ValueError, match="integer"):
        metric.update(torch.zeros(2, 5), target)
    with pytest.raises(ValueError, match="mask shape"):
        metric.update(target, target, mask=torch.ones(2, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match="outside"):
        metric.update(torch.full((2, 5), len(CONLL_LABELS)), target)
    with pytest.raises(ValueError, match="outside"):
        metric.update(target, torch.full((2, 5), -1))
    assert metric.gold.sum().item() == 0


def test_count_entities_bad_input() -> None:
    with pytest.raises(ValueError, match="sentence 1"):
        count_entities([["O"], ["B-PER", "O"]], [["O"], ["B-PER"]], ["PER"])
    with pytest.raises(ValueError, match="2 predicted sentences but 1 gold"):
        count_entities([["O"], ["O"]], [["O"]], ["PER"])
    with pytest.raises(ValueError, match="'LOC'"):
        count_entities([["B-LOC"]], [["O"]], ["PER"])
