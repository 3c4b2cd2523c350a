"""Shared pieces of the loss implementations: argument checks, reductions, and the per-row divergence
with its analytic gradient that the chunked and fused implementations are built on."""

from __future__ import annotations

import contextlib
import math

import torch

REDUCTIONS = ("batchmean", "sum", "none")
IGNORE_INDEX = -100  # marks, in the targets of counted rows, the rows without cross-entropy

# Log-probabilities are clamped here: below log(smallest subnormal) in float32 (-103.3) and float64
# (-744.4), so exp() of it is still exactly 0, but finite, so that 0 * (log 0 - x) gives 0, not NaN.
LOG_FLOOR = -1.0e4


# ------------------------------------------------------------------------------ argument checks
def check_same_positions(student_shape: torch.Size, teacher_shape: torch.Size, vocab_size=None) -> int:
    """The compared vocabulary size: both inputs' last dimension (which must then be equal), or
    vocab_size, which both must reach. The positions (all other dimensions) must agree."""
    if len(student_shape) < 1 or student_shape[:-1] != teacher_shape[:-1] or (
        vocab_size is None and student_shape[-1] != teacher_shape[-1]
    ):
        raise ValueError(
            f"student_logits {tuple(student_shape)} and teacher_logits {tuple(teacher_shape)} "
            "must have the same shape, with a vocabulary dimension"
        )
    if vocab_size is None:
        return student_shape[-1]
    if int(vocab_size) != vocab_size or not 1 <= vocab_size <= min(student_shape[-1], teacher_shape[-1]):
        raise ValueError(
            f"vocab_size {vocab_size} must be an integer in [1, {min(student_shape[-1], teacher_shape[-1])}] "
            "(at most both logits' last dimension)"
        )
    return int(vocab_size)


def check_labels(labels: torch.Tensor, positions: torch.Size, name: str = "labels") -> None:
    if labels.shape != positions:
        raise ValueError(
            f"{name} {tuple(labels.shape)} must match the logits' shape without the vocabulary "
            f"dimension {tuple(positions)}"
        )


def check_temperature(temperature) -> float:
    temperature = float(temperature)
    if not temperature > 0.0 or math.isinf(temperature):
        raise ValueError(f"temperature must be a positive finite number, got {temperature}")
    return temperature


def check_options(beta, temperature, reduction) -> tuple[float, float]:
    beta = float(beta)
    if not 0.0 <= beta <= 1.0:
        raise ValueError(f"beta must be in [0, 1], got {beta}")
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {', '.join(REDUCTIONS)}, got {reduction!r}")
    return beta, check_temperature(temperature)


def check_chunk_size(chunk_size: int) -> int:
    if int(chunk_size) != chunk_size or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive integer, got {chunk_size}")
    return int(chunk_size)


# ------------------------------------------------------------------------------ rows and reductions
def compute_dtype(*tensors: torch.Tensor) -> torch.dtype:
    """float32 whatever the inputs, float64 if any input is float64 (as the exact loss)."""
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def counted_rows(labels, positions: torch.Size, ignore_index: int, device) -> torch.Tensor:
    """Flat indices (ascending) of the positions that count: label != ignore_index, or all."""
    if labels is None:
        return torch.arange(math.prod(positions), device=device)
    check_labels(labels, positions)
    return (labels.reshape(-1) != ignore_index).nonzero().squeeze(1).to(device)


_RECORDS: list[list] = []  # the open recording_divergences() blocks, innermost last


@contextlib.contextmanager
def recording_divergences():
    """Inside the block, every reduced divergence (sum or batchmean: the trainer's) also appends
    (per-position values, their flat position indices), detached, to the list it yields: the values
    the loss summed anyway, for per-sample losses at no extra cost (--log_completions)."""
    record: list = []
    _RECORDS.append(record)
    try:
        yield record
    finally:
        _RECORDS.remove(record)


def recording() -> bool:
    return bool(_RECORDS)


def record_divergences(per_pos: torch.Tensor, rows: torch.Tensor, reduction: str) -> None:
    if _RECORDS and reduction != "none":
        _RECORDS[-1].append((per_pos.detach(), rows))


def reduce(per_pos: torch.Tensor, rows: torch.Tensor, positions: torch.Size, reduction: str):
    """Reduce the divergences of the counted rows as generalized_jsd_loss does."""
    record_divergences(per_pos, rows, reduction)
    if reduction == "none":
        full = per_pos.new_zeros(math.prod(positions))
        return full.index_copy_(0, rows, per_pos).reshape(positions)
    total = per_pos.sum()
    return total if reduction == "sum" else total / max(per_pos.numel(), 1)


def grad_scale(beta: float, temperature: float, reduction: str, count: int) -> float:
    """The constant that turns jsd_rows' gradients into d(loss)/d(logits).

    (1 - beta) in the interior (see jsd_rows), 1 / temperature for u = logits / temperature,
    1 / count for batchmean.
    """
    scale = (1.0 - beta if 0.0 < beta < 1.0 else 1.0) / temperature
    return scale / max(count, 1) if reduction == "batchmean" else scale


def pop_scaled(ctx, factor) -> list:
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


# ------------------------------------------------------------------------------ the divergence of rows
def log_softmax_(x: torch.Tensor, probs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
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


class Workspace:
    """The (rows, V) buffers one chunk needs, allocated once per loss call and reused by every
    chunk: on CPU the page faults of fresh allocations cost more than the arithmetic in them."""

    def __init__(self, rows: int, vocab: int, dtype, device, beta: float, extra: int = 0):
        # student and teacher logits, q, p, and log m (interior) or a mask of zeros (endpoints),
        # then `extra` buffers for the caller (the fused cross-entropy's rows)
        interior = 0.0 < beta < 1.0
        count = (5 if interior else 4) + extra
        self.floats = torch.empty(count, rows, vocab, dtype=dtype, device=device)
        self.extra = extra
        self.mask = None if interior else torch.empty(rows, vocab, dtype=torch.bool, device=device)

    def take(self, n: int):
        """Buffers for a chunk of n rows: student, teacher, the spare ones of jsd_rows, and the
        caller's extra ones."""
        buffers = [buffer[:n] for buffer in self.floats]
        extra = buffers[len(buffers) - self.extra:] if self.extra else []
        s, t, q, p, *log_m = buffers[: len(buffers) - self.extra]
        return s, t, (q, p, log_m[0] if self.mask is None else self.mask[:n]), extra


def jsd_rows(s: torch.Tensor, t: torch.Tensor, beta: float, want_grad: bool, spare):
    """Divergence per row and, if want_grad, its gradient w.r.t. u = s (else None).

    s, t: (rows, V) student and teacher logits already divided by the temperature, in the compute
    dtype; both are overwritten, and so are the buffers in spare (see Workspace.take); the
    gradient is returned in s's buffer. With q = softmax(s), p = softmax(t):

      beta == 0:  L = KL(P||Q) = sum_j p_j (log p_j - log q_j),   dL/du = q - p
      beta == 1:  L = KL(Q||P) = sum_j q_j f_j, f = log q - log p,  dL/du_j = q_j (f_j - L)
      otherwise:  M = beta P + (1-beta) Q, L = beta KL(P||M) + (1-beta) KL(Q||M), d = log q - log m,
                  dL/du_j = (1-beta) q_j (d_j - sum_i q_i d_i)

    For the interior, dm_j/dq_j = 1-beta gives dL/dq_j = (1-beta) (d_j + 1) - (1-beta) (beta p_j +
    (1-beta) q_j) / m_j = (1-beta) d_j; in all three cases the softmax Jacobian
    dq_i/du_j = q_i (delta_ij - q_j) turns g = dL/dq into q * (g - <q, g>). Terms with a zero
    probability count as 0 (0 log 0 = 0), as in the exact loss. In the interior the returned
    gradient omits the factor (1 - beta), which grad_scale applies once to the whole gradient.
    """
    q_buffer, p_buffer, extra = spare  # extra: a float buffer (interior) or a bool one (endpoints)
    log_q, q = log_softmax_(s, q_buffer)
    log_p, p = log_softmax_(t, p_buffer)
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
    log_q.clamp_min_(LOG_FLOOR)
    log_p.clamp_min_(LOG_FLOOR)
    # m = beta p + (1-beta) q, floored at the smallest normal number: it is 0 only where p = q = 0,
    # or where beta * p underflows; those terms are (numerically) 0 anyway, and log m stays finite.
    log_m = torch.lerp(q, p, beta, out=extra).clamp_min_(torch.finfo(q.dtype).tiny).log_()
    kl_pm = log_p.sub_(log_m).mul_(p).sum(-1)
    qd = log_q.sub_(log_m).mul_(q)
    kl_qm = qd.sum(-1)
    loss = beta * kl_pm + (1.0 - beta) * kl_qm
    return loss, (qd.addcmul_(q, kl_qm.unsqueeze(1), value=-1.0) if want_grad else None)


# ------------------------------------------------------------------------------ the cross-entropy of rows
def sft_targets_of_rows(sft_labels, labels, rows, positions: torch.Size, ignore_index: int):
    """The cross-entropy's target at each counted row (IGNORE_INDEX where it counts none), or None.
    Its positions must be a subset of the divergence's."""
    if sft_labels is None:
        return None
    check_labels(sft_labels, positions, "sft_labels")
    sft = sft_labels.reshape(-1) != ignore_index
    if labels is not None and bool((sft & (labels.reshape(-1) == ignore_index)).any()):
        raise ValueError("sft_labels count positions that labels do not: they must be a subset")
    targets = sft_labels.reshape(-1).to(rows.device).index_select(0, rows)
    return targets.masked_fill(targets == ignore_index, IGNORE_INDEX)


def sft_chunks(sft_targets: torch.Tensor, starts: range) -> tuple[torch.Tensor, list[int]]:
    """The counted rows with a cross-entropy target, and where each chunk's begin among them (one
    device sync for all chunks)."""
    sft_rows = (sft_targets != IGNORE_INDEX).nonzero().squeeze(1)
    edges = torch.tensor([*starts, starts.stop], device=sft_targets.device)
    return sft_rows, torch.searchsorted(sft_rows, edges).tolist()


def cross_entropy_rows_(z: torch.Tensor, targets: torch.Tensor, want_grad: bool) -> torch.Tensor:
    """Summed cross-entropy of logits z (rows, V) at targets; z is overwritten, with
    d(CE)/dz = softmax(z) - onehot(targets) if want_grad."""
    z.sub_(z.amax(-1, keepdim=True))
    picked = z.gather(1, targets.unsqueeze(1))
    total = z.exp_().sum(-1, keepdim=True)
    loss = (total.log() - picked).sum()
    if want_grad:
        z.div_(total).scatter_add_(1, targets.unsqueeze(1), torch.full_like(picked, -1.0))
    return loss


def incoming_ratio_is(grad_ce: torch.Tensor, grad_jsd: torch.Tensor, ratio: float) -> bool:
    """Whether backward got the gradients forward prepared for: grad_ce == ratio * grad_jsd (the
    caller's loss is jsd + ratio * ce)."""
    return bool(torch.allclose(grad_ce, grad_jsd * ratio, rtol=1e-6, atol=0.0))
