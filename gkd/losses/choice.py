"""Which loss implementation runs: decided here, once, before training starts."""

from __future__ import annotations

import logging

from gkd.errors import GKDUserError
from gkd.losses.chunked import ChunkedLoss
from gkd.losses.exact import ExactLoss
from gkd.losses.fused import FusedLoss
from gkd.losses.heads import lm_head_of, probe_head
from gkd.losses.interface import LossImpl, LossSettings
from gkd.losses.topk import TopKLoss

logger = logging.getLogger("gkd")

IMPLEMENTATIONS: dict[str, type[LossImpl]] = {impl.name: impl for impl in (ExactLoss, ChunkedLoss, FusedLoss, TopKLoss)}


def make_loss(name: str, settings: LossSettings) -> LossImpl:
    return IMPLEMENTATIONS[name](settings)


def why_not_fusable(model, vocab_size: int | None = None) -> str | None:
    """None when the loss can be fused with the model's LM head, else the reason it cannot: decided
    by evaluating the model (heads.probe_head), on the device its weights are on. vocab_size: the
    compared vocabulary (default: the head's rows)."""
    head = lm_head_of(model)
    if vocab_size is None:
        vocab_size = getattr(head, "out_features", None) or getattr(model.config, "vocab_size", None)
    return probe_head(model, vocab_size)


def choose_loss_impl(requested: str | None, topk: int | None, student, teacher, vocab_size: int | None = None,
                     replicas: int = 1, sharded: str | None = None) -> str:
    """The implementation to run, logged with the reason. topk: --gkd_logits_topk (then top-k);
    requested: --loss_impl (None: fused where both models allow it, else chunked). A requested
    fused loss that a model does not allow is refused, in one line. replicas: the student's copies in
    this process (torch DataParallel over several GPUs), whose decoders each see a slice of the batch,
    so no one final hidden state covers it: the fused loss needs one. sharded: why the student's LM head
    weight is not whole outside its forward (ZeRO-3, FSDP), which the fused loss reads; None when it is."""
    if topk is not None:
        impl, why = "topk", f"--gkd_logits_topk {topk}"
    elif requested in ("exact", "chunked"):
        impl, why = requested, f"--loss_impl {requested}"
    else:
        reason = sharded
        if replicas > 1:
            reason = (f"single-process training over {replicas} GPUs (DataParallel) splits the batch between "
                      "replicas of the student; run one process per GPU (torchrun) for the fused loss")
        reason = reason or why_not_fusable(student, vocab_size)
        if reason is None and teacher is not student:
            reason = why_not_fusable(teacher, vocab_size)
        if requested == "fused" and reason:
            raise GKDUserError(f"--loss_impl fused: {reason}; use --loss_impl chunked")
        impl = "chunked" if reason else "fused"
        why = reason or "both models' logits are their LM head applied to their last hidden state (probed)"
        if requested == "fused":
            why = f"--loss_impl fused; {why}"
    logger.info("loss implementation: %s (%s)", impl, why)
    return impl
