"""Tests for the lean loss variants (chunked, fused, top-k) against the exact generalized_jsd_loss.

The exact loss and autograd through it are the reference for values and student gradients; the
top-k loss with K < V is checked against a float64 reference written from its definition.
"""

import pytest
import torch

from gkd.loss import (
    TeacherTopK,
    chunked_generalized_jsd_loss,
    fused_generalized_jsd_loss,
    generalized_jsd_loss,
    teacher_topk,
    topk_generalized_jsd_loss,
)

BETAS = [0.0, 0.1, 0.5, 0.9, 1.0]
TEMPERATURES = [1.0, 0.7]
REDUCTIONS = ["batchmean", "sum", "none"]
INF = float("inf")
CHUNK = 4


def _labels(layout, shape, seed=0):
    """Labels of a given shape whose counted positions make the layout named."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, 5, shape, generator=g)
    flat = labels.view(-1)
    if layout == "ragged":  # 13 counted positions: not a multiple of CHUNK, a masked run > CHUNK
        flat[2:8] = -100
        flat[-2:] = -100
    elif layout == "single":
        flat[:] = -100
        flat[5] = 3
    elif layout == "none_counted":
        flat[:] = -100
    elif layout == "no_labels":
        return None
    return labels


def _logits(shape, seed, scale=3.0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=g, dtype=torch.float64) * scale).to(dtype)


def _grad_output(loss, reduction, seed=5):
    if reduction != "none":
        return torch.tensor(0.75, dtype=loss.dtype)
    g = torch.Generator().manual_seed(seed)
    return torch.randn(loss.shape, generator=g, dtype=torch.float64).to(loss.dtype)


def _value_and_grads(fn, inputs, reduction, **kwargs):
    """fn(*inputs, **kwargs) and its gradients w.r.t. the arguments that require grad."""
    loss = fn(*inputs, reduction=reduction, **kwargs)
    wrt = [x for x in (*inputs, *kwargs.values())
           if isinstance(x, torch.Tensor) and x.requires_grad]
    grads = torch.autograd.grad(loss, wrt, _grad_output(loss, reduction))
    return loss, grads


def _assert_matches(got, want, rtol=1e-5, atol=1e-6):
    torch.testing.assert_close(got, want, rtol=rtol, atol=atol, equal_nan=False)


# ============================================================================= chunked
@pytest.mark.parametrize("layout", ["ragged", "single", "none_counted", "no_labels"])
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("temperature", TEMPERATURES)
@pytest.mark.parametrize("beta", BETAS)
def test_chunked_matches_exact(beta, temperature, reduction, layout):
    shape = (3, 7, 33)  # 21 positions
    student = _logits(shape, 1).requires_grad_()
    teacher = _logits(shape, 2)
    labels = _labels(layout, shape[:-1])
    kwargs = dict(beta=beta, temperature=temperature)
    want, (want_g,) = _value_and_grads(generalized_jsd_loss, (student, teacher, labels),
                                       reduction, **kwargs)
    got, (got_g,) = _value_and_grads(chunked_generalized_jsd_loss, (student, teacher, labels),
                                     reduction, chunk_size=CHUNK, **kwargs)
    assert got.dtype == want.dtype and got.shape == want.shape
    _assert_matches(got, want)
    assert got_g.dtype == student.dtype
    _assert_matches(got_g, want_g)


@pytest.mark.parametrize("chunk_size", [1, 3, 7, 64])
def test_chunked_chunk_sizes(chunk_size):
    student, teacher = _logits((2, 5, 9), 3).requires_grad_(), _logits((2, 5, 9), 4)
    labels = _labels("ragged", (2, 5))
    want, want_g = _value_and_grads(generalized_jsd_loss, (student, teacher, labels), "sum")
    got, got_g = _value_and_grads(chunked_generalized_jsd_loss, (student, teacher, labels), "sum",
                                  chunk_size=chunk_size)
    _assert_matches(got, want)
    _assert_matches(got_g[0], want_g[0])


# ---------------------------------------------------------------- -inf logits
def _neg_inf_case(where):
    """Logits with -inf entries on the student side, the teacher side or shared by both (and an
    ignored row that is all -inf, which must not matter)."""
    student, teacher = _logits((2, 4, 11), 6), _logits((2, 4, 11), 7)
    if where in ("both", "student"):
        student[0, :, :3] = -INF
    if where in ("both", "teacher"):
        teacher[0, :, 2:5] = -INF
    if where == "both":  # shared entries only
        teacher[0, :, :2] = student[0, :, 3:5] = -INF
    student[1, 3], teacher[1, 3] = -INF, -INF
    labels = torch.ones(2, 4, dtype=torch.long)
    labels[1, 3] = -100
    return student.requires_grad_(), teacher, labels


# where the exact loss is finite: KL(P||Q) needs q > 0 where p > 0, KL(Q||P) the converse
FINITE_NEG_INF = [(b, w) for b in BETAS for w in ("both", "student", "teacher")
                  if not (b == 0.0 and w == "student") and not (b == 1.0 and w == "teacher")]


@pytest.mark.parametrize("reduction", ["sum", "none"])
@pytest.mark.parametrize("beta,where", FINITE_NEG_INF)
def test_chunked_neg_inf_logits(beta, where, reduction):
    student, teacher, labels = _neg_inf_case(where)
    want, (want_g,) = _value_and_grads(generalized_jsd_loss, (student, teacher, labels), reduction,
                                       beta=beta, temperature=0.7)
    got, (got_g,) = _value_and_grads(chunked_generalized_jsd_loss, (student, teacher, labels),
                                     reduction, beta=beta, temperature=0.7, chunk_size=3)
    assert torch.isfinite(got).all() and torch.isfinite(got_g).all()
    _assert_matches(got, want)
    _assert_matches(got_g, want_g)


@pytest.mark.parametrize("beta,where", [(0.0, "student"), (1.0, "teacher")])
def test_chunked_unsupported_support_is_inf_like_exact(beta, where):
    student, teacher, labels = _neg_inf_case(where)
    got = chunked_generalized_jsd_loss(student, teacher, labels, beta=beta, reduction="none")
    want = generalized_jsd_loss(student, teacher, labels, beta=beta, reduction="none")
    assert torch.equal(torch.isinf(got), torch.isinf(want)) and torch.isinf(got).any()


# ---------------------------------------------------------------- dtypes
@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0])
def test_chunked_bfloat16_close_to_float32(beta):
    student, teacher = _logits((2, 6, 40), 8, dtype=torch.bfloat16), _logits((2, 6, 40), 9)
    teacher = teacher.bfloat16()
    labels = _labels("ragged", (2, 6))
    s32 = student.float().requires_grad_()
    want, (want_g,) = _value_and_grads(generalized_jsd_loss, (s32, teacher.float(), labels),
                                       "batchmean", beta=beta)
    student.requires_grad_()
    got, (got_g,) = _value_and_grads(chunked_generalized_jsd_loss, (student, teacher, labels),
                                     "batchmean", beta=beta, chunk_size=CHUNK)
    assert got.dtype == torch.float32 and got_g.dtype == torch.bfloat16
    _assert_matches(got, want, rtol=1e-2, atol=1e-2)
    _assert_matches(got_g.float(), want_g, rtol=1e-2, atol=1e-3)


def test_chunked_float64_stays_float64():
    student, teacher = _logits((2, 3, 5), 10, dtype=torch.float64), _logits((2, 3, 5), 11)
    assert chunked_generalized_jsd_loss(student, teacher).dtype == torch.float64


# ---------------------------------------------------------------- autograd behaviour
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("beta", [0.0, 0.3, 1.0])
def test_chunked_gradcheck(beta, reduction):
    student = _logits((2, 3, 5), 12, scale=1.0, dtype=torch.float64).requires_grad_()
    teacher = _logits((2, 3, 5), 13, scale=1.0, dtype=torch.float64)
    labels = torch.tensor([[1, -100, 2], [0, 1, 1]])
    assert torch.autograd.gradcheck(
        lambda s: chunked_generalized_jsd_loss(s, teacher, labels, beta=beta, temperature=0.7,
                                               reduction=reduction, chunk_size=2),
        (student,),
    )


def test_chunked_backward_twice_with_retained_graph():
    student, teacher = _logits((2, 3, 5), 14).requires_grad_(), _logits((2, 3, 5), 15)
    loss = chunked_generalized_jsd_loss(student, teacher, chunk_size=2)
    (2 * loss).backward(retain_graph=True)
    first = student.grad.clone()
    loss.backward()  # must see the unscaled gradient, not the one scaled by 2 in the first pass
    _assert_matches(student.grad, 1.5 * first)


def test_chunked_teacher_gets_no_gradient_and_no_grad_mode_works():
    student, teacher = _logits((2, 3, 5), 16).requires_grad_(), _logits((2, 3, 5), 17)
    teacher.requires_grad_()
    chunked_generalized_jsd_loss(student, teacher).backward()
    assert teacher.grad is None and student.grad is not None
    with torch.no_grad():
        value = chunked_generalized_jsd_loss(student, teacher)
    _assert_matches(value, generalized_jsd_loss(student, teacher).detach())


def test_no_gradient_work_under_no_grad(monkeypatch):
    import gkd.loss

    asked = []
    exact_rows = gkd.loss._jsd_rows
    monkeypatch.setattr(gkd.loss, "_jsd_rows",
                        lambda s, t, beta, want_grad, spare: asked.append(want_grad)
                        or exact_rows(s, t, beta, want_grad, spare))
    s_hidden, s_weight, t_hidden, t_weight, _, _ = _fused_case(4, 5, False, torch.float32)
    student = _logits((2, 3, 5), 18).requires_grad_()
    with torch.no_grad():  # the inputs require grad, but no graph is recorded
        chunked_generalized_jsd_loss(student, _logits((2, 3, 5), 19))
        fused_generalized_jsd_loss(s_hidden, s_weight, t_hidden, t_weight)
    assert asked == [False, False]


@pytest.mark.parametrize(
    "kwargs,match",
    [(dict(beta=1.5), "beta"), (dict(temperature=0.0), "temperature"),
     (dict(reduction="mean"), "reduction"), (dict(chunk_size=0), "chunk_size"),
     (dict(labels=torch.zeros(2, 4, dtype=torch.long)), "labels")],
)
def test_chunked_invalid_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        chunked_generalized_jsd_loss(torch.randn(2, 3, 5), torch.randn(2, 3, 5), **kwargs)
    with pytest.raises(ValueError, match="same shape"):
        chunked_generalized_jsd_loss(torch.randn(2, 3, 5), torch.randn(2, 3, 6))


# ============================================================================= fused
def _fused_case(h_s, h_t, bias, dtype=torch.float64, vocab=13, positions=(2, 5), seed=20):
    s_hidden = _logits((*positions, h_s), seed, 1.0, dtype).requires_grad_()
    s_weight = _logits((vocab, h_s), seed + 1, 1.0, dtype).requires_grad_()
    t_hidden = _logits((*positions, h_t), seed + 2, 1.0, dtype)
    t_weight = _logits((vocab, h_t), seed + 3, 1.0, dtype)
    s_bias = _logits((vocab,), seed + 4, 1.0, dtype).requires_grad_() if bias else None
    t_bias = _logits((vocab,), seed + 5, 1.0, dtype) if bias else None
    return s_hidden, s_weight, t_hidden, t_weight, s_bias, t_bias


def _explicit_projections(s_hidden, s_weight, t_hidden, t_weight, labels=None, *,
                          student_lm_head_bias=None, teacher_lm_head_bias=None, **kwargs):
    """The exact loss of the explicitly projected logits: the fused loss's reference."""
    student = torch.nn.functional.linear(s_hidden, s_weight, student_lm_head_bias)
    teacher = torch.nn.functional.linear(t_hidden, t_weight, teacher_lm_head_bias)
    return generalized_jsd_loss(student, teacher, labels, **kwargs)


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("beta", BETAS)
def test_fused_matches_exact_of_projections(beta, reduction, bias):
    s_hidden, s_weight, t_hidden, t_weight, s_bias, t_bias = _fused_case(6, 9, bias,
                                                                         torch.float32)
    labels = _labels("ragged", (2, 5))
    inputs = (s_hidden, s_weight, t_hidden, t_weight, labels)
    kwargs = dict(beta=beta, temperature=0.7, student_lm_head_bias=s_bias,
                  teacher_lm_head_bias=t_bias)
    want, want_g = _value_and_grads(_explicit_projections, inputs, reduction, **kwargs)
    got, got_g = _value_and_grads(fused_generalized_jsd_loss, inputs, reduction, chunk_size=3,
                                  **kwargs)
    assert got.shape == want.shape and len(got_g) == (3 if bias else 2)
    _assert_matches(got, want)
    for g, w in zip(got_g, want_g):
        _assert_matches(g, w)


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("beta", [0.0, 0.3, 1.0])
def test_fused_gradcheck(beta, reduction):
    s_hidden, s_weight, t_hidden, t_weight, s_bias, t_bias = _fused_case(3, 4, True, vocab=5,
                                                                         positions=(2, 2))
    labels = torch.tensor([[1, -100], [0, 1]])
    assert torch.autograd.gradcheck(
        lambda h, w, b: fused_generalized_jsd_loss(
            h, w, t_hidden, t_weight, labels, beta=beta, temperature=0.7, reduction=reduction,
            chunk_size=2, student_lm_head_bias=b, teacher_lm_head_bias=t_bias),
        (s_hidden, s_weight, s_bias),
    )


def test_fused_bfloat16_close_to_float32():
    case = _fused_case(8, 8, True, torch.float32, vocab=40)
    labels = _labels("ragged", (2, 5))
    want = _explicit_projections(*case[:4], labels, student_lm_head_bias=case[4],
                                 teacher_lm_head_bias=case[5])
    want_g = torch.autograd.grad(want, case[:2])
    low = [x.detach().bfloat16().requires_grad_(x.requires_grad) for x in case]
    got = fused_generalized_jsd_loss(*low[:4], labels, chunk_size=3,
                                     student_lm_head_bias=low[4], teacher_lm_head_bias=low[5])
    got_g = torch.autograd.grad(got, low[:2])
    assert got.dtype == torch.float32
    assert [g.dtype for g in got_g] == [torch.bfloat16, torch.bfloat16]
    _assert_matches(got, want, rtol=1e-2, atol=1e-2)
    for g, w in zip(got_g, want_g):
        _assert_matches(g.float(), w, rtol=2e-2, atol=2e-3)


def test_fused_under_autocast_with_float32_head():
    # mixed precision: bf16 hidden states, float32 master weights, the matmuls autocast to bf16
    s_hidden, s_weight, t_hidden, t_weight, _, _ = _fused_case(8, 8, False, torch.float32)
    want, want_g = _value_and_grads(_explicit_projections, (s_hidden, s_weight, t_hidden, t_weight),
                                    "batchmean")
    low_hidden = s_hidden.detach().bfloat16().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got, got_g = _value_and_grads(fused_generalized_jsd_loss,
                                      (low_hidden, s_weight, t_hidden.bfloat16(), t_weight),
                                      "batchmean", chunk_size=3)
    assert [g.dtype for g in got_g] == [torch.bfloat16, torch.float32]
    _assert_matches(got, want, rtol=1e-2, atol=1e-2)
    for g, w in zip(got_g, want_g):
        _assert_matches(g.float(), w, rtol=2e-2, atol=2e-3)


def test_fused_frozen_head_and_retained_graph():
    s_hidden, s_weight, t_hidden, t_weight, _, _ = _fused_case(4, 5, False, torch.float32)
    s_weight.requires_grad_(False)
    t_hidden.requires_grad_()
    loss = fused_generalized_jsd_loss(s_hidden, s_weight, t_hidden, t_weight, chunk_size=3)
    loss.backward(retain_graph=True)
    first = s_hidden.grad.clone()
    loss.backward()
    _assert_matches(s_hidden.grad, 2 * first)
    assert s_weight.grad is None and t_hidden.grad is None


def test_fused_invalid_arguments():
    s_hidden, s_weight, t_hidden, t_weight, _, _ = _fused_case(4, 5, False, torch.float32)
    with pytest.raises(ValueError, match="vocabularies differ"):
        fused_generalized_jsd_loss(s_hidden, s_weight, t_hidden, t_weight[:-1])
    with pytest.raises(ValueError, match="LM head weight"):
        fused_generalized_jsd_loss(s_hidden, s_weight[:, :3], t_hidden, t_weight)
    with pytest.raises(ValueError, match="same positions"):
        fused_generalized_jsd_loss(s_hidden, s_weight, t_hidden[:1], t_weight)
    with pytest.raises(ValueError, match="bias"):
        fused_generalized_jsd_loss(s_hidden, s_weight, t_hidden, t_weight,
                                   student_lm_head_bias=torch.zeros(3))


# ============================================================================= top-k
def _divergence_from_probs(p, q, beta):
    """D(P, Q, beta) over the last dimension from probabilities, 0 log 0 = 0 (float64)."""
    def kl(a, b):
        return torch.where(a > 0, a * (a.log() - b.log()), torch.zeros_like(a)).sum(-1)

    if beta == 0:
        return kl(p, q)
    if beta == 1:
        return kl(q, p)
    m = beta * p + (1 - beta) * q
    return beta * kl(p, m) + (1 - beta) * kl(q, m)


def _topk_reference(student, teacher, labels, k, tail, beta, temperature):
    """Per-position top-k divergence, straight from the definition, summed over counted rows."""
    p = torch.softmax(teacher.double() / temperature, -1)
    q = torch.softmax(student.double() / temperature, -1)
    ids = p.argsort(-1, descending=True)[..., :k]
    p_k, q_k = p.gather(-1, ids), q.gather(-1, ids)
    if tail:
        p_k = torch.cat([p_k, 1 - p_k.sum(-1, keepdim=True)], -1)
        q_k = torch.cat([q_k, 1 - q_k.sum(-1, keepdim=True)], -1)
    else:
        p_k, q_k = p_k / p_k.sum(-1, keepdim=True), q_k / q_k.sum(-1, keepdim=True)
    per_pos = _divergence_from_probs(p_k, q_k, beta)
    return torch.where(labels != -100, per_pos, torch.zeros_like(per_pos)).sum()


@pytest.mark.parametrize("tail", [False, True])
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("temperature", TEMPERATURES)
@pytest.mark.parametrize("beta", BETAS)
def test_topk_with_full_vocabulary_equals_exact(beta, temperature, reduction, tail):
    student, teacher = _logits((2, 5, 12), 30).requires_grad_(), _logits((2, 5, 12), 31)
    labels = _labels("ragged", (2, 5))
    kwargs = dict(beta=beta, temperature=temperature)
    want, (want_g,) = _value_and_grads(generalized_jsd_loss, (student, teacher, labels),
                                       reduction, **kwargs)
    got, (got_g,) = _value_and_grads(topk_generalized_jsd_loss, (student, teacher, labels),
                                     reduction, topk=12, tail_bucket=tail, **kwargs)
    assert got.shape == want.shape
    _assert_matches(got, want)
    assert torch.isfinite(got_g).all()
    _assert_matches(got_g, want_g)


@pytest.mark.parametrize("tail", [False, True])
@pytest.mark.parametrize("k", [1, 3, 8])
@pytest.mark.parametrize("beta", BETAS)
def test_topk_matches_definition(beta, k, tail):
    student = _logits((2, 5, 12), 32, dtype=torch.float64).requires_grad_()
    teacher = _logits((2, 5, 12), 33, dtype=torch.float64)
    labels = _labels("ragged", (2, 5))
    got = topk_generalized_jsd_loss(student, teacher, labels, topk=k, tail_bucket=tail,
                                    beta=beta, temperature=0.7, reduction="sum")
    want = _topk_reference(student, teacher, labels, k, tail, beta, 0.7)
    _assert_matches(got, want, rtol=1e-9, atol=1e-12)
    got_g, want_g = (torch.autograd.grad(x, student)[0] for x in (got, want))
    _assert_matches(got_g, want_g, rtol=1e-7, atol=1e-10)


@pytest.mark.parametrize("tail", [False, True])
def test_topk_precomputed_teacher_equals_full_logits(tail):
    student, teacher = _logits((2, 5, 12), 34).requires_grad_(), _logits((2, 5, 12), 35)
    labels = _labels("ragged", (2, 5))
    reduced = teacher_topk(teacher, 4, temperature=0.7, chunk_size=3)  # 10 positions: 4 chunks
    assert reduced.ids.shape == (2, 5, 4) and reduced.tail_logprob.shape == (2, 5)
    assert torch.all(reduced.logprobs[..., :-1] >= reduced.logprobs[..., 1:])
    tail_mass = 1 - reduced.logprobs.double().exp().sum(-1)
    _assert_matches(reduced.tail_logprob.double().exp(), tail_mass)
    full = topk_generalized_jsd_loss(student, teacher, labels, topk=4, tail_bucket=tail,
                                     temperature=0.7)
    pre = topk_generalized_jsd_loss(student, reduced, labels, tail_bucket=tail, temperature=0.7)
    torch.testing.assert_close(pre, full, rtol=0, atol=0)


def test_teacher_topk_full_vocabulary_has_empty_tail():
    reduced = teacher_topk(_logits((3, 6), 36), 6)
    assert torch.all(reduced.tail_logprob == -INF)
    assert isinstance(reduced, TeacherTopK) and reduced.temperature == 1.0


def test_topk_invalid_arguments():
    student, teacher = torch.randn(2, 3, 6), torch.randn(2, 3, 6)
    with pytest.raises(ValueError, match="topk is required"):
        topk_generalized_jsd_loss(student, teacher)
    with pytest.raises(ValueError, match="k must be"):
        topk_generalized_jsd_loss(student, teacher, topk=7)
    reduced = teacher_topk(teacher, 3, temperature=0.7)
    with pytest.raises(ValueError, match="temperature"):
        topk_generalized_jsd_loss(student, reduced, temperature=1.0)
    with pytest.raises(ValueError, match="K=3"):
        topk_generalized_jsd_loss(student, reduced, topk=4, temperature=0.7)
    with pytest.raises(ValueError, match="positions"):
        topk_generalized_jsd_loss(student[:1], reduced, temperature=0.7)
