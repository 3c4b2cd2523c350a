"""The generalized Jensen-Shannon divergence used by GKD (Agarwal et al., ICLR 2024)."""

from __future__ import annotations

import math
from typing import NamedTuple

import torch

_REDUCTIONS = ("batchmean", "sum", "none")


def _kl_terms(log_a: torch.Tensor, log_b: torch.Tensor) -> torch.Tensor:
    """Per-position sum over the vocabulary of a * (log a - log b), with 0 * log(0 / b) = 0.

    Where a == 0 the difference may be -inf - -inf (NaN). Replacing it by 0 *before* the product
    keeps NaN out of the backward pass too: torch.where routes a zero gradient to the unused
    branch, while masking the product afterwards would still compute 0 * NaN for d/da.
    """
    a = log_a.exp()
    diff = torch.where(a > 0, log_a - log_b, torch.zeros_like(log_a))
    return (a * diff).sum(-1)


def generalized_jsd_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    labels: torch.Tensor | None = None,
    beta: float = 0.5,
    temperature: float = 1.0,
    reduction: str = "batchmean",
    ignore_index: int = -100,
) -> torch.Tensor:
    """Generalized JSD between teacher P and student Q, summed over the vocabulary per position.

    P = softmax(teacher_logits / temperature), Q = softmax(student_logits / temperature),
    M = beta * P + (1 - beta) * Q and D = beta * KL(P || M) + (1 - beta) * KL(Q || M).

    The endpoints are defined separately: beta == 0 gives exactly
    KL(P || Q) = KL(teacher || student) and beta == 1 exactly KL(Q || P) = KL(student || teacher).
    The interior formula scales with beta * (1 - beta) and tends to 0 at both ends, so the loss
    jumps at beta = 0 and beta = 1; this is deliberate and matches ms-swift and TRL.

    Logits have shape (..., V), already shifted so that position t predicts ``labels[..., t]``.
    Positions whose label equals ``ignore_index`` are excluded (``labels=None``: all count).
    reduction: "batchmean" = sum over counted positions / their number (0.0 when none count; this
    is per token, not per sequence as in ``torch.nn.functional.kl_div``), "sum", or "none" (a
    tensor of labels' shape, zeros at ignored positions).

    Computed in float32 (float64 if either input is float64) whatever the input dtype.
    -inf logits (masked vocabulary entries) are handled with 0 * log 0 = 0: the value and the
    gradient are finite whenever the divergence is. It is always finite for 0 < beta < 1; at
    beta == 0 it is +inf if the student is -inf where the teacher is not, and at beta == 1 if the
    teacher is -inf where the student is not (the gradient is then not meaningful). A counted
    position whose logits are all -inf gives NaN. Gradients flow into both inputs; detach the
    teacher's logits yourself.
    """
    _check_same_shape(student_logits.shape, teacher_logits.shape)
    if labels is not None:
        _check_labels(labels, student_logits.shape[:-1])
    beta, temperature = _check_options(beta, temperature, reduction)

    wide = torch.float64 in (student_logits.dtype, teacher_logits.dtype)
    dtype = torch.float64 if wide else torch.float32
    vocab = student_logits.shape[-1]
    out_shape = student_logits.shape[:-1]

    # Keep only counted positions before upcasting: less memory and compute, and ignored rows
    # (e.g. padding whose logits may be all -inf) can then neither produce NaN nor get gradient.
    s = student_logits.reshape(-1, vocab)
    t = teacher_logits.reshape(-1, vocab)
    counted = None
    if labels is not None:
        counted = labels.reshape(-1) != ignore_index
        s, t = s[counted], t[counted]
    log_q = torch.log_softmax(s.to(dtype) / temperature, dim=-1)
    log_p = torch.log_softmax(t.to(dtype) / temperature, dim=-1)

    if beta == 0.0:
        per_pos = _kl_terms(log_p, log_q)
    elif beta == 1.0:
        per_pos = _kl_terms(log_q, log_p)
    else:
        # Where both are -inf, logaddexp's backward evaluates exp(-inf - -inf) = NaN even under a
        # zero incoming gradient. M is 0 there and never used (both KL terms skip a == 0), so feed
        # logaddexp finite stand-ins instead.
        both_zero = torch.isneginf(log_p) & torch.isneginf(log_q)
        lp = log_p.masked_fill(both_zero, 0.0)
        lq = log_q.masked_fill(both_zero, 0.0)
        log_m = torch.logaddexp(lp + math.log(beta), lq + math.log1p(-beta))
        per_pos = beta * _kl_terms(log_p, log_m) + (1.0 - beta) * _kl_terms(log_q, log_m)

    if reduction == "none":
        if counted is None:
            return per_pos.reshape(out_shape)
        full = per_pos.new_zeros(counted.shape)
        return full.masked_scatter(counted, per_pos).reshape(out_shape)
    total = per_pos.sum()
    if reduction == "sum":
        return total
    return total / max(per_pos.shape[0], 1)


# ================================================================================ lean variants
# The exact loss above keeps several float32 copies of the logits and an autograd graph through
# them: about twelve logits-sized tensors at its peak. The variants below give the same value and
# student gradient with about one (chunked), about a weight gradient (fused), or work on a top-K
# slice of the vocabulary (top-k).

# Log-probabilities are clamped here: below log(smallest subnormal) in float32 (-103.3) and float64
# (-744.4), so exp() of it is still exactly 0, but finite, so that 0 * (log 0 - x) gives 0, not NaN.
_LOG_FLOOR = -1.0e4


def _check_same_shape(student_shape: torch.Size, teacher_shape: torch.Size) -> None:
    if student_shape != teacher_shape or len(student_shape) < 1:
        raise ValueError(
            f"student_logits {tuple(student_shape)} and teacher_logits {tuple(teacher_shape)} "
            "must have the same shape, with a vocabulary dimension"
        )


def _check_labels(labels: torch.Tensor, positions: torch.Size) -> None:
    if labels.shape != positions:
        raise ValueError(
            f"labels {tuple(labels.shape)} must match the logits' shape without the vocabulary "
            f"dimension {tuple(positions)}"
        )


def _check_temperature(temperature) -> float:
    temperature = float(temperature)
    if not temperature > 0.0 or math.isinf(temperature):
        raise ValueError(f"temperature must be a positive finite number, got {temperature}")
    return temperature


def _check_options(beta, temperature, reduction) -> tuple[float, float]:
    beta = float(beta)
    if not 0.0 <= beta <= 1.0:
        raise ValueError(f"beta must be in [0, 1], got {beta}")
    if reduction not in _REDUCTIONS:
        raise ValueError(f"reduction must be one of {', '.join(_REDUCTIONS)}, got {reduction!r}")
    return beta, _check_temperature(temperature)


def _check_chunk_size(chunk_size: int) -> int:
    if int(chunk_size) != chunk_size or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive integer, got {chunk_size}")
    return int(chunk_size)


def _compute_dtype(*tensors: torch.Tensor) -> torch.dtype:
    """float32 whatever the inputs, float64 if any input is float64 (as the exact loss)."""
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def _counted_rows(labels, positions: torch.Size, ignore_index: int, device) -> torch.Tensor:
    """Flat indices (ascending) of the positions that count: label != ignore_index, or all."""
    if labels is None:
        return torch.arange(math.prod(positions), device=device)
    _check_labels(labels, positions)
    return (labels.reshape(-1) != ignore_index).nonzero().squeeze(1).to(device)


def _reduce(per_pos: torch.Tensor, rows: torch.Tensor, positions: torch.Size, reduction: str):
    """Reduce the divergences of the counted rows as generalized_jsd_loss does."""
    if reduction == "none":
        full = per_pos.new_zeros(math.prod(positions))
        return full.index_copy_(0, rows, per_pos).reshape(positions)
    total = per_pos.sum()
    return total if reduction == "sum" else total / max(per_pos.numel(), 1)


def _grad_scale(beta: float, temperature: float, reduction: str, count: int) -> float:
    """The constant that turns _jsd_rows' gradients into d(loss)/d(logits).

    (1 - beta) in the interior (see _jsd_rows), 1 / temperature for u = logits / temperature,
    1 / count for batchmean.
    """
    scale = (1.0 - beta if 0.0 < beta < 1.0 else 1.0) / temperature
    return scale / max(count, 1) if reduction == "batchmean" else scale


def _log_softmax_(x: torch.Tensor, probs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """log_softmax(x) over the last dimension, in place, and softmax(x) written into probs.

    One exp per element for both (log_softmax followed by exp takes two), and only elementwise
    ops and plain reductions, which stay serial on small inputs (torch.log_softmax on CPU opens a
    parallel region even for a few elements, which costs milliseconds on a busy machine). A row of
    -inf gives NaN, as with torch.log_softmax.
    """
    x.sub_(x.amax(-1, keepdim=True))
    torch.exp(x, out=probs)
    total = probs.sum(-1, keepdim=True)
    return x.sub_(total.log()), probs.div_(total)


class _Workspace:
    """The (rows, V) buffers one chunk needs, allocated once per loss call and reused by every
    chunk: on CPU the page faults of fresh allocations cost more than the arithmetic in them."""

    def __init__(self, rows: int, vocab: int, dtype, device, beta: float):
        # student and teacher logits, q, p, and log m (interior) or a mask of zeros (endpoints)
        interior = 0.0 < beta < 1.0
        self.floats = torch.empty(5 if interior else 4, rows, vocab, dtype=dtype, device=device)
        self.mask = None if interior else torch.empty(rows, vocab, dtype=torch.bool, device=device)

    def take(self, n: int):
        """Buffers for a chunk of n rows: student, teacher, and the spare ones of _jsd_rows."""
        s, t, q, p, *log_m = (buffer[:n] for buffer in self.floats)
        return s, t, (q, p, log_m[0] if self.mask is None else self.mask[:n])


def _jsd_rows(s: torch.Tensor, t: torch.Tensor, beta: float, want_grad: bool, spare):
    """Divergence per row and, if want_grad, its gradient w.r.t. u = s (else None).

    s, t: (rows, V) student and teacher logits already divided by the temperature, in the compute
    dtype; both are overwritten, and so are the buffers in spare (see _Workspace.take); the
    gradient is returned in s's buffer. With q = softmax(s), p = softmax(t):

      beta == 0:  L = KL(P||Q) = sum_j p_j (log p_j - log q_j),   dL/du = q - p
      beta == 1:  L = KL(Q||P) = sum_j q_j f_j, f = log q - log p,  dL/du_j = q_j (f_j - L)
      otherwise:  M = beta P + (1-beta) Q, L = beta KL(P||M) + (1-beta) KL(Q||M), d = log q - log m,
                  dL/du_j = (1-beta) q_j (d_j - sum_i q_i d_i)

    For the interior, dm_j/dq_j = 1-beta gives dL/dq_j = (1-beta) (d_j + 1) - (1-beta) (beta p_j +
    (1-beta) q_j) / m_j = (1-beta) d_j; in all three cases the softmax Jacobian
    dq_i/du_j = q_i (delta_ij - q_j) turns g = dL/dq into q * (g - <q, g>). Terms with a zero
    probability count as 0 (0 log 0 = 0), as in _kl_terms. In the interior the returned gradient
    omits the factor (1 - beta), which _grad_scale applies once to the whole gradient.
    """
    q_buffer, p_buffer, extra = spare  # extra: a float buffer (interior) or a bool one (endpoints)
    log_q, q = _log_softmax_(s, q_buffer)
    log_p, p = _log_softmax_(t, p_buffer)
    if beta == 0.0:
        # where p == 0 the difference may be -inf - -inf; those terms are 0 by convention
        zero = torch.eq(p, 0.0, out=extra)
        loss = log_p.sub_(log_q).masked_fill_(zero, 0.0).mul_(p).sum(-1)
        return loss, (q.sub_(p) if want_grad else None)
    if beta == 1.0:
        qf = log_q.sub_(log_p).masked_fill_(torch.eq(q, 0.0, out=extra), 0.0).mul_(q)
        loss = qf.sum(-1)
        return loss, (qf.addcmul_(q, loss.unsqueeze(1), value=-1.0) if want_grad else None)

    # A zero probability's log (-inf) becomes a finite floor, so its terms below are 0 * finite.
    log_q.clamp_min_(_LOG_FLOOR)
    log_p.clamp_min_(_LOG_FLOOR)
    # m = beta p + (1-beta) q, floored at the smallest normal number: it is 0 only where p = q = 0,
    # or where beta * p underflows; those terms are (numerically) 0 anyway, and log m stays finite.
    log_m = torch.lerp(q, p, beta, out=extra).clamp_min_(torch.finfo(q.dtype).tiny).log_()
    kl_pm = log_p.sub_(log_m).mul_(p).sum(-1)
    qd = log_q.sub_(log_m).mul_(q)
    kl_qm = qd.sum(-1)
    loss = beta * kl_pm + (1.0 - beta) * kl_qm
    return loss, (qd.addcmul_(q, kl_qm.unsqueeze(1), value=-1.0) if want_grad else None)


def _scaled_rows(flat: torch.Tensor, idx: torch.Tensor, temperature: float, out: torch.Tensor):
    """out = flat[idx] / temperature, out being a buffer of the compute dtype."""
    if flat.dtype == out.dtype:
        torch.index_select(flat, 0, idx, out=out)
    else:
        out.copy_(flat.index_select(0, idx))
    return out if temperature == 1.0 else out.div_(temperature)


def _pop_scaled(ctx, factor) -> list:
    """The gradients forward stored in ctx.grads, multiplied by factor.

    In place, and ctx lets go of them (so autograd can take the buffer over as .grad without a
    copy), unless the engine keeps the graph for another backward (retain_graph=True, gradcheck):
    that one must find them unscaled. torch's AOTAutograd asks the engine the same question.
    """
    grads = ctx.grads
    # A private torch function; where it is missing, the safe (out-of-place) path is taken.
    keeps_graph = getattr(torch._C._autograd, "_get_current_graph_task_keep_graph", lambda: True)
    if keeps_graph():
        return [None if g is None else g * factor for g in grads]
    ctx.grads = None
    return [None if g is None else g.mul_(factor) for g in grads]


class _ChunkedJSD(torch.autograd.Function):
    """Forward visits the counted rows chunk by chunk and writes dL/d(student logits) into one
    logits-shaped buffer as it goes; backward only scales that buffer."""

    @staticmethod
    def forward(ctx, student_logits, teacher_logits, rows, beta, temperature, reduction,
                chunk_size, grad_enabled):
        vocab = student_logits.shape[-1]
        dtype = _compute_dtype(student_logits, teacher_logits)
        flat_s = student_logits.reshape(-1, vocab)
        flat_t = teacher_logits.reshape(-1, vocab)
        want_grad = grad_enabled and ctx.needs_input_grad[0]
        grad = torch.zeros_like(flat_s) if want_grad else None
        per_pos = flat_s.new_empty(rows.numel(), dtype=dtype)
        work = _Workspace(min(chunk_size, rows.numel()), vocab, dtype, flat_s.device, beta)
        for start in range(0, rows.numel(), chunk_size):
            idx = rows[start : start + chunk_size]
            s, t, spare = work.take(idx.numel())
            loss, g = _jsd_rows(
                _scaled_rows(flat_s, idx, temperature, s),
                _scaled_rows(flat_t, idx, temperature, t),
                beta,
                grad is not None,
                spare,
            )
            per_pos[start : start + idx.numel()] = loss
            if grad is not None:
                grad.index_copy_(0, idx, g.to(grad.dtype))
        ctx.grads = [None if grad is None else grad.view(student_logits.shape)]
        ctx.scale = _grad_scale(beta, temperature, reduction, rows.numel())
        ctx.per_position = reduction == "none"
        return _reduce(per_pos, rows, student_logits.shape[:-1], reduction)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_output):
        factor = grad_output * ctx.scale
        if ctx.per_position:
            factor = factor.unsqueeze(-1)
        (grad,) = _pop_scaled(ctx, factor)
        return grad, *[None] * 7


def chunked_generalized_jsd_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    labels: torch.Tensor | None = None,
    beta: float = 0.5,
    temperature: float = 1.0,
    reduction: str = "batchmean",
    ignore_index: int = -100,
    chunk_size: int = 64,
) -> torch.Tensor:
    """generalized_jsd_loss computed chunk_size counted positions at a time, lean in memory.

    Same arguments, value and gradient w.r.t. student_logits as generalized_jsd_loss (see there for
    the definition, the reductions and the -inf conventions), computed in float32 (float64 for
    float64 inputs) one chunk at a time. Positions whose label is ignore_index are never read.

    The gradient is computed analytically during the forward pass (see _jsd_rows) into one buffer
    of student_logits' shape and dtype; backward scales it in place and hands it on, so the loss
    costs about one logits-sized tensor plus a few (chunk_size, V) float32 temporaries, instead of
    the exact loss's autograd graph. Consequences: the teacher's logits are constants (no gradient
    flows into them, whatever their requires_grad; the trainer computes them under no_grad), and
    the loss cannot be differentiated twice (create_graph=True).
    """
    _check_same_shape(student_logits.shape, teacher_logits.shape)
    beta, temperature = _check_options(beta, temperature, reduction)
    chunk_size = _check_chunk_size(chunk_size)
    rows = _counted_rows(labels, student_logits.shape[:-1], ignore_index, student_logits.device)
    # ctx.needs_input_grad ignores no_grad mode: tell forward whether a gradient can be asked for
    return _ChunkedJSD.apply(
        student_logits, teacher_logits, rows, beta, temperature, reduction, chunk_size,
        torch.is_grad_enabled(),
    )


def _project(hidden_rows, weight, bias, temperature: float, out: torch.Tensor) -> torch.Tensor:
    """out = (hidden_rows @ weight.T + bias) / temperature, out being a buffer of the compute
    dtype; the matmul runs in the inputs' dtype (bf16 under mixed precision)."""
    if hidden_rows.dtype == weight.dtype == out.dtype:
        if bias is None:
            torch.mm(hidden_rows, weight.t(), out=out)
        else:
            torch.addmm(bias, hidden_rows, weight.t(), out=out)
    else:
        out.copy_(torch.nn.functional.linear(hidden_rows, weight, bias))
    return out if temperature == 1.0 else out.div_(temperature)


def _fused_pass(student, teacher, rows, beta, temperature, chunk_size, want, row_weights=None):
    """Divergence per counted row, and the gradients w.r.t. the student's (hidden, weight, bias)
    that the booleans in want ask for (None for the others).

    student, teacher: (hidden (N, H), weight (V, H), bias (V,) or None). Logits are made for
    chunk_size rows at a time and dropped after use. With G = dL/du for a chunk (_jsd_rows) and
    logits = h W^T + b: dL/dh = G W, dL/dW = sum over chunks of G^T h, dL/db = sum over rows of G.
    The weight and bias gradients accumulate in the compute dtype (each chunk's G^T h is a GEMM in
    the weight's dtype when that is lower). Without row_weights the gradients lack the constant
    _grad_scale; with them (per counted row, scale included) each row's gradient is weighted
    first, which reduction "none" needs.
    """
    hidden, weight, bias = student
    dtype = _compute_dtype(hidden, weight, teacher[0], teacher[1])
    grad_h = torch.zeros_like(hidden) if want[0] else None
    grad_w = torch.zeros_like(weight, dtype=dtype) if want[1] else None
    grad_b = torch.zeros_like(bias, dtype=dtype) if want[2] and bias is not None else None
    per_pos = hidden.new_empty(rows.numel(), dtype=dtype)
    work = _Workspace(min(chunk_size, rows.numel()), weight.shape[0], dtype, hidden.device, beta)
    for start in range(0, rows.numel(), chunk_size):
        idx = rows[start : start + chunk_size]
        h = hidden.index_select(0, idx)
        s, t, spare = work.take(idx.numel())
        loss, g = _jsd_rows(
            _project(h, weight, bias, temperature, s),
            _project(teacher[0].index_select(0, idx), teacher[1], teacher[2], temperature, t),
            beta,
            any(want),
            spare,
        )
        per_pos[start : start + idx.numel()] = loss
        if g is None:
            continue
        if row_weights is not None:
            g.mul_(row_weights[start : start + idx.numel()].unsqueeze(1))
        if grad_h is not None:
            grad_h.index_copy_(0, idx, (g.to(weight.dtype) @ weight).to(grad_h.dtype))
        if grad_w is not None:
            if weight.dtype == dtype:
                grad_w.addmm_(g.t(), h.to(dtype))
            else:  # one low-precision GEMM per chunk (e.g. bf16 tensor cores), summed in float32
                grad_w += g.to(weight.dtype).t() @ h.to(weight.dtype)
        if grad_b is not None:
            grad_b += g.sum(0)
    return per_pos, [grad_h, grad_w, grad_b]


class _FusedJSD(torch.autograd.Function):
    """sum / batchmean: forward accumulates the student's gradients, backward scales them.
    none: the weight gradient needs each position's grad_output, known only in backward, so
    forward computes the loss alone and backward makes a second, weighted pass."""

    @staticmethod
    def forward(ctx, s_hidden, s_weight, s_bias, t_hidden, t_weight, t_bias, rows, beta,
                temperature, reduction, chunk_size, grad_enabled):
        student = (s_hidden.reshape(-1, s_hidden.shape[-1]), s_weight, s_bias)
        teacher = (t_hidden.reshape(-1, t_hidden.shape[-1]), t_weight, t_bias)
        ctx.scale = _grad_scale(beta, temperature, reduction, rows.numel())
        ctx.per_position = reduction == "none"
        ctx.grad_meta = (s_hidden.shape, s_weight.dtype, None if s_bias is None else s_bias.dtype)
        want = tuple(grad_enabled and needed for needed in ctx.needs_input_grad[:3])
        if ctx.per_position:
            ctx.save_for_backward(*student, *teacher, rows)
            ctx.options = (beta, temperature, chunk_size)
            want = (False, False, False)
        per_pos, ctx.grads = _fused_pass(
            student, teacher, rows, beta, temperature, chunk_size, want
        )
        return _reduce(per_pos, rows, s_hidden.shape[:-1], reduction)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_output):
        if ctx.per_position:
            *tensors, rows = ctx.saved_tensors
            weights = grad_output.reshape(-1).index_select(0, rows) * ctx.scale
            _, (grad_h, grad_w, grad_b) = _fused_pass(
                tensors[:3], tensors[3:], rows, *ctx.options, want=ctx.needs_input_grad[:3],
                row_weights=weights,
            )
        else:
            grad_h, grad_w, grad_b = _pop_scaled(ctx, grad_output * ctx.scale)
        hidden_shape, weight_dtype, bias_dtype = ctx.grad_meta
        return (
            None if grad_h is None else grad_h.view(hidden_shape),
            None if grad_w is None else grad_w.to(weight_dtype),
            None if grad_b is None else grad_b.to(bias_dtype),
            *[None] * 9,
        )


def fused_generalized_jsd_loss(
    student_hidden: torch.Tensor,
    student_lm_head_weight: torch.Tensor,
    teacher_hidden: torch.Tensor,
    teacher_lm_head_weight: torch.Tensor,
    labels: torch.Tensor | None = None,
    beta: float = 0.5,
    temperature: float = 1.0,
    reduction: str = "batchmean",
    ignore_index: int = -100,
    chunk_size: int = 32,
    student_lm_head_bias: torch.Tensor | None = None,
    teacher_lm_head_bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """generalized_jsd_loss of the two models' LM heads, never holding either model's full logits.

    Equals generalized_jsd_loss(student_hidden @ W_s.T + b_s, teacher_hidden @ W_t.T + b_t,
    labels, beta, temperature, reduction, ignore_index), value and student gradients alike.
    student_hidden (..., H_s), teacher_hidden (..., H_t): the final hidden states, already shifted
    like the logits would be (H_s and H_t may differ); weights (V, H_s) and (V, H_t) with the same
    V (slice vocabulary padding rows off first); biases (V,) or None; labels (...).

    chunk_size counted positions at a time are projected (in the inputs' dtype, e.g. bf16 under
    mixed precision), compared in float32 (float64 for float64 inputs), and their gradient is
    pushed through the projection at once (see _fused_pass): the extra memory is the student
    weight gradient (V x H_s, accumulated in float32 and cast to the weight's dtype at the end)
    plus a few (chunk_size, V) float32 temporaries. Gradients flow into student_hidden, the student
    weight and bias only; the teacher's inputs are constants (the trainer runs the teacher under
    no_grad). Cannot be differentiated twice. reduction "none" costs a second pass in backward
    (the weight gradient needs each position's incoming gradient, known only then).
    """
    for name, hidden, weight, bias in (
        ("student", student_hidden, student_lm_head_weight, student_lm_head_bias),
        ("teacher", teacher_hidden, teacher_lm_head_weight, teacher_lm_head_bias),
    ):
        if weight.dim() != 2 or hidden.dim() < 1 or hidden.shape[-1] != weight.shape[1]:
            raise ValueError(
                f"{name} hidden states {tuple(hidden.shape)} and LM head weight "
                f"{tuple(weight.shape)} must be (..., H) and (V, H)"
            )
        if bias is not None and bias.shape != weight.shape[:1]:
            raise ValueError(
                f"{name} LM head bias {tuple(bias.shape)} must be ({weight.shape[0]},)"
            )
    if student_lm_head_weight.shape[0] != teacher_lm_head_weight.shape[0]:
        raise ValueError(
            f"student and teacher vocabularies differ ({student_lm_head_weight.shape[0]} vs "
            f"{teacher_lm_head_weight.shape[0]}): slice padding rows off the LM heads"
        )
    if student_hidden.shape[:-1] != teacher_hidden.shape[:-1]:
        raise ValueError(
            f"student_hidden {tuple(student_hidden.shape)} and teacher_hidden "
            f"{tuple(teacher_hidden.shape)} must cover the same positions"
        )
    beta, temperature = _check_options(beta, temperature, reduction)
    chunk_size = _check_chunk_size(chunk_size)
    rows = _counted_rows(labels, student_hidden.shape[:-1], ignore_index, student_hidden.device)
    return _FusedJSD.apply(
        student_hidden, student_lm_head_weight, student_lm_head_bias,
        teacher_hidden, teacher_lm_head_weight, teacher_lm_head_bias,
        rows, beta, temperature, reduction, chunk_size, torch.is_grad_enabled(),
    )


class TeacherTopK(NamedTuple):
    """The teacher's K most likely tokens per position: what topk_generalized_jsd_loss needs.

    logprobs (..., K): their log-probabilities under the full softmax of logits / temperature,
    descending; ids (..., K): their vocabulary ids; tail_logprob (...): log of the remaining mass
    1 - sum(exp(logprobs)), -inf when none is left (K = V); temperature: the loss temperature they
    were computed at (the loss checks it matches its own).
    """

    logprobs: torch.Tensor
    ids: torch.Tensor
    tail_logprob: torch.Tensor
    temperature: float


def _tail_logprob(x: torch.Tensor, ids: torch.Tensor, lse: torch.Tensor) -> torch.Tensor:
    """log(sum of softmax(x) outside ids) per row, -inf where nothing is left.

    x: logits already divided by the temperature; lse: logsumexp(x, -1, keepdim=True). A logsumexp
    over the remaining logits, not log(1 - sum of the top-K): no cancellation for small tails, and
    exactly -inf for K = V. Rows with nothing left get finite stand-ins before the logsumexp, whose
    backward would otherwise evaluate exp(-inf - -inf) = NaN even under a zero incoming gradient.
    """
    rest = x.scatter(-1, ids, -math.inf)
    empty = torch.isneginf(rest).all(-1, keepdim=True)
    rest = rest.masked_fill(empty, 0.0)
    tail = torch.logsumexp(rest, -1, keepdim=True) - lse
    return torch.where(empty, -math.inf, tail).squeeze(-1)


def teacher_topk(
    teacher_logits: torch.Tensor, k: int, temperature: float = 1.0, chunk_size: int = 256
) -> TeacherTopK:
    """Reduce the teacher's logits (..., V) to its top k per position (see TeacherTopK).

    For the trainer: call it right after the teacher's forward, then drop the full logits and pass
    the result to topk_generalized_jsd_loss as teacher_logits. Works through chunk_size positions
    at a time, so its float32 temporaries stay small. Detached; float32 (float64 for float64
    input).
    """
    vocab = teacher_logits.shape[-1]
    if int(k) != k or not 1 <= k <= vocab:
        raise ValueError(f"k must be an integer in [1, {vocab}], got {k}")
    temperature, chunk_size = _check_temperature(temperature), _check_chunk_size(chunk_size)
    k = int(k)
    dtype = _compute_dtype(teacher_logits)
    flat = teacher_logits.detach().reshape(-1, vocab)
    logprobs = flat.new_empty(flat.shape[0], k, dtype=dtype)
    ids = torch.empty(flat.shape[0], k, dtype=torch.long, device=flat.device)
    tail = flat.new_empty(flat.shape[0], dtype=dtype)
    with torch.no_grad():
        for start in range(0, flat.shape[0], chunk_size):
            rows = slice(start, start + chunk_size)
            x = flat[rows].to(dtype) / temperature
            lse = torch.logsumexp(x, -1, keepdim=True)
            values, ids[rows] = x.topk(k, dim=-1)
            logprobs[rows] = values - lse
            tail[rows] = _tail_logprob(x, ids[rows], lse)
    positions = teacher_logits.shape[:-1]
    return TeacherTopK(
        logprobs.reshape(*positions, k), ids.reshape(*positions, k), tail.reshape(positions),
        temperature,
    )


def _teacher_topk_rows(teacher, logits_shape: torch.Size, topk, temperature: float, rows):
    """The teacher's top-k (log-probabilities, ids, tail log-probability) at the counted rows,
    from its full logits or from a precomputed TeacherTopK (checked against the loss's options)."""
    if not isinstance(teacher, TeacherTopK):
        _check_same_shape(logits_shape, teacher.shape)
        if topk is None:
            raise ValueError("topk is required with full teacher logits")
        flat = teacher.reshape(-1, logits_shape[-1]).index_select(0, rows)
        return teacher_topk(flat, topk, temperature)[:3]
    k = teacher.ids.shape[-1]
    if topk is not None and topk != k:
        raise ValueError(f"topk={topk} but the precomputed teacher top-k has K={k}")
    if teacher.temperature != temperature:
        raise ValueError(
            f"the teacher's top-k was computed at temperature {teacher.temperature}, "
            f"the loss uses {temperature}"
        )
    if teacher.ids.shape[:-1] != logits_shape[:-1]:
        raise ValueError(
            f"teacher top-k {tuple(teacher.ids.shape)} does not cover the student's positions "
            f"{tuple(logits_shape[:-1])}"
        )
    return (
        teacher.logprobs.reshape(-1, k).index_select(0, rows),
        teacher.ids.reshape(-1, k).index_select(0, rows),
        teacher.tail_logprob.reshape(-1).index_select(0, rows),
    )


def topk_generalized_jsd_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor | TeacherTopK,
    labels: torch.Tensor | None = None,
    topk: int | None = None,
    tail_bucket: bool = False,
    beta: float = 0.5,
    temperature: float = 1.0,
    reduction: str = "batchmean",
    ignore_index: int = -100,
) -> torch.Tensor:
    """generalized_jsd_loss restricted to the teacher's top-K tokens of each position.

    The teacher's K most likely ids (after temperature) are kept and the student's logits gathered
    at the same ids; both are renormalised over those K (as ms-swift's gkd_logits_topk):
    P_K = softmax(t_K / T), Q_K = softmax(s_K / T), and the loss is D(P_K, Q_K, beta). With
    tail_bucket, a (K+1)-th category holds each side's remaining mass under its full softmax,
    1 - sum_{j in K} softmax(x / T)_j, and nothing is renormalised. K = V gives the exact loss
    (the tail is then empty: mass 0 on both sides, which adds 0).

    teacher_logits: the full (..., V) logits (then topk is required), or a TeacherTopK from
    teacher_topk(teacher_logits, k, temperature) at this temperature (topk may then be omitted),
    so that the trainer can drop the full teacher logits right after the teacher's forward.
    Other arguments and reductions as generalized_jsd_loss; only counted positions are computed.
    The teacher is a constant (no gradient); the student's gradient is ordinary autograd.
    """
    beta, temperature = _check_options(beta, temperature, reduction)
    positions, vocab = student_logits.shape[:-1], student_logits.shape[-1]
    rows = _counted_rows(labels, positions, ignore_index, student_logits.device)
    log_p, ids, tail_p = _teacher_topk_rows(
        teacher_logits, student_logits.shape, topk, temperature, rows
    )
    flat = student_logits.reshape(-1, vocab)
    dtype = _compute_dtype(flat, log_p)
    # without a tail only the K gathered logits are needed: no copy of the vocabulary dimension
    log_q = flat[rows.unsqueeze(1), ids].to(dtype) / temperature
    if tail_bucket:
        s = flat.index_select(0, rows).to(dtype) / temperature
        lse = torch.logsumexp(s, -1, keepdim=True)
        log_q = torch.cat([log_q - lse, _tail_logprob(s, ids, lse).unsqueeze(-1)], dim=-1)
        log_p = torch.cat([log_p, tail_p.unsqueeze(-1)], dim=-1)
    # generalized_jsd_loss's log_softmax renormalises the K gathered logits / log-probabilities,
    # and leaves the K+1 already normalised ones as they are.
    per_pos = generalized_jsd_loss(log_q, log_p, beta=beta, reduction="none")
    return _reduce(per_pos, rows, positions, reduction)
