"""Readers for the two data formats our recipes train on: CoNLL columns and labelled text tables.

Every reader names the file and the line when something is malformed, so a user can fix the data
instead of debugging a crash deep inside a data loader.

Example:
    >>> import gzip, tempfile, os
    >>> path = os.path.join(tempfile.mkdtemp(), "tiny.txt")
    >>> _ = open(path, "w").write("EU NNP B-NP I-ORG\\nrejects VBZ B-VP O\\n\\n")
    >>> sentences, scheme = load_conll(path)
    >>> sentences[0].tags, scheme
    (('B-ORG', 'O'), 'IOB1')
"""

from __future__ import annotations

import codecs
import csv
import gzip
import io
import json
import zlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO

DOCSTART = "-DOCSTART-"
TAG_PREFIXES = ("B", "I", "E", "S")


class DataFormatError(ValueError):
    """A data file does not have the format the reader was configured for."""


@dataclass(frozen=True)
class TaggedSentence:
    """One sentence of a token-classification corpus: words and one tag per word."""

    tokens: tuple[str, ...]
    tags: tuple[str, ...]


@dataclass(frozen=True)
class LabelledText:
    """One example of a sequence-classification corpus: a text (optionally a pair) and its label."""

    text: str
    label: str
    text_pair: str | None = None


@dataclass(frozen=True)
class PromptCompletion:
    """One causal-LM training text: a prompt (not trained on when masked; empty for plain text) and its completion."""

    prompt: str
    completion: str
    text_pair: None = None  # (texts have no pair: what split_texts reads)

    @property
    def text(self) -> str:
        return self.prompt + self.completion


def open_text(path: str | Path, encoding: str = "utf-8") -> IO[str]:
    """Open a plain or gzip-compressed text file (compression detected from the content)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"Data file {str(path)!r} does not exist.")
    try:
        codecs.lookup(encoding)
    except LookupError:
        raise ValueError(
            f"--data.encoding={encoding!r} is not an encoding Python knows (e.g. utf-8, latin-1)."
        ) from None
    with path.open("rb") as raw:
        is_gzip = raw.read(2) == b"\x1f\x8b"
    if is_gzip:
        return io.TextIOWrapper(gzip.open(path, "rb"), encoding=encoding)
    return path.open(encoding=encoding)


def text_lines(path: str | Path, encoding: str = "utf-8") -> Iterator[str]:
    """The lines of a (gzip) text file; a decoding error or a truncated gzip names the file and line."""
    line_number = 0
    with open_text(path, encoding) as handle:
        try:
            for line_number, line in enumerate(handle, start=1):  # noqa: B007 (read in the except clause)
                yield line
        except UnicodeDecodeError as error:
            raise DataFormatError(
                f"{path}:{line_number + 1}: not valid {encoding} ({error.reason} at byte {error.start} of a block); "
                "set --data.encoding to the file's encoding (e.g. latin-1)."
            ) from None
        except (EOFError, gzip.BadGzipFile, zlib.error) as error:
            raise DataFormatError(
                f"{path}:{line_number + 1}: the gzip file is damaged or truncated ({error})."
            ) from None


def _check_tag(tag: str, where: str) -> None:
    if tag == "O":
        return
    prefix, dash, entity_type = tag.partition("-")
    if not dash or prefix not in TAG_PREFIXES or not entity_type:
        raise DataFormatError(
            f"{where}: tag {tag!r} is not 'O' or PREFIX-TYPE with PREFIX in {TAG_PREFIXES}; "
            "check --data.tag_column (tags are expected in the last column by default)."
        )


def read_conll(
    path: str | Path, token_column: int = 0, tag_column: int = -1, encoding: str = "utf-8"
) -> list[TaggedSentence]:
    """Read a CoNLL-style file: one token per line, columns split on whitespace, blank line between sentences.

    ``-DOCSTART-`` lines mark documents and are skipped. Tags are returned as written (see
    :func:`load_conll` for IOB2 normalisation).
    """
    sentences: list[TaggedSentence] = []
    tokens: list[str] = []
    tags: list[str] = []
    needed = (
        max(
            token_column if token_column >= 0 else -token_column - 1,
            tag_column if tag_column >= 0 else -tag_column - 1,
        )
        + 1
    )

    def flush() -> None:
        if tokens:
            sentences.append(TaggedSentence(tuple(tokens), tuple(tags)))
            tokens.clear()
            tags.clear()

    columns: tuple[int, int] | None = None  # (count, first line) of the file's first token line
    for line_number, line in enumerate(text_lines(path, encoding), start=1):
        fields = line.split()
        if not fields:
            flush()
            continue
        if fields[0] == DOCSTART:
            flush()
            continue
        where = f"{path}:{line_number}"
        if len(fields) < needed:
            raise DataFormatError(
                f"{where}: expected at least {needed} whitespace-separated columns "
                f"(--data.token_column={token_column}, --data.tag_column={tag_column}), got {len(fields)}: {line.strip()!r}"
            )
        columns = columns or (len(fields), line_number)
        if len(fields) != columns[0]:
            raise DataFormatError(
                f"{where}: {len(fields)} columns where line {columns[1]} has {columns[0]}: {line.strip()!r}; a column "
                f"is missing or extra (the tag is column {tag_column}, --data.tag_column)."
            )
        _check_tag(fields[tag_column], where)
        tokens.append(fields[token_column])
        tags.append(fields[tag_column])
    flush()
    if not sentences:
        raise DataFormatError(f"{path}: no sentences found; is this a CoNLL-format file?")
    return sentences


def read_conll_words(path: str | Path, column: int = 0, encoding: str = "utf-8") -> list[tuple[str, ...]]:
    """The words of a CoNLL-style file (one column, tags or not), one tuple per sentence, for prediction."""
    sentences: list[tuple[str, ...]] = []
    words: list[str] = []
    for line in text_lines(path, encoding):
        fields = line.split()
        if not fields or fields[0] == DOCSTART:
            if words:
                sentences.append(tuple(words))
                words = []
            continue
        words.append(fields[column])
    if words:
        sentences.append(tuple(words))
    return sentences


def iob_to_iob2(tags: Sequence[str]) -> list[str]:
    """Rewrite IOB1 (``I-`` may open an entity) and IOBES tags as IOB2 (every entity opens with ``B-``).

    Example:
        >>> iob_to_iob2(["I-PER", "I-PER", "O", "I-LOC", "B-LOC"])
        ['B-PER', 'I-PER', 'O', 'B-LOC', 'B-LOC']
    """
    result: list[str] = []
    previous_type: str | None = None
    for tag in tags:
        if tag == "O":
            result.append(tag)
            previous_type = None
            continue
        prefix, _, entity_type = tag.partition("-")
        opens = prefix in ("B", "S") or previous_type != entity_type
        result.append(f"{'B' if opens else 'I'}-{entity_type}")
        previous_type = None if prefix in ("E", "S") else entity_type
    return result


def load_conll(
    path: str | Path, token_column: int = 0, tag_column: int = -1, encoding: str = "utf-8"
) -> tuple[list[TaggedSentence], str]:
    """Read a CoNLL file and normalise its tags to IOB2; also say which scheme the file used."""
    sentences = read_conll(path, token_column, tag_column, encoding)
    normalised = [TaggedSentence(s.tokens, tuple(iob_to_iob2(s.tags))) for s in sentences]
    prefixes = {tag[0] for s in sentences for tag in s.tags}
    if prefixes & {"E", "S"}:
        scheme = "IOBES"
    elif any(s.tags != n.tags for s, n in zip(sentences, normalised, strict=True)):
        scheme = "IOB1"
    else:
        scheme = "IOB2"
    return normalised, scheme


def _table_rows(path: Path, encoding: str = "utf-8") -> Iterator[tuple[int, dict[str, str]]]:
    """Yield ``(line_number, row)`` from a TSV, CSV or JSON-lines file (optionally gzip-compressed)."""
    suffixes = [s for s in path.suffixes if s != ".gz"]
    kind = suffixes[-1] if suffixes else ""
    if kind not in (".tsv", ".csv", ".jsonl"):
        raise DataFormatError(f"{path}: unknown table format {kind!r}; use .tsv, .csv or .jsonl (optionally .gz).")
    lines = text_lines(path, encoding)
    if kind == ".jsonl":
        for line_number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as error:
                raise DataFormatError(f"{path}:{line_number}: not valid JSON ({error.msg}).") from None
            if not isinstance(row, dict):
                raise DataFormatError(f"{path}:{line_number}: expected a JSON object per line.")
            yield line_number, {key: str(value) for key, value in row.items()}
        return
    reader = csv.reader(lines, delimiter="\t", quoting=csv.QUOTE_NONE) if kind == ".tsv" else csv.reader(lines)
    header = next(reader, None)
    if header is None:
        raise DataFormatError(f"{path}: the file is empty; a header line with column names is expected.")
    for fields in reader:
        line_number = reader.line_num
        if not fields:
            continue
        if len(fields) != len(header):
            raise DataFormatError(
                f"{path}:{line_number}: expected {len(header)} fields like the header {header}, got {len(fields)}."
            )
        yield line_number, dict(zip(header, fields, strict=True))


def read_table(
    path: str | Path,
    text_column: str = "sentence",
    label_column: str = "label",
    text_pair_column: str | None = None,
    encoding: str = "utf-8",
) -> list[LabelledText]:
    """Read labelled texts from a ``.tsv``, ``.csv`` or ``.jsonl`` file (plain or ``.gz``).

    TSV files are read without quote processing (as GLUE writes them); CSV uses standard quoting.
    """
    path = Path(path)
    examples: list[LabelledText] = []
    options = {"text_column": text_column, "label_column": label_column, "text_pair_column": text_pair_column}
    for line_number, row in _table_rows(path, encoding):
        for option, column in options.items():
            if column is not None and column not in row:
                raise DataFormatError(
                    f"{path}:{line_number}: no column {column!r} (from --data.{option}); columns are {sorted(row)}."
                )
        examples.append(
            LabelledText(
                text=row[text_column],
                label=row[label_column].strip(),
                text_pair=row[text_pair_column] if text_pair_column else None,
            )
        )
    if not examples:
        raise DataFormatError(f"{path}: no examples found.")
    return examples


def read_prompts(
    path: str | Path,
    text_column: str = "text",
    prompt_column: str = "prompt",
    completion_column: str = "completion",
    encoding: str = "utf-8",
) -> list[PromptCompletion]:
    """Causal-LM texts from a ``.jsonl``/``.tsv``/``.csv`` file (plain or ``.gz``): rows with ``prompt_column`` and
    ``completion_column``, or with ``text_column`` alone (then all of it is trained on)."""
    path = Path(path)
    examples = []
    for line_number, row in _table_rows(path, encoding):
        if prompt_column in row and completion_column in row:
            examples.append(PromptCompletion(row[prompt_column], row[completion_column]))
        elif text_column in row:
            examples.append(PromptCompletion("", row[text_column]))
        else:
            raise DataFormatError(
                f"{path}:{line_number}: no column {text_column!r} (--data.text_column) and not both of "
                f"{prompt_column!r} and {completion_column!r} (--data.prompt_column, --data.completion_column); "
                f"columns are {sorted(row)}."
            )
    if not examples:
        raise DataFormatError(f"{path}: no examples found.")
    return examples
