"""The generalized JSD restricted to the teacher's top-K tokens (ms-swift's --gkd_logits_topk)."""

from __future__ import annotations

import math
from typing import NamedTuple

import torch

from gkd.losses.common import (
    check_chunk_size, check_options, check_same_positions, check_temperature, compute_dtype, counted_rows, reduce,
)
from gkd.losses.exact import generalized_jsd_loss
from gkd.losses.interface import LogitsLossImpl, flat_vocab


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
    temperature, chunk_size = check_temperature(temperature), check_chunk_size(chunk_size)
    k = int(k)
    dtype = compute_dtype(teacher_logits)
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
        check_same_positions(logits_shape, teacher.shape)
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
    beta, temperature = check_options(beta, temperature, reduction)
    positions, vocab = student_logits.shape[:-1], student_logits.shape[-1]
    rows = counted_rows(labels, positions, ignore_index, student_logits.device)
    log_p, ids, tail_p = _teacher_topk_rows(
        teacher_logits, student_logits.shape, topk, temperature, rows
    )
    flat = student_logits.reshape(-1, vocab)
    dtype = compute_dtype(flat, log_p)
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
    return reduce(per_pos, rows, positions, reduction)


class TopKLoss(LogitsLossImpl):
    """--gkd_logits_topk K: the teacher gives its top K per position (Teacher.top_k_request: a model's logits
    shrink to them right after its forward; a served teacher answers while the student's forward runs), never
    full logits."""

    name = "topk"

    def __call__(self, student, teacher, batch, student_module=None):
        settings = self.settings
        teacher_top_k = teacher.top_k_request(batch, settings.topk, settings.temperature, settings.vocab_size)
        student_logits = student(**batch.forward_kwargs()).logits
        return self.sums(student_logits, teacher_top_k(), batch.targets(), batch.sft_targets())

    def divergence(self, student_logits, teacher_side, targets):
        return topk_generalized_jsd_loss(flat_vocab(student_logits, self.settings.vocab_size), teacher_side,
                                         targets.reshape(-1), tail_bucket=self.settings.topk_tail, **self._options())
