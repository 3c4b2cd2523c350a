"""The generalized JSD fused with both models' LM heads: logits exist a chunk of positions at a time,
never whole, and so does the student's cross-entropy (sft_alpha's term) at the positions it counts."""

from __future__ import annotations

from typing import NamedTuple

import torch

from gkd.losses.common import (
    Workspace, check_chunk_size, check_options, compute_dtype, counted_rows, cross_entropy_rows_, grad_scale,
    incoming_ratio_is, jsd_rows, pop_scaled, reduce, sft_chunks, sft_targets_of_rows,
)
from gkd.losses.heads import last_hidden_state, lm_head_of
from gkd.losses.interface import IGNORE_INDEX, LossImpl, LossSums


def gemm_dtype(hidden: torch.Tensor, weight: torch.Tensor) -> torch.dtype:
    """The dtype an LM head's matmuls run in: autocast's, where autocast is on for the inputs'
    device (as the model's own head would run under it; float64 is never cast), else the inputs'
    common dtype."""
    device = hidden.device.type
    if torch.float64 not in (hidden.dtype, weight.dtype) and torch.is_autocast_enabled(device):
        return torch.get_autocast_dtype(device)
    return torch.promote_types(hidden.dtype, weight.dtype)


def _project(hidden_rows, weight, bias, out: torch.Tensor) -> torch.Tensor:
    """out = hidden_rows @ weight.T + bias: a GEMM in the (common) dtype of the three, written into
    out, a buffer of the compute dtype."""
    if hidden_rows.dtype == out.dtype:
        return torch.mm(hidden_rows, weight.t(), out=out) if bias is None else \
            torch.addmm(bias, hidden_rows, weight.t(), out=out)
    return out.copy_(torch.nn.functional.linear(hidden_rows, weight, bias))


def _fused_pass(student, teacher, rows, beta, temperature, chunk_size, want, jsd_weights=None, sft=None):
    """Divergence per counted row, the summed cross-entropy (sft), and the gradients w.r.t. the
    student's (hidden, weight, bias) that the booleans in want ask for (None for the others).

    student, teacher: (hidden (N, H), weight (V, H), bias (V,) or None), weight and bias already
    in the dtype the GEMMs run in (gemm_dtype). Logits are made for chunk_size rows at a time and
    dropped after use: projected in that dtype, compared in float32 (float64 for float64 inputs).
    With G = dL/d(logits) for a chunk and logits = h W^T + b: dL/dh = G W and dL/dW = G^T h, GEMMs
    in that dtype again, dL/db = sum over rows of G; the weight and bias gradients accumulate over
    chunks in float32.

    jsd_weights: None leaves the divergence's gradient without the constant grad_scale (the caller
    applies it once); else (per counted row, scale included) each row's gradient is weighted, as
    reduction "none" needs. sft: None, or (targets, weight): targets per counted row (IGNORE_INDEX
    where no cross-entropy counts), and the weight of d(CE)/d(logits) = softmax(logits) - onehot
    (no temperature) added to those rows' gradient.
    """
    hidden, weight, bias = student
    t_hidden, t_weight, t_bias = teacher
    mm, dtype = weight.dtype, compute_dtype(hidden, weight, t_hidden, t_weight)
    grad_h = torch.zeros_like(hidden) if want[0] else None
    grad_w = torch.zeros(weight.shape, dtype=dtype, device=weight.device) if want[1] else None
    grad_b = torch.zeros(bias.shape, dtype=dtype, device=bias.device) if want[2] and bias is not None else None
    per_pos = hidden.new_empty(rows.numel(), dtype=dtype)
    ce_sum = hidden.new_zeros((), dtype=dtype)
    work = Workspace(min(chunk_size, rows.numel()), weight.shape[0], dtype, hidden.device, beta,
                     extra=0 if sft is None else 1)
    starts = range(0, rows.numel(), chunk_size)
    if sft is not None:
        sft_targets, sft_weight = sft
        sft_rows, bounds = sft_chunks(sft_targets, starts)
    for chunk, start in enumerate(starts):
        idx = rows[start : start + chunk_size]
        h = hidden.index_select(0, idx).to(mm)
        s, t, spare, extra = work.take(idx.numel())
        _project(h, weight, bias, s)
        _project(t_hidden.index_select(0, idx).to(t_weight.dtype), t_weight, t_bias, t)
        local = None
        if sft is not None and bounds[chunk] < bounds[chunk + 1]:
            local = sft_rows[bounds[chunk] : bounds[chunk + 1]]
            z = torch.index_select(s, 0, local - start, out=extra[0][: local.numel()])
            ce_sum += cross_entropy_rows_(z, sft_targets.index_select(0, local), any(want))
        if temperature != 1.0:
            s.div_(temperature)
            t.div_(temperature)
        loss, g = jsd_rows(s, t, beta, any(want), spare)
        per_pos[start : start + idx.numel()] = loss
        if g is None:
            continue
        if jsd_weights is not None:
            g.mul_(jsd_weights[start : start + idx.numel()].unsqueeze(1))
        if local is not None:
            g.index_add_(0, local - start, z, alpha=sft_weight)
        g_mm = g.to(mm)
        if grad_h is not None:
            grad_h.index_copy_(0, idx, (g_mm @ weight).to(grad_h.dtype))
        if grad_w is not None:
            if mm == dtype:
                grad_w.addmm_(g_mm.t(), h)
            else:  # one low-precision GEMM per chunk (e.g. bf16 tensor cores), summed in float32
                grad_w += g_mm.t() @ h
        if grad_b is not None:
            grad_b += g.sum(0)
    return per_pos, ce_sum, [grad_h, grad_w, grad_b]


class _Options(NamedTuple):
    beta: float
    temperature: float
    reduction: str
    chunk_size: int
    grad_enabled: bool
    sft_alpha: float  # the expected ratio of the cross-entropy's incoming gradient to the divergence's


class _FusedJSD(torch.autograd.Function):
    """Outputs (divergence, cross-entropy). sum / batchmean: forward accumulates the student's
    gradient of divergence + sft_alpha * cross-entropy, backward scales it (or, if the incoming
    gradients are in another ratio, makes a second pass with theirs). none: the weight gradient
    needs each position's incoming gradient, known only in backward, so forward computes the loss
    alone and backward makes a second, weighted pass. The GEMMs run in autocast's dtype where
    autocast is on, as they would inside the model; everything else in float32, autocast or not."""

    @staticmethod
    def forward(ctx, s_hidden, s_weight, s_bias, t_hidden, t_weight, t_bias, rows, sft_targets, options):
        beta, temperature, reduction, chunk_size, grad_enabled, sft_alpha = options
        ctx.device_type = s_hidden.device.type
        ctx.gemm = (gemm_dtype(s_hidden, s_weight), gemm_dtype(t_hidden, t_weight))
        ctx.grad_meta = (s_hidden.shape, s_weight.dtype, None if s_bias is None else s_bias.dtype)
        ctx.options = options
        ctx.jsd_scale = grad_scale(beta, temperature, reduction, rows.numel())
        sft_count = 0 if sft_targets is None else int((sft_targets != IGNORE_INDEX).sum())
        ctx.ce_scale = 1.0 / max(sft_count, 1) if reduction == "batchmean" else 1.0
        ctx.has_sft = sft_count > 0
        ctx.per_position = reduction == "none"
        want = tuple(grad_enabled and needed for needed in ctx.needs_input_grad[:3])
        if ctx.per_position or (ctx.has_sft and any(want)):  # for the second pass, if one is needed
            ctx.save_for_backward(s_hidden, s_weight, s_bias, t_hidden, t_weight, t_bias, rows, sft_targets)
        if ctx.per_position:
            want = (False, False, False)
        sft = (sft_targets, sft_alpha * ctx.ce_scale / ctx.jsd_scale) if ctx.has_sft else None
        with torch.autocast(ctx.device_type, enabled=False):  # every cast below is explicit
            per_pos, ce_sum, ctx.grads = _fused_pass(
                *_FusedJSD._sides(ctx, s_hidden, s_weight, s_bias, t_hidden, t_weight, t_bias),
                rows, beta, temperature, chunk_size, want, sft=sft,
            )
        ce = ce_sum * ctx.ce_scale
        if not ctx.has_sft:
            ctx.mark_non_differentiable(ce)
        return reduce(per_pos, rows, s_hidden.shape[:-1], reduction), ce

    @staticmethod
    def _sides(ctx, s_hidden, s_weight, s_bias, t_hidden, t_weight, t_bias):
        """Both models' (hidden (N, H), weight, bias), the heads cast once to their GEMM dtype."""
        sides = []
        for (hidden, weight, bias), mm in zip(((s_hidden, s_weight, s_bias), (t_hidden, t_weight, t_bias)), ctx.gemm):
            sides.append((hidden.reshape(-1, hidden.shape[-1]), weight.to(mm), None if bias is None else bias.to(mm)))
        return sides

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_jsd, grad_ce):
        beta, temperature, reduction, chunk_size, _, sft_alpha = ctx.options
        expected = not ctx.has_sft or incoming_ratio_is(grad_ce, grad_jsd, sft_alpha)
        if not ctx.per_position and expected:
            grad_h, grad_w, grad_b = pop_scaled(ctx, grad_jsd * ctx.jsd_scale)
        else:
            s_hidden, s_weight, s_bias, t_hidden, t_weight, t_bias, rows, sft_targets = ctx.saved_tensors
            if ctx.per_position:
                weights = grad_jsd.reshape(-1).index_select(0, rows) * ctx.jsd_scale
            else:
                weights = (grad_jsd * ctx.jsd_scale).expand(rows.numel())
            sft = (sft_targets, float(grad_ce) * ctx.ce_scale) if ctx.has_sft else None
            with torch.autocast(ctx.device_type, enabled=False):
                _, _, (grad_h, grad_w, grad_b) = _fused_pass(
                    *_FusedJSD._sides(ctx, s_hidden, s_weight, s_bias, t_hidden, t_weight, t_bias),
                    rows, beta, temperature, chunk_size, ctx.needs_input_grad[:3], jsd_weights=weights, sft=sft,
                )
        hidden_shape, weight_dtype, bias_dtype = ctx.grad_meta
        return (
            None if grad_h is None else grad_h.view(hidden_shape),
            None if grad_w is None else grad_w.to(weight_dtype),
            None if grad_b is None else grad_b.to(bias_dtype),
            *[None] * 6,
        )


def _check_heads(student_hidden, student_weight, student_bias, teacher_hidden, teacher_weight, teacher_bias):
    for name, hidden, weight, bias in (
        ("student", student_hidden, student_weight, student_bias),
        ("teacher", teacher_hidden, teacher_weight, teacher_bias),
    ):
        if weight.dim() != 2 or hidden.dim() < 1 or hidden.shape[-1] != weight.shape[1]:
            raise ValueError(
                f"{name} hidden states {tuple(hidden.shape)} and LM head weight "
                f"{tuple(weight.shape)} must be (..., H) and (V, H)"
            )
        if bias is not None and bias.shape != weight.shape[:1]:
            raise ValueError(f"{name} LM head bias {tuple(bias.shape)} must be ({weight.shape[0]},)")
    if student_weight.shape[0] != teacher_weight.shape[0]:
        raise ValueError(
            f"student and teacher vocabularies differ ({student_weight.shape[0]} vs "
            f"{teacher_weight.shape[0]}): slice padding rows off the LM heads"
        )
    if student_hidden.shape[:-1] != teacher_hidden.shape[:-1]:
        raise ValueError(
            f"student_hidden {tuple(student_hidden.shape)} and teacher_hidden "
            f"{tuple(teacher_hidden.shape)} must cover the same positions"
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

    chunk_size counted positions at a time are projected, compared, and their gradient is pushed
    through the projection at once (see _fused_pass): the extra memory is the student weight
    gradient (V x H_s, accumulated in float32 and cast to the weight's dtype at the end) plus a few
    (chunk_size, V) float32 temporaries. Precision: the projections and the gradient's GEMMs run in
    autocast's dtype where autocast is on for the inputs' device (each head is cast to it once per
    call), else in the inputs' dtype; softmax, divergence and the accumulation of the weight and
    bias gradients in float32 (float64 for float64 inputs). Gradients flow into student_hidden, the
    student weight and bias only; the teacher's inputs are constants (the trainer runs the teacher
    under no_grad). Cannot be differentiated twice. reduction "none" costs a second pass in
    backward (the weight gradient needs each position's incoming gradient, known only then).
    """
    jsd, _ = _fused(student_hidden, student_lm_head_weight, teacher_hidden, teacher_lm_head_weight, labels, None,
                    beta, temperature, reduction, ignore_index, chunk_size, student_lm_head_bias,
                    teacher_lm_head_bias, 0.0)
    return jsd


def fused_generalized_jsd_and_cross_entropy(
    student_hidden: torch.Tensor,
    student_lm_head_weight: torch.Tensor,
    teacher_hidden: torch.Tensor,
    teacher_lm_head_weight: torch.Tensor,
    labels: torch.Tensor | None = None,
    sft_labels: torch.Tensor | None = None,
    beta: float = 0.5,
    temperature: float = 1.0,
    reduction: str = "sum",
    ignore_index: int = -100,
    chunk_size: int = 32,
    student_lm_head_bias: torch.Tensor | None = None,
    teacher_lm_head_bias: torch.Tensor | None = None,
    sft_weight: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(fused_generalized_jsd_loss(...), the student's cross-entropy at sft_labels) in one pass.

    The cross-entropy is F.cross_entropy(student_hidden @ W_s.T + b_s, sft_labels,
    ignore_index=ignore_index) at the loss's chunks (no temperature; summed for "sum", averaged
    over its own counted positions for "batchmean"; "none" is not supported), computed from the
    chunk's logits that the divergence projects anyway, so no full logits exist for it either.
    Its counted positions must be counted in labels too (the trainer's: completion tokens of the
    samples the student did not write). sft_labels None: the cross-entropy is a constant 0.

    sft_weight: the weight the caller's loss gives the cross-entropy (jsd + sft_weight * ce; the
    trainer's sft_alpha). Forward then accumulates that sum's gradient once; a backward with
    incoming gradients in another ratio is still exact, at the cost of a second pass.
    """
    if reduction == "none":
        raise ValueError("reduction 'none' is not supported with the cross-entropy; use 'sum' or 'batchmean'")
    return _fused(student_hidden, student_lm_head_weight, teacher_hidden, teacher_lm_head_weight, labels, sft_labels,
                  beta, temperature, reduction, ignore_index, chunk_size, student_lm_head_bias, teacher_lm_head_bias,
                  sft_weight)


def _fused(s_hidden, s_weight, t_hidden, t_weight, labels, sft_labels, beta, temperature, reduction, ignore_index,
           chunk_size, s_bias, t_bias, sft_weight):
    _check_heads(s_hidden, s_weight, s_bias, t_hidden, t_weight, t_bias)
    beta, temperature = check_options(beta, temperature, reduction)
    chunk_size = check_chunk_size(chunk_size)
    positions = s_hidden.shape[:-1]
    rows = counted_rows(labels, positions, ignore_index, s_hidden.device)
    sft_targets = sft_targets_of_rows(sft_labels, labels, rows, positions, ignore_index)
    options = _Options(beta, temperature, reduction, chunk_size, torch.is_grad_enabled(), float(sft_weight))
    return _FusedJSD.apply(s_hidden, s_weight, s_bias, t_hidden, t_weight, t_bias, rows, sft_targets, options)


class FusedLoss(LossImpl):
    """--loss_impl fused: both models run with logits_to_keep=1 (their own heads project one
    position), their final hidden states are read by a hook on their decoders (not
    output_hidden_states, which keeps every layer's), and the divergence and the cross-entropy
    are fused with the LM heads: neither model's full logits ever exist."""

    name = "fused"

    def __call__(self, student, teacher, batch, student_module=None) -> LossSums:
        student_module = student if student_module is None else student_module
        forward = batch.forward_kwargs(logits_to_keep=1)
        with last_hidden_state(student_module) as student_hidden:
            student(**forward)  # the wrapper's forward (DDP needs it called); the hook is inside
        with torch.no_grad(), teacher.running(), last_hidden_state(teacher.model) as teacher_hidden:
            teacher.model(**batch.teacher_inputs(logits_to_keep=1))
            teacher_head = lm_head_of(teacher.model)  # the head it ran with (its adapters off, for the student's base)
        teacher_states = batch.as_student_positions(teacher_hidden.value)
        vocab, settings = self.settings.vocab_size, self.settings
        student_head = lm_head_of(student_module)
        sft_targets = batch.sft_targets()
        jsd, sft = fused_generalized_jsd_and_cross_entropy(
            student_hidden.value, student_head.weight[:vocab], teacher_states, teacher_head.weight[:vocab],
            batch.targets(), sft_targets, **self._options(), **self._chunk(),
            student_lm_head_bias=None if student_head.bias is None else student_head.bias[:vocab],
            teacher_lm_head_bias=None if teacher_head.bias is None else teacher_head.bias[:vocab],
            sft_weight=settings.sft_alpha,
        )
        return LossSums(jsd, sft)
