"""What every teacher kind gives GKDTrainer, so that the trainer never asks where the teacher runs."""

import contextlib

import torch

from gkd.sharding.base import ModelSharding, Replicated


class Teacher:
    """model: what the loss implementations and the seq_kd generation engine call, always under no_grad
    and inside running(); sharding: how its weights are spread over the processes (its generation is
    entered by every process together when sharded). This base is a whole model in this process, as
    it is given: what the loss functions' own tests and benchmarks hand them."""

    def __init__(self, model: torch.nn.Module, sharding: ModelSharding | None = None):
        self.model, self.sharding = model, sharding or Replicated()

    def running(self):
        """What must hold while the teacher runs (a forward, a generation, the loss probe)."""
        return contextlib.nullcontext()

    def load(self) -> None:
        """Bring the weights to the device for this optimizer step's forwards (a no-op while there)."""

    def offload(self) -> None:
        """The step's forwards are done: release what load() brought, before the optimizer needs room."""
