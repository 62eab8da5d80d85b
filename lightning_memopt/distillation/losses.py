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

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.autograd.function import once_differentiable

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
    return rows if keep is None else rows[keep.reshape(-1).bool()]


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


def _chunk_selections(rows: int, keep: Tensor | None, chunk_rows: int) -> list[slice | Tensor]:
    """The kept rows, ``chunk_rows`` at a time: a slice where a chunk's rows are contiguous (a view of the
    logits, no copy), a tensor of row indices where the mask leaves gaps."""
    if keep is None:
        return [slice(i, min(i + chunk_rows, rows)) for i in range(0, rows, chunk_rows)]
    kept = keep.nonzero().squeeze(1).tolist()  # one host sync, as boolean indexing does
    selections: list[slice | Tensor] = []
    for i in range(0, len(kept), chunk_rows):
        part = kept[i : i + chunk_rows]
        if part[-1] - part[0] + 1 == len(part):
            selections.append(slice(part[0], part[-1] + 1))
        else:
            selections.append(torch.tensor(part, device=keep.device))
    return selections


def _chunk_kl(
    student: Tensor,
    teacher: Tensor,
    temperature: float,
    top_k: int | None,
    grad_scale: float | None = None,
    work: Tensor | None = None,
) -> tuple[Tensor, Tensor | None]:
    """``_kl_rows`` of a chunk of rows and, with ``grad_scale``, ``grad_scale`` times its gradient w.r.t. ``student``.

    Float32 math whatever the logits' dtype. ``work`` (float32, shaped like ``student``, float32 ``student`` only)
    holds the student's scores and then the gradient, so that a float32 chunk of the gradient buffer costs no
    temporary. With ``z = s/T``, ``q = softmax(z)`` and ``p`` the teacher's (renormalised top-k) probabilities
    scattered over the classes, ``d KL / d s = (q·Σp - p) / T`` (``Σp`` is 1 but kept, as autograd keeps it): the
    student's normaliser reaches every class, top-k or not.
    """
    if work is not None:
        log_q = torch.div(student, temperature, out=work)
        log_q.copy_(F.log_softmax(log_q, -1))
    else:
        log_q = F.log_softmax(student.float() / temperature, -1)
    scores = teacher.float() / temperature
    index = None
    if top_k is not None and top_k < scores.shape[-1]:
        scores, index = scores.topk(top_k, dim=-1)
    log_p = F.log_softmax(scores, -1)
    del scores
    p = log_p.exp()
    kl = log_p.sub_(log_q if index is None else log_q.gather(-1, index)).mul_(p).sum()  # p · (log p - log q)
    del log_p
    if grad_scale is None:
        return kl, None
    grad = log_q.exp_().mul_(p.sum(-1, keepdim=True))
    if index is None:
        grad.sub_(p)
    else:
        grad.scatter_add_(-1, index, p.neg_())
    return kl, grad.mul_(grad_scale)


def _chunked_kl_sum(
    student: Tensor,
    teacher: Tensor,
    selections: list[slice | Tensor],
    temperature: float,
    top_k: int | None,
    grad: Tensor | None = None,
    grad_scale: float = 1.0,
) -> Tensor:
    """Summed KL over the selected rows of ``student``/``teacher`` ``[rows, C]`` (float32, chunk by chunk);
    with ``grad`` (``[rows, C]``, the logits' dtype, zero on unselected rows), each chunk's gradient times
    ``grad_scale`` is written into its rows."""
    total = torch.zeros((), dtype=torch.float32, device=student.device)
    for selection in selections:
        in_place = grad is not None and isinstance(selection, slice) and student.dtype == grad.dtype == torch.float32
        work = grad[selection] if in_place else None
        kl, chunk_grad = _chunk_kl(
            student[selection], teacher[selection], temperature, top_k, None if grad is None else grad_scale, work
        )
        total += kl
        if grad is not None and not in_place:
            if isinstance(selection, slice):
                grad[selection].copy_(chunk_grad)
            else:
                grad.index_copy_(0, selection, chunk_grad.to(grad.dtype))
        del chunk_grad
    return total


def handed_over(ctx: Any, grad_output: Tensor) -> tuple[Tensor | None, ...]:
    """The gradients a chunked loss's forward pass computed (``ctx.gradients``), scaled by ``grad_output`` in place and
    handed over: ``ctx`` drops them, so autograd takes them without a copy, and a second backward pass is refused."""
    gradients, ctx.gradients = ctx.gradients, None
    if gradients is None:
        raise RuntimeError(
            "The chunked KD loss hands its gradient over at the first backward pass; it cannot be backpropagated "
            "twice (retain_graph=True), compute the loss again instead."
        )
    return tuple(None if grad is None else grad.mul_(grad_output) for grad in gradients)


class ChunkedKL(torch.autograd.Function):
    """``T²/N · Σ KL`` over the selected rows, its gradient computed chunk by chunk in the forward pass.

    The forward pass writes the gradient w.r.t. the student logits into one tensor shaped like them (their
    dtype), so the float32 softmax temporaries exist for one chunk at a time; the tensor is kept on ``ctx`` as a
    plain attribute, and the backward pass scales it by ``grad_output`` in place and hands it over (``ctx``
    drops its reference), so autograd takes it without a copy, into a leaf's ``.grad`` too. One backward
    pass only: the gradient is handed over (``retain_graph`` for a second pass is refused). The teacher gets
    no gradient; double backward is not supported.
    """

    @staticmethod
    def forward(
        ctx: Any,
        student_logits: Tensor,
        teacher_logits: Tensor,
        temperature: float,
        selections: list[slice | Tensor],
        rows: int,
        top_k: int | None,
    ) -> Tensor:
        classes = student_logits.shape[-1]
        grad = torch.empty_like(student_logits, memory_format=torch.contiguous_format)
        if rows < grad.numel() // classes:
            grad.zero_()  # rows outside the mask get no gradient
        total = _chunked_kl_sum(
            student_logits.reshape(-1, classes),
            teacher_logits.reshape(-1, classes),
            selections,
            temperature,
            top_k,
            grad.view(-1, classes),
            temperature / rows,  # d(T²/N · KL)/d s = T²/N · (q·Σp - p)/T
        )
        ctx.gradients = (grad,)
        return total / rows * temperature**2

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad_output: Tensor) -> tuple[Tensor | None, ...]:
        (grad,) = handed_over(ctx, grad_output)
        return grad, None, None, None, None, None


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

    With ``chunk_rows``, the kept rows are taken ``chunk_rows`` at a time and the gradient w.r.t. the student
    logits is computed with the value (:class:`ChunkedKL`): the float32 softmax temporaries of a large
    vocabulary exist for one chunk at a time, and only the gradient, one tensor the size and dtype of the
    logits, is kept for the backward pass, which hands it to autograd without a copy. The same value and
    gradient as one pass (float32 math; in bfloat16 the gradient is rounded once more when the loss is
    scaled, e.g. by ``alpha``). Without gradient (``torch.no_grad``, validation) nothing but the chunks' own
    temporaries is allocated.
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
    keep = None if mask is None else mask.reshape(-1).bool()
    classes = student_logits.shape[-1]
    if keep is not None and keep.numel() * classes != student_logits.numel():
        raise ValueError(
            f"The mask {tuple(mask.shape)} must have one entry per position of the logits {tuple(student_logits.shape)}."
        )
    if chunk_rows is None:
        student = _flatten(student_logits, keep)
        rows = student.shape[0]
        if rows == 0:
            return student_logits.sum() * 0.0
        total = _kl_rows(student, _flatten(teacher_logits, keep).detach(), temperature, top_k)
        return total / rows * temperature**2
    positions = student_logits.numel() // classes
    rows = positions if keep is None else int(keep.sum())
    if rows == 0:
        return student_logits.sum() * 0.0
    selections = _chunk_selections(positions, keep, chunk_rows)
    teacher_logits = teacher_logits.detach()
    if torch.is_grad_enabled() and student_logits.requires_grad:
        return ChunkedKL.apply(student_logits, teacher_logits, temperature, selections, rows, top_k)
    total = _chunked_kl_sum(
        student_logits.reshape(-1, classes), teacher_logits.reshape(-1, classes), selections, temperature, top_k
    )
    return total / rows * temperature**2


class HeadChunkedKL(torch.autograd.Function):
    """``T²/N · Σ KL`` over the selected rows of the logits two linear heads make of hidden states, the logits
    made a chunk of rows at a time and the gradients (hidden states, head weight and bias) computed with them.

    The forward pass writes the student hidden states' gradient into one tensor shaped like them and adds each
    chunk's share of the weight's (and bias's) gradient into one float32 tensor shaped like the weight, so no
    full-sequence logits tensor, nor its gradient, ever exists. The backward pass scales them in place and hands
    them over (one backward pass only, as :class:`ChunkedKL`). The teacher's side gets no gradient.
    """

    @staticmethod
    def forward(
        ctx: Any,
        hidden: Tensor,
        weight: Tensor,
        bias: Tensor | None,
        teacher_hidden: Tensor,
        teacher_weight: Tensor,
        teacher_bias: Tensor | None,
        temperature: float,
        selections: list[slice | Tensor],
        rows: int,
        top_k: int | None,
    ) -> Tensor:
        grad_hidden = torch.zeros_like(hidden, memory_format=torch.contiguous_format)
        grad_weight = torch.zeros_like(weight, dtype=torch.float32)
        grad_bias = None if bias is None else torch.zeros_like(bias, dtype=torch.float32)
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        for selection in selections:
            chunk = hidden[selection]
            student = F.linear(chunk, weight, bias)
            teacher = F.linear(teacher_hidden[selection], teacher_weight, teacher_bias)
            kl, grad = _chunk_kl(student, teacher, temperature, top_k, temperature / rows)
            del student, teacher
            total += kl
            grad_hidden[selection] = (grad.to(weight.dtype) @ weight).to(hidden.dtype)
            grad_weight.addmm_(grad.t(), chunk.float())
            if grad_bias is not None:
                grad_bias += grad.sum(0)
            del grad
        ctx.gradients = (grad_hidden, grad_weight.to(weight.dtype), None if bias is None else grad_bias.to(bias.dtype))
        return total / rows * temperature**2

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad_output: Tensor) -> tuple[Tensor | None, ...]:
        hidden, weight, bias = handed_over(ctx, grad_output)
        return hidden, weight, bias, None, None, None, None, None, None, None


def head_chunked_kl(
    student_hidden: Tensor,
    student_head: nn.Linear,
    teacher_hidden: Tensor,
    teacher_head: nn.Linear,
    temperature: float = 1.0,
    mask: Tensor | None = None,
    chunk_rows: int = 256,
    top_k: int | None = None,
) -> Tensor:
    """:func:`soft_target_kl` of the logits ``student_head(student_hidden)`` and ``teacher_head(teacher_hidden)``
    (linear LM heads), without either full-sequence logits tensor or its gradient ever existing.

    The kept positions are taken ``chunk_rows`` at a time (:class:`HeadChunkedKL`): each chunk's logits, student
    and teacher, are made, scored and freed while the gradients of the student's hidden states and of its head's
    weight and bias (a head tied to the input embeddings included) are computed. So the loss's extra memory is
    one chunk of logits and its softmax temporaries, the hidden states' gradient and the head weight's gradient,
    which autograd takes over as the weight's ``.grad`` (any loss on the logits makes one); the logits route holds
    the logits' full gradient and the teacher's logits instead. Same value and gradients as the logits route.
    """
    if chunk_rows < 1:
        raise ValueError(f"chunk_rows must be a positive number of positions, got {chunk_rows}.")
    if student_hidden.shape[:-1] != teacher_hidden.shape[:-1]:
        raise ValueError(
            f"Student hidden states {tuple(student_hidden.shape)} and teacher hidden states "
            f"{tuple(teacher_hidden.shape)} cover different positions."
        )
    student_rows = student_hidden.reshape(-1, student_hidden.shape[-1])
    teacher_rows = teacher_hidden.detach().reshape(-1, teacher_hidden.shape[-1])
    keep = None if mask is None else mask.reshape(-1).bool()
    if keep is not None and keep.numel() != student_rows.shape[0]:
        raise ValueError(
            f"The mask {tuple(mask.shape)} must have one entry per position of the hidden states "
            f"{tuple(student_hidden.shape)}."
        )
    rows = student_rows.shape[0] if keep is None else int(keep.sum())
    if rows == 0:
        return student_rows.sum() * 0.0
    selections = _chunk_selections(student_rows.shape[0], keep, chunk_rows)
    teacher = (teacher_head.weight.detach(), None if teacher_head.bias is None else teacher_head.bias.detach())
    loss = HeadChunkedKL.apply(
        student_rows, student_head.weight, student_head.bias, teacher_rows, *teacher, temperature, selections, rows,
        top_k,
    )  # fmt: skip
    return loss


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
