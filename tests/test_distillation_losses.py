"""Distillation losses against values computed by hand."""

from __future__ import annotations

import math

import pytest
import torch

from lightning_memopt.distillation import (
    attention_kl,
    distillation_loss,
    head_chunked_kl,
    hidden_state_mse,
    soft_target_kl,
)


def softmax(values: list[float]) -> list[float]:
    exps = [math.exp(v) for v in values]
    return [e / sum(exps) for e in exps]


def kl(p: list[float], q: list[float]) -> float:
    return sum(pi * math.log(pi / qi) for pi, qi in zip(p, q, strict=True))


def test_soft_target_kl_by_hand() -> None:
    student, teacher, temperature = [2.0, 0.5, -1.0], [0.0, 1.0, 3.0], 3.0
    expected = temperature**2 * kl(
        softmax([t / temperature for t in teacher]), softmax([s / temperature for s in student])
    )
    value = soft_target_kl(torch.tensor([student]), torch.tensor([teacher]), temperature)
    assert float(value) == pytest.approx(expected, rel=1e-6)


def test_mixed_loss_only_at_labelled_positions() -> None:
    # One sentence of three positions; the middle one is an ignored sub-token, the last is padding.
    student = torch.tensor([[[2.0, 0.0], [9.0, -9.0], [0.3, 0.1]]])
    teacher = torch.tensor([[[0.0, 1.0], [-9.0, 9.0], [5.0, 5.0]]])
    labels = torch.tensor([[1, -100, -100]])
    alpha, temperature = 0.25, 2.0
    ce = -math.log(softmax([2.0, 0.0])[1])
    kd = temperature**2 * kl(softmax([0.0, 0.5]), softmax([1.0, 0.0]))
    parts = distillation_loss(student, teacher, labels, alpha=alpha, temperature=temperature)
    assert float(parts["ce"]) == pytest.approx(ce, rel=1e-6)
    assert float(parts["kd"]) == pytest.approx(kd, rel=1e-6)
    assert float(parts["loss"]) == pytest.approx((1 - alpha) * ce + alpha * kd, rel=1e-6)


def test_alpha_and_temperature_are_checked() -> None:
    logits, labels = torch.zeros(1, 2), torch.zeros(1, dtype=torch.long)
    with pytest.raises(ValueError, match=r"alpha must be in \[0, 1\]"):
        distillation_loss(logits, logits, labels, alpha=1.5)
    with pytest.raises(ValueError, match="temperature must be positive"):
        distillation_loss(logits, logits, labels, temperature=0.0)
    with pytest.raises(ValueError, match="same labels"):
        soft_target_kl(torch.zeros(1, 2), torch.zeros(1, 3))


def test_hidden_state_mse_with_projection_and_mask() -> None:
    student = torch.tensor([[[1.0, 2.0], [3.0, 4.0]]])
    teacher = torch.tensor([[[1.0, 2.0, 0.0], [0.0, 0.0, 0.0]]])
    projection = torch.nn.Linear(2, 3, bias=False)
    with torch.no_grad():
        projection.weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.0, 0.0]]))
    assert float(hidden_state_mse(student, teacher, projection, mask=torch.tensor([[1, 0]]))) == 0.0
    assert float(hidden_state_mse(student, teacher, projection)) == pytest.approx((0 + (9 + 16) / 3) / 2)
    with pytest.raises(ValueError, match="give a projection"):
        hidden_state_mse(student, teacher)


def test_attention_kl_by_hand() -> None:
    teacher = torch.tensor([[[[0.5, 0.5], [0.9, 0.1]]]])  # [B=1, heads=1, L=2, L=2]
    student = torch.tensor([[[[0.25, 0.75], [0.5, 0.5]]]])
    rows = [kl([0.5, 0.5], [0.25, 0.75]), kl([0.9, 0.1], [0.5, 0.5])]
    assert float(attention_kl(student, teacher)) == pytest.approx(sum(rows) / 2, rel=1e-6)
    assert float(attention_kl(student, teacher, mask=torch.tensor([[1, 0]]))) == pytest.approx(rows[0], rel=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(("temperature", "top_k", "masked"), [(2.0, None, True), (1.0, 8, False), (3.0, 5, True)])
def test_the_chunked_kd_loss_has_the_same_value_and_gradient(
    dtype: torch.dtype, temperature: float, top_k: int | None, masked: bool
) -> None:
    torch.manual_seed(0)
    student = (3 * torch.randn(2, 37, 50)).to(dtype).requires_grad_()
    teacher = (3 * torch.randn(2, 37, 50)).to(dtype)
    mask = torch.rand(2, 37) > 0.3 if masked else None  # kept rows in runs and with gaps: slices and index chunks
    whole = soft_target_kl(student, teacher, temperature, mask, top_k=top_k)
    (grad_whole,) = torch.autograd.grad(whole, student)
    chunked = soft_target_kl(student, teacher, temperature, mask, chunk_rows=8, top_k=top_k)
    assert type(chunked.grad_fn).__name__ == "ChunkedKLBackward"
    (grad_chunked,) = torch.autograd.grad(chunked, student)
    assert chunked.dtype == whole.dtype == torch.float32 and grad_chunked.dtype == dtype
    assert math.isclose(float(chunked), float(whole), rel_tol=1e-6)
    scale = float(grad_whole.float().abs().max())
    if dtype == torch.float32:  # float32 math both ways: the same up to rounding
        torch.testing.assert_close(grad_chunked, grad_whole, rtol=1e-6, atol=1e-6 * scale)
    else:  # the same float32 gradient rounded to bfloat16: at most one bfloat16 step apart
        torch.testing.assert_close(grad_chunked.float(), grad_whole.float(), rtol=2**-7, atol=2**-8 * scale)
    if mask is not None:
        assert not grad_chunked[~mask].any()
    with torch.no_grad():  # validation: the value alone, no gradient buffer, no graph
        value = soft_target_kl(student, teacher, temperature, mask, chunk_rows=8, top_k=top_k)
    assert value.grad_fn is None and math.isclose(float(value), float(whole), rel_tol=1e-6)


def test_the_chunked_kd_loss_through_an_lm_head_and_a_weight() -> None:
    # Non-leaf logits (an LM head's output), a loss scaled by alpha and added to another: the gradients reaching
    # the head's input and weight are those of one pass.
    torch.manual_seed(0)
    states, weight = torch.randn(1, 30, 16, requires_grad=True), torch.randn(16, 64, requires_grad=True)
    teacher, mask = torch.randn(1, 30, 64), torch.rand(1, 30) > 0.2
    grads = []
    for chunk_rows in (None, 7):
        logits = states @ weight
        kd = soft_target_kl(logits, teacher, 2.0, mask, chunk_rows=chunk_rows, top_k=10)
        total = 0.3 * kd + 0.7 * logits.float().logsumexp(-1).mean()
        grads.append(torch.autograd.grad(total, (states, weight)))
    for one_pass, chunked in zip(*grads, strict=True):
        torch.testing.assert_close(chunked, one_pass, rtol=1e-5, atol=1e-6 * float(one_pass.abs().max()))


@pytest.mark.parametrize("tied", [False, True], ids=["own head", "head tied to the embeddings"])
def test_the_head_chunked_kd_loss_equals_the_loss_on_the_heads_logits(tied: bool) -> None:
    # hidden states and LM heads in, never the logits: the same value and the same gradients (hidden states, head
    # weight and bias; a head tied to an embedding gets its gradient through both uses) as the loss on the logits
    torch.manual_seed(0)
    embedding = torch.nn.Embedding(64, 16)
    head, teacher_head = torch.nn.Linear(16, 64, bias=not tied), torch.nn.Linear(24, 64)
    if tied:
        head.weight = embedding.weight
    ids, teacher_hidden = torch.randint(0, 64, (2, 15)), torch.randn(2, 15, 24)
    mask = torch.rand(2, 15) > 0.2
    params = list({*embedding.parameters(), *head.parameters()})
    results = []
    for fused in (False, True):
        hidden = embedding(ids) * 1.5  # a non-leaf body output
        if fused:
            kd = head_chunked_kl(hidden, head, teacher_hidden, teacher_head, 2.0, mask, chunk_rows=4, top_k=10)
        else:
            kd = soft_target_kl(head(hidden), teacher_head(teacher_hidden).detach(), 2.0, mask, top_k=10)
        total = 0.3 * kd + 0.7 * head(hidden).logsumexp(-1).mean()  # beside another loss on the same head
        results.append((kd.detach(), torch.autograd.grad(total, params)))
    torch.testing.assert_close(results[1][0], results[0][0], rtol=1e-6, atol=0)
    for one_pass, chunked in zip(results[0][1], results[1][1], strict=True):
        torch.testing.assert_close(chunked, one_pass, rtol=1e-5, atol=1e-6 * float(one_pass.abs().max()))
    assert all(p.grad is None for p in teacher_head.parameters())  # the teacher's head is never trained
    nothing = head_chunked_kl(hidden, head, teacher_hidden, teacher_head, mask=torch.zeros(2, 15, dtype=torch.bool))
    assert float(nothing) == 0.0
    with pytest.raises(ValueError, match="cover different positions"):
        head_chunked_kl(hidden, head, teacher_hidden[:, :3], teacher_head)


def test_the_chunked_kd_backward_hands_its_gradient_buffer_over() -> None:
    # The gradient written in the forward pass reaches a leaf's .grad as the same storage (autograd steals a
    # gradient nothing else references), scaled in place; the loss keeps no reference to it afterwards.
    torch.manual_seed(0)
    student, teacher = torch.randn(3, 11, 40, requires_grad=True), torch.randn(3, 11, 40)
    kd = soft_target_kl(student, teacher, 2.0, torch.rand(3, 11) > 0.3, chunk_rows=4)
    (buffer,) = kd.grad_fn.gradients
    expected = 0.5 * buffer.clone()
    address = buffer.data_ptr()
    del buffer
    (0.5 * kd).backward()
    assert student.grad.data_ptr() == address and torch.equal(student.grad, expected)
    assert kd.grad_fn.gradients is None
    again = soft_target_kl(student, teacher, 2.0, chunk_rows=4)
    again.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="hands its gradient over"):
        again.backward()


def test_the_chunked_kd_loss_edge_cases() -> None:
    student, teacher = torch.randn(2, 5, 7, requires_grad=True), torch.randn(2, 5, 7)
    nothing = soft_target_kl(student, teacher, 2.0, torch.zeros(2, 5, dtype=torch.bool), chunk_rows=3)
    assert float(nothing) == 0.0
    nothing.backward()
    assert not student.grad.any()
    # an integer mask counts as a boolean one (not as row indices)
    as_int = soft_target_kl(student, teacher, 2.0, torch.tensor([[1, 0, 1, 1, 0], [0, 1, 1, 0, 0]]), chunk_rows=2)
    as_bool = soft_target_kl(student, teacher, 2.0, torch.tensor([[1, 0, 1, 1, 0], [0, 1, 1, 0, 0]]).bool())
    assert math.isclose(float(as_int), float(as_bool), rel_tol=1e-6)
    with pytest.raises(ValueError, match="one entry per position"):
        soft_target_kl(student, teacher, 2.0, torch.ones(2, 4, dtype=torch.bool), chunk_rows=2)
    with pytest.raises(ValueError, match="chunk_rows must be a positive"):
        soft_target_kl(student, teacher, 2.0, chunk_rows=0)


def test_top_k_kd_uses_the_teachers_k_likeliest_classes_renormalised() -> None:
    student, teacher = [0.5, 1.0, -1.0, 2.0], [3.0, 1.0, 0.0, -2.0]
    temperature = 2.0
    s = torch.log_softmax(torch.tensor(student) / temperature, -1).tolist()
    top = [0, 1]  # the teacher's two likeliest classes
    q = softmax([teacher[i] / temperature for i in top])
    by_hand = temperature**2 * sum(qi * (math.log(qi) - s[i]) for qi, i in zip(q, top, strict=True))
    value = soft_target_kl(torch.tensor([student]), torch.tensor([teacher]), temperature, top_k=2)
    assert math.isclose(float(value), by_hand, rel_tol=1e-5)
    full = soft_target_kl(torch.tensor([student]), torch.tensor([teacher]), temperature)
    assert torch.allclose(soft_target_kl(torch.tensor([student]), torch.tensor([teacher]), temperature, top_k=4), full)
    # chunked or not, the same value and gradient
    torch.manual_seed(0)
    logits, targets = torch.randn(6, 5, 50, requires_grad=True), torch.randn(6, 5, 50)
    one = soft_target_kl(logits, targets, 2.0, top_k=8)
    (grad_one,) = torch.autograd.grad(one, logits)
    chunked = soft_target_kl(logits, targets, 2.0, chunk_rows=7, top_k=8)
    (grad_chunked,) = torch.autograd.grad(chunked, logits)
    assert torch.allclose(one, chunked) and torch.allclose(grad_one, grad_chunked, atol=1e-7)
    with pytest.raises(ValueError, match="top_k must be a positive"):
        soft_target_kl(logits, targets, top_k=0)
