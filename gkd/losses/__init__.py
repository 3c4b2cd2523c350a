"""GKD's loss: the generalized Jensen-Shannon divergence, in four implementations behind one interface.

exact.py    generalized_jsd_loss: the definition, written plainly (the reference); ExactLoss
chunked.py  chunked_generalized_jsd_loss (+ _and_cross_entropy): chunk by chunk, analytic gradient; ChunkedLoss
fused.py    fused_generalized_jsd_loss (+ _and_cross_entropy): fused with the LM heads; FusedLoss
topk.py     teacher_topk, topk_generalized_jsd_loss: the teacher's top K tokens; TopKLoss
common.py   argument checks, reductions, the per-row divergence and its gradient
interface.py  LossSettings, LossBatch, LossSums, LossImpl: what the trainer calls
heads.py    final hidden states by a decoder hook, LM heads, the probe behind the fused choice
choice.py   why_not_fusable, choose_loss_impl, make_loss
"""

from gkd.losses.choice import IMPLEMENTATIONS, choose_loss_impl, make_loss, why_not_fusable
from gkd.losses.chunked import chunked_generalized_jsd_and_cross_entropy, chunked_generalized_jsd_loss
from gkd.losses.exact import generalized_jsd_loss
from gkd.losses.fused import fused_generalized_jsd_and_cross_entropy, fused_generalized_jsd_loss
from gkd.losses.interface import LossBatch, LossImpl, LossSettings, LossSums
from gkd.losses.topk import TeacherTopK, teacher_topk, topk_generalized_jsd_loss

__all__ = [
    "IMPLEMENTATIONS", "LossBatch", "LossImpl", "LossSettings", "LossSums", "TeacherTopK", "choose_loss_impl",
    "chunked_generalized_jsd_and_cross_entropy", "chunked_generalized_jsd_loss", "fused_generalized_jsd_and_cross_entropy", "fused_generalized_jsd_loss",
    "generalized_jsd_loss", "make_loss", "teacher_topk", "topk_generalized_jsd_loss", "why_not_fusable",
]
