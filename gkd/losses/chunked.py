"""The generalized JSD a chunk of positions at a time, its student gradient computed analytically:
about one logits-sized tensor (the gradient) instead of the exact loss's autograd graph. The student's
cross-entropy (sft_alpha's term) can ride along, its gradient written into the same buffer."""

from __future__ import annotations

import torch

from gkd.losses.common import (
    IGNORE_INDEX, Workspace, check_chunk_size, check_options, check_same_positions, compute_dtype, counted_rows,
    cross_entropy_rows_, grad_scale, incoming_ratio_is, jsd_rows, pop_scaled, reduce, sft_chunks, sft_targets_of_rows,
)
from gkd.losses.interface import LogitsLossImpl, LossSums


def _rows_of(flat: torch.Tensor, idx: torch.Tensor, out: torch.Tensor):
    """out = flat[idx, :V], out being a (len(idx), V) buffer of the compute dtype."""
    vocab = out.shape[1]
    if flat.dtype == out.dtype and flat.shape[1] == vocab:
        return torch.index_select(flat, 0, idx, out=out)
    return out.copy_(flat[:, :vocab].index_select(0, idx))  # basic slicing first: the chunk's rows only


def _chunked_pass(flat_s, flat_t, rows, beta, temperature, chunk_size, vocab, want_grad, weights=None, sft=None):
    """Divergence per counted row, the summed cross-entropy, and (if want_grad) the gradient w.r.t.
    the student's logits, shaped like flat_s (columns past vocab stay 0).

    weights: None leaves the divergence's gradient without grad_scale (the caller applies it);
    else (per counted row, scale included) each row's gradient is weighted. sft: None, or
    (targets per counted row, IGNORE_INDEX where no cross-entropy counts; the weight of
    d(CE)/d(logits) = softmax(logits) - onehot, no temperature, added to those rows)."""
    dtype = compute_dtype(flat_s, flat_t)
    grad = torch.zeros_like(flat_s) if want_grad else None
    per_pos = flat_s.new_empty(rows.numel(), dtype=dtype)
    ce_sum = flat_s.new_zeros((), dtype=dtype)
    work = Workspace(min(chunk_size, rows.numel()), vocab, dtype, flat_s.device, beta, extra=0 if sft is None else 1)
    starts = range(0, rows.numel(), chunk_size)
    if sft is not None:
        sft_targets, sft_weight = sft
        sft_rows, bounds = sft_chunks(sft_targets, starts)
    for chunk, start in enumerate(starts):
        idx = rows[start : start + chunk_size]
        s, t, spare, extra = work.take(idx.numel())
        _rows_of(flat_s, idx, s)
        _rows_of(flat_t, idx, t)
        local = None
        if sft is not None and bounds[chunk] < bounds[chunk + 1]:
            local = sft_rows[bounds[chunk] : bounds[chunk + 1]]
            z = torch.index_select(s, 0, local - start, out=extra[0][: local.numel()])
            ce_sum += cross_entropy_rows_(z, sft_targets.index_select(0, local), want_grad)
        if temperature != 1.0:
            s.div_(temperature)
            t.div_(temperature)
        loss, g = jsd_rows(s, t, beta, want_grad, spare)
        per_pos[start : start + idx.numel()] = loss
        if g is None:
            continue
        if weights is not None:
            g.mul_(weights[start : start + idx.numel()].unsqueeze(1))
        if local is not None:
            g.index_add_(0, local - start, z, alpha=sft_weight)
        grad[:, :vocab].index_copy_(0, idx, g.to(grad.dtype))
    return per_pos, ce_sum, grad


class _ChunkedJSD(torch.autograd.Function):
    """Outputs (divergence, cross-entropy). sum / batchmean: forward writes the gradient of
    divergence + sft_weight * cross-entropy w.r.t. the student's logits into one logits-shaped
    buffer as it goes; backward only scales that buffer (or, if the incoming gradients come in
    another ratio, makes a second pass with theirs). none: forward's buffer holds each row's
    gradient, which backward weights by the row's incoming gradient."""

    @staticmethod
    def forward(ctx, student_logits, teacher_logits, rows, sft_targets, options):
        beta, temperature, reduction, chunk_size, grad_enabled, vocab, sft_weight = options
        ctx.options = options
        # views of contiguous logits: neither is copied, whatever their last dimension
        flat_s = student_logits.reshape(-1, student_logits.shape[-1])
        flat_t = teacher_logits.reshape(-1, teacher_logits.shape[-1])
        want_grad = grad_enabled and ctx.needs_input_grad[0]
        ctx.jsd_scale = grad_scale(beta, temperature, reduction, rows.numel())
        sft_count = 0 if sft_targets is None else int((sft_targets != IGNORE_INDEX).sum())
        ctx.ce_scale = 1.0 / max(sft_count, 1) if reduction == "batchmean" else 1.0
        ctx.has_sft, ctx.per_position = sft_count > 0, reduction == "none"
        if ctx.has_sft and want_grad:  # for a second pass, should backward need one
            ctx.save_for_backward(student_logits, teacher_logits, rows, sft_targets)
        sft = (sft_targets, sft_weight * ctx.ce_scale / ctx.jsd_scale) if ctx.has_sft else None
        per_pos, ce_sum, grad = _chunked_pass(flat_s, flat_t, rows, beta, temperature, chunk_size, vocab, want_grad,
                                              sft=sft)
        ctx.grads = [None if grad is None else grad.view(student_logits.shape)]
        ce = ce_sum * ctx.ce_scale
        if not ctx.has_sft:
            ctx.mark_non_differentiable(ce)
        return reduce(per_pos, rows, student_logits.shape[:-1], reduction), ce

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_jsd, grad_ce):
        beta, temperature, _, chunk_size, _, vocab, sft_weight = ctx.options
        if not ctx.has_sft or incoming_ratio_is(grad_ce, grad_jsd, sft_weight):
            factor = grad_jsd * ctx.jsd_scale
            (grad,) = pop_scaled(ctx, factor.unsqueeze(-1) if ctx.per_position else factor)
            return grad, *[None] * 4
        student_logits, teacher_logits, rows, sft_targets = ctx.saved_tensors  # sum / batchmean only
        _, _, grad = _chunked_pass(
            student_logits.reshape(-1, student_logits.shape[-1]), teacher_logits.reshape(-1, teacher_logits.shape[-1]),
            rows, beta, temperature, chunk_size, vocab, True, weights=(grad_jsd * ctx.jsd_scale).expand(rows.numel()),
            sft=(sft_targets, float(grad_ce) * ctx.ce_scale),
        )
        return grad.view(student_logits.shape), *[None] * 4


def chunked_generalized_jsd_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    labels: torch.Tensor | None = None,
    beta: float = 0.5,
    temperature: float = 1.0,
    reduction: str = "batchmean",
    ignore_index: int = -100,
    chunk_size: int = 64,
    vocab_size: int | None = None,
) -> torch.Tensor:
    """generalized_jsd_loss computed chunk_size counted positions at a time, lean in memory.

    Same arguments, value and gradient w.r.t. student_logits as generalized_jsd_loss (see there for
    the definition, the reductions and the -inf conventions), computed in float32 (float64 for
    float64 inputs) one chunk at a time. Positions whose label is ignore_index are never read.

    vocab_size: compare only the first vocab_size entries of each side's last dimension (the two
    may then differ, e.g. LM heads padded to different sizes), as generalized_jsd_loss of
    student_logits[..., :vocab_size] and teacher_logits[..., :vocab_size] would, without the copy
    that flattening such a slice makes; the gradient of the other entries is 0.

    The gradient is computed analytically during the forward pass (see common.jsd_rows) into one
    buffer of student_logits' shape and dtype; backward scales it in place and hands it on, so the
    loss costs about one logits-sized tensor plus a few (chunk_size, V) float32 temporaries,
    instead of the exact loss's autograd graph. Pass contiguous logits (the model's output):
    non-contiguous ones are copied once. Consequences: the teacher's logits are constants (no
    gradient flows into them, whatever their requires_grad; the trainer computes them under
    no_grad), and the loss cannot be differentiated twice (create_graph=True).
    """
    jsd, _ = _chunked(student_logits, teacher_logits, labels, None, beta, temperature, reduction, ignore_index,
                      chunk_size, vocab_size, 0.0)
    return jsd


def chunked_generalized_jsd_and_cross_entropy(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    labels: torch.Tensor | None = None,
    sft_labels: torch.Tensor | None = None,
    beta: float = 0.5,
    temperature: float = 1.0,
    reduction: str = "sum",
    ignore_index: int = -100,
    chunk_size: int = 64,
    vocab_size: int | None = None,
    sft_weight: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(chunked_generalized_jsd_loss(...), F.cross_entropy(student_logits[..., :vocab_size],
    sft_labels)) in one pass, the cross-entropy's gradient written into the divergence's buffer (no
    autograd graph through a log-softmax of the logits). As fused_generalized_jsd_and_cross_entropy:
    the cross-entropy has no temperature, is summed ("sum") or averaged over its own positions
    ("batchmean"), its positions must be counted in labels too, and sft_weight is the weight the
    caller's loss gives it (other weights cost backward a second pass)."""
    if reduction == "none":
        raise ValueError("reduction 'none' is not supported with the cross-entropy; use 'sum' or 'batchmean'")
    return _chunked(student_logits, teacher_logits, labels, sft_labels, beta, temperature, reduction, ignore_index,
                    chunk_size, vocab_size, sft_weight)


def _chunked(student_logits, teacher_logits, labels, sft_labels, beta, temperature, reduction, ignore_index,
             chunk_size, vocab_size, sft_weight):
    vocab = check_same_positions(student_logits.shape, teacher_logits.shape, vocab_size)
    beta, temperature = check_options(beta, temperature, reduction)
    chunk_size = check_chunk_size(chunk_size)
    positions = student_logits.shape[:-1]
    rows = counted_rows(labels, positions, ignore_index, student_logits.device)
    sft_targets = sft_targets_of_rows(sft_labels, labels, rows, positions, ignore_index)
    # ctx.needs_input_grad ignores no_grad mode: tell forward whether a gradient can be asked for
    options = (beta, temperature, reduction, chunk_size, torch.is_grad_enabled(), vocab, float(sft_weight))
    return _ChunkedJSD.apply(student_logits, teacher_logits, rows, sft_targets, options)


class ChunkedLoss(LogitsLossImpl):
    """--loss_impl chunked: both models' full logits, compared chunk by chunk (no autograd graph
    through the divergence or the cross-entropy), the compared vocabulary read in place."""

    name = "chunked"

    def sums(self, student_logits, teacher_side, targets, sft_targets) -> LossSums:
        jsd, sft = chunked_generalized_jsd_and_cross_entropy(
            student_logits, teacher_side, targets, sft_targets, vocab_size=self.settings.vocab_size,
            sft_weight=self.settings.sft_alpha, **self._options(), **self._chunk())
        return LossSums(jsd, sft)
