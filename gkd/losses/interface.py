"""The one interface every loss implementation has: GKDTrainer hands it the models and a micro-batch,
and gets back the summed generalized JSD and the summed cross-entropy (sft_alpha's term).

Each implementation runs the models itself, because what it needs from them differs: the exact,
chunked and top-k ones read both models' logits, the fused one their last hidden states and LM heads.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar, NamedTuple

import torch
import torch.nn.functional as F

from gkd.losses.common import IGNORE_INDEX  # gkd.data.IGNORE_INDEX: the label of prompt and padding positions

if TYPE_CHECKING:
    from gkd.teachers.base import Teacher


@dataclass(frozen=True)
class LossSettings:
    beta: float
    temperature: float  # the loss temperature (--loss_temperature); the cross-entropy uses none
    vocab_size: int  # the compared vocabulary: each model's first vocab_size logits (the rest is padding)
    chunk_size: int | None = None  # rows per chunk (chunked, fused); None: the functions' defaults
    topk: int | None = None  # --gkd_logits_topk
    topk_tail: bool = False  # --gkd_logits_topk_tail
    # --sft_alpha: the trainer's loss is jsd + sft_alpha * sft. The fused and chunked implementations
    # build the gradient of that sum in their forward pass; any other combination costs a second pass.
    sft_alpha: float = 0.0


@dataclass
class LossBatch:
    """One micro-batch as the trainer built it (gkd.data.build_batch): labels are IGNORE_INDEX
    outside completions and not shifted; sft_rows marks the samples whose completion tokens also
    get the cross-entropy, per row (batch,) or per position (batch, seq) bool, or is None for no
    cross-entropy at all.

    Padding-free (gkd.packing): several rows concatenated into one sequence, attention_mask None and
    position_ids restarting at 0 at each row (the model then keeps the rows apart; use_cache must be
    off, or transformers does not look for packed rows); sft_rows is then per position.

    teacher_view: what the teacher reads when it differs from what the student reads (OPSD's privileged
    prompt): the same completions after other prompts, labelled the same way, so that the k-th counted
    position of one is the k-th of the other; None: the teacher reads the student's batch."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor | None
    labels: torch.Tensor
    sft_rows: torch.Tensor | None = None
    position_ids: torch.Tensor | None = None
    teacher_view: LossBatch | None = None
    teacher_tags: list[str | None] | None = None  # per row: which served teacher teaches it (--teacher_tag_key)
    pixel_inputs: dict | None = None  # vision-language rows: pixel_values and the like, for both models' forward

    def teacher_inputs(self, **extra) -> dict:
        """The teacher's forward arguments."""
        return (self.teacher_view or self).forward_kwargs(**extra)

    def as_student_positions(self, teacher_values: torch.Tensor) -> torch.Tensor:
        """The teacher's per-position values (batch, teacher positions, ...) moved to the student's positions:
        each counted completion position takes the teacher's value at the same completion token; positions
        the loss does not count hold zeros. Without a teacher_view, the values as they are."""
        if self.teacher_view is None:
            return teacher_values
        rows = self.targets().reshape(-1).ne(IGNORE_INDEX).nonzero().squeeze(1)
        teacher_rows = self.teacher_view.targets().reshape(-1).ne(IGNORE_INDEX).nonzero().squeeze(1)
        if rows.numel() != teacher_rows.numel():
            raise ValueError(f"the teacher's view counts {teacher_rows.numel()} positions, the student's "
                             f"{rows.numel()}: both must label the same completion tokens")
        flat = teacher_values.reshape(-1, *teacher_values.shape[2:])
        moved = flat.new_zeros((self.labels.numel(), *teacher_values.shape[2:]))
        moved[rows.to(moved.device)] = flat[teacher_rows.to(flat.device)]
        return moved.reshape(*self.labels.shape, *teacher_values.shape[2:])

    def forward_kwargs(self, **extra) -> dict:
        inputs = {"input_ids": self.input_ids, "use_cache": False, **(self.pixel_inputs or {}), **extra}
        if self.attention_mask is not None:
            inputs["attention_mask"] = self.attention_mask
        if self.position_ids is not None:
            inputs["position_ids"] = self.position_ids
        return inputs

    def targets(self) -> torch.Tensor:
        """What position t's logits predict: labels[:, t + 1], and IGNORE_INDEX at the last position
        and, in a packed sequence, at each row's last position (the next token opens another row).

        The labels move, not the logits: logits[:, :-1] is not contiguous, and flattening it copies
        the logits once more."""
        targets = F.pad(self.labels[:, 1:], (0, 1), value=IGNORE_INDEX)
        if self.position_ids is not None:
            row_ends = F.pad(self.position_ids[:, 1:] == 0, (0, 1), value=True).to(targets.device)
            targets = targets.masked_fill(row_ends, IGNORE_INDEX)
        return targets

    def sft_targets(self) -> torch.Tensor | None:
        """targets() at the cross-entropy's positions, IGNORE_INDEX elsewhere; None without any."""
        if self.sft_rows is None:
            return None
        rows = self.sft_rows.to(self.labels.device)
        return self.targets().masked_fill(~(rows if rows.dim() == 2 else rows[:, None]), IGNORE_INDEX)


class LossSums(NamedTuple):
    jsd: torch.Tensor  # summed over the counted positions
    sft: torch.Tensor  # summed over the cross-entropy's positions (0 without any)


class LossImpl:
    """A loss implementation: settings in, then called once per micro-batch."""

    name: ClassVar[str]

    def __init__(self, settings: LossSettings):
        self.settings = settings

    def __call__(self, student, teacher: Teacher, batch: LossBatch, student_module=None) -> LossSums:
        """student: the model to call (possibly wrapped by DDP or DeepSpeed, whose forward must run);
        student_module: the model inside any such wrapper (default: student), for its LM head and
        decoder; teacher: a gkd.teachers.Teacher, whose model runs (under no_grad, inside
        teacher.running()) on the device the loss runs on. Forwards run in the caller's grad mode and
        autocast."""
        raise NotImplementedError

    def _options(self) -> dict:
        return {"beta": self.settings.beta, "temperature": self.settings.temperature, "reduction": "sum"}

    def _chunk(self) -> dict:
        return {} if self.settings.chunk_size is None else {"chunk_size": self.settings.chunk_size}


class LogitsLossImpl(LossImpl):
    """Shared by the implementations that compare logits: both forwards, then the cross-entropy
    at the SFT positions only."""

    def __call__(self, student, teacher, batch: LossBatch, student_module=None) -> LossSums:
        student_logits = student(**batch.forward_kwargs()).logits
        teacher_side = self.teacher_side(teacher.logits(batch))
        return self.sums(student_logits, teacher_side, batch.targets(), batch.sft_targets())

    def sums(self, student_logits, teacher_side, targets, sft_targets) -> LossSums:
        """The divergence, then the cross-entropy of the SFT positions' logits (autograd)."""
        jsd = self.divergence(student_logits, teacher_side, targets)
        return LossSums(jsd, sft_sum_of_logits(student_logits, sft_targets, self.settings.vocab_size, jsd))

    def teacher_side(self, teacher_logits):
        """What the divergence needs of the teacher's logits, taken right after its forward, so that the
        full logits can go before the divergence runs."""
        return teacher_logits

    def divergence(self, student_logits, teacher_side, targets) -> torch.Tensor:
        """Summed divergence of (batch, seq, V') logits (V' >= vocab_size) at targets != IGNORE_INDEX."""
        raise NotImplementedError


def flat_vocab(logits: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """(batch, seq, V') -> (batch * seq, vocab_size), a view of contiguous logits (no copy)."""
    return logits.flatten(0, -2)[:, :vocab_size]


def sft_sum_of_logits(logits, sft_targets, vocab_size: int, like: torch.Tensor) -> torch.Tensor:
    """Summed cross-entropy (float32) of the student's logits at the positions sft_targets marks:
    only those rows are gathered and upcast, not the whole logits tensor."""
    if sft_targets is None:
        return like.new_zeros(())
    rows = (sft_targets.reshape(-1) != IGNORE_INDEX).nonzero().squeeze(1)
    picked = flat_vocab(logits, vocab_size).index_select(0, rows)
    return F.cross_entropy(picked.float(), sft_targets.reshape(-1).index_select(0, rows), reduction="sum")
