"""What every teacher kind gives GKDTrainer, so that the trainer never asks where the teacher runs."""

import contextlib

import torch

from gkd.losses.interface import flat_vocab
from gkd.losses.topk import teacher_topk
from gkd.sampling.transformers_engine import TransformersEngine
from gkd.sharding.base import ModelSharding, Replicated


class Teacher:
    """model: what the loss implementations and the seq_kd generation engine call, always under no_grad
    and inside running(); sharding: how its weights are spread over the processes (its generation is
    entered by every process together when sharded). This base is a whole model in this process, as
    it is given: what the loss functions' own tests and benchmarks hand them."""

    def __init__(self, model: torch.nn.Module, sharding: ModelSharding | None = None):
        self.model, self.sharding = model, sharding or Replicated()

    def logits(self, batch) -> torch.Tensor:
        """Its logits at the student's positions of a LossBatch (the teacher reads its own view, if any)."""
        with torch.no_grad(), self.running():
            return batch.as_student_positions(self.model(**batch.teacher_inputs()).logits)

    def top_k_request(self, batch, topk: int, temperature: float, vocab_size: int):
        """Its top-k tokens at every position of the student's batch (LossBatch), flattened: what
        --gkd_logits_topk's loss compares. Asked for before the student's forward, it returns the function
        that gives them, called after: a model's forward runs then (its logits shrink to the top k right
        after, so the full logits can go); a teacher that answers elsewhere (served) starts at once."""
        return lambda: teacher_topk(flat_vocab(self.logits(batch), vocab_size), topk, temperature)

    def sampling_engine(self, pad_token_id: int, unwrap, processor=None):
        """What writes its seq_kd completions: the default engine on its model (unwrap: the accelerator's,
        for a prepared model), sharded as it is, reading the prompts' images through the processor of a
        vision-language model; None for a teacher that writes none."""
        return TransformersEngine(unwrap(self.model), pad_token_id, sharding=self.sharding, processor=processor)

    def running(self):
        """What must hold while the teacher runs (a forward, a generation, the loss probe)."""
        return contextlib.nullcontext()

    def load(self) -> None:
        """Bring the weights to the device for this optimizer step's forwards (a no-op while there)."""

    def offload(self) -> None:
        """The step's forwards are done: release what load() brought, before the optimizer needs room."""
