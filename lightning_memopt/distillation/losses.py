"""Distillation losses as pure functions of logits, hidden states and attention maps.

The classic objective (Hinton et al., 2015) mixes the task loss with a soft-target term:

    loss = (1 - alpha) * CE(student, labels) + alpha * T**2 * KL(softmax(teacher / T) || softmax(student / T))

For token classification only positions with a label count (not padding, not ignored sub-tokens):
pass the labels with ``ignore_index`` there, or a ``mask``.

Example:
    >>> import torch
    >>> student, teacher = torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 1.0]])
    >>> parts = distillation_loss(student, teacher, torch.tensor([0]), alpha=0.5, temperature=2.0)
    >>> round(float(parts["kd"]), 4), round(float(parts["loss"]), 4)
    (0.4898, 0.4015)
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

IGNORE_INDEX = -100


def check_alpha_temperature(alpha: float, temperature: float) -> None:
    """Raise a ValueError naming the option when ``alpha`` is outside [0, 1] or ``temperature`` is not positive."""
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1] (the weight of the distillation term), got {alpha}.")
    if not temperature > 0.0:
        raise ValueError(f"temperature must be positive, got {temperature}.")


def _flatten(logits: Tensor, keep: Tensor | None) -> Tensor:
    """Rows of class scores at the kept positions: ``[N, C]`` from ``[..., C]``."""
    rows = logits.reshape(-1, logits.shape[-1])
    return rows if keep is None else rows[keep.reshape(-1)]


def position_mask(labels: Tensor, causal: bool, ignore_index: int = IGNORE_INDEX) -> Tensor:
    """Which logit positions the task loss counts: labelled tokens, or for a causal LM, the positions that
    predict a labelled next token (logits at ``t`` are scored against ``labels[t + 1]``, as the LM loss shifts them).

    >>> position_mask(torch.tensor([[-100, -100, 5, 6]]), causal=True).tolist()
    [[False, True, True, False]]
    >>> position_mask(torch.tensor([[-100, 3, 4]]), causal=False).tolist()
    [[False, True, True]]
    """
    if not causal:
        return labels != ignore_index
    mask = torch.zeros_like(labels, dtype=torch.bool)
    mask[..., :-1] = labels[..., 1:] != ignore_index
    return mask


def _kl_rows(student: Tensor, teacher: Tensor, temperature: float, top_k: int | None = None) -> Tensor:
    """Summed ``KL(softmax(t/T) ‖ softmax(s/T))`` over rows of logits (float32, whatever their dtype); with ``top_k``,
    over the teacher's ``k`` most likely classes, its distribution renormalised over them."""
    log_student = F.log_softmax(student.float() / temperature, -1)
    teacher = teacher.float() / temperature
    if top_k is not None and top_k < teacher.shape[-1]:
        teacher, index = teacher.topk(top_k, dim=-1)
        log_student = log_student.gather(-1, index)
    kl = F.kl_div(log_student, F.log_softmax(teacher, -1), log_target=True, reduction="none")
    return kl.sum()


def soft_target_kl(
    student_logits: Tensor,
    teacher_logits: Tensor,
    temperature: float = 1.0,
    mask: Tensor | None = None,
    chunk_rows: int | None = None,
    top_k: int | None = None,
) -> Tensor:
    """``T² · KL(softmax(t/T) ‖ softmax(s/T))``, averaged over positions (rows); masked rows are skipped.

    With ``top_k``, only the teacher's ``k`` most likely classes of each row count: the teacher's distribution
    renormalised over them against the student's log-probabilities of the same classes (sparse KD for large
    vocabularies: a teacher's top-k can be computed, stored or sent as ``k`` values per position).

    With ``chunk_rows``, the rows are taken ``chunk_rows`` at a time and the gradient is computed with the
    value (:class:`ChunkedKL`), so the float32 softmax temporaries of a large vocabulary exist for one chunk
    at a time and only the gradient, one logits-sized tensor, is kept for the backward pass: the same value
    and gradient as one pass.
    """
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(
            f"Student logits {tuple(student_logits.shape)} and teacher logits {tuple(teacher_logits.shape)} differ; "
            "teacher and student must predict the same labels."
        )
    if chunk_rows is not None and chunk_rows < 1:
        raise ValueError(f"chunk_rows must be a positive number of positions, got {chunk_rows}.")
    if top_k is not None and top_k < 1:
        raise ValueError(f"top_k must be a positive number of classes, got {top_k}.")
    student = _flatten(student_logits, mask)
    teacher = _flatten(teacher_logits, mask).detach()
    rows = student.shape[0]
    if rows == 0:
        return student_logits.sum() * 0.0
    if chunk_rows is None or rows <= chunk_rows:
        total = _kl_rows(student, teacher, temperature, top_k)
    else:
        from torch.utils.checkpoint import checkpoint

        total = sum(
            checkpoint(
                _kl_rows,
                student[i : i + chunk_rows],
                teacher[i : i + chunk_rows],
                temperature,
                top_k,
                use_reentrant=False,
            )
            for i in range(0, rows, chunk_rows)
        )
    return total / rows * temperature**2


def distillation_loss(
    student_logits: Tensor,
    teacher_logits: Tensor,
    labels: Tensor,
    alpha: float = 0.5,
    temperature: float = 2.0,
    ignore_index: int = IGNORE_INDEX,
) -> dict[str, Tensor]:
    """``{"loss", "ce", "kd"}``: the mixed objective and its two parts (for logging them apart)."""
    check_alpha_temperature(alpha, temperature)
    keep = labels != ignore_index
    ce = F.cross_entropy(
        student_logits.reshape(-1, student_logits.shape[-1]).float(), labels.reshape(-1), ignore_index=ignore_index
    )
    kd = soft_target_kl(student_logits, teacher_logits, temperature, keep)
    return {"loss": (1 - alpha) * ce + alpha * kd, "ce": ce, "kd": kd}


def hidden_state_mse(
    student_hidden: Tensor,
    teacher_hidden: Tensor,
    projection: torch.nn.Module | None = None,
    mask: Tensor | None = None,
) -> Tensor:
    """Mean squared error between hidden states ``[B, L, H]`` at the kept positions (``mask`` ``[B, L]``).

    When widths differ, ``projection`` (e.g. ``nn.Linear(student_width, teacher_width)``) maps the student first.
    """
    if projection is not None:
        student_hidden = projection(student_hidden)
    if student_hidden.shape != teacher_hidden.shape:
        raise ValueError(
            f"Hidden states {tuple(student_hidden.shape)} (student) and {tuple(teacher_hidden.shape)} (teacher) "
            "differ; give a projection from the student's width to the teacher's."
        )
    error = (student_hidden.float() - teacher_hidden.float()).pow(2).mean(-1)
    return error.mean() if mask is None else error[mask.bool()].mean()


def attention_kl(student_attention: Tensor, teacher_attention: Tensor, mask: Tensor | None = None) -> Tensor:
    """KL(teacher ‖ student) between attention distributions ``[B, heads, L, L]``, MiniLM-style.

    Averaged over heads and over the query positions that ``mask`` (``[B, L]``) keeps.
    """
    if student_attention.shape != teacher_attention.shape:
        raise ValueError(
            f"Attention maps {tuple(student_attention.shape)} (student) and {tuple(teacher_attention.shape)} "
            "(teacher) differ; attention transfer needs the same number of heads and positions."
        )
    eps = torch.finfo(torch.float32).tiny
    teacher = teacher_attention.float().clamp_min(eps)
    student = student_attention.float().clamp_min(eps)
    kl = (teacher * (teacher.log() - student.log())).sum(-1)  # [B, heads, L]
    if mask is None:
        return kl.mean()
    keep = mask.bool().unsqueeze(1).expand_as(kl)
    return kl[keep].mean()
