"""Tests for gkd.losses.generalized_jsd_loss against independent float64 references."""

import math

import pytest
import torch
import torch.nn.functional as F

from gkd.losses import generalized_jsd_loss

BETAS = [0.0, 0.1, 0.5, 0.9, 1.0]
INF = float("inf")


# ---------------------------------------------------------------- reference (from the definition)
def _probs(logits, temperature):
    x = logits.double() / temperature
    e = torch.exp(x - x.max(dim=-1, keepdim=True).values)
    return e / e.sum(dim=-1, keepdim=True)


def _kl(a, b):
    # sum_v a_v * log(a_v / b_v), with terms where a_v == 0 counted as 0
    safe_b = torch.where(a > 0, b, torch.ones_like(b))
    safe_a = torch.where(a > 0, a, torch.ones_like(a))
    return torch.where(a > 0, a * torch.log(safe_a / safe_b), torch.zeros_like(a)).sum(-1)


def reference_per_position(student, teacher, beta, temperature):
    q = _probs(student, temperature)
    p = _probs(teacher, temperature)
    if beta == 0:
        return _kl(p, q)
    if beta == 1:
        return _kl(q, p)
    m = beta * p + (1 - beta) * q
    return beta * _kl(p, m) + (1 - beta) * _kl(q, m)


def reference(student, teacher, labels=None, beta=0.5, temperature=1.0, reduction="batchmean"):
    per_pos = reference_per_position(student, teacher, beta, temperature)
    mask = torch.ones_like(per_pos, dtype=torch.bool) if labels is None else labels != -100
    per_pos = torch.where(mask, per_pos, torch.zeros_like(per_pos))
    if reduction == "none":
        return per_pos
    if reduction == "sum":
        return per_pos.sum()
    n = int(mask.sum())
    return per_pos.sum() / n if n else per_pos.sum() * 0


def _random_case(seed, with_mask=True):
    g = torch.Generator().manual_seed(seed)
    b = int(torch.randint(1, 4, (1,), generator=g))
    s = int(torch.randint(1, 6, (1,), generator=g))
    v = int(torch.randint(2, 40, (1,), generator=g))
    student = torch.randn(b, s, v, generator=g) * 3
    teacher = torch.randn(b, s, v, generator=g) * 3
    labels = torch.randint(0, v, (b, s), generator=g)
    if with_mask:
        labels[torch.rand(b, s, generator=g) < 0.3] = -100
        labels[0, 0] = 1  # at least one counted position
    return student, teacher, labels


# ---------------------------------------------------------------- against the reference
@pytest.mark.parametrize("reduction", ["batchmean", "sum", "none"])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
@pytest.mark.parametrize("beta", BETAS)
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_matches_reference(seed, beta, temperature, reduction):
    student, teacher, labels = _random_case(seed)
    got = generalized_jsd_loss(student, teacher, labels, beta=beta, temperature=temperature,
                               reduction=reduction)
    want = reference(student, teacher, labels, beta, temperature, reduction)
    assert got.dtype == torch.float32
    assert got.shape == want.shape
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("beta", BETAS)
def test_no_labels_counts_every_position(beta):
    student, teacher, _ = _random_case(7)
    got = generalized_jsd_loss(student, teacher, None, beta=beta)
    want = reference_per_position(student, teacher, beta, 1.0).mean()
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-7)


def test_none_reduction_zero_at_ignored_positions():
    student, teacher, labels = _random_case(3)
    labels[0, 0] = -100
    got = generalized_jsd_loss(student, teacher, labels, reduction="none")
    assert got.shape == labels.shape
    assert torch.all(got[labels == -100] == 0)
    assert torch.all(got[labels != -100] > 0)


def test_custom_ignore_index():
    student, teacher, labels = _random_case(4, with_mask=False)
    labels[..., 0] = 5
    labels[..., 1:] = -1
    got = generalized_jsd_loss(student, teacher, labels, ignore_index=-1,
                               reduction="sum")
    want = reference_per_position(student, teacher, 0.5, 1.0)[..., 0].sum()
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-7)


# ------------------------------------------------- hand-checkable case (GKD-NOTES.md, sec. 1)
@pytest.mark.parametrize(
    "beta,expected",
    [(0.0, 1.75778), (1.0, 1.75778), (0.5, 0.368064), (0.1, 0.146311), (0.9, 0.146311)],
)
def test_hand_checked_values(beta, expected):
    student = torch.tensor([[0.1, 0.9]]).log()
    teacher = torch.tensor([[0.9, 0.1]]).log()
    got = generalized_jsd_loss(student, teacher, beta=beta).item()
    assert got == pytest.approx(expected, rel=1e-5)


def test_hand_checked_endpoint_closed_form():
    student = torch.tensor([[0.1, 0.9]], dtype=torch.float64).log()
    teacher = torch.tensor([[0.9, 0.1]], dtype=torch.float64).log()
    kl = 0.8 * math.log(9.0)
    for beta in (0.0, 1.0):
        got = generalized_jsd_loss(student, teacher, beta=beta).item()
        assert got == pytest.approx(kl, rel=1e-12)


# ---------------------------------------------------------------- identities
@pytest.mark.parametrize("beta", [0.0, 0.1, 0.3, 0.5, 0.75, 0.9, 1.0])
def test_swap_identity(beta):
    a, b, labels = _random_case(11)
    d1 = generalized_jsd_loss(a, b, labels, beta=beta, reduction="none")
    d2 = generalized_jsd_loss(b, a, labels, beta=1 - beta, reduction="none")
    torch.testing.assert_close(d1, d2, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("beta", BETAS)
def test_zero_when_equal(beta):
    logits = torch.randn(2, 3, 17, dtype=torch.float64)
    shifted = logits + 4.0  # softmax is shift invariant: same distributions
    got = generalized_jsd_loss(shifted, logits, beta=beta, reduction="none")
    torch.testing.assert_close(got, torch.zeros(2, 3, dtype=torch.float64), rtol=0, atol=1e-12)


def test_endpoints_equal_torch_kl_div():
    student, teacher, _ = _random_case(5, with_mask=False)
    n = student.shape[0] * student.shape[1]
    log_q = F.log_softmax(student, -1)
    log_p = F.log_softmax(teacher, -1)
    kl_t_s = F.kl_div(log_q, log_p, log_target=True, reduction="sum") / n  # KL(T || S)
    kl_s_t = F.kl_div(log_p, log_q, log_target=True, reduction="sum") / n  # KL(S || T)
    got0 = generalized_jsd_loss(student, teacher, beta=0.0)
    got1 = generalized_jsd_loss(student, teacher, beta=1.0)
    torch.testing.assert_close(got0, kl_t_s, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got1, kl_s_t, rtol=1e-5, atol=1e-6)


def test_interior_is_bounded_and_tends_to_zero_at_the_ends():
    student, teacher, _ = _random_case(6, with_mask=False)
    eps = 1e-6
    near0 = generalized_jsd_loss(student.double(), teacher.double(), beta=eps)
    near1 = generalized_jsd_loss(student.double(), teacher.double(), beta=1 - eps)
    assert 0 < near0 < 1e-4 and 0 < near1 < 1e-4
    # the defined endpoints jump away from those limits
    assert generalized_jsd_loss(student, teacher, beta=0.0) > 1e-2
    for beta in (0.1, 0.5, 0.9):
        d = generalized_jsd_loss(student, teacher, beta=beta, reduction="none")
        # JSD_beta <= h(beta) (binary entropy, in nats)
        assert torch.all(d <= -(beta * math.log(beta) + (1 - beta) * math.log(1 - beta)) + 1e-6)


# ---------------------------------------------------------------- gradients
@pytest.mark.parametrize("reduction", ["batchmean", "sum", "none"])
@pytest.mark.parametrize("beta", [0.0, 0.3, 0.5, 1.0])
def test_gradcheck(beta, reduction):
    g = torch.Generator().manual_seed(21)
    student = torch.randn(2, 2, 4, dtype=torch.float64, generator=g, requires_grad=True)
    teacher = torch.randn(2, 2, 4, dtype=torch.float64, generator=g, requires_grad=True)
    labels = torch.tensor([[1, -100], [0, 3]])

    def fn(s, t):
        return generalized_jsd_loss(s, t, labels, beta=beta, temperature=0.8,
                                    reduction=reduction)

    assert torch.autograd.gradcheck(fn, (student, teacher))


@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0])
def test_gradcheck_with_shared_neg_inf(beta):
    g = torch.Generator().manual_seed(22)
    student = torch.randn(2, 6, dtype=torch.float64, generator=g)
    teacher = torch.randn(2, 6, dtype=torch.float64, generator=g)
    student[:, 1] = teacher[:, 1] = -INF
    student[0, 4] = teacher[0, 4] = -INF

    def fn(s):
        return generalized_jsd_loss(s, teacher, beta=beta)

    assert torch.autograd.gradcheck(fn, (student.requires_grad_(),))


# ---------------------------------------------------------------- -inf logits
def _grad(student, teacher, **kw):
    s = student.clone().requires_grad_()
    t = teacher.clone().requires_grad_()
    loss = generalized_jsd_loss(s, t, **kw)
    loss.backward()
    return loss, s.grad, t.grad


@pytest.mark.parametrize("beta", BETAS)
def test_shared_neg_inf_equals_reduced_vocabulary(beta):
    student, teacher, labels = _random_case(8)
    v = student.shape[-1]
    keep = torch.ones(v, dtype=torch.bool)
    keep[[0, v - 1]] = False
    student[..., ~keep] = -INF
    teacher[..., ~keep] = -INF
    loss, gs, gt = _grad(student, teacher, labels=labels, beta=beta, temperature=0.7)
    assert torch.isfinite(loss) and torch.isfinite(gs).all() and torch.isfinite(gt).all()
    assert torch.all(gs[..., ~keep] == 0) and torch.all(gt[..., ~keep] == 0)

    # reference: the same problem on the vocabulary without the masked entries (value and gradient)
    rs = student[..., keep].double().requires_grad_()
    rt = teacher[..., keep].double().requires_grad_()
    want = reference(rs, rt, labels, beta, 0.7)
    want.backward()
    torch.testing.assert_close(loss.double(), want.detach(), rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(gs[..., keep].double(), rs.grad, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(gt[..., keep].double(), rt.grad, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("beta", [0.0, 0.1, 0.5, 0.9])
def test_teacher_only_neg_inf_is_finite(beta):
    # P = 0 there; KL(P||Q) and all interior values stay finite (0 * log 0 = 0).
    student, teacher, labels = _random_case(9)
    teacher[..., :2] = -INF
    loss, gs, gt = _grad(student, teacher, labels=labels, beta=beta)
    assert torch.isfinite(loss) and torch.isfinite(gs).all() and torch.isfinite(gt).all()
    assert torch.all(gt[..., :2] == 0)
    want = reference(student, teacher, labels, beta)
    torch.testing.assert_close(loss.double(), want, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("beta", [0.1, 0.5, 0.9, 1.0])
def test_student_only_neg_inf_is_finite(beta):
    student, teacher, labels = _random_case(10)
    student[..., -3:] = -INF
    loss, gs, gt = _grad(student, teacher, labels=labels, beta=beta)
    assert torch.isfinite(loss) and torch.isfinite(gs).all() and torch.isfinite(gt).all()
    assert torch.all(gs[..., -3:] == 0)
    want = reference(student, teacher, labels, beta)
    torch.testing.assert_close(loss.double(), want, rtol=1e-5, atol=1e-7)


def test_unsupported_support_at_endpoints_is_inf_not_nan():
    # KL(T||S) with S = 0 where T > 0 is +inf, and likewise KL(S||T); report it, don't hide it.
    student = torch.tensor([[0.0, 1.0, -INF]])
    teacher = torch.tensor([[0.0, 1.0, 2.0]])
    assert generalized_jsd_loss(student, teacher, beta=0.0).item() == INF
    assert generalized_jsd_loss(teacher, student, beta=1.0).item() == INF
    assert math.isfinite(generalized_jsd_loss(student, teacher, beta=1.0).item())
    assert math.isfinite(generalized_jsd_loss(teacher, student, beta=0.0).item())


def test_ignored_rows_may_be_all_neg_inf():
    student, teacher, labels = _random_case(12, with_mask=False)
    labels[0, 0] = -100
    student[0, 0] = -INF
    teacher[0, 0] = -INF
    loss, gs, gt = _grad(student, teacher, labels=labels)
    assert torch.isfinite(loss) and torch.isfinite(gs).all() and torch.isfinite(gt).all()
    assert torch.all(gs[0, 0] == 0)


# ---------------------------------------------------------------- dtypes
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0])
def test_low_precision_inputs_computed_in_float32(dtype, beta):
    student, teacher, labels = _random_case(13)
    s, t = student.to(dtype), teacher.to(dtype)
    got = generalized_jsd_loss(s, t, labels, beta=beta)
    assert got.dtype == torch.float32
    want = generalized_jsd_loss(s.float(), t.float(), labels, beta=beta)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(got.double(), reference(s, t, labels, beta), rtol=1e-5, atol=1e-7)

    s.requires_grad_()
    generalized_jsd_loss(s, t, labels, beta=beta).backward()
    assert s.grad.dtype == dtype and torch.isfinite(s.grad.float()).all()


def test_float64_stays_float64():
    student, teacher, labels = _random_case(14)
    got = generalized_jsd_loss(student.double(), teacher.double(), labels)
    assert got.dtype == torch.float64
    assert generalized_jsd_loss(student.double(), teacher, labels).dtype == torch.float64


# ---------------------------------------------------------------- edge cases and argument checks
@pytest.mark.parametrize("beta", BETAS)
def test_all_ignored_batchmean_is_zero(beta):
    student = torch.randn(2, 3, 7, requires_grad=True)
    teacher = torch.randn(2, 3, 7)
    labels = torch.full((2, 3), -100)
    loss = generalized_jsd_loss(student, teacher, labels, beta=beta)
    assert loss.item() == 0.0
    loss.backward()
    assert torch.all(student.grad == 0)
    assert generalized_jsd_loss(student, teacher, labels, beta=beta, reduction="sum").item() == 0.0
    none = generalized_jsd_loss(student, teacher, labels, beta=beta, reduction="none")
    assert none.shape == (2, 3) and torch.all(none == 0)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(beta=-0.1), "beta"),
        (dict(beta=1.5), "beta"),
        (dict(beta=float("nan")), "beta"),
        (dict(temperature=0.0), "temperature"),
        (dict(temperature=-1.0), "temperature"),
        (dict(temperature=float("nan")), "temperature"),
        (dict(reduction="mean"), "reduction"),
    ],
)
def test_invalid_arguments(kwargs, match):
    s, t = torch.randn(2, 3, 5), torch.randn(2, 3, 5)
    with pytest.raises(ValueError, match=match):
        generalized_jsd_loss(s, t, **kwargs)


def test_shape_mismatch():
    with pytest.raises(ValueError, match="same shape"):
        generalized_jsd_loss(torch.randn(2, 3, 5), torch.randn(2, 3, 6))
    with pytest.raises(ValueError, match="labels"):
        generalized_jsd_loss(torch.randn(2, 3, 5), torch.randn(2, 3, 5),
                             torch.zeros(2, 4, dtype=torch.long))
