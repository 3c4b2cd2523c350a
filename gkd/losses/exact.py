"""The generalized Jensen-Shannon divergence used by GKD (Agarwal et al., ICLR 2024), written plainly:
the reference every other implementation is tested against."""

from __future__ import annotations

import math

import torch

from gkd.losses.common import check_labels, check_options, check_same_positions, record_divergences, recording
from gkd.losses.interface import LogitsLossImpl, flat_vocab


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
    check_same_positions(student_logits.shape, teacher_logits.shape)
    if labels is not None:
        check_labels(labels, student_logits.shape[:-1])
    beta, temperature = check_options(beta, temperature, reduction)

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
    if recording():  # (--log_completions) the counted positions' flat indices, for per-sample losses
        rows = torch.arange(per_pos.shape[0], device=per_pos.device) if counted is None else counted.nonzero()[:, 0]
        record_divergences(per_pos, rows, reduction)
    total = per_pos.sum()
    if reduction == "sum":
        return total
    return total / max(per_pos.shape[0], 1)


class ExactLoss(LogitsLossImpl):
    """--loss_impl exact: generalized_jsd_loss on both models' full logits, autograd for the gradient."""

    name = "exact"

    def divergence(self, student_logits, teacher_logits, targets):
        vocab = self.settings.vocab_size
        # flattened views: generalized_jsd_loss then copies the counted rows only
        return generalized_jsd_loss(flat_vocab(student_logits, vocab), flat_vocab(teacher_logits, vocab),
                                    targets.reshape(-1), **self._options())
