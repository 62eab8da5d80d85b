"""Checks that a teacher can teach a student, run before training: labels, vocabulary, tokenization.

Each raises a ``ValueError`` that says what differs and what to do.

Example:
    >>> from transformers import BertConfig
    >>> check_labels(BertConfig(num_labels=3), BertConfig(num_labels=2))
    Traceback (most recent call last):
    ...
    ValueError: The teacher predicts 3 labels and the student 2; distill from a teacher fine-tuned on the same label set.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

PROBE_TEXT = "Distillation probe: EU rejects German call to boycott British lamb, says Müller (1996)."


def label_names(config: Any) -> list[str] | None:
    """Label names from a HF config, or ``None`` when they are the generated ``LABEL_i`` defaults."""
    id2label = getattr(config, "id2label", None) or {}
    names = [id2label[i] for i in sorted(id2label)]
    return None if all(name == f"LABEL_{i}" for i, name in enumerate(names)) else names


def check_labels(teacher_config: Any, student_config: Any, student_labels: Sequence[str] | None = None) -> None:
    """Same number of labels, and the same names in the same order where both sides name them."""
    if teacher_config.num_labels != student_config.num_labels:
        raise ValueError(
            f"The teacher predicts {teacher_config.num_labels} labels and the student {student_config.num_labels}; "
            "distill from a teacher fine-tuned on the same label set."
        )
    teacher_names = label_names(teacher_config)
    student_names = list(student_labels or label_names(student_config) or []) or None
    if teacher_names and student_names and teacher_names != student_names:
        raise ValueError(
            f"Teacher labels {teacher_names} and student labels {student_names} differ (names or order); "
            "the soft targets would teach the wrong classes. Use the teacher's label list for the student."
        )


def check_vocabulary(teacher_config: Any, student_config: Any) -> None:
    """Same vocabulary size (a cheap first sign of a shared tokenizer)."""
    teacher_vocab = getattr(teacher_config, "vocab_size", None)
    student_vocab = getattr(student_config, "vocab_size", None)
    if teacher_vocab and student_vocab and teacher_vocab != student_vocab:
        raise ValueError(
            f"The teacher's vocabulary has {teacher_vocab} tokens and the student's {student_vocab}: they "
            "tokenize differently, so the teacher would see other inputs. Use a teacher and student that share "
            "a tokenizer."
        )


def check_tokenizers(teacher_tokenizer: Any, student_tokenizer: Any) -> None:
    """Both tokenizers turn a probe text into the same ids."""
    teacher_ids = teacher_tokenizer(PROBE_TEXT)["input_ids"]
    student_ids = student_tokenizer(PROBE_TEXT)["input_ids"]
    if teacher_ids != student_ids:
        raise ValueError(
            "The teacher and the student tokenize the probe text differently "
            f"({teacher_tokenizer.convert_ids_to_tokens(teacher_ids)[:12]} vs "
            f"{student_tokenizer.convert_ids_to_tokens(student_ids)[:12]}); the teacher would see other inputs. "
            "Use a teacher and student that share a tokenizer."
        )
