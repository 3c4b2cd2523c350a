"""Tests for the lean loss variants (chunked, fused, top-k) against the exact generalized_jsd_loss.

The exact loss and autograd through it are the reference for values and student gradients; the
top-k loss with K < V is checked against a float64 reference written from its definition.
"""

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from gkd.losses import (
    TeacherTopK,
    chunked_generalized_jsd_and_cross_entropy,
    chunked_generalized_jsd_loss,
    fused_generalized_jsd_and_cross_entropy,
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
    import gkd.losses.chunked
    import gkd.losses.common
    import gkd.losses.fused

    asked = []
    exact_rows = gkd.losses.common.jsd_rows
    for module in (gkd.losses.chunked, gkd.losses.fused):
        monkeypatch.setattr(module, "jsd_rows",
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


# ---------------------------------------------------------------- a wider last dimension (padded heads)
class NewTensors(TorchDispatchMode):
    """Shapes of the tensors the ops inside allocate (outputs that are not views of an input)."""

    def __init__(self):
        super().__init__()
        self.shapes = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {t.untyped_storage().data_ptr() for t in tree_flatten((args, kwargs))[0]
                  if isinstance(t, torch.Tensor)}
        self.shapes += [tuple(t.shape) for t in tree_flatten(out)[0]
                        if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in inputs]
        return out


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0])
def test_chunked_compares_the_first_vocab_size_entries(beta, reduction):
    """Logits wider than the compared vocabulary (padding rows of the LM heads, 3 and 6 of them):
    the exact loss of the slices, and 0 gradient for the padding columns."""
    student = _logits((3, 7, 36), 40).requires_grad_()
    teacher = _logits((3, 7, 39), 41)
    labels = _labels("ragged", (3, 7))
    want, (want_g,) = _value_and_grads(
        lambda s, t, lab, **kw: generalized_jsd_loss(s[..., :33], t[..., :33], lab, **kw),
        (student, teacher, labels), reduction, beta=beta, temperature=0.7)
    got, (got_g,) = _value_and_grads(chunked_generalized_jsd_loss, (student, teacher, labels), reduction,
                                     beta=beta, temperature=0.7, chunk_size=CHUNK, vocab_size=33)
    _assert_matches(got, want)
    _assert_matches(got_g, want_g)
    assert torch.all(got_g[..., 33:] == 0)
    with pytest.raises(ValueError, match="vocab_size 37"):
        chunked_generalized_jsd_loss(student, teacher, labels, vocab_size=37)


def test_chunked_makes_one_logits_sized_tensor_the_gradient():
    """With shifted labels and vocab_size the logits are read where they lie: forward and backward
    allocate one logits-sized tensor, the gradient. Shifting the logits instead (logits[:, :-1, :V],
    as the trainer used to) copies both sides, and autograd's slice backward adds two more."""
    student, teacher = _logits((2, 30, 104), 42).requires_grad_(), _logits((2, 30, 104), 43)
    labels = torch.randint(0, 100, (2, 30), generator=torch.Generator().manual_seed(0))
    targets = F.pad(labels[:, 1:], (0, 1), value=-100)
    large = lambda shapes: [shape for shape in shapes if torch.Size(shape).numel() >= 2 * 29 * 100]  # noqa: E731
    with NewTensors() as new:
        chunked_generalized_jsd_loss(student, teacher, targets, reduction="sum", chunk_size=CHUNK,
                                     vocab_size=100).backward()
    assert large(new.shapes) == [(60, 104)]
    gradient = student.grad.clone()
    student.grad = None
    with NewTensors() as sliced:
        chunked_generalized_jsd_loss(student[:, :-1, :100], teacher[:, :-1, :100], labels[:, 1:], reduction="sum",
                                     chunk_size=CHUNK).backward()
    assert len(large(sliced.shapes)) == 5  # what the shifted logits cost
    _assert_matches(student.grad, gradient)


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
        # Gradients summed chunk by chunk against all at once: float32 rounding reached 3.5e-5 of an element
        # on one machine's kernels, so this comparison allows 1e-4.
        _assert_matches(g, w, rtol=1e-4, atol=1e-5)


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


# ---------------------------------------------------------------- mixed precision (autocast)
def _relative_error(got, want):
    return float((got.double() - want.double()).norm() / want.double().norm())


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0])
def test_fused_under_bf16_autocast_equals_the_exact_loss_under_it(beta, bias):
    """float32 hidden states and heads (a float32 residual stream and master weights) under CPU bf16
    autocast: the reference projects with F.linear, which autocast runs in bf16, then the exact loss.
    The fused loss projects in bf16 too, so both compare the same bf16 logits: each position's value
    agrees to float32 summation order (1e-5 relative; a float32 projection, as the fused loss used
    to run under autocast, is off by ~1e-3). Gradients: both round the logits' gradient to bf16
    before the head's GEMMs, the reference after its scaling and the fused loss before, and round the
    GEMMs' outputs to bf16 (the fused loss per chunk, summed in float32), so they differ by
    independent roundings of relative size <= 2^-9 each: about 0.3% in norm, 6e-3 with margin (the
    reference itself is ~1.2% from the float64 truth; a float32 weight-gradient GEMM is ~1.2% from it)."""
    g = torch.Generator().manual_seed(50)
    s_hidden = torch.randn(2, 16, 48, generator=g)
    t_hidden = torch.randn(2, 16, 48, generator=g)
    s_weight = torch.randn(400, 48, generator=g) * 3 / 48**0.5
    t_weight = torch.randn(400, 48, generator=g) * 3 / 48**0.5
    s_bias = torch.randn(400, generator=g) if bias else None
    labels = _labels("ragged", (2, 16))

    def run(fn, reduction):
        h, w = s_hidden.clone().requires_grad_(), s_weight.clone().requires_grad_()
        b = None if s_bias is None else s_bias.clone().requires_grad_()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = fn(h, w, b, reduction)
        if reduction == "none":
            return loss.detach(), None
        loss.backward()
        return loss.detach(), [x.grad for x in (h, w, b) if x is not None]

    def exact(h, w, b, reduction):
        with torch.no_grad():
            teacher = F.linear(t_hidden, t_weight)
        return generalized_jsd_loss(F.linear(h, w, b), teacher, labels, beta=beta, temperature=0.9,
                                    reduction=reduction)

    def fused(h, w, b, reduction):
        return fused_generalized_jsd_loss(h, w, t_hidden, t_weight, labels, beta=beta, temperature=0.9,
                                          reduction=reduction, chunk_size=5, student_lm_head_bias=b)

    want, _ = run(exact, "none")
    got, _ = run(fused, "none")
    counted = labels != -100
    torch.testing.assert_close(got[counted], want[counted], rtol=1e-5, atol=1e-7)
    want, want_grads = run(exact, "sum")
    got, got_grads = run(fused, "sum")
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    assert [x.dtype for x in got_grads] == [torch.float32] * len(want_grads)
    for got_grad, want_grad in zip(got_grads, want_grads):
        assert _relative_error(got_grad, want_grad) < 6e-3


# ---------------------------------------------------------------- the cross-entropy in the same pass
def _sft_labels(labels, seed=7):
    """A subset of labels' counted positions (about half of them)."""
    g = torch.Generator().manual_seed(seed)
    return labels.masked_fill(torch.rand(labels.shape, generator=g) < 0.5, -100)


def _exact_with_cross_entropy(student_logits, teacher_logits, labels, sft_labels, reduction, **kwargs):
    """The reference: the exact loss, and F.cross_entropy of the same logits (no temperature)."""
    jsd = generalized_jsd_loss(student_logits, teacher_logits, labels, reduction=reduction, **kwargs)
    ce = F.cross_entropy(student_logits.flatten(0, -2), sft_labels.flatten(), reduction="sum")
    return jsd, ce / max(int(sft_labels.ne(-100).sum()), 1) if reduction == "batchmean" else ce


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("reduction", ["sum", "batchmean"])
@pytest.mark.parametrize("temperature", TEMPERATURES)
@pytest.mark.parametrize("beta", BETAS)
def test_fused_cross_entropy_matches_exact_plus_cross_entropy(beta, temperature, reduction, bias):
    s_hidden, s_weight, t_hidden, t_weight, s_bias, t_bias = _fused_case(6, 9, bias, torch.float32, vocab=17)
    labels = _labels("ragged", (2, 5))
    sft_labels = _sft_labels(labels)
    alpha = 0.3
    with torch.no_grad():
        teacher = F.linear(t_hidden, t_weight, t_bias)
    want = _exact_with_cross_entropy(F.linear(s_hidden, s_weight, s_bias), teacher, labels, sft_labels, reduction,
                                     beta=beta, temperature=temperature)
    got = fused_generalized_jsd_and_cross_entropy(
        s_hidden, s_weight, t_hidden, t_weight, labels, sft_labels, beta=beta, temperature=temperature,
        reduction=reduction, chunk_size=3, student_lm_head_bias=s_bias, teacher_lm_head_bias=t_bias, sft_weight=alpha)
    wrt = [x for x in (s_hidden, s_weight, s_bias) if x is not None]
    for g, w in zip(got, want):
        _assert_matches(g, w.detach())
    # the weighting forward prepared for (one pass) and two others (a second pass in backward)
    for weights in ((1.0, alpha), (1.0, 0.0), (0.0, 2.0)):
        want_g = torch.autograd.grad(weights[0] * want[0] + weights[1] * want[1], wrt, retain_graph=True)
        got_g = torch.autograd.grad(weights[0] * got[0] + weights[1] * got[1], wrt, retain_graph=True)
        for g, w in zip(got_g, want_g):
            _assert_matches(g, w)


@pytest.mark.parametrize("reduction", ["sum", "batchmean"])
@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0])
def test_chunked_cross_entropy_matches_exact_plus_cross_entropy(beta, reduction):
    student = _logits((3, 7, 36), 60).requires_grad_()
    teacher = _logits((3, 7, 38), 61)
    labels = _labels("ragged", (3, 7))
    sft_labels = _sft_labels(labels)
    want = _exact_with_cross_entropy(student[..., :33], teacher[..., :33], labels, sft_labels, reduction,
                                     beta=beta, temperature=0.7)
    got = chunked_generalized_jsd_and_cross_entropy(student, teacher, labels, sft_labels, beta=beta, temperature=0.7,
                                                    reduction=reduction, chunk_size=CHUNK, vocab_size=33,
                                                    sft_weight=0.3)
    for g, w in zip(got, want):
        _assert_matches(g, w.detach())
    for weights in ((1.0, 0.3), (1.0, 0.0), (0.5, 2.0)):
        (want_g,) = torch.autograd.grad(weights[0] * want[0] + weights[1] * want[1], student, retain_graph=True)
        (got_g,) = torch.autograd.grad(weights[0] * got[0] + weights[1] * got[1], student, retain_graph=True)
        _assert_matches(got_g, want_g)


def test_fused_cross_entropy_under_bf16_autocast():
    """As test_fused_under_bf16_autocast_equals_the_exact_loss_under_it, with the cross-entropy: the same
    bf16 logits, so the same values to float32 summation order; gradients as argued there."""
    s_hidden, s_weight, t_hidden, t_weight, _, _ = _fused_case(32, 32, False, torch.float32, vocab=300)
    labels = _labels("ragged", (2, 5))
    sft_labels = _sft_labels(labels)

    def run(fused):
        h, w = s_hidden.detach().clone().requires_grad_(), s_weight.detach().clone().requires_grad_()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            if fused:
                jsd, ce = fused_generalized_jsd_and_cross_entropy(h, w, t_hidden, t_weight, labels, sft_labels,
                                                                  chunk_size=3, sft_weight=0.3)
            else:
                with torch.no_grad():
                    teacher = F.linear(t_hidden, t_weight)
                jsd, ce = _exact_with_cross_entropy(F.linear(h, w), teacher, labels, sft_labels, "sum")
        (jsd + 0.3 * ce).backward()
        return jsd.detach(), ce.detach(), h.grad, w.grad

    got, want = run(True), run(False)
    for g, w in zip(got[:2], want[:2]):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-6)
    for g, w in zip(got[2:], want[2:]):
        assert _relative_error(g, w) < 6e-3


def test_cross_entropy_arguments():
    s_hidden, s_weight, t_hidden, t_weight, _, _ = _fused_case(4, 5, False, torch.float32)
    labels = _labels("ragged", (2, 5))
    outside = labels.clone()
    outside[0, 2] = 1  # labels ignores (0, 2)
    with pytest.raises(ValueError, match="subset"):
        fused_generalized_jsd_and_cross_entropy(s_hidden, s_weight, t_hidden, t_weight, labels, outside)
    with pytest.raises(ValueError, match="reduction 'none'"):
        fused_generalized_jsd_and_cross_entropy(s_hidden, s_weight, t_hidden, t_weight, labels, labels,
                                                reduction="none")
    with pytest.raises(ValueError, match="sft_labels"):
        chunked_generalized_jsd_and_cross_entropy(torch.randn(2, 5, 7), torch.randn(2, 5, 7), labels, labels[:1])
    # no cross-entropy positions: a constant 0, and the divergence as without
    none = torch.full_like(labels, -100)
    jsd, ce = fused_generalized_jsd_and_cross_entropy(s_hidden, s_weight, t_hidden, t_weight, labels, none)
    assert ce.item() == 0.0 and not ce.requires_grad
    _assert_matches(jsd, fused_generalized_jsd_loss(s_hidden, s_weight, t_hidden, t_weight, labels, reduction="sum"))


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
